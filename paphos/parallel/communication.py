"""Collectives over a `ParallelInfo`'s group; every one is the identity at world size 1.

Invariant: each rank calls the same collectives in the same order with tensors of the same shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from paphos.parallel.group import ParallelInfo


def all_reduce(x: torch.Tensor, parallel: ParallelInfo) -> torch.Tensor:
    """Sum of `x` over all ranks (in place where possible); returns the summed tensor."""
    if parallel.world_size == 1:
        return x
    if not x.is_contiguous():
        x = x.contiguous()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=parallel.group)
    return x


def all_gather(x: torch.Tensor, parallel: ParallelInfo, dim: int = -1) -> torch.Tensor:
    """Concatenation of every rank's `x` along `dim`, in rank order."""
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is invalid for a tensor of {x.dim()} dimensions")
    if parallel.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(parallel.world_size)]  # world_size x [*x.shape]
    dist.all_gather(parts, x, group=parallel.group)
    return torch.cat(parts, dim=dim)  # x.shape with dim scaled by world_size


def broadcast_object(obj: Any, parallel: ParallelInfo, src: int = 0) -> Any:
    """`obj` of rank `src`, on every rank (pickled); for small control messages, not tensors."""
    if not 0 <= src < parallel.world_size:
        raise ValueError(f"src={src!r} is invalid: expected a rank in [0, {parallel.world_size})")
    if parallel.world_size == 1:
        return obj
    box = [obj if parallel.rank == src else None]
    dist.broadcast_object_list(box, group=parallel.group, group_src=src)
    return box[0]
