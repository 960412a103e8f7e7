"""Copying checkpoint tensors into parameters: shape-checked copies and shard cutting.

Invariant: a parameter is only ever written with a tensor of exactly its shape; anything else is a
ValueError that names both shapes, never a silent broadcast. A packed checkpoint tensor (a GGUF
matrix kept as blocks) goes to a parameter that stores it its own way (`store_slice`, set by its
linear method), or is dequantized first.
"""

from __future__ import annotations

import torch
from torch import nn


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """dst.copy_(src) after checking that the shapes agree (dtype and device may differ)."""
    if not isinstance(src, torch.Tensor):  # packed (gguf_file.GGUFQuantizedTensor): unpack
        src = src.dequantize()
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"{what}: cannot load a tensor of shape {tuple(src.shape)} "
            f"into a parameter (slice) of shape {tuple(dst.shape)}"
        )
    dst.copy_(src)


def param_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The shape a parameter stands for: its own, or, for packed weights, `logical_shape`."""
    return tuple(getattr(param, "logical_shape", param.shape))


def store_slice(
    param: nn.Parameter, src: torch.Tensor, dim: int | None, offset: int, what: str
) -> None:
    """Write `src` into `param` at [offset, offset + len) along `dim` (the whole parameter when
    dim is None); a parameter with `store_slice` (a packed format's) takes it its own way."""
    store = getattr(param, "store_slice", None)
    if store is not None:
        store(src, dim, offset)
        return
    dst = param.data if dim is None else param.data.narrow(dim, offset, src.shape[dim])
    copy_checked(dst, src, what)


def narrow_checked(
    loaded: torch.Tensor, dim: int, start: int, size: int, full_size: int, what: str
) -> torch.Tensor:
    """Entries [start, start + size) of `loaded` along `dim`, which must hold `full_size`."""
    if loaded.dim() <= dim or loaded.shape[dim] != full_size:
        raise ValueError(
            f"{what}: checkpoint tensor of shape {tuple(loaded.shape)} should have {full_size} "
            f"entries along dim {dim}"
        )
    return loaded.narrow(dim, start, size)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Load a replicated (unsharded) parameter; a 1-element tensor may fill a 0-d parameter."""
    if param.dim() == 0 and loaded_weight.numel() == 1:
        loaded_weight = loaded_weight.reshape(())  # []
    store_slice(param, loaded_weight, None, 0, "default_weight_loader")


def load_rank_parts(
    param: nn.Parameter,
    loaded: torch.Tensor,
    part_sizes: list[int],
    rank: int,
    world_size: int,
    what: str,
) -> None:
    """Load a parameter made of parts concatenated along dim 0 (a conv over [x | B | C]), each
    split over ranks: this rank's slice of every part, concatenated. Part sizes are full sizes."""
    full = narrow_checked(loaded, 0, 0, sum(part_sizes), sum(part_sizes), what)
    slices = []
    for part in full.split(part_sizes, dim=0):
        size = part.shape[0] // world_size
        slices.append(part.narrow(0, rank * size, size))
    copy_checked(param.data, torch.cat(slices).reshape(param.shape), what)
