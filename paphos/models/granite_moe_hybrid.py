"""Granite 4 hybrids (GraniteMoeHybrid): Llama-like layers whose mixer is a Mamba2 layer or
attention (rope or none), whose MLP is routed experts (softmax over the top-k logits) plus a
shared gated MLP, with Granite's embedding, residual, attention and logit multipliers."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from paphos.layers.mamba2 import Mamba2Mixer
from paphos.layers.moe import FusedMoE, MoESpec
from paphos.layers.norm import RMSNorm
from paphos.layers.rotary import get_rope
from paphos.models.decoder_layer import DecoderAttention, DecoderMLP
from paphos.models.decoder_spec import (
    LayerSpec,
    NormSpec,
    RopeSpec,
    expert_activation_of,
    head_dim_of,
    rope_settings,
)
from paphos.models.hybrid import HybridForCausalLM, HybridLayer
from paphos.models.mamba2 import MAMBA2_RENAMES, mamba2_spec
from paphos.ops.moe import RouterSpec
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod


class GraniteHybridMLP(nn.Module):
    """Routed experts (if any) plus the shared MLP, both over every token."""

    def __init__(
        self,
        hf_config: Any,
        spec: LayerSpec,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ) -> None:
        super().__init__()
        self.block_sparse_moe = None
        if getattr(hf_config, "num_local_experts", 0):
            router = RouterSpec(
                hf_config.num_local_experts, hf_config.num_experts_per_tok, scoring="softmax_topk"
            )
            moe = MoESpec(router, hf_config.intermediate_size, expert_activation_of(hf_config))
            self.block_sparse_moe = FusedMoE(hf_config.hidden_size, moe, linear_method, parallel)
        shared = LayerSpec(
            **{**spec.__dict__, "intermediate_size": hf_config.shared_intermediate_size}
        )
        self.shared_mlp = DecoderMLP(shared, linear_method, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared_mlp(x)
        return out if self.block_sparse_moe is None else out + self.block_sparse_moe(x)


class GraniteMoeHybridForCausalLM(HybridForCausalLM):
    checkpoint_renames: ClassVar[dict[str, str]] = {
        ".block_sparse_moe.": ".feed_forward.block_sparse_moe.",  # applied in this order
        ".block_sparse_moe.router.layer.": ".block_sparse_moe.gate.",
        ".shared_mlp.input_linear.": ".feed_forward.shared_mlp.gate_up_proj.",
        ".shared_mlp.output_linear.": ".feed_forward.shared_mlp.down_proj.",
        **MAMBA2_RENAMES,
    }
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        **HybridForCausalLM.stacked_params,
        ".block_sparse_moe.input_linear.weight": (
            ".block_sparse_moe.w13_weight",
            ("gate_up", None),
        ),
        ".block_sparse_moe.output_linear.weight": (".block_sparse_moe.w2_weight", ("down", None)),
    }

    @classmethod
    def multipliers(cls, hf_config: Any) -> tuple[float, float]:
        return float(hf_config.embedding_multiplier), 1.0 / float(hf_config.logits_scaling)

    def build_layers(
        self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> tuple[list[HybridLayer], nn.Module]:
        head_dim = head_dim_of(hf_config)
        rope, rotary = None, None
        if getattr(hf_config, "position_embedding_type", None) == "rope":
            theta, scaling = rope_settings(hf_config)
            rope = RopeSpec(theta, head_dim, True, scaling)
            rotary = get_rope(
                head_dim, head_dim, hf_config.max_position_embeddings, theta, scaling, True, None
            )
        bias = bool(getattr(hf_config, "attention_bias", False))
        spec = LayerSpec(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=hf_config.intermediate_size,
            norm=NormSpec("rms", hf_config.rms_norm_eps),
            qkv_bias=bias,
            o_bias=bias,
            hidden_act=hf_config.hidden_act,
            rope=rope,
            scale=hf_config.attention_multiplier,
        )
        mamba = mamba2_spec(
            hf_config, num_heads="mamba_n_heads", head_dim="mamba_d_head",
            n_groups="mamba_n_groups", state_size="mamba_d_state", conv_kernel="mamba_d_conv",
            chunk_size="mamba_chunk_size", eps="rms_norm_eps", use_conv_bias="mamba_conv_bias",
            use_bias="mamba_proj_bias",
        )  # fmt: skip
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        layers = []
        for index, kind in enumerate(hf_config.layer_types):
            mixer: nn.Module
            if kind in ("mamba", "linear_attention"):
                name, mixer = "mamba", Mamba2Mixer(mamba, linear_method, parallel)
            elif kind in ("attention", "full_attention"):
                name, mixer = "self_attn", DecoderAttention(spec, rotary, linear_method, parallel)
            else:
                raise ValueError(f"layer_types[{index}]={kind!r} is invalid for GraniteMoeHybrid")
            layers.append(
                HybridLayer(
                    ("input_layernorm", name, "post_attention_layernorm", "feed_forward"),
                    RMSNorm(hidden, eps),
                    mixer,
                    RMSNorm(hidden, eps),
                    GraniteHybridMLP(hf_config, spec, linear_method, parallel),
                    residual_multiplier=float(hf_config.residual_multiplier),
                )
            )
        return layers, RMSNorm(hidden, eps)
