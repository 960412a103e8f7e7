"""Triton paged prefill attention: sequences with more than one query token (prompt chunks).

One program per (sequence, query block, kv head) holds BLOCK_Q query tokens times the GQA group as
its rows. Query token i of a sequence sits at position seq_len - q_len + i; keys before the
block's first position are attended without a mask, the rest with the causal mask; with a sliding
window every tile from the first one the block's first query sees is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from paphos.kernels.attention_tile import attend_tile, normalize_with_sinks
from paphos.kernels.decode_attention import score_scales
from paphos.kernels.kv_cache import FP8_DTYPES


@triton.jit
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    query_start_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    out_ptr,
    sinks_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_blk,
    stride_tok,
    stride_head,
    stride_bt,
    scale_log2,
    window,
    cap_log2,
    v_scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    CHUNK: tl.constexpr,
    KV_FP8: tl.constexpr,  # fp8 K/V (attention_tile); the output times v_scale
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    if q_len <= 1 or q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context_len = seq_len - q_len
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)  # [M]
    q_idx = q_block * BLOCK_Q + rows // GROUP_PAD
    g = rows % GROUP_PAD
    heads = kv_head * GROUP + g
    dims = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
    io_mask = ((q_idx < q_len) & (g < GROUP))[:, None] & (dims < HEAD_SIZE)[None, :]
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=io_mask,
        other=0.0,
    )  # [M, HEAD_PAD]
    q_pos = context_len + q_idx  # [M]
    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    first_pos = context_len + q_block * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    unmasked_start = 0
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    if WINDOW:  # every tile masked, from the first one the block's first row sees
        unmasked_end = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        unmasked_start = unmasked_end
    if CHUNK:  # likewise from the tile of the first row's chunk start (`window`: chunk size)
        unmasked_end = ((first_pos - first_pos % window) // BLOCK_N) * BLOCK_N
        unmasked_start = unmasked_end
    for start in range(unmasked_start, unmasked_end, BLOCK_N):
        acc, m, l_sum = attend_tile(
            q,
            acc,
            m,
            l_sum,
            cache_ptr,
            bt_row,
            kv_head,
            start,
            kv_end,
            q_pos,
            scale_log2,
            window,
            cap_log2,
            stride_kv,
            stride_blk,
            stride_tok,
            stride_head,
            HEAD_SIZE,
            HEAD_PAD,
            PAGE_SIZE,
            BLOCK_N,
            False,
            IEEE,
            False,
            SOFT_CAP,
            False,
            KV_FP8,
        )
    for start in range(unmasked_end, kv_end, BLOCK_N):
        acc, m, l_sum = attend_tile(
            q,
            acc,
            m,
            l_sum,
            cache_ptr,
            bt_row,
            kv_head,
            start,
            kv_end,
            q_pos,
            scale_log2,
            window,
            cap_log2,
            stride_kv,
            stride_blk,
            stride_tok,
            stride_head,
            HEAD_SIZE,
            HEAD_PAD,
            PAGE_SIZE,
            BLOCK_N,
            True,
            IEEE,
            WINDOW,
            SOFT_CAP,
            CHUNK,
            KV_FP8,
        )
    out = normalize_with_sinks(acc, m, l_sum, sinks_ptr, heads, g < GROUP, HAS_SINKS)
    if KV_FP8:
        out = out * v_scale
    dst = out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@dataclass(frozen=True)
class PrefillTiles:
    """Rows (query tokens x GQA group) and keys per program, and the launch shape."""

    rows: int
    block_n: int
    num_warps: int
    num_stages: int


def default_prefill_tiles(head_size: int) -> PrefillTiles:
    """128 rows x 32 keys, 4 warps, 3 stages: best of the H100 sweep for head size 128
    (notes/cuda.md); 64 rows with 8 warps for head size 256 (registers), not yet swept."""
    if head_size <= 128:
        return PrefillTiles(rows=128, block_n=32, num_warps=4, num_stages=3)
    return PrefillTiles(rows=64, block_n=32, num_warps=8, num_stages=2)


def prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
    tiles: PrefillTiles | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write `out` rows of sequences with more than one query token; others stay untouched.
    sinks: [num_heads] float32 logits joining each row's softmax (None: none); chunk_size: each
    query sees only its own chunk (not with a sliding window); k_scale, v_scale: an fp8 cache's
    per-tensor scales (float caches ignore them)."""
    if chunk_size is not None and sliding_window is not None:
        raise ValueError("a layer attends within a sliding window or within chunks, not both")
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_size = query.shape
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    tiles = tiles or default_prefill_tiles(head_size)
    group_pad = triton.next_power_of_2(group)
    block_q = max(tiles.rows // group_pad, 1)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    kv_fp8 = kv_cache.dtype in FP8_DTYPES
    scale_log2, cap_log2 = score_scales(scale * (k_scale if kv_fp8 else 1.0), soft_cap)
    _prefill_kernel[grid](
        query,
        kv_cache,
        query_start_loc,
        seq_lens,
        block_tables,
        out,
        query if sinks is None else sinks,  # a placeholder pointer without sinks
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        scale_log2,
        sliding_window or chunk_size or 0,
        cap_log2,
        v_scale,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        HEAD_SIZE=head_size,
        HEAD_PAD=max(triton.next_power_of_2(head_size), 16),
        PAGE_SIZE=page_size,
        BLOCK_N=tiles.block_n,
        IEEE=query.dtype == torch.float32,
        WINDOW=sliding_window is not None,
        SOFT_CAP=soft_cap is not None,
        HAS_SINKS=sinks is not None,
        CHUNK=chunk_size is not None,
        KV_FP8=kv_fp8,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
