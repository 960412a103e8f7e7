"""Loader and Python entry of the AVX2 paged-attention kernel in attention.c (K/V read in place).

Invariant: same signature and semantics as paphos.ops.paged_attention.paged_attention; operands the
kernel does not take (a dtype other than fp32/bf16, a head size not a multiple of 16, a non-CPU
tensor) go to that reference, which is also the test oracle.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from paphos.kernels.cpu import native
from paphos.ops.paged_attention import paged_attention as reference_paged_attention

SOURCE = Path(__file__).with_name("attention.c")
DTYPES = (torch.bfloat16, torch.float32)
MAX_HEAD = 512
_ERRORS = {
    -1: "size (head_size, num_heads or block_size)",
    -2: "num_threads",
    -3: "pointer",
    -4: "memory",
    -5: "query_start_loc (negative, decreasing or past the last query token)",
    -6: "query_start_loc/seq_lens (more query tokens than context)",
    -7: "seq_lens (context longer than its block table row)",
    -8: "block_tables (block id outside the cache)",
}

find_compiler = native.find_compiler  # module attributes, so tests can replace them


def library_path(compiler: str, source: bytes, level: str) -> Path:
    return native.library_path("attention", compiler, source, level)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.paphos_paged_attention.argtypes = [
        *(ptr, c_int, i64, ptr),  # query, query_bf16, query_token_stride, out
        *(ptr, c_int, i64, i64, i64, i64),  # cache, bf16, blocks, block_size, kv heads, head
        *(i64, i64, ptr, ptr, i64),  # num_heads, num_tokens, query_start_loc, seq_lens, seqs
        *(ptr, i64, i64),  # block_tables, table_stride, max_blocks
        *(ctypes.c_float, c_int, ptr),  # scale, num_threads, bad_seq
    ]
    lib.paphos_paged_attention.restype = c_int
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    """The kernel library built for ISA `level` (default: this process's), or None (logged once)
    where it cannot run here."""
    return native.load_library("attention", SOURCE, find_compiler(), library_path, bind, level)


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these operands (`paged_attention` runs the reference otherwise)."""
    head_size = kv_cache.shape[-1] if kv_cache.dim() == 5 else 0
    return (
        query.is_cpu
        and kv_cache.is_cpu
        and query.dtype in DTYPES
        and kv_cache.dtype in DTYPES
        and 16 <= head_size <= MAX_HEAD
        and head_size % 16 == 0
        and kv_cache.is_contiguous()
    )


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The reference's contract: query [num_tokens, num_heads, head_size]; kv_cache [2, num_blocks,
    block_size, num_kv_heads, head_size]; query_start_loc [num_seqs + 1]; seq_lens [num_seqs];
    block_tables [num_seqs, max_blocks]. Returns [num_tokens, num_heads, head_size] in query's
    dtype. The host-side bounds are accepted for the layer's interface; the kernel needs none.
    An fp8 cache (the reference reads it) takes its scales; the kernel's caches ignore them."""
    lib = load_library()
    if lib is None or not supports(query, kv_cache):
        return reference_paged_attention(
            query, kv_cache, query_start_loc, seq_lens, block_tables, scale,
            k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    return launch(lib, query, kv_cache, query_start_loc, seq_lens, block_tables, scale)


def _check_shapes(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    if query.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"query {tuple(query.shape)} / kv_cache {tuple(kv_cache.shape)} should be "
            "[num_tokens, num_heads, head_size] / [2, num_blocks, block_size, kv_heads, head_size]"
        )
    if query.shape[2] != kv_cache.shape[4] or query.shape[1] % kv_cache.shape[3]:
        raise ValueError(
            f"query heads x size {tuple(query.shape[1:])} do not fit the cache's "
            f"{tuple(kv_cache.shape[3:])} (num_heads must be a multiple of num_kv_heads)"
        )
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if tuple(query_start_loc.shape) != (num_seqs + 1,) or block_tables.dim() != 2:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)}, seq_lens {tuple(seq_lens.shape)} and "
            f"block_tables {tuple(block_tables.shape)} should be [n + 1], [n] and [n, max_blocks]"
        )
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")


def _as_int64(index: torch.Tensor) -> torch.Tensor:
    if index.dtype == torch.int64 and index.stride(-1) == 1:
        return index
    return index.to(torch.int64).contiguous()  # same shape, int64 rows of unit stride


def launch(
    lib: ctypes.CDLL,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_threads: int | None = None,
) -> torch.Tensor:
    """The kernel on operands `supports` accepted; `num_threads` defaults to torch's."""
    _check_shapes(query, kv_cache, query_start_loc, seq_lens, block_tables)
    num_tokens, num_heads, head_size = query.shape
    out = torch.empty(num_tokens, num_heads, head_size, dtype=query.dtype)  # [tokens, heads, head]
    if num_tokens == 0:
        return out
    if query.stride(2) != 1 or query.stride(1) != head_size:
        query = query.contiguous()  # [num_tokens, num_heads, head_size]
    starts, lens = _as_int64(query_start_loc).contiguous(), _as_int64(seq_lens).contiguous()
    tables = _as_int64(block_tables)  # [num_seqs, max_blocks], rows of unit stride
    bad_seq = ctypes.c_int64(-1)
    code = lib.paphos_paged_attention(
        *(query.data_ptr(), query.dtype == torch.bfloat16, query.stride(0), out.data_ptr()),
        *(kv_cache.data_ptr(), kv_cache.dtype == torch.bfloat16, *kv_cache.shape[1:]),
        *(num_heads, num_tokens, starts.data_ptr(), lens.data_ptr(), lens.shape[0]),
        *(tables.data_ptr(), tables.stride(0), tables.shape[1]),
        *(scale, torch.get_num_threads() if num_threads is None else num_threads),
        ctypes.byref(bad_seq),
    )
    if code != 0:
        where = f" at sequence {bad_seq.value}" if bad_seq.value >= 0 else ""
        raise ValueError(f"paphos_paged_attention rejected its {_ERRORS.get(code, code)}{where}")
    return out
