"""Process groups for tensor parallelism: `ParallelInfo` says which rank of how many a process is.

Invariant: a `ParallelInfo` is frozen and travels as an argument (layers get it when built); this
module keeps no state of its own. torch.distributed's default group is set up once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class ParallelInfo:
    """This process's place in the tensor-parallel group; `group=None` means the default group.
    `expert_parallel`: MoE layers give each rank whole experts instead of a slice of every one."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size={self.world_size!r} is invalid: expected an int >= 1")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank={self.rank!r} is invalid: expected an int in [0, {self.world_size})"
            )

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0


# The single-process default for layers built without tensor parallelism (frozen, so safe to share).
SINGLE_PROCESS = ParallelInfo()


def default_backend() -> str:
    """NCCL where CUDA is usable, gloo elsewhere."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    rank: int,
    world_size: int,
    backend: str | None = None,
    init_method: str = "env://",
) -> ParallelInfo:
    """Join the process group of `world_size` ranks as `rank`; on NCCL also pick this rank's GPU.

    `init_method` is a torch.distributed URL: "tcp://127.0.0.1:PORT", "file:///path" or "env://".
    """
    info = ParallelInfo(rank=rank, world_size=world_size)  # validates rank and world_size
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}")
    if dist.is_initialized():
        raise ValueError(
            "torch.distributed is already initialised in this process; "
            "call destroy_distributed() first"
        )
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size
    )
    return ParallelInfo(rank=info.rank, world_size=info.world_size, group=dist.group.WORLD)


def destroy_distributed() -> None:
    """Leave the process group (a no-op where none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
