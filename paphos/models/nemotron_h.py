"""NemotronH (Nemotron-H, Nemotron Nano 2): a pattern of blocks (`layers_block_type`), each
RMSNorm -> one mixer -> residual add, the mixer a Mamba2 layer, attention without position
embedding, or a non-gated relu2 MLP. (MoE blocks need the MoE layer: refused with a clear error.)"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from paphos.attention import AttentionMetadata
from paphos.layers.mamba2 import Mamba2Mixer
from paphos.layers.norm import RMSNorm
from paphos.models.decoder_layer import DecoderAttention, DecoderMLP
from paphos.models.decoder_spec import LayerSpec, NormSpec, head_dim_of
from paphos.models.hybrid import HybridForCausalLM, HybridLayer
from paphos.models.mamba2 import MAMBA2_RENAMES, mamba2_spec
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

NAMES = ("norm", "mixer", None, None)


class MLPMixer(DecoderMLP):
    """An MLP in a mixer's place: the mixer signature, no cache."""

    def forward(  # type: ignore[override]
        self, positions: torch.Tensor, x: torch.Tensor, cache: Any, md: AttentionMetadata
    ) -> torch.Tensor:
        return super().forward(x)


def _layer_spec(hf_config: Any) -> LayerSpec:
    bias = bool(getattr(hf_config, "attention_bias", False))
    return LayerSpec(
        hidden_size=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=head_dim_of(hf_config),
        intermediate_size=hf_config.intermediate_size,
        norm=NormSpec("rms", hf_config.layer_norm_epsilon),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        hidden_act=hf_config.mlp_hidden_act,
        gated=False,
        rope=None,
    )


class NemotronHForCausalLM(HybridForCausalLM):
    model_prefix: ClassVar[str] = "backbone"
    model_names: ClassVar[tuple[str, str]] = ("embeddings", "norm_f")
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
    }
    checkpoint_renames: ClassVar[dict[str, str]] = dict(MAMBA2_RENAMES)
    ignored_weights: ClassVar[tuple[str, ...]] = ("mtp.",)

    def build_layers(
        self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> tuple[list[HybridLayer], nn.Module]:
        spec = _layer_spec(hf_config)
        mamba = mamba2_spec(
            hf_config,
            num_heads="mamba_num_heads",
            head_dim="mamba_head_dim",
            state_size="ssm_state_size",
        )
        hidden, eps = hf_config.hidden_size, hf_config.layer_norm_epsilon
        layers = []
        for index, kind in enumerate(hf_config.layers_block_type):
            mixer: nn.Module
            if kind == "linear_attention":
                mixer = Mamba2Mixer(mamba, linear_method, parallel)
            elif kind == "full_attention":
                mixer = DecoderAttention(spec, None, linear_method, parallel)
            elif kind == "mlp":
                mixer = MLPMixer(spec, linear_method, parallel)
            else:
                raise ValueError(
                    f"layers_block_type[{index}]={kind!r} is not supported by paphos's "
                    "NemotronH yet (MoE blocks need the MoE layer)"
                )
            layers.append(HybridLayer(NAMES, RMSNorm(hidden, eps), mixer))
        return layers, RMSNorm(hidden, eps)
