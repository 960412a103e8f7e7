"""Mistral (one sliding window on every layer, when set) and Ministral 3, on the configurable
decoder."""

from __future__ import annotations

import dataclasses
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


class Ministral3ForCausalLM(DecoderForCausalLM):
    """Ministral 3 (text): Mistral with yarn rope and Llama 4's position-dependent query scale
    (`llama_4_scaling_beta` over `original_max_position_embeddings`)."""

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        spec = MistralForCausalLM.describe(hf_config)
        params = getattr(hf_config, "rope_parameters", None) or {}
        beta = params.get("llama_4_scaling_beta")
        if beta is None:
            return spec
        scale = (float(beta), int(params["original_max_position_embeddings"]))
        return dataclasses.replace(
            spec, layers=tuple(with_features(list(spec.layers), position_query_scale=scale))
        )
