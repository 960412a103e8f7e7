"""Loader and Python entries of matvec.c: the small-batch matrix-vector kernel (1-4 rows, every
ISA level) and, at the AVX-512 BF16 level, the batched product over weights packed in bf16 pairs.

Invariant: `load_library()` builds and loads the library at most once per process; it returns None
(after one logged warning) when the CPU, compiler or build cannot provide it.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from paphos.kernels.cpu import native

SOURCE = Path(__file__).with_name("matvec.c")
MAX_ROWS = 4
WEIGHT_DTYPES = (torch.bfloat16, torch.float32)
_ERRORS = {-1: "rows", -2: "in", -3: "out", -4: "num_threads", -5: "pointer", -6: "memory"}

find_compiler = native.find_compiler  # module attributes, so tests can replace them


def library_path(compiler: str, source: bytes, level: str) -> Path:
    return native.library_path("matvec", compiler, source, level)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.paphos_matvec.argtypes = [ptr, c_int, ptr, c_int, ptr, ptr, c_int, i64, i64, i64, c_int]
    lib.paphos_matvec.restype = c_int
    bind_gemm(lib)
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    """The kernel library built for ISA `level` (default: this process's), or None (logged once)
    where it cannot run here."""
    return native.load_library("matvec", SOURCE, find_compiler(), library_path, bind, level)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `matvec` handles these operands (the caller falls back to torch otherwise).

    Written for speed (it runs before every small product): `is_cpu`, not `device.type`."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.is_cpu
        and weight.is_cpu
        and weight.dtype in WEIGHT_DTYPES
        and weight.dim() == 2
        and x.shape[1] == weight.shape[1]
        and weight.numel() > 0
        and weight.is_contiguous()
    )


def matvec(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_threads: int = 1,
) -> torch.Tensor:
    """x [rows <= 4, in] @ weight[out, in].T (+ bias) -> [rows, out] in x's dtype (fp32 sums)."""
    if not supports(x, weight):
        raise ValueError(
            f"matvec cannot take x {tuple(x.shape)} {x.dtype} with weight {tuple(weight.shape)} "
            f"{weight.dtype} (contiguous={weight.is_contiguous()}): needs rows 1..{MAX_ROWS}, "
            f"matching in, a non-empty contiguous CPU weight in {WEIGHT_DTYPES}"
        )
    return launch(lib, x, weight, bias, num_threads)


def launch(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_threads: int,
) -> torch.Tensor:
    """`matvec` for operands that `supports` accepted (callers that already checked skip it)."""
    rows, out = x.shape[0], weight.shape[0]
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bias shape {tuple(bias.shape)} should be ({out},)")
    x_is_bf16 = x.dtype == torch.bfloat16
    x_in = x.contiguous() if x.dtype in WEIGHT_DTYPES else x.float().contiguous()  # [rows, in]
    y = torch.empty(rows, out, dtype=x_in.dtype)  # [rows, out]
    bias_fp32 = None if bias is None else bias.float().contiguous()  # [out]
    code = lib.paphos_matvec(
        x_in.data_ptr(),
        x_is_bf16,
        weight.data_ptr(),
        weight.dtype == torch.bfloat16,
        None if bias_fp32 is None else bias_fp32.data_ptr(),
        y.data_ptr(),
        x_is_bf16,
        rows,
        x.shape[1],
        out,
        num_threads,
    )
    if code != 0:
        raise ValueError(f"paphos_matvec rejected its {_ERRORS.get(code, code)} argument")
    return y if y.dtype == x.dtype else y.to(x.dtype)


# ---- batched products over a packed copy (matvec.c's paphos_gemm_packed, AVX-512 BF16) ---------

_GEMM_ERRORS = {**_ERRORS, -7: "isa"}


def bind_gemm(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.paphos_packed_numel.argtypes = [i64, i64]
    lib.paphos_packed_numel.restype = i64
    lib.paphos_pack_bf16_pairs.argtypes = [ptr, i64, i64, ptr]
    lib.paphos_pack_bf16_pairs.restype = c_int
    lib.paphos_gemm_packed.argtypes = [ptr, ptr, ptr, ptr, c_int, i64, i64, i64, c_int]
    lib.paphos_gemm_packed.restype = c_int


def has_packed_gemm(lib: ctypes.CDLL | None) -> bool:
    """Whether `lib` was built with the packed bf16 product (the AVX-512 BF16 level)."""
    return lib is not None and lib.paphos_isa_level == "avx512_bf16"


def pack_bf16_pairs(lib: ctypes.CDLL, weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] bf16 -> its packed copy for `gemm_packed`: a flat bf16 tensor laid out
    [panels][in pairs][panel columns][2] (matvec.c)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"pack_bf16_pairs takes a contiguous 2-D bf16 weight, not {weight.dtype}")
    out, in_ = weight.shape
    packed = torch.empty(lib.paphos_packed_numel(out, in_), dtype=torch.bfloat16)  # flat
    code = lib.paphos_pack_bf16_pairs(weight.data_ptr(), out, in_, packed.data_ptr())
    if code != 0:
        raise ValueError(f"paphos_pack_bf16_pairs rejected its {_ERRORS.get(code, code)} argument")
    return packed


def gemm_packed(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    num_threads: int,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x [rows, in] bf16 times the weight `packed` came from (+ bias) -> [rows, out_features] in
    out_dtype (bf16 or fp32; fp32 sums, one rounding)."""
    rows, in_ = x.shape
    if lib.paphos_packed_numel(out_features, in_) != packed.numel():
        raise ValueError(f"packed copy of {packed.numel()} elements is not [{out_features}, {in_}]")
    x_in = x.contiguous()  # [rows, in] bf16
    y = torch.empty(rows, out_features, dtype=out_dtype)  # [rows, out]
    bias_fp32 = None if bias is None else bias.float().contiguous()  # [out]
    code = lib.paphos_gemm_packed(
        x_in.data_ptr(),
        packed.data_ptr(),
        None if bias_fp32 is None else bias_fp32.data_ptr(),
        y.data_ptr(),
        out_dtype == torch.bfloat16,
        rows,
        in_,
        out_features,
        num_threads,
    )
    if code != 0:
        raise ValueError(f"paphos_gemm_packed rejected its {_GEMM_ERRORS.get(code, code)} argument")
    return y
