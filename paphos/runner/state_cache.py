"""The recurrent-state cache of hybrid models, beside the paged KV cache: every state layer (a
module with `state_shapes()`: Mamba2 mixers, Gated DeltaNet) gets one tensor per kind of state,
[num_slots + 1, *shape]; slot s of every layer belongs to one request (core.state_pool). The last
slot is scratch for padded rows of a CUDA graph batch, which no request holds.

The model's `kv_caches` list holds one entry per cache-owning layer in module order: a KV tensor
for an `Attention`, a tuple of state tensors for a state layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paphos.config import EngineConfig

StateShapes = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # (shape of one slot, dtype) each


@dataclass(frozen=True)
class StateCacheSpec:
    layers: tuple[StateShapes, ...]  # one entry per state layer, in module order

    @property
    def bytes_per_slot(self) -> int:
        total = 0
        for shapes in self.layers:
            for shape, dtype in shapes:
                total += torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return total


def is_state_layer(module: nn.Module) -> bool:
    return callable(getattr(module, "state_shapes", None))


def cache_layout(model: nn.Module) -> list[str]:
    """ "kv" or "state" for each cache-owning layer of the model, in module order."""
    layout = []
    for module in model.modules():
        if type(module).__name__ == "Attention":
            layout.append("kv")
        elif is_state_layer(module):
            layout.append("state")
    return layout


def state_cache_spec(model: nn.Module) -> StateCacheSpec | None:
    """The state layers' shapes, or None for a model without any."""
    layers = tuple(m.state_shapes() for m in model.modules() if is_state_layer(m))
    return StateCacheSpec(layers) if layers else None


def num_state_slots(config: EngineConfig) -> int:
    """Slots of a hybrid model's state pool: the configured number, else max_num_seqs."""
    slots = config.cache.num_state_slots
    if slots is None:
        return config.scheduler.max_num_seqs
    if slots < 1:
        raise ValueError(f"num_state_slots={slots!r} is invalid: expected >= 1")
    return slots


def allocate_state_caches(
    spec: StateCacheSpec, num_slots: int, device: torch.device
) -> list[tuple[torch.Tensor, ...]]:
    """Zeroed [num_slots + 1, *shape] tensors for each state layer (the extra slot: padding)."""
    return [
        tuple(
            torch.zeros((num_slots + 1, *shape), dtype=dtype, device=device) for shape, dtype in s
        )
        for s in spec.layers
    ]


def interleave_caches(
    layout: list[str], kv_caches: list[torch.Tensor], state_caches: list[tuple[torch.Tensor, ...]]
) -> list:
    """The model's cache list: KV tensors and state tuples in the order of `layout`."""
    kv, state = iter(kv_caches), iter(state_caches)
    return [next(kv) if kind == "kv" else next(state) for kind in layout]
