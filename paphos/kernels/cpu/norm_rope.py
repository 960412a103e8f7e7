"""Loader and Python entries of the C RMSNorm / fused add+RMSNorm / rotary kernels in norm_rope.c.

Invariant: same signatures and semantics as paphos.ops.rms_norm and paphos.ops.rotary; operands the
kernel does not take (fp16, a non-CPU tensor, an odd layout, no library) go to those references.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from paphos.kernels.cpu import native
from paphos.ops import rms_norm as reference_norm
from paphos.ops import rotary as reference_rotary

SOURCE = Path(__file__).with_name("norm_rope.c")
DTYPES = (torch.bfloat16, torch.float32)
MAX_WIDTH = 16384
# The C sum of squares follows torch's AVX2 reduction order (bitwise equal to torch built for AVX2;
# torch built for AVX-512 sums in another order, so fp32 may differ from it in the last bit).
NORM_DTYPES = DTYPES
_ERRORS = {-1: "size", -2: "num_threads", -3: "pointer", -4: "positions (outside the cache)"}

find_compiler = native.find_compiler  # module attributes, so tests can replace them


def library_path(compiler: str, source: bytes, level: str) -> Path:
    return native.library_path("norm_rope", compiler, source, level)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.paphos_rms_norm.argtypes = [
        *(ptr, ptr, ptr, ptr, ptr),  # x, residual, residual_out, weight, out
        *(c_int, i64, i64, ctypes.c_float, c_int),  # is_bf16, rows, hidden, eps, num_threads
    ]
    lib.paphos_rms_norm.restype = c_int
    lib.paphos_rotary.argtypes = [
        *(ptr, ptr, i64, i64),  # positions, query, q_stride, q_heads
        *(ptr, i64, i64),  # key, k_stride, k_heads
        *(ptr, c_int, i64, ptr, ptr),  # cache, cache_is_bf16, max_position, q_out, k_out
        *(c_int, i64, i64, i64, c_int, c_int),  # bf16, tokens, head, rot_dim, neox, threads
    ]
    lib.paphos_rotary.restype = c_int
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    """The kernel library built for ISA `level` (default: this process's), or None (logged once)
    where it cannot run here."""
    return native.load_library("norm_rope", SOURCE, find_compiler(), library_path, bind, level)


def _check(code: int, name: str) -> None:
    if code != 0:
        raise ValueError(f"{name} rejected its {_ERRORS.get(code, code)} argument")


def _norm_supported(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    return (
        x.dtype in NORM_DTYPES
        and x.dim() == 2
        and x.shape[0] > 0
        and 0 < x.shape[1] <= MAX_WIDTH
        and x.is_cpu
        and weight.is_cpu
        and weight.dtype == x.dtype
        and weight.dim() == 1
        and weight.shape[0] == x.shape[1]
        and all(t.is_cpu and t.dtype == x.dtype and t.shape == x.shape for t in others)
    )


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    lib = load_library()
    assert lib is not None  # callers checked
    x_in = x.contiguous()  # [rows, hidden]
    res_in = None if residual is None else residual.contiguous()  # [rows, hidden]
    w_in = weight.contiguous()  # [hidden]
    out = torch.empty_like(x_in)  # [rows, hidden]
    summed = None if residual is None else torch.empty_like(x_in)  # [rows, hidden]
    code = lib.paphos_rms_norm(
        x_in.data_ptr(),
        None if res_in is None else res_in.data_ptr(),
        None if summed is None else summed.data_ptr(),
        w_in.data_ptr(),
        out.data_ptr(),
        x.dtype == torch.bfloat16,
        x.shape[0],
        x.shape[1],
        eps,
        torch.get_num_threads(),
    )
    _check(code, "paphos_rms_norm")
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As paphos.ops.rms_norm.rms_norm: x [num_tokens, hidden], weight [hidden] -> x's shape."""
    if load_library() is None or not _norm_supported(x, weight):
        return reference_norm.rms_norm(x, weight, eps)
    return _norm(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As paphos.ops.rms_norm.fused_add_rms_norm: (rms_norm(x + residual), x + residual)."""
    if load_library() is None or not _norm_supported(x, weight, residual):
        return reference_norm.fused_add_rms_norm(x, residual, weight, eps)
    out, summed = _norm(x, residual, weight, eps)
    assert summed is not None
    return out, summed


def _rotary_supported(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cache: torch.Tensor, head: int
) -> bool:
    rot_dim = cache.shape[-1] if cache.dim() == 2 else 0
    return (
        query.dtype in DTYPES
        and key.dtype == query.dtype
        and cache.dtype in DTYPES
        and positions.is_cpu
        and query.is_cpu
        and key.is_cpu
        and cache.is_cpu
        and positions.dim() == 1
        and query.dim() == 2
        and key.dim() == 2
        and head > 0
        and query.shape[0] == key.shape[0] == positions.shape[0] > 0
        and query.shape[1] % head == 0
        and key.shape[1] % head == 0
        and 0 < rot_dim <= min(head, MAX_WIDTH)
        and rot_dim % 2 == 0
        and query.stride(1) == 1
        and key.stride(1) == 1
    )


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As paphos.ops.rotary.rotary_embedding; returns new contiguous (query, key)."""
    lib = load_library()
    if lib is None or not _rotary_supported(positions, query, key, cos_sin_cache, head_size):
        args = (positions, query, key, cos_sin_cache, head_size, is_neox)
        return reference_rotary.rotary_embedding(*args)
    tokens = positions.shape[0]
    pos = positions  # [num_tokens]
    if pos.dtype != torch.int64 or not pos.is_contiguous():
        pos = pos.to(torch.int64).contiguous()  # [num_tokens]
    cache_in = cos_sin_cache.contiguous()  # [max_position, rot_dim]
    q_out = torch.empty(tokens, query.shape[1], dtype=query.dtype)  # [num_tokens, q width]
    k_out = torch.empty(tokens, key.shape[1], dtype=key.dtype)  # [num_tokens, k width]
    code = lib.paphos_rotary(
        *(pos.data_ptr(), query.data_ptr(), query.stride(0), query.shape[1] // head_size),
        *(key.data_ptr(), key.stride(0), key.shape[1] // head_size),
        *(cache_in.data_ptr(), cache_in.dtype == torch.bfloat16, cache_in.shape[0]),
        *(q_out.data_ptr(), k_out.data_ptr(), query.dtype == torch.bfloat16, tokens),
        *(head_size, cache_in.shape[1], bool(is_neox), torch.get_num_threads()),
    )
    _check(code, "paphos_rotary")
    return q_out, k_out
