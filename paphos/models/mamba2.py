"""Mamba2: every layer RMSNorm -> Mamba2 mixer -> residual add, no attention and no MLP."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from paphos.layers.mamba2 import Mamba2Mixer, Mamba2Spec
from paphos.layers.norm import RMSNorm
from paphos.models.hybrid import HybridForCausalLM, HybridLayer
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

# The mixer's conv parameters under the checkpoint's conv1d names (shared by Mamba2 hybrids).
MAMBA2_RENAMES = {".conv1d.weight": ".conv_weight", ".conv1d.bias": ".conv_bias"}


def mamba2_spec(hf_config: Any, **names: str) -> Mamba2Spec:
    """The mixer from a config; `names` maps a spec field to the config's attribute where the
    family names it differently (NemotronH: mamba_num_heads, ...)."""

    def get(field: str, default: Any = None) -> Any:
        return getattr(hf_config, names.get(field, field), default)

    limit = get("time_step_limit", (0.0, float("inf")))
    if None in (get("num_heads"), get("head_dim"), get("n_groups"), get("state_size")):
        raise ValueError(f"{type(hf_config).__name__} lacks the Mamba2 sizes paphos reads")
    return Mamba2Spec(
        hidden_size=hf_config.hidden_size,
        num_heads=get("num_heads"),
        head_dim=get("head_dim"),
        n_groups=get("n_groups"),
        state_size=get("state_size"),
        conv_kernel=get("conv_kernel"),
        chunk_size=get("chunk_size"),
        eps=getattr(hf_config, names.get("eps", "layer_norm_epsilon")),
        use_conv_bias=bool(get("use_conv_bias", True)),
        use_bias=bool(get("use_bias", False)),
        dt_limit=(float(limit[0]), float(limit[1])),
    )


class Mamba2ForCausalLM(HybridForCausalLM):
    model_prefix: ClassVar[str] = "backbone"
    model_names: ClassVar[tuple[str, str]] = ("embeddings", "norm_f")
    checkpoint_renames: ClassVar[dict[str, str]] = {
        "backbone.embedding.": "backbone.embeddings.",  # older checkpoints
        **MAMBA2_RENAMES,
    }

    def build_layers(
        self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> tuple[list[HybridLayer], nn.Module]:
        spec, eps = mamba2_spec(hf_config), hf_config.layer_norm_epsilon
        layers = [
            HybridLayer(
                ("norm", "mixer", None, None),
                RMSNorm(hf_config.hidden_size, eps),
                Mamba2Mixer(spec, linear_method, parallel),
            )
            for _ in range(hf_config.num_hidden_layers)
        ]
        return layers, RMSNorm(hf_config.hidden_size, eps)
