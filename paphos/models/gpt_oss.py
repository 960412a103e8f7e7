"""gpt-oss (bf16 weights; the MXFP4 checkpoint format is the quantization issue's): attention
with sinks and biases, alternating sliding-window and full layers, yarn rope; every MLP a
mixture of experts with biases, routed by a biased router's softmax over its top-k logits, and
the clamped SwiGLU. Its expert tensors are stored stacked, transposed ([E, in, out]) and with
gate and up interleaved: loading reorders them into FusedMoE's [gate | up] rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from paphos.layers.moe import MoESpec
from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    NormSpec,
    decoder_spec,
    llama_like_layers,
    num_experts_of,
    with_moe,
)
from paphos.ops.moe import ExpertActivation, RouterSpec


class GptOssForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[dict[str, str]] = {".mlp.router.": ".mlp.gate."}
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        **DecoderForCausalLM.stacked_params,
        # the biases' names contain the weights': matched first
        ".mlp.experts.gate_up_proj_bias": (".mlp.w13_bias", ("gate_up", None)),
        ".mlp.experts.down_proj_bias": (".mlp.w2_bias", ("down", None)),
        ".mlp.experts.gate_up_proj": (".mlp.w13_weight", ("gate_up", None)),
        ".mlp.experts.down_proj": (".mlp.w2_weight", ("down", None)),
    }

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(hf_config.attention_bias)
        layers = llama_like_layers(hf_config, norm, qkv_bias=bias, o_bias=bias, sinks=True)
        router = RouterSpec(
            num_experts_of(hf_config), hf_config.num_experts_per_tok, scoring="softmax_topk"
        )
        activation = ExpertActivation("swiglu_oai", 1.702, float(hf_config.swiglu_limit))
        moe = MoESpec(
            router, hf_config.intermediate_size, activation, expert_bias=True, router_bias=True
        )
        return decoder_spec(hf_config, with_moe(layers, moe))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(_fused_moe_layout(weights))


def _fused_moe_layout(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """gate_up_proj [E, hidden, 2I] (gate, up interleaved) -> [E, 2I, hidden] = [gate | up] rows;
    its bias [E, 2I] likewise; down_proj [E, I, hidden] -> [E, hidden, I]."""
    for name, tensor in weights:
        if name.endswith(".mlp.experts.gate_up_proj_bias"):
            tensor = torch.cat([tensor[..., ::2], tensor[..., 1::2]], dim=-1)  # [E, 2I]
        elif name.endswith(".mlp.experts.gate_up_proj"):
            tensor = torch.cat([tensor[..., ::2], tensor[..., 1::2]], dim=-1).transpose(1, 2)
        elif name.endswith(".mlp.experts.down_proj"):
            tensor = tensor.transpose(1, 2)  # [E, hidden, I]
        yield name, tensor
