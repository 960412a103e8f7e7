"""`load_weights` for models whose checkpoint names map onto parameters one tensor at a time: a
family gives a function (checkpoint name, tensor) -> the loads to make; this applies them through
each parameter's `weight_loader` and returns the parameter names filled.

Checkpoints made for an fp8 KV cache carry per-tensor K/V scales beside the attention weights
(compressed-tensors' `kv_cache_scheme`: `self_attn.k_scale` / `v_scale`; older FP8 files:
`self_attn.kv_scale`, or `k_proj.output_scale` / `v_proj.output_scale`). They are not parameters:
each goes to its layer's `Attention` (`set_kv_scales`), found under the checkpoint's own module
path or, for families whose names are mapped, under the module the layer's k_proj maps into.
Query and probability scales (FP8 attention, which paphos does not run) are skipped."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from paphos.attention.layer import Attention
from paphos.layers.weight_utils import default_weight_loader

# (parameter name, tensor, shard id or None); a name that maps to nothing is skipped (a buffer)
Load = tuple[str, torch.Tensor, object]
MapWeight = Callable[[str, torch.Tensor], list[Load]]


# checkpoint name suffix -> which of the layer's cache scales it gives
KV_SCALE_SUFFIXES = {
    ".k_scale": "k",
    ".v_scale": "v",
    ".kv_scale": "kv",
    ".k_proj.output_scale": "k",
    ".v_proj.output_scale": "v",
}
SKIPPED_SCALE_SUFFIXES = (".q_scale", ".prob_scale", ".q_proj.output_scale")


def load_mapped(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], map_weight: MapWeight
) -> set[str]:
    params = dict(model.named_parameters())
    attentions = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(SKIPPED_SCALE_SUFFIXES):
            continue
        suffix = next((s for s in KV_SCALE_SUFFIXES if name.endswith(s)), None)
        if suffix is not None and name not in params:
            layer = _attention_of(name[: -len(suffix)], attentions, map_weight, tensor, model)
            if layer is not None:
                _set_kv_scale(layer, KV_SCALE_SUFFIXES[suffix], tensor, name)
            continue
        for target, part, shard_id in map_weight(name, tensor):
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"checkpoint weight {name!r} ({target!r}) has no parameter in "
                    f"{type(model).__name__}"
                )
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard_id is None:
                loader(param, part)
            else:
                loader(param, part, shard_id)
            loaded.add(target)
    return loaded


def _attention_of(
    prefix: str,
    attentions: dict[str, Attention],
    map_weight: MapWeight,
    tensor: torch.Tensor,
    model: nn.Module,
) -> Attention | None:
    """The Attention a checkpoint scale under module path `prefix` belongs to; None where the
    family skips that layer (a multi-token-prediction layer, say)."""
    found = [m for n, m in attentions.items() if n == prefix or n.startswith(prefix + ".")]
    if not found:
        targets = [t for t, _, _ in map_weight(prefix + ".k_proj.weight", tensor)]
        if not targets:
            return None
        parent = targets[0].rsplit(".", 2)[0]  # X.qkv_proj.weight -> X
        found = [m for n, m in attentions.items() if n.startswith(parent + ".")]
    if len(found) != 1:
        raise ValueError(
            f"checkpoint KV cache scale under {prefix!r}: {len(found)} attention layers of "
            f"{type(model).__name__} match it (expected one)"
        )
    return found[0]


def _set_kv_scale(layer: Attention, which: str, tensor: torch.Tensor, name: str) -> None:
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint KV cache scale {name!r} has shape {tuple(tensor.shape)}: paphos takes "
            "one scale per tensor (per-head KV scales are not supported)"
        )
    value = float(tensor.float().item())
    k_scale = value if which in ("k", "kv") else layer.k_scale
    v_scale = value if which in ("v", "kv") else layer.v_scale
    layer.set_kv_scales(k_scale, v_scale)


def per_head_to_qkv(
    tensor: torch.Tensor, num_heads: int, head_size: int, target: str
) -> list[Load]:
    """A fused qkv stored per head ([num_heads, 3, head_size, *rest], GPT-NeoX, BigCode, Falcon
    without kv groups) as full q, k and v for QKVParallelLinear's shard ids."""
    rest = tensor.shape[1:]
    per_head = tensor.view(num_heads, 3, head_size, *rest)  # [heads, 3, head_size, *rest]
    return [
        (target, per_head[:, i].reshape(num_heads * head_size, *rest), shard)
        for i, shard in enumerate(("q", "k", "v"))
    ]
