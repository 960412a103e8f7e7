"""SmolLM3 (Llama with no rope on every 4th layer, `no_rope_layers`; optional sliding windows),
on the configurable decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import DecoderSpec, NormSpec, decoder_spec, llama_like_layers


class SmolLM3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(getattr(hf_config, "attention_bias", False))
        layers = llama_like_layers(
            hf_config, norm, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf_config.mlp_bias)
        )
        windows = bool(getattr(hf_config, "use_sliding_window", False))
        layers = [
            dataclasses.replace(
                layer,
                rope=layer.rope if uses_rope else None,
                sliding_window=layer.sliding_window if windows else None,
            )
            for layer, uses_rope in zip(layers, hf_config.no_rope_layers, strict=True)
        ]
        return decoder_spec(hf_config, layers)
