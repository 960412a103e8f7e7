"""Tensor parallelism over torch.distributed: `ParallelInfo`, process-group set-up and collectives.

Invariant: no module-level mutable state; callers pass a `ParallelInfo` to everything that talks.
"""

from __future__ import annotations

from paphos.parallel.communication import all_gather, all_reduce, broadcast_object
from paphos.parallel.group import (
    SINGLE_PROCESS,
    ParallelInfo,
    default_backend,
    destroy_distributed,
    init_distributed,
)
from paphos.parallel.sharding import divide, round_up

__all__ = [
    "SINGLE_PROCESS",
    "ParallelInfo",
    "all_gather",
    "all_reduce",
    "broadcast_object",
    "default_backend",
    "destroy_distributed",
    "divide",
    "init_distributed",
    "round_up",
]
