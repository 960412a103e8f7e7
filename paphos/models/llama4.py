"""Llama 4 (text): interleaved (GPT-J) rope on most layers, chunked local attention on the rope
layers, NoPE full-attention layers with attention temperature tuning, a weightless q/k L2 norm on
the rope layers; MoE every `interleave_moe_layer_step` layers: one routed expert whose sigmoid
score scales its input, beside a shared expert. Expert tensors are stored stacked [E, in, out];
loading reorders them into FusedMoE's rows. On the configurable decoder."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from paphos.layers.moe import MoESpec, experts_as_rows
from paphos.models.decoder import STACKED_EXPERTS, DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    LayerSpec,
    NormSpec,
    decoder_spec,
    expert_activation_of,
    llama_like_layers,
    num_experts_of,
    with_moe,
)
from paphos.ops.moe import RouterSpec


class Llama4ForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[dict[str, str]] = {
        ".feed_forward.router.": ".mlp.gate.",
        ".feed_forward.": ".mlp.",
    }
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        **STACKED_EXPERTS,
        **DecoderForCausalLM.stacked_params,
    }

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(getattr(hf_config, "attention_bias", False))
        layers = llama_like_layers(hf_config, norm, qkv_bias=bias, o_bias=bias)
        layers = [_layer(hf_config, i, layer) for i, layer in enumerate(layers)]
        router = RouterSpec(
            num_experts_of(hf_config), hf_config.num_experts_per_tok, scoring="sigmoid_topk"
        )
        moe = MoESpec(
            router, hf_config.intermediate_size, expert_activation_of(hf_config),
            shared_intermediate_size=hf_config.intermediate_size,
            apply_router_weight_on_input=True,
        )  # fmt: skip
        moe_layers = set(hf_config.moe_layers)
        return decoder_spec(hf_config, with_moe(layers, moe, lambda i: i in moe_layers))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(experts_as_rows(weights))


def _layer(hf_config: Any, index: int, layer: LayerSpec) -> LayerSpec:
    """One layer's attention kind: rope (interleaved) with the L2 q/k norm, chunked where its
    type says; or NoPE with the temperature-tuned query scale. Dense MLPs: intermediate_size_mlp."""
    features: dict[str, Any] = {"intermediate_size": hf_config.intermediate_size_mlp}
    if hf_config.no_rope_layers[index]:
        assert layer.rope is not None
        features["rope"] = dataclasses.replace(layer.rope, is_neox=False)
        features["qk_norm"] = "l2" if hf_config.use_qk_norm else None
    else:
        features["rope"] = None
        if hf_config.attn_temperature_tuning:
            features["position_query_scale"] = (hf_config.attn_scale, hf_config.floor_scale)
            features["position_query_offset"] = 1
    if hf_config.layer_types[index] == "chunked_attention":
        features["chunk_size"] = hf_config.attention_chunk_size
    return dataclasses.replace(layer, **features)
