"""StableLM (LayerNorm, partial rotary, optional qkv bias, parallel residual and per-head q/k
LayerNorms) and Starcoder 2 (LayerNorm, biases everywhere, ungated gelu MLP c_fc/c_proj, one
sliding window), on the configurable decoder."""

from __future__ import annotations

import re
from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    NormSpec,
    decoder_spec,
    llama_like_layers,
    with_features,
)

_HEAD_NORM = re.compile(r"\.(q|k)_layernorm\.norms\.(\d+)\.")


class StableLmForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("layer", hf_config.layer_norm_eps, bias=True)
        parallel = bool(hf_config.use_parallel_residual)
        layers = llama_like_layers(
            hf_config,
            norm,
            norms=(("pre_attn", "input_layernorm"),)
            + (() if parallel else (("pre_mlp", "post_attention_layernorm"),)),
            parallel_block=parallel,
            qkv_bias=bool(hf_config.use_qkv_bias),
            qk_norm="headwise" if hf_config.qk_layernorm else None,
        )
        return decoder_spec(hf_config, layers)

    def map_name(self, name: str) -> tuple[str, Any]:
        """q_layernorm.norms.{h} (one LayerNorm per head) -> q_norm with shard id h."""
        if match := _HEAD_NORM.search(name):
            which, head = match.groups()
            return _HEAD_NORM.sub(f".{which}_norm.", name), int(head)
        return super().map_name(name)


class Starcoder2ForCausalLM(DecoderForCausalLM):
    checkpoint_renames = {".mlp.c_fc.": ".mlp.up_proj.", ".mlp.c_proj.": ".mlp.down_proj."}

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("layer", hf_config.norm_epsilon, bias=True)
        bias = bool(hf_config.use_bias)
        layers = llama_like_layers(
            hf_config, norm, qkv_bias=bias, o_bias=bias, mlp_bias=bias, gated=False
        )
        window = getattr(hf_config, "sliding_window", None)
        return decoder_spec(hf_config, with_features(layers, sliding_window=window))
