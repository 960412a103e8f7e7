"""Qwen 2 / 2.5 (qkv bias; sliding window on the layers past `max_window_layers` where enabled)
and Qwen 3 (q/k RMSNorm per head), and their mixtures of experts, on the configurable decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paphos.layers.moe import MoESpec
from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    NormSpec,
    decoder_spec,
    expert_activation_of,
    llama_like_layers,
    num_experts_of,
    with_moe,
)
from paphos.ops.moe import RouterSpec


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        return decoder_spec(hf_config, llama_like_layers(hf_config, norm, qkv_bias=True))


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(getattr(hf_config, "attention_bias", False))
        layers = llama_like_layers(hf_config, norm, qkv_bias=bias, o_bias=bias, qk_norm="head")
        return decoder_spec(hf_config, layers)


def _qwen_moe_layer(hf_config: Any) -> Callable[[int], bool]:
    """Qwen MoE's sparse layers: every `decoder_sparse_step`-th, but those in `mlp_only_layers`."""
    step, dense = hf_config.decoder_sparse_step, set(hf_config.mlp_only_layers or ())
    return lambda i: i not in dense and (i + 1) % step == 0


def _qwen_router(hf_config: Any) -> RouterSpec:
    renormalize = bool(hf_config.norm_topk_prob)
    return RouterSpec(
        num_experts_of(hf_config), hf_config.num_experts_per_tok, renormalize=renormalize
    )


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    """Qwen 2 MoE: Qwen 2's attention; a shared expert scaled by a sigmoid gate beside the
    routed ones."""

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        spec = Qwen2ForCausalLM.describe(hf_config)
        moe = MoESpec(
            _qwen_router(hf_config),
            hf_config.moe_intermediate_size,
            expert_activation_of(hf_config),
            shared_intermediate_size=hf_config.shared_expert_intermediate_size,
            shared_gate=True,
        )
        return spec.with_layers(with_moe(list(spec.layers), moe, _qwen_moe_layer(hf_config)))


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """Qwen 3 MoE (30B-A3B, 235B-A22B): Qwen 3's attention, routed experts only."""

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        spec = Qwen3ForCausalLM.describe(hf_config)
        activation = expert_activation_of(hf_config)
        moe = MoESpec(_qwen_router(hf_config), hf_config.moe_intermediate_size, activation)
        return spec.with_layers(with_moe(list(spec.layers), moe, _qwen_moe_layer(hf_config)))
