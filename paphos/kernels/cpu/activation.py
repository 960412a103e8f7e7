"""Loader and Python entry of the C SiLU-and-mul in activation.c (the fused decode layer's own).

Invariant: same signature and semantics as paphos.ops.activation.silu_and_mul; operands the kernel
does not take (fp16, a non-CPU tensor, no library) go to that reference. Picked for the unfused
layers too, so they and the fused decode layer compute one SiLU.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from paphos.kernels.cpu import native
from paphos.ops import activation as reference_activation

SOURCE = Path(__file__).with_name("activation.c")
DTYPES = (torch.bfloat16, torch.float32)
_ERRORS = {-1: "size", -2: "num_threads", -3: "pointer"}

find_compiler = native.find_compiler  # module attributes, so tests can replace them


def library_path(compiler: str, source: bytes, level: str) -> Path:
    return native.library_path("activation", compiler, source, level)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.paphos_silu_and_mul.argtypes = [ptr, ptr, i64, i64, c_int, c_int]
    lib.paphos_silu_and_mul.restype = c_int
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    """The kernel library built for ISA `level` (default: this process's), or None (logged once)
    where it cannot run here."""
    return native.load_library("activation", SOURCE, find_compiler(), library_path, bind, level)


def silu_and_mul(x: torch.Tensor, level: str | None = None) -> torch.Tensor:
    """As paphos.ops.activation.silu_and_mul: x [num_tokens, 2 * d] = [gate | up] -> [.., d]."""
    lib = load_library(level)
    if (
        lib is None
        or x.dtype not in DTYPES
        or not x.is_cpu
        or x.dim() != 2
        or x.shape[0] == 0
        or x.shape[1] % 2
        or x.shape[1] == 0
    ):
        return reference_activation.silu_and_mul(x)
    x_in = x.contiguous()  # [num_tokens, 2 * d]
    d = x.shape[1] // 2
    out = torch.empty(x.shape[0], d, dtype=x.dtype)  # [num_tokens, d]
    code = lib.paphos_silu_and_mul(
        x_in.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        d,
        x.dtype == torch.bfloat16,
        torch.get_num_threads(),
    )
    if code != 0:
        raise ValueError(f"paphos_silu_and_mul rejected its {_ERRORS.get(code, code)} argument")
    return out
