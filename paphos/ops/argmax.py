"""Row-wise argmax of logits in two stages (chunk maxima, then the best chunk), because a single
row of a Llama-3 vocabulary (128K) runs in one thread block under torch.argmax (~26 us on an H100).

Same result as `torch.argmax(x, dim=-1)`, ties included (both pick the first maximum). On the CPU
the C kernel of paphos.kernels.cpu.argmax runs instead (~10x torch's argmax there).
"""

from __future__ import annotations

import functools

import torch

from paphos.kernels.cpu import argmax as cpu_argmax

MAX_CHUNK = 1024
MIN_CHUNKS = 64


@functools.cache
def chunk_size(vocab_size: int) -> int | None:
    """The largest divisor of vocab_size in [2, MAX_CHUNK] that leaves >= MIN_CHUNKS chunks, or None
    (the plain argmax is used)."""
    for size in range(MAX_CHUNK, 1, -1):
        if vocab_size % size == 0 and vocab_size // size >= MIN_CHUNKS:
            return size
    return None


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, vocab] -> [rows] int64 (into `out` when given)."""
    rows, vocab = x.shape
    if x.is_cpu:
        return cpu_argmax.argmax_rows(x, out)
    size = chunk_size(vocab)
    if size is None or not x.is_cuda or not x.is_contiguous():
        return torch.argmax(x, dim=-1, out=out)
    result = two_stage_argmax(x, size)  # [rows]
    return result if out is None else out.copy_(result)


def two_stage_argmax(x: torch.Tensor, size: int) -> torch.Tensor:
    """x [rows, vocab] contiguous, vocab a multiple of size -> [rows] int64."""
    rows, vocab = x.shape
    values, within = x.view(rows, vocab // size, size).max(dim=-1)  # [rows, chunks] each
    best = values.argmax(dim=-1, keepdim=True)  # [rows, 1]: the first chunk holding the maximum
    return (best * size + within.gather(1, best)).view(rows)  # [rows]
