"""Zeroed int32 counters for kernels whose last-arriving program finishes a shared result (the
split-K skinny GEMM): one launch instead of a second reduce kernel, and no memset.

Invariant: every counter is zero between launches; a launch that takes tickets resets each counter
it used before it ends. Buffers only grow, and an outgrown buffer is kept alive, because a CUDA
graph captured earlier still points into it; none is allocated during a capture (its zeroing would
only run at replay), so each shape runs eagerly first, as the decode graphs' warm-up does.
"""

from __future__ import annotations

import torch

MIN_TICKETS = 4096


class TicketPool:
    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._outgrown: list[torch.Tensor] = []

    def get(self, device: torch.device, num_tickets: int) -> torch.Tensor:
        """At least num_tickets zeroed int32 counters on device."""
        buffer = self._buffers.get(device)
        if buffer is not None and buffer.numel() >= num_tickets:
            return buffer
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{num_tickets} kernel tickets are first needed during a CUDA graph capture; run "
                "the same shapes once eagerly before capturing"
            )
        if buffer is not None:
            self._outgrown.append(buffer)
        buffer = torch.zeros(max(num_tickets, MIN_TICKETS), dtype=torch.int32, device=device)
        self._buffers[device] = buffer
        return buffer


TICKETS = TicketPool()
