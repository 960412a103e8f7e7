"""GLM-4 (0414: sandwich norms under their own names, partial interleaved rotary, qkv bias,
gate_up fused in the checkpoint) and GLM-4 MoE, on the configurable decoder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from paphos.layers.moe import MoESpec
from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    NormSpec,
    decoder_spec,
    expert_activation_of,
    llama_like_layers,
    num_experts_of,
    with_moe,
)
from paphos.ops.moe import RouterSpec

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


class Glm4MoeForCausalLM(DecoderForCausalLM):
    """GLM-4.5 / 4.6 MoE: Llama's layout with partial rotary, optional q/k norm per head; dense
    first layers (`first_k_dense_replace`), then sigmoid-scored grouped top-k experts with a
    correction bias and a shared expert. The checkpoint's multi-token-prediction layer is
    skipped."""

    skips_extra_layers: ClassVar[bool] = True
    checkpoint_renames: ClassVar[dict[str, str]] = {
        ".mlp.gate.e_score_correction_bias": ".mlp.e_score_correction_bias",
        ".mlp.shared_experts.": ".mlp.shared_expert.",
    }

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        qk_norm = "head" if getattr(hf_config, "use_qk_norm", False) else None
        layers = llama_like_layers(
            hf_config, norm, qkv_bias=bool(hf_config.attention_bias), qk_norm=qk_norm
        )
        moe = sigmoid_grouped_moe(hf_config)
        return decoder_spec(hf_config, with_moe(layers, moe, after_dense_layers(hf_config)))


def after_dense_layers(hf_config: Any) -> Callable[[int], bool]:
    """MoE layers after the first `first_k_dense_replace` dense ones."""
    first = hf_config.first_k_dense_replace
    return lambda i: i >= first


def sigmoid_grouped_moe(hf_config: Any) -> MoESpec:
    """DeepSeek V3's routing (also GLM-4 MoE's): sigmoid scores, correction bias, grouped top-k,
    renormalised and scaled; float32 router; `n_shared_experts` shared experts as one MLP."""
    router = RouterSpec(
        num_experts_of(hf_config), hf_config.num_experts_per_tok, scoring="sigmoid",
        renormalize=bool(hf_config.norm_topk_prob), correction_bias=True,
        num_groups=hf_config.n_group or 1, topk_groups=hf_config.topk_group or 1,
        routed_scaling_factor=float(hf_config.routed_scaling_factor),
    )  # fmt: skip
    inter = hf_config.moe_intermediate_size
    shared = inter * hf_config.n_shared_experts if hf_config.n_shared_experts else None
    return MoESpec(
        router, inter, expert_activation_of(hf_config), router_fp32=True,
        shared_intermediate_size=shared,
    )  # fmt: skip
