"""`load_weights` for models whose checkpoint names map onto parameters one tensor at a time: a
family gives a function (checkpoint name, tensor) -> the loads to make; this applies them through
each parameter's `weight_loader` and returns the parameter names filled."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from paphos.layers.weight_utils import default_weight_loader

# (parameter name, tensor, shard id or None); a name that maps to nothing is skipped (a buffer)
Load = tuple[str, torch.Tensor, object]
MapWeight = Callable[[str, torch.Tensor], list[Load]]


def load_mapped(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], map_weight: MapWeight
) -> set[str]:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
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
