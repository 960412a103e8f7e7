"""gpt-oss (bf16 weights; the MXFP4 checkpoint format is the quantization issue's): attention
with sinks and biases, alternating sliding-window and full layers, yarn rope; every MLP a
mixture of experts with biases, routed by a biased router's softmax over its top-k logits, and
the clamped SwiGLU. Its expert tensors are stored stacked, transposed ([E, in, out]) and with
gate and up interleaved: loading reorders them into FusedMoE's [gate | up] rows."""

from __future__ import annotations

from collections.abc import Iterable
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
        return super().load_weights(experts_as_rows(weights, interleaved=True))
