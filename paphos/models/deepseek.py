"""DeepSeek V2 / V3 (and the configs built on V3's: Kimi K2, Mistral Large 3) on the configurable
decoder: multi-head latent attention in every layer (models/decoder_mla.py), dense MLPs in the
first `first_k_dense_replace` layers.

The rope key is rotated in interleaved pairs (V2 always; V3 with `rope_interleave`), and yarn's
`mscale_all_dim` scales the softmax by mscale^2 on top of 1 / sqrt(qk head dim), as transformers
does."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    LatentSpec,
    LayerSpec,
    NormSpec,
    RopeSpec,
    decoder_spec,
    rope_settings,
)


def softmax_scale(qk_head_dim: int, scaling: dict[str, Any] | None) -> float:
    scale = qk_head_dim**-0.5
    m_all = (scaling or {}).get("mscale_all_dim")
    if scaling and m_all:
        factor = float(scaling["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * m_all * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def deepseek_layers(hf_config: Any, interleaved_rope: bool) -> list[LayerSpec]:
    norm = NormSpec("rms", hf_config.rms_norm_eps)
    theta, scaling = rope_settings(hf_config)
    nope, rope_dim = hf_config.qk_nope_head_dim, hf_config.qk_rope_head_dim
    latent = LatentSpec(
        kv_lora_rank=hf_config.kv_lora_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=hf_config.v_head_dim,
        q_lora_rank=hf_config.q_lora_rank,
    )
    bias = bool(getattr(hf_config, "attention_bias", False))
    num_dense = hf_config.first_k_dense_replace
    if num_dense < hf_config.num_hidden_layers and getattr(hf_config, "n_routed_experts", None):
        raise ValueError(
            f"{type(hf_config).__name__}: layers {num_dense}..{hf_config.num_hidden_layers - 1} "
            "are mixture-of-experts layers, which this build does not have yet"
        )
    layer = LayerSpec(
        hidden_size=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_attention_heads,
        head_dim=nope + rope_dim,
        intermediate_size=hf_config.intermediate_size,
        norm=norm,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        hidden_act=hf_config.hidden_act,
        rope=RopeSpec(theta, rope_dim, not interleaved_rope, scaling),
        scale=softmax_scale(nope + rope_dim, scaling),
        latent=latent,
    )
    return [layer] * hf_config.num_hidden_layers


class DeepseekV2ForCausalLM(DecoderForCausalLM):
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        return decoder_spec(hf_config, deepseek_layers(hf_config, interleaved_rope=True))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Skips the multi-token-prediction layers V3 checkpoints append past the last layer."""
        num_layers = len(self.spec.layers)
        return super().load_weights(
            (name, tensor) for name, tensor in weights if _layer_index(name) < num_layers
        )


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        interleaved = bool(getattr(hf_config, "rope_interleave", True))
        return decoder_spec(hf_config, deepseek_layers(hf_config, interleaved_rope=interleaved))


def _layer_index(name: str) -> int:
    """The layer number in `model.layers.N.` names; -1 for the others."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1
