"""Granite (Llama with embedding, residual, attention and logit multipliers), on the configurable
decoder."""

from __future__ import annotations

from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import DecoderSpec, NormSpec, decoder_spec, llama_like_layers


class GraniteForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(getattr(hf_config, "attention_bias", False))
        layers = llama_like_layers(
            hf_config,
            norm,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            scale=hf_config.attention_multiplier,
            residual_multiplier=hf_config.residual_multiplier,
        )
        return decoder_spec(
            hf_config,
            layers,
            embedding_multiplier=hf_config.embedding_multiplier,
            logits_multiplier=1.0 / hf_config.logits_scaling,
        )
