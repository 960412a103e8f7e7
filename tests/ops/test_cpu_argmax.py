"""The C row-wise argmax (paphos.kernels.cpu.argmax) equals torch.argmax at every ISA level this
CPU has: first maximum on ties, first NaN, rows of -inf, strided rows, vector tails; and greedy
sampling on the CPU goes through it."""

from __future__ import annotations

import pytest
import torch

from paphos.kernels.cpu import argmax, isa
from paphos.ops.argmax import argmax_rows


def _cases() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 3, (40, 37), generator=gen).float()  # many equal maxima per row
    ties[3, 5] = ties[3, 9] = float("nan")
    ties[7] = -float("inf")
    ties[8, 30] = float("inf")
    ties[9, 36] = float("nan")  # a NaN in the scalar tail
    return [
        torch.randn(64, 49152, generator=gen),
        torch.randn(3, 13, generator=gen),
        torch.randn(1, 1, generator=gen),
        ties,
        torch.randn(20, 60, generator=gen)[:, 3:53],  # rows 60 apart, 50 wide
    ]


@pytest.mark.parametrize("level", isa.available())
def test_argmax_kernel_equals_torch_argmax(level) -> None:
    assert argmax.load_library(level) is not None
    for x in _cases():
        assert torch.equal(argmax.argmax_rows(x, level=level), torch.argmax(x, dim=-1))


def test_argmax_writes_into_out_and_falls_back_for_other_dtypes() -> None:
    x = torch.randn(5, 100)
    out = torch.empty(5, dtype=torch.int64)
    assert argmax_rows(x, out=out) is out and torch.equal(out, x.argmax(-1))
    half = x.bfloat16()
    assert torch.equal(argmax.argmax_rows(half), half.argmax(-1))
