"""Copying checkpoint tensors into parameters: shape-checked copies and shard cutting.

Invariant: a parameter is only ever written with a tensor of exactly its shape; anything else is a
ValueError that names both shapes, never a silent broadcast.
"""

from __future__ import annotations

import torch
from torch import nn


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """dst.copy_(src) after checking that the shapes agree (dtype and device may differ)."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"{what}: cannot load a tensor of shape {tuple(src.shape)} "
            f"into a parameter (slice) of shape {tuple(dst.shape)}"
        )
    dst.copy_(src)


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
    copy_checked(param.data, loaded_weight, "default_weight_loader")
