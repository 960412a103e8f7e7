"""GLM-4 (0414: sandwich norms under their own names, partial interleaved rotary, qkv bias,
gate_up fused in the checkpoint), on the configurable decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import DecoderSpec, NormSpec, decoder_spec, llama_like_layers

GLM4_NORMS = (
    ("pre_attn", "input_layernorm"),
    ("post_attn", "post_self_attn_layernorm"),
    ("pre_mlp", "post_attention_layernorm"),
    ("post_mlp", "post_mlp_layernorm"),
)


class Glm4ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        layers = llama_like_layers(
            hf_config, norm, norms=GLM4_NORMS, qkv_bias=bool(hf_config.attention_bias)
        )
        layers = [  # GLM rotates interleaved pairs (GPT-J's layout) of the first dims
            dataclasses.replace(layer, rope=dataclasses.replace(layer.rope, is_neox=False))
            for layer in layers
        ]
        return decoder_spec(hf_config, layers)
