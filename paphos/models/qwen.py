"""Qwen 2 / 2.5 (qkv bias; sliding window on the layers past `max_window_layers` where enabled)
and Qwen 3 (q/k RMSNorm per head), on the configurable decoder."""

from __future__ import annotations

from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import DecoderSpec, NormSpec, decoder_spec, llama_like_layers


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
