"""Mistral (one sliding window on every layer, when set), on the configurable decoder."""

from __future__ import annotations

from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    NormSpec,
    decoder_spec,
    llama_like_layers,
    with_features,
)


class MistralForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        layers = llama_like_layers(hf_config, norm)
        window = getattr(hf_config, "sliding_window", None)
        return decoder_spec(hf_config, with_features(layers, sliding_window=window))
