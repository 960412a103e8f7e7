"""OLMo 2 (norms after attention and MLP, none before; q/k RMSNorm over the whole projection)
and OLMo 3 (the same with sliding-window layers from `layer_types`), and OLMoE, on the
configurable decoder."""

from __future__ import annotations

from typing import Any

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

POST_NORMS = (("post_attn", "post_attention_layernorm"), ("post_mlp", "post_feedforward_layernorm"))


class Olmo2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(getattr(hf_config, "attention_bias", False))
        layers = llama_like_layers(
            hf_config, norm, norms=POST_NORMS, qkv_bias=bias, o_bias=bias, qk_norm="projection"
        )
        return decoder_spec(hf_config, layers)


class Olmo3ForCausalLM(Olmo2ForCausalLM):
    pass  # its sliding windows come with `layer_types`, which llama_like_layers reads


class OlmoeForCausalLM(DecoderForCausalLM):
    """OLMoE: Llama's pre-norms, q/k RMSNorm over the whole projection, optional q/k/v clipping,
    every MLP a softmax top-k mixture of experts."""

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        bias = bool(getattr(hf_config, "attention_bias", False))
        layers = llama_like_layers(
            hf_config, norm, qkv_bias=bias, o_bias=bias, qk_norm="projection",
            clip_qkv=getattr(hf_config, "clip_qkv", None),
        )  # fmt: skip
        router = RouterSpec(
            num_experts_of(hf_config), hf_config.num_experts_per_tok,
            renormalize=bool(hf_config.norm_topk_prob),
        )  # fmt: skip
        moe = MoESpec(router, hf_config.intermediate_size, expert_activation_of(hf_config))
        return decoder_spec(hf_config, with_moe(layers, moe))
