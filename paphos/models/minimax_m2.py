"""MiniMax M2: Llama's layout with q/k RMSNorm over the whole projection and partial rotary;
every MLP a mixture of experts scored by a sigmoid with a correction bias (no groups),
renormalised; on the configurable decoder."""

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


class MiniMaxM2ForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[dict[str, str]] = {".block_sparse_moe.": ".mlp."}

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        norm = NormSpec("rms", hf_config.rms_norm_eps)
        layers = llama_like_layers(hf_config, norm, qk_norm="projection")
        router = RouterSpec(
            num_experts_of(hf_config), hf_config.num_experts_per_tok, scoring="sigmoid",
            renormalize=True, correction_bias=True,
        )  # fmt: skip
        moe = MoESpec(router, hf_config.intermediate_size, expert_activation_of(hf_config))
        return decoder_spec(hf_config, with_moe(layers, moe))
