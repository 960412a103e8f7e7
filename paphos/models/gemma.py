"""Gemma (RMSNorm(1 + w), embeddings scaled by sqrt(hidden), gated gelu-tanh), Gemma 2 (pre and
post norms, attention and final soft-caps, alternating sliding windows, query_pre_attn_scalar)
and Gemma 3 text (per-layer `layer_types` with their own rope base, q/k norm), on the
configurable decoder."""

from __future__ import annotations

from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    SANDWICH_NORMS,
    DecoderSpec,
    LayerSpec,
    NormSpec,
    decoder_spec,
    llama_like_layers,
)


def _gemma_layers(hf_config: Any, **features: Any) -> list[LayerSpec]:
    norm = NormSpec("rms_offset", hf_config.rms_norm_eps)
    act = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
    bias = bool(hf_config.attention_bias)
    return llama_like_layers(
        hf_config, norm, qkv_bias=bias, o_bias=bias, hidden_act=act, **features
    )


def _gemma_spec(hf_config: Any, layers: list[LayerSpec], **model: Any) -> DecoderSpec:
    return decoder_spec(
        hf_config,
        layers,
        embedding_multiplier=hf_config.hidden_size**0.5,
        embedding_multiplier_in_dtype=True,
        **model,
    )


class GemmaForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        return _gemma_spec(hf_config, _gemma_layers(hf_config))


class Gemma2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        layers = _gemma_layers(
            hf_config,
            norms=SANDWICH_NORMS,
            scale=hf_config.query_pre_attn_scalar**-0.5,
            soft_cap=hf_config.attn_logit_softcapping,
        )
        return _gemma_spec(hf_config, layers, final_soft_cap=hf_config.final_logit_softcapping)


class Gemma3ForCausalLM(DecoderForCausalLM):
    """Text only. transformers' Gemma 3 attention takes no soft-cap (its config field is unused)."""

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        layers = _gemma_layers(
            hf_config,
            norms=SANDWICH_NORMS,
            scale=hf_config.query_pre_attn_scalar**-0.5,
            qk_norm="head",
        )
        return _gemma_spec(hf_config, layers, final_soft_cap=hf_config.final_logit_softcapping)
