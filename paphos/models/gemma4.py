"""Gemma 4 text (`Gemma4ForCausalLM`) on the configurable decoder: per-layer head sizes and kv
heads (full layers: global_head_dim, num_global_key_value_heads), the last num_kv_shared_layers
layers attending to the keys and values of the last earlier layer of their type, per-layer input
embeddings, q/k norms and a weightless v norm, attention scale 1, proportional partial rope on full
layers, sandwich norms, a scalar per layer, values equal to keys on full layers (attention_k_eq_v)
and double-wide MLPs on KV-sharing layers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    SANDWICH_NORMS,
    DecoderSpec,
    LayerSpec,
    NormSpec,
    RopeSpec,
    decoder_spec,
    layer_types,
    rope_settings,
)


def _kv_sources(hf_config: Any) -> list[int | None]:
    """Each layer's KV source: None for the first layers, else the last earlier owner of its
    type (transformers' kv_sharing_modes: "store" layers feed the "reuse" ones)."""
    kinds = layer_types(hf_config)
    first_shared = len(kinds) - (hf_config.num_kv_shared_layers or 0)
    sources: list[int | None] = []
    for index, kind in enumerate(kinds):
        if index < first_shared:
            sources.append(None)
            continue
        owners = [i for i in range(first_shared) if kinds[i] == kind]
        if not owners:
            raise ValueError(f"Gemma 4 layer {index} ({kind}) shares KV, but no layer has them")
        sources.append(owners[-1])
    return sources


def _check_supported(hf_config: Any) -> None:
    if getattr(hf_config, "enable_moe_block", False):
        raise ValueError("Gemma 4 with MoE blocks (enable_moe_block) is not supported natively")
    if getattr(hf_config, "use_bidirectional_attention", None) == "all":
        raise ValueError("Gemma 4 with bidirectional attention over all tokens is not a decoder")


def _layer(hf_config: Any, index: int, kind: str, source: int | None) -> LayerSpec:
    shape = hf_config.per_layer_config[index]  # head_dim, num_key_value_heads of this layer
    theta, scaling = rope_settings(hf_config, kind)  # proportional (full layers): whole head
    double_wide = getattr(hf_config, "use_double_wide_mlp", False) and source is not None
    bias = bool(hf_config.attention_bias)
    return LayerSpec(
        hidden_size=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        intermediate_size=hf_config.intermediate_size * (2 if double_wide else 1),
        norm=NormSpec("rms", hf_config.rms_norm_eps),
        norms=SANDWICH_NORMS,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        hidden_act=hf_config.hidden_activation,
        rope=RopeSpec(theta, shape.head_dim, True, scaling),
        sliding_window=hf_config.sliding_window if kind == "sliding_attention" else None,
        scale=1.0,
        kv_source=source,
        v_norm=True,
        per_layer_input_size=_per_layer_size(hf_config),
        layer_scalar=True,
    )


def _per_layer_size(hf_config: Any) -> int:
    return getattr(hf_config, "hidden_size_per_layer_input", 0) or 0


class Gemma4ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        _check_supported(hf_config)
        kinds = layer_types(hf_config)
        layers = [
            _layer(hf_config, index, kind, source)
            for index, (kind, source) in enumerate(zip(kinds, _kv_sources(hf_config)))
        ]
        size = _per_layer_size(hf_config)
        return decoder_spec(
            hf_config,
            layers,
            embedding_multiplier=hf_config.hidden_size**0.5,
            embedding_multiplier_in_dtype=True,
            final_soft_cap=hf_config.final_logit_softcapping,
            per_layer_inputs=(hf_config.vocab_size_per_layer_input, size) if size else None,
        )

    checkpoint_renames = {
        f"model.{name}.": f"model.per_layer_inputs.{name}."
        for name in ("embed_tokens_per_layer", "per_layer_model_projection")
    } | {"model.per_layer_projection_norm.": "model.per_layer_inputs.per_layer_projection_norm."}

    def map_name(self, name: str) -> tuple[str, Any]:
        layer = _layer_index(name)
        if ".self_attn.q_proj." in name and self.spec.layers[layer or 0].kv_source is not None:
            return name, None  # a KV-sharing layer's query projection, alone
        return super().map_name(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._checkpoint_weights(weights))

    def _checkpoint_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Full layers with attention_k_eq_v have no v_proj: their values are the key
        projection (normed on their own), so k_proj's weight loads as v_proj's too. KV-sharing
        layers' k/v projections and norms, if a checkpoint has them, are unused."""
        k_eq_v = bool(getattr(self.hf_config, "attention_k_eq_v", False))
        for name, tensor in weights:
            layer = _layer_index(name)
            spec = None if layer is None else self.spec.layers[layer]
            if spec is not None and spec.kv_source is not None and "self_attn.q_" not in name:
                if ".self_attn." in name and ".o_proj." not in name:
                    continue
            yield name, tensor
            if k_eq_v and spec is not None and spec.sliding_window is None and ".k_proj." in name:
                yield name.replace(".k_proj.", ".v_proj."), tensor


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layers" not in parts:
        return None
    return int(parts[parts.index("layers") + 1])
