"""Loader and Python entries of the GGUF block kernels in gguf_matvec.c (AVX2 + FMA).

Invariant: `load_library()` builds and loads the library at most once per process, or returns None
(after one logged warning); callers then use the reference (dequantize with the `gguf` package,
then matmul). A weight is `[rows, row_bytes]` uint8, its rows stored as in the GGUF file.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from paphos.kernels.cpu import native

SOURCE = Path(__file__).with_name("gguf_matvec.c")
# Up to this many x rows the product runs from the blocks; more rows multiply dequantized tiles.
BLOCK_PRODUCT_MAX_ROWS = 16
_ERRORS = {
    -1: "type",
    -2: "in (not a positive multiple of the block)",
    -3: "rows",
    -4: "num_threads",
    -5: "pointer",
    -6: "memory",
    -7: "out",
    -8: "isa (AVX-512 asked of a CPU without it)",
}
AVX2, AVX512 = 0, 1  # the `isa` argument of paphos_gguf_matvec

find_compiler = native.find_compiler  # module attributes, so tests can replace them


def library_path(compiler: str, source: bytes, level: str) -> Path:
    return native.library_path("gguf_matvec", compiler, source, level)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.paphos_gguf_dequantize.argtypes = [c_int, ptr, i64, i64, ptr, c_int, c_int]
    lib.paphos_gguf_dequantize.restype = c_int
    lib.paphos_gguf_matvec.argtypes = [c_int, ptr, i64, ptr, i64, i64, ptr, i64, c_int, c_int]
    lib.paphos_gguf_matvec.restype = c_int
    lib.paphos_gguf_supports.argtypes = [c_int]
    lib.paphos_gguf_supports.restype = c_int
    lib.paphos_gguf_has_avx512.argtypes = []
    lib.paphos_gguf_has_avx512.restype = c_int
    lib.paphos_gguf_has_vnni.argtypes = []
    lib.paphos_gguf_has_vnni.restype = c_int
    lib.paphos_gguf_quantize_q8.argtypes = [ptr, c_int, i64, i64, ptr, ptr]
    lib.paphos_gguf_quantize_q8.restype = c_int
    lib.paphos_gguf_gemm_q8.argtypes = [
        *(c_int, ptr, c_int, i64, ptr, i64, i64, ptr, c_int, i64, c_int, c_int)
    ]
    lib.paphos_gguf_gemm_q8.restype = c_int
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    """The kernel library built for ISA `level` (default: this process's), or None (logged once)
    where it cannot run here."""
    return native.load_library("gguf_matvec", SOURCE, find_compiler(), library_path, bind, level)


@cache
def best_isa(lib: ctypes.CDLL) -> int:
    """AVX512 where the library's ISA level is AVX-512 or above (so PAPHOS_CPU_ISA=avx2 lowers
    it) and the CPU has it, else AVX2: asked once per library."""
    level = getattr(lib, "paphos_isa_level", "avx2")
    return AVX512 if level != "avx2" and lib.paphos_gguf_has_avx512() else AVX2


@cache
def best_gemm_isa(lib: ctypes.CDLL) -> int:
    """AVX512 (the VNNI product) where the library's level is AVX-512 or above and the CPU has
    AVX512-VNNI, else AVX2 (vpmaddubsw)."""
    level = getattr(lib, "paphos_isa_level", "avx2")
    return AVX512 if level != "avx2" and lib.paphos_gguf_has_vnni() else AVX2


def _check(code: int, name: str) -> None:
    if code != 0:
        raise ValueError(f"{name} rejected its {_ERRORS.get(code, code)} argument")


def dequantize(
    lib: ctypes.CDLL,
    ggml_type: int,
    weight: torch.Tensor,
    in_features: int,
    num_threads: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """weight [rows, row_bytes] uint8 of `ggml_type` -> [rows, in_features] float32 (or into
    `out`, a contiguous float32 or bfloat16 tensor of that shape: bf16 rounds as torch does)."""
    weight = weight.contiguous()
    if out is None:
        out = torch.empty(weight.shape[0], in_features, dtype=torch.float32)  # [rows, in]
    assert out.dtype in (torch.float32, torch.bfloat16) and out.is_contiguous()
    assert out.shape == (weight.shape[0], in_features)
    code = lib.paphos_gguf_dequantize(
        int(ggml_type),
        weight.data_ptr(),
        weight.shape[0],
        in_features,
        out.data_ptr(),
        out.dtype == torch.bfloat16,
        num_threads,
    )
    _check(code, "paphos_gguf_dequantize")
    return out


def matvec_into(
    lib: ctypes.CDLL,
    ggml_type: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    num_threads: int,
    isa: int | None = None,
) -> None:
    """y [rows, out] (rows contiguous, any row stride) = x [rows, in] fp32 @ W.T, W given as
    weight [out, row_bytes] uint8 blocks of `ggml_type`; activations stay fp32. `isa` (AVX2 or
    AVX512; default `best_isa`) picks the code path of the 32-element affine formats."""
    rows, in_features = x.shape
    assert x.dtype == torch.float32 and x.is_contiguous() and weight.is_contiguous()
    assert y.dtype == torch.float32 and y.stride(1) == 1 and y.shape == (rows, weight.shape[0])
    code = lib.paphos_gguf_matvec(
        int(ggml_type),
        x.data_ptr(),
        rows,
        weight.data_ptr(),
        weight.shape[0],
        in_features,
        y.data_ptr(),
        y.stride(0),
        best_isa(lib) if isa is None else isa,
        num_threads,
    )
    _check(code, "paphos_gguf_matvec")


def quantize_q8(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] fp32 or bf16 -> (q [rows, in] int8, d [rows, in / 32] fp32): the activation
    quantization of `gemm_q8_into` (xq = q * d per 32-element block)."""
    assert x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous() and x.dim() == 2
    rows, in_features = x.shape
    q = torch.empty(rows, in_features, dtype=torch.int8)  # [rows, in]
    d = torch.empty(rows, in_features // 32, dtype=torch.float32)  # [rows, in / 32]
    code = lib.paphos_gguf_quantize_q8(
        x.data_ptr(), x.dtype == torch.bfloat16, rows, in_features, q.data_ptr(), d.data_ptr()
    )
    _check(code, "paphos_gguf_quantize_q8")
    return q, d


def gemm_q8_into(
    lib: ctypes.CDLL,
    ggml_type: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    num_threads: int,
    isa: int | None = None,
) -> None:
    """y [rows, out] fp32 or bf16 (rounded once; rows contiguous, any row stride) = xq @ W.T:
    x [rows, in] fp32 or bf16
    quantized to 8 bits per 32-element block (`quantize_q8`), W as weight [out, row_bytes] uint8
    blocks of `ggml_type`, integer dot products per block. `isa`: AVX2 or AVX512 (VNNI; default
    `best_gemm_isa`)."""
    rows, in_features = x.shape
    assert x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
    assert weight.is_contiguous()
    assert y.dtype in (torch.float32, torch.bfloat16) and y.stride(1) == 1
    assert y.shape == (rows, weight.shape[0])
    code = lib.paphos_gguf_gemm_q8(
        int(ggml_type),
        x.data_ptr(),
        x.dtype == torch.bfloat16,
        rows,
        weight.data_ptr(),
        weight.shape[0],
        in_features,
        y.data_ptr(),
        y.dtype == torch.bfloat16,
        y.stride(0),
        best_gemm_isa(lib) if isa is None else isa,
        num_threads,
    )
    _check(code, "paphos_gguf_gemm_q8")
