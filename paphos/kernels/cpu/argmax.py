"""Loader and Python entry of the C row-wise argmax in argmax.c (greedy sampling on the CPU).

Invariant: the result equals torch.argmax(x, dim=-1) (first maximum, first NaN); operands the kernel
does not take (not fp32 rows of a CPU tensor, no library) go to torch.argmax.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from paphos.kernels.cpu import native

SOURCE = Path(__file__).with_name("argmax.c")


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.paphos_argmax_rows.argtypes = [ptr, i64, i64, i64, ptr, c_int]
    lib.paphos_argmax_rows.restype = c_int
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    """The kernel library built for ISA `level` (default: this process's), or None (logged once)."""

    def target_for(compiler: str, source: bytes, lvl: str) -> Path:
        return native.library_path("argmax", compiler, source, lvl)

    return native.load_library("argmax", SOURCE, native.find_compiler(), target_for, bind, level)


def argmax_rows(
    x: torch.Tensor, out: torch.Tensor | None = None, level: str | None = None
) -> torch.Tensor:
    """x [rows, vocab] -> [rows] int64 (into `out` when given), as torch.argmax(x, dim=-1)."""
    lib = load_library(level)
    takes = (
        lib is not None
        and x.is_cpu
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.shape[1] > 0
        and x.stride(1) == 1
        and (out is None or (out.is_contiguous() and out.dtype == torch.int64))
    )
    if not takes:
        return torch.argmax(x, dim=-1, out=out)
    result = out if out is not None else torch.empty(x.shape[0], dtype=torch.int64)  # [rows]
    code = lib.paphos_argmax_rows(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        x.stride(0),
        result.data_ptr(),
        torch.get_num_threads(),
    )
    if code != 0:
        raise ValueError(f"paphos_argmax_rows rejected its arguments (code {code})")
    return result
