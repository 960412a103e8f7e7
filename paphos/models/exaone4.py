"""EXAONE 4 (norms after attention and MLP, q/k RMSNorm per head; with windows, 3 of 4 layers
slide and only those have rope), on the configurable decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import DecoderSpec, NormSpec, decoder_spec, llama_like_layers
from paphos.models.olmo import POST_NORMS


class Exaone4ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        layers = llama_like_layers(hf_config, norm, norms=POST_NORMS, qk_norm="head")
        if hf_config.sliding_window is not None:  # global layers have no rope then
            layers = [
                layer if layer.sliding_window is not None else dataclasses.replace(layer, rope=None)
                for layer in layers
            ]
        return decoder_spec(hf_config, layers)
