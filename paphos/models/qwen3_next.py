"""Qwen3.5 / Qwen3.6 (dense and MoE text models) and Qwen3-Next: Gated DeltaNet layers with,
every few layers (`layer_types`), a gated attention layer (q/k zero-centred RMSNorm per head,
partial rotary, output * sigmoid(gate) where q_proj carries the gate); zero-centred RMSNorms
throughout. The MoE models' MLP: routed experts (top-k of the softmax, renormalised) beside a
shared expert scaled by a sigmoid gate (layers.moe.FusedMoE).

Their `...ForConditionalGeneration` checkpoints hold the same language model under
`model.language_model.` (the vision tower is skipped until multimodal serving exists), and the
multi-token-prediction head (`mtp.`) is skipped until speculative decoding exists.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from paphos.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetSpec
from paphos.layers.moe import FusedMoE, MoESpec
from paphos.layers.norm import OffsetRMSNorm
from paphos.layers.rotary import get_rope
from paphos.models.decoder_layer import DecoderAttention, DecoderMLP
from paphos.models.decoder_spec import (
    LayerSpec,
    NormSpec,
    RopeSpec,
    expert_activation_of,
    head_dim_of,
    num_experts_of,
    partial_rotary_factor,
    rope_settings,
)
from paphos.models.hybrid import HybridForCausalLM, HybridLayer
from paphos.ops.moe import RouterSpec
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

LAYER_NAMES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
LINEAR_LAYER_NAMES = ("input_layernorm", "linear_attn", "post_attention_layernorm", "mlp")


def attention_layer_spec(hf_config: Any) -> LayerSpec:
    head_dim = head_dim_of(hf_config)
    theta, scaling = rope_settings(hf_config)
    bias = bool(getattr(hf_config, "attention_bias", False))
    norm = NormSpec("rms_offset", hf_config.rms_norm_eps)
    rope = RopeSpec(theta, int(head_dim * partial_rotary_factor(hf_config)), True, scaling)
    return LayerSpec(
        hidden_size=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        norm=norm,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        hidden_act=hf_config.hidden_act,
        rope=rope,
        output_gate=True,
    )


def deltanet_spec(hf_config: Any, layout: str) -> GatedDeltaNetSpec:
    return GatedDeltaNetSpec(
        hidden_size=hf_config.hidden_size,
        num_k_heads=hf_config.linear_num_key_heads,
        num_v_heads=hf_config.linear_num_value_heads,
        head_k_dim=hf_config.linear_key_head_dim,
        head_v_dim=hf_config.linear_value_head_dim,
        conv_kernel=hf_config.linear_conv_kernel_dim,
        eps=hf_config.rms_norm_eps,
        layout=layout,  # type: ignore[arg-type]
    )


class Qwen3_5ForCausalLM(HybridForCausalLM):
    deltanet_layout: ClassVar[str] = "qwen3_5"
    checkpoint_renames: ClassVar[dict[str, str]] = {
        "model.language_model.": "model.",  # a ...ForConditionalGeneration checkpoint
        ".conv1d.weight": ".conv_weight",
    }
    ignored_weights: ClassVar[tuple[str, ...]] = ("mtp.", "model.visual.")

    @classmethod
    def text_config(cls, hf_config: Any) -> Any:
        return getattr(hf_config, "text_config", None) or hf_config

    def build_layers(
        self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> tuple[list[HybridLayer], nn.Module]:
        spec = attention_layer_spec(hf_config)
        self.attention_spec = spec
        rope = spec.rope
        assert rope is not None
        rotary = get_rope(
            spec.head_dim, rope.rotary_dim, hf_config.max_position_embeddings, rope.theta,
            rope.scaling, rope.is_neox, None,
        )  # fmt: skip
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        layers = []
        for index, kind in enumerate(hf_config.layer_types):
            if kind == "linear_attention":
                names = LINEAR_LAYER_NAMES
                mixer = GatedDeltaNet(
                    deltanet_spec(hf_config, self.deltanet_layout), linear_method, parallel
                )
            elif kind == "full_attention":
                names, mixer = LAYER_NAMES, DecoderAttention(spec, rotary, linear_method, parallel)
            else:
                raise ValueError(
                    f"layer_types[{index}]={kind!r} is invalid for {type(self).__name__}"
                )
            mlp = self.build_mlp(hf_config, index, linear_method, parallel)
            layers.append(
                HybridLayer(
                    names, OffsetRMSNorm(hidden, eps), mixer, OffsetRMSNorm(hidden, eps), mlp
                )
            )
        return layers, OffsetRMSNorm(hidden, eps)

    def build_mlp(
        self, hf_config: Any, index: int, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> nn.Module:
        return DecoderMLP(self.attention_spec, linear_method, parallel)

    def split_weight(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """q_proj holds [q_h | gate_h] per head: q goes to the fused qkv, the gate to attn_gate."""
        if ".self_attn.q_proj." not in name:
            return [(name, tensor)]
        spec = self.attention_spec
        per_head = tensor.reshape(spec.num_heads, 2 * spec.head_dim, *tensor.shape[1:])
        q, gate = per_head.chunk(2, dim=1)  # [heads, head_dim, ...] each
        flat = (spec.num_heads * spec.head_dim, *tensor.shape[1:])
        gate_name = name.replace(".q_proj.", ".attn_gate.")
        return [(name, q.reshape(flat)), (gate_name, gate.reshape(flat))]


def qwen_moe(
    hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo
) -> FusedMoE:
    renormalize = bool(getattr(hf_config, "norm_topk_prob", True))
    router = RouterSpec(
        num_experts_of(hf_config), hf_config.num_experts_per_tok, renormalize=renormalize
    )
    spec = MoESpec(
        router,
        hf_config.moe_intermediate_size,
        expert_activation_of(hf_config),
        shared_intermediate_size=hf_config.shared_expert_intermediate_size,
        shared_gate=True,
    )
    return FusedMoE(hf_config.hidden_size, spec, linear_method, parallel)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """Qwen3.5 / Qwen3.6 MoE (35B-A3B, ...): every layer's MLP is the MoE block."""

    def build_mlp(
        self, hf_config: Any, index: int, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> nn.Module:
        return qwen_moe(hf_config, linear_method, parallel)


class Qwen3NextForCausalLM(Qwen3_5ForCausalLM):
    """Qwen3-Next: the interleaved DeltaNet projections; MoE on every `decoder_sparse_step`-th
    layer but those in `mlp_only_layers` (which keep a dense MLP)."""

    deltanet_layout: ClassVar[str] = "qwen3_next"

    def build_mlp(
        self, hf_config: Any, index: int, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> nn.Module:
        step, dense = hf_config.decoder_sparse_step, set(hf_config.mlp_only_layers or ())
        if index in dense or not getattr(hf_config, "num_experts", 0) or (index + 1) % step:
            return DecoderMLP(self.attention_spec, linear_method, parallel)
        return qwen_moe(hf_config, linear_method, parallel)
