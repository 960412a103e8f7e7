"""DeepSeek V2 / V3 (and the configs built on V3's: Kimi K2, Mistral Large 3) on the configurable
decoder: multi-head latent attention in every layer (models/decoder_mla.py), dense MLPs in the
first `first_k_dense_replace` layers, mixtures of experts after them (layers/moe.py) with shared
experts: V2 routes by softmax (greedy, or group-limited by each group's best score), V3 by sigmoid
scores with a correction bias and grouped top-k (the sum of each group's two best).

The rope key is rotated in interleaved pairs (V2 always; V3 with `rope_interleave`), and yarn's
`mscale_all_dim` scales the softmax by mscale^2 on top of 1 / sqrt(qk head dim), as transformers
does."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from paphos.layers.moe import MoESpec
from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    LatentSpec,
    LayerSpec,
    NormSpec,
    RopeSpec,
    decoder_spec,
    expert_activation_of,
    num_experts_of,
    rope_settings,
    with_moe,
)
from paphos.models.glm4 import after_dense_layers, sigmoid_grouped_moe
from paphos.ops.moe import RouterSpec


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


def softmax_moe(hf_config: Any) -> MoESpec:
    """DeepSeek V2's experts: top-k of the softmax, among the `topk_group` groups of the best
    single scores with "group_limited_greedy"; renormalised where `norm_topk_prob` (the original
    code's rule; V2 and V2-Lite ship False), scaled; `n_shared_experts` shared experts as one."""
    method = hf_config.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method={method!r}: expected 'greedy' or 'group_limited_greedy'")
    grouped = method == "group_limited_greedy"
    router = RouterSpec(
        num_experts_of(hf_config), hf_config.num_experts_per_tok,
        renormalize=bool(hf_config.norm_topk_prob),
        num_groups=hf_config.n_group if grouped else 1,
        topk_groups=hf_config.topk_group if grouped else 1, group_score="max",
        routed_scaling_factor=float(hf_config.routed_scaling_factor), topk_sorted=False,
    )  # fmt: skip
    inter = hf_config.moe_intermediate_size
    shared = inter * hf_config.n_shared_experts if hf_config.n_shared_experts else None
    return MoESpec(
        router, inter, expert_activation_of(hf_config), router_fp32=True,
        shared_intermediate_size=shared,
    )  # fmt: skip


class DeepseekV2ForCausalLM(DecoderForCausalLM):
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }
    checkpoint_renames: ClassVar[dict[str, str]] = {
        ".mlp.gate.e_score_correction_bias": ".mlp.e_score_correction_bias",
        ".mlp.shared_experts.": ".mlp.shared_expert.",
    }
    skips_extra_layers: ClassVar[bool] = True  # V3's multi-token-prediction layers

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        layers = deepseek_layers(hf_config, cls.interleaved_rope(hf_config))
        if hf_config.first_k_dense_replace < len(layers) and hf_config.n_routed_experts:
            layers = with_moe(layers, cls.experts(hf_config), after_dense_layers(hf_config))
        return decoder_spec(hf_config, layers)

    @staticmethod
    def interleaved_rope(hf_config: Any) -> bool:
        return True

    @staticmethod
    def experts(hf_config: Any) -> MoESpec:
        return softmax_moe(hf_config)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @staticmethod
    def interleaved_rope(hf_config: Any) -> bool:
        return bool(getattr(hf_config, "rope_interleave", True))

    @staticmethod
    def experts(hf_config: Any) -> MoESpec:
        return sigmoid_grouped_moe(hf_config)
