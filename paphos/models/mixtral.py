"""Mixtral (Mistral's attention, every MLP a softmax top-k mixture of experts renormalised over
the chosen ones), on the configurable decoder."""

from __future__ import annotations

from typing import Any, ClassVar

from paphos.layers.moe import MoESpec
from paphos.models.decoder import DecoderForCausalLM
from paphos.models.decoder_spec import (
    DecoderSpec,
    expert_activation_of,
    num_experts_of,
    with_moe,
)
from paphos.models.mistral import MistralForCausalLM
from paphos.ops.moe import RouterSpec


class MixtralForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[dict[str, str]] = {".block_sparse_moe.": ".mlp."}

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        spec = MistralForCausalLM.describe(hf_config)
        router = RouterSpec(
            num_experts_of(hf_config), hf_config.num_experts_per_tok, renormalize=True
        )
        moe = MoESpec(router, hf_config.intermediate_size, expert_activation_of(hf_config))
        return spec.with_layers(with_moe(list(spec.layers), moe))
