"""gpt-oss: attention with sinks and biases, alternating sliding-window and full layers, yarn
rope; every MLP a mixture of experts with biases, routed by a biased router's softmax over its
top-k logits, and the clamped SwiGLU. Its bf16 expert tensors are stored stacked, transposed
([E, in, out]) and with gate and up interleaved: loading reorders them into FusedMoE's
[gate | up] rows. Its released MXFP4 checkpoints store the experts as `*_blocks`/`*_scales`
stacked [E, out, ...] (gate and up rows interleaved): loading splits them into each expert's
gate/up/down tensors, which the MXFP4 expert layers keep as blocks (quant/mxfp4.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from paphos.layers.moe import MoESpec, experts_as_rows
from paphos.models.decoder import STACKED_EXPERTS, DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    NormSpec,
    decoder_spec,
    llama_like_layers,
    num_experts_of,
    with_moe,
)
from paphos.ops.moe import ExpertActivation, RouterSpec

_MXFP4_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


class GptOssForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[dict[str, str]] = {".mlp.router.": ".mlp.gate."}
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        **STACKED_EXPERTS,
        **DecoderForCausalLM.stacked_params,
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
        return super().load_weights(_mxfp4_per_expert(experts_as_rows(weights, interleaved=True)))


def _mxfp4_per_expert(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """`experts.gate_up_proj_blocks` [E, 2I, H/32, 16] (rows gate, up, gate, ...) and its
    `_scales` [E, 2I, H/32] -> `experts.{e}.gate_proj.blocks` / `.up_proj.blocks` / `.scales`;
    `experts.down_proj_{blocks,scales}` [E, H, ...] -> `experts.{e}.down_proj.{blocks,scales}`.
    Other tensors pass unchanged."""
    for name, tensor in weights:
        match = _MXFP4_EXPERTS.search(name)
        if match is None:
            yield name, tensor
            continue
        prefix, proj, kind = name[: match.start()], match[1], match[2]
        for expert in range(tensor.shape[0]):
            if proj == "down_proj":
                yield f"{prefix}.experts.{expert}.down_proj.{kind}", tensor[expert]
            else:
                yield f"{prefix}.experts.{expert}.gate_proj.{kind}", tensor[expert, 0::2]
                yield f"{prefix}.experts.{expert}.up_proj.{kind}", tensor[expert, 1::2]
