"""Programmatic dependent launch (PDL) for the Triton kernels of a step, on Hopper (sm90) and later.

A decode step is ~150 short kernels in a row. Without PDL each one's programs are placed on the
SMs only after the kernel before it has finished and flushed its writes: per kernel a gap and a
ramp in which memory bandwidth goes unused. With PDL a kernel is launched with `launch_pdl=True`
(the launch attribute "programmatic stream serialization", kept by CUDA graph capture) and its
programs may become resident while the previous kernel runs its last wave. Each kernel then:

1. calls `pdl_prologue` first: it lets the next kernel launch, then waits for the previous
   kernel to finish and flush (griddepcontrol.wait);
2. touches no memory before that wait.

Why that is enough: a kernel cannot finish before its own wait returned, that is before the kernel
before it finished; so "the previous kernel finished" covers every kernel before it too, PDL or
not (a kernel launched without the attribute waits for its predecessor the usual way).

Measured on an H200 (notes/cuda.md, session 4): the 1B decode graph replays 8-10% faster
(batch 1 0.973 -> 0.890 ms, batch 64 1.447 -> 1.307). Prefetching the weights into L2 before
the wait (the weights are constant) made it slower than no PDL at batch 1 (1.066 ms): removed.

`PAPHOS_PDL=0` turns it off (for comparisons: benchmarks/gpu.py --no-pdl); it is off before sm90,
where the instructions do nothing, and under the Triton interpreter (no inline assembly there).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """The first statement of a kernel: let the next kernel in the stream launch once every
    program of this one got here, then wait until the previous kernel finished and its writes
    are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@functools.cache
def _enabled_on(device_index: int) -> bool:
    if os.environ.get("PAPHOS_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL."""
    if device.type != "cuda":
        return False
    return _enabled_on(device.index if device.index is not None else torch.cuda.current_device())


def pdl_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel launch: the kernel's USE_PDL and Triton's launch_pdl."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
