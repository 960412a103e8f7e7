"""Granite (Llama with embedding, residual, attention and logit multipliers) and Granite MoE, on
the configurable decoder."""

from __future__ import annotations

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


class GraniteForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(getattr(hf_config, "attention_bias", False))
        layers = llama_like_layers(
            hf_config,
            norm,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            scale=hf_config.attention_multiplier,
            residual_multiplier=hf_config.residual_multiplier,
        )
        return decoder_spec(
            hf_config,
            layers,
            embedding_multiplier=hf_config.embedding_multiplier,
            logits_multiplier=1.0 / hf_config.logits_scaling,
        )


class GraniteMoeForCausalLM(DecoderForCausalLM):
    """Granite 3 MoE: Granite's multipliers; experts stored stacked (input_linear = [gate | up],
    output_linear), routed by a softmax over the top-k logits."""

    checkpoint_renames: ClassVar[dict[str, str]] = {
        ".block_sparse_moe.router.layer.": ".mlp.gate.",
        ".block_sparse_moe.": ".mlp.",
    }
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        **DecoderForCausalLM.stacked_params,
        ".mlp.input_linear.weight": (".mlp.w13_weight", ("gate_up", None)),
        ".mlp.output_linear.weight": (".mlp.w2_weight", ("down", None)),
    }

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        spec = GraniteForCausalLM.describe(hf_config)
        router = RouterSpec(
            num_experts_of(hf_config), hf_config.num_experts_per_tok, scoring="softmax_topk"
        )
        moe = MoESpec(router, hf_config.intermediate_size, expert_activation_of(hf_config))
        return spec.with_layers(with_moe(list(spec.layers), moe))
