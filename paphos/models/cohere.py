"""Command-R (Cohere: one LayerNorm without bias before a parallel attention + MLP block,
interleaved rotary, optional per-head q/k LayerNorms, logits scaled) and Command-R7B (Cohere 2:
sliding-window layers with rope, global layers without), on the configurable decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    LayerSpec,
    NormSpec,
    decoder_spec,
    llama_like_layers,
)


def _cohere_layers(hf_config: Any, **features: Any) -> list[LayerSpec]:
    norm = NormSpec("layer", hf_config.layer_norm_eps, bias=False)
    bias = bool(hf_config.attention_bias)
    layers = llama_like_layers(
        hf_config,
        norm,
        norms=(("pre_attn", "input_layernorm"),),
        parallel_block=True,
        qkv_bias=bias,
        o_bias=bias,
        **features,
    )
    return [  # rotates interleaved pairs (GPT-J's layout)
        dataclasses.replace(layer, rope=dataclasses.replace(layer.rope, is_neox=False))
        for layer in layers
    ]


class CohereForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        qk_norm = "headwise" if getattr(hf_config, "use_qk_norm", False) else None
        layers = _cohere_layers(hf_config, qk_norm=qk_norm)
        return decoder_spec(hf_config, layers, logits_multiplier=hf_config.logit_scale)


class Cohere2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        layers = [  # only the sliding-window layers have rope
            layer if layer.sliding_window is not None else dataclasses.replace(layer, rope=None)
            for layer in _cohere_layers(hf_config)
        ]
        return decoder_spec(hf_config, layers, logits_multiplier=hf_config.logit_scale)
