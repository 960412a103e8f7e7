"""Triton paged attention for a mixed batch: the decode kernel takes rows with one query token, the
prefill kernel rows with more; together they write every query row the reference writes.

No host sync: host-side facts (max_query_len, max_seq_len) come as optional arguments, and are
otherwise bounded by tensor shapes (num_tokens, max_blocks * block_size).
"""

from __future__ import annotations

import torch

from paphos.kernels._checks import check_dim, check_float_dtype, check_same_device, num_sms
from paphos.kernels.decode_attention import decode_attention, num_decode_splits
from paphos.kernels.kv_cache import FP8_DTYPES
from paphos.kernels.prefill_attention import prefill_attention


def _check(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    check_dim("query", query, 3)
    check_dim("kv_cache", kv_cache, 5)
    check_dim("query_start_loc", query_start_loc, 1)
    check_dim("seq_lens", seq_lens, 1)
    check_dim("block_tables", block_tables, 2)
    check_float_dtype("query", query)
    if kv_cache.dtype not in FP8_DTYPES:
        check_float_dtype("kv_cache", kv_cache)
    check_same_device(
        query=query,
        kv_cache=kv_cache,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
    )
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)}, seq_lens {tuple(seq_lens.shape)} "
            f"and block_tables {tuple(block_tables.shape)} disagree on the number of sequences"
        )
    if kv_cache.shape[0] != 2 or kv_cache.shape[4] != query.shape[2]:
        raise ValueError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not fit query head size {query.shape[2]}"
        )
    if kv_cache.stride(4) != 1:
        raise ValueError("kv_cache must have unit stride along head_size")
    if query.shape[1] % kv_cache.shape[3]:
        raise ValueError(
            f"num_heads={query.shape[1]} is not a multiple of num_kv_heads={kv_cache.shape[3]}"
        )
    for name, t in (
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
        ("block_tables", block_tables),
    ):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} has dtype {t.dtype}; expected int32 or int64")


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """As paphos.ops.paged_attention.paged_attention (sliding window, soft-cap, sinks, chunks and
    fp8 caches with their per-tensor scales included); returns [num_tokens, num_heads,
    head_size].

    max_query_len / max_seq_len: host-side upper bounds of this batch (optional; the reference
    ignores them). max_query_len == 1 skips the prefill kernel; max_seq_len sizes the decode
    split count and must stay fixed across replays of a captured CUDA graph.
    """
    _check(query, kv_cache, query_start_loc, seq_lens, block_tables)
    if query.stride(2) != 1:
        query = query.contiguous()  # [num_tokens, num_heads, head_size]
    out = torch.empty_like(query)  # [num_tokens, num_heads, head_size]
    num_tokens, num_seqs = query.shape[0], seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = num_tokens
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * kv_cache.shape[2]
    if max_query_len < 1 or max_seq_len < 1:
        raise ValueError(
            f"max_query_len={max_query_len} and max_seq_len={max_seq_len} must be >= 1"
        )
    num_splits = num_decode_splits(num_seqs, kv_cache.shape[3], max_seq_len, num_sms(query.device))
    if sinks is not None:
        if tuple(sinks.shape) != (query.shape[1],):
            raise ValueError(f"sinks has shape {tuple(sinks.shape)}; expected ({query.shape[1]},)")
        sinks = sinks.float().contiguous()  # [num_heads]
    limits = {
        "sliding_window": sliding_window, "soft_cap": soft_cap, "sinks": sinks,
        "chunk_size": chunk_size, "k_scale": k_scale, "v_scale": v_scale,
    }  # fmt: skip
    decode_attention(
        query, kv_cache, query_start_loc, seq_lens, block_tables, scale, out, num_splits, **limits
    )
    if max_query_len > 1:
        prefill_attention(
            query,
            kv_cache,
            query_start_loc,
            seq_lens,
            block_tables,
            scale,
            out,
            min(max_query_len, num_tokens),
            **limits,
        )
    return out
