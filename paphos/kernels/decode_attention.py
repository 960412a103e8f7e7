"""Triton paged decode attention (flash-decoding): rows with exactly one query token.

One program per (sequence, kv head, split) attends the whole GQA group to its share of the
context; with several splits a second kernel merges the partial results. The grid depends only on
shapes and the host-side split count, never on data: a captured CUDA graph stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import DEFAULT_NUM_SMS, num_sms
from paphos.kernels.attention_tile import LOG2_E_SINK, attend_tile, normalize_with_sinks
from paphos.kernels.kv_cache import FP8_DTYPES
from paphos.kernels.pdl import pdl_options, pdl_prologue


@triton.jit
def _attend_tiles(
    q,
    acc,
    m,
    l_sum,
    cache_ptr,
    bt_row,
    kv_head,
    tile_start,
    tile_end,
    seq_len,
    scale_log2,
    window,
    cap_log2,
    stride_kv,
    stride_blk,
    stride_tok,
    stride_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    CHUNK: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Online softmax over tiles tile_start..tile_end-1, software-pipelined NUM_STAGES deep.
    The query sits at position seq_len - 1 (what a sliding window is measured from)."""
    q_pos = tl.zeros_like(m).to(tl.int32) + seq_len - 1  # [GROUP_PAD]
    for tile in tl.range(tile_start, tile_end, num_stages=NUM_STAGES):
        acc, m, l_sum = attend_tile(
            q,
            acc,
            m,
            l_sum,
            cache_ptr,
            bt_row,
            kv_head,
            tile * BLOCK_N,
            seq_len,
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
            WINDOW,
            SOFT_CAP,
            CHUNK,
            KV_FP8,
        )
    return acc, m, l_sum


@triton.jit
def _decode_kernel(
    q_ptr,
    cache_ptr,
    query_start_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    out_ptr,
    part_out_ptr,
    part_m_ptr,
    part_l_ptr,
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
    num_heads,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    STAGES: tl.constexpr,  # the pipelining depth of programs with few tiles
    DEEP_STAGES: tl.constexpr,  # ... and of those with DEEP_MIN_TILES or more (0: STAGES)
    DEEP_MIN_TILES: tl.constexpr,
    USE_PDL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    CHUNK: tl.constexpr,
    KV_FP8: tl.constexpr,  # fp8 K/V (attention_tile); the output times v_scale
):
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int64) - q_start
    if q_len != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    first_tile = 0  # the first tile holding a key the query sees
    if WINDOW:
        first_tile = tl.maximum(seq_len - window, 0) // BLOCK_N
    if CHUNK:  # `window` is the chunk size: the query's chunk starts at its multiple
        first_tile = ((seq_len - 1) - (seq_len - 1) % window) // BLOCK_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_start = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    g = tl.arange(0, GROUP_PAD)  # [GROUP_PAD]
    dims = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
    heads = kv_head * GROUP + g
    io_mask = (g < GROUP)[:, None] & (dims < HEAD_SIZE)[None, :]
    q = tl.load(
        q_ptr + q_start * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=io_mask,
        other=0.0,
    )  # [GROUP_PAD, HEAD_PAD]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Deep pipelining (two K/V tiles in flight behind the block-table load, from 5 stages on)
    # pays for programs that walk many tiles and costs those that walk a few (notes/cuda.md,
    # session 6): the branch depends only on this program's tile count.
    if DEEP_STAGES > 0 and tile_end - tile_start >= DEEP_MIN_TILES:
        acc, m, l_sum = _attend_tiles(
            q,
            acc,
            m,
            l_sum,
            cache_ptr,
            bt_row,
            kv_head,
            tile_start,
            tile_end,
            seq_len,
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
            IEEE,
            DEEP_STAGES,
            WINDOW,
            SOFT_CAP,
            CHUNK,
            KV_FP8,
        )
    else:
        acc, m, l_sum = _attend_tiles(
            q,
            acc,
            m,
            l_sum,
            cache_ptr,
            bt_row,
            kv_head,
            tile_start,
            tile_end,
            seq_len,
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
            IEEE,
            STAGES,
            WINDOW,
            SOFT_CAP,
            CHUNK,
            KV_FP8,
        )
    if SPLIT:  # the sinks join once, when the splits merge
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # [GROUP_PAD, HEAD_PAD]
    else:
        out = normalize_with_sinks(acc, m, l_sum, sinks_ptr, heads, g < GROUP, HAS_SINKS)
    if KV_FP8:  # the merge of splits is linear in the partial outputs
        out = out * v_scale
    if SPLIT:
        part = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(part_out_ptr + part[:, None] * HEAD_PAD + dims[None, :], out, mask=io_mask)
        tl.store(part_m_ptr + part, m, mask=g < GROUP)
        tl.store(part_l_ptr + part, l_sum, mask=g < GROUP)
    else:
        dst = out_ptr + q_start * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _merge_splits_kernel(
    query_start_ptr,
    out_ptr,
    part_out_ptr,
    part_m_ptr,
    part_l_ptr,
    sinks_ptr,
    stride_ot,
    stride_oh,
    num_heads,
    num_splits,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    if tl.load(query_start_ptr + seq + 1).to(tl.int64) - q_start != 1:
        return
    splits = tl.arange(0, SPLITS_PAD)  # [SPLITS_PAD]
    dims = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
    part = (seq * num_heads + head) * num_splits + splits
    m = tl.load(part_m_ptr + part, mask=splits < num_splits, other=float("-inf"))
    l_sum = tl.load(part_l_ptr + part, mask=splits < num_splits, other=0.0)
    m_max = tl.max(m, axis=0)
    sink = float("-inf")
    if HAS_SINKS:  # one more term of the softmax's denominator, in the log2 domain
        sink = tl.load(sinks_ptr + head) * LOG2_E_SINK
        m_max = tl.maximum(m_max, sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max) * l_sum  # [SPLITS_PAD]
    mask = (splits < num_splits)[:, None] & (dims < HEAD_SIZE)[None, :]
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_PAD + dims[None, :], mask=mask, other=0.0)
    total = tl.sum(weight, axis=0) + tl.exp2(sink - m_max)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # [HEAD_PAD]
    dst = out_ptr + q_start * stride_ot + head * stride_oh + dims
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_SIZE)


@dataclass(frozen=True)
class DecodeTiles:
    """Keys per loop step, the launch shape of the decode kernel and its software pipelining:
    programs with `deep_min_tiles` tiles or more run `deep_stages` deep (0: every program runs
    `num_stages` deep)."""

    block_n: int
    num_warps: int
    num_stages: int
    deep_stages: int = 0
    deep_min_tiles: int = 4


LOG2_E = 1.4426950408889634

# The deep loop's shared memory (54 KB at head size 64, 105 KB at 128, 64-key tiles) leaves room
# for every program of a launch at once while programs x padded head size per SM stays within this.
DEEP_PROGRAM_BUDGET = 4 * 64


def default_decode_tiles(
    head_size: int, seq_programs: int = 0, num_splits: int = 1, num_sms: int = DEFAULT_NUM_SMS
) -> DecodeTiles:
    """64 keys per step (32 for head size 256), 4 warps, 3 stages (the H100 sweep). Programs
    walking 4 tiles or more run 7 stages deep in unsplit launches whose (sequence, kv head)
    programs all fit on the SMs with the deep loop's shared memory. H200 (notes/cuda.md, session
    6), head size 64, 64 sequences: context 2048 89.7 -> 71.7 us, 192 11.9 -> 10.8. Left out
    where it was slower: short contexts at 7 stages for every program (+16-20%), split launches
    (batch 1: +3-4% per step at short contexts, the heavier kernel), head size 128 at 64 sequences
    (two programs per SM fit)."""
    head_pad = max(triton.next_power_of_2(head_size), 16)
    fits = 0 < seq_programs and seq_programs * head_pad <= DEEP_PROGRAM_BUDGET * num_sms
    return DecodeTiles(
        block_n=64 if head_size <= 128 else 32,
        num_warps=4,
        num_stages=3,
        deep_stages=7 if fits and num_splits == 1 else 0,
    )


def score_scales(scale: float, soft_cap: float | None) -> tuple[float, float]:
    """(scale_log2, cap_log2) as attend_tile takes them (see paphos.kernels.attention_tile)."""
    if soft_cap is None:
        return scale * LOG2_E, 0.0
    return scale / soft_cap, soft_cap * LOG2_E


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split only when (seq, kv head) programs fill the chip less than twice; then aim at four
    programs per SM, no split shorter than 256 keys, at most 32 (H100 sweep: notes/cuda.md)."""
    programs = max(num_seqs * num_kv_heads, 1)
    if programs >= 2 * num_sms:
        return 1
    return max(1, min(triton.cdiv(4 * num_sms, programs), triton.cdiv(max_seq_len, 256), 32))


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int,
    tiles: DecodeTiles | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write `out` rows of the sequences with one query token; other rows are left untouched.
    sinks: [num_heads] float32 logits joining each row's softmax (None: none); chunk_size: each
    query sees only its own chunk (not with a sliding window); k_scale, v_scale: an fp8 cache's
    per-tensor scales (float caches ignore them). An fp8 cache runs the same tiles."""
    if chunk_size is not None and sliding_window is not None:
        raise ValueError("a layer attends within a sliding window or within chunks, not both")
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_size = query.shape
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    head_pad = max(triton.next_power_of_2(head_size), 16)
    tiles = tiles or default_decode_tiles(
        head_size, num_seqs * num_kv_heads, num_splits, num_sms(query.device)
    )
    split = num_splits > 1
    # partial outputs [num_seqs, num_heads, num_splits, head_pad]; m, l [num_seqs, heads, splits]
    part_out = torch.empty(
        (num_seqs, num_heads, num_splits, head_pad) if split else (1,),
        dtype=torch.float32,
        device=query.device,
    )
    part_m = torch.empty(
        (num_seqs, num_heads, num_splits) if split else (1,),
        dtype=torch.float32,
        device=query.device,
    )  # [num_seqs, heads, splits]
    part_l = torch.empty_like(part_m)  # [num_seqs, num_heads, num_splits]
    pdl = pdl_options(query.device)
    kv_fp8 = kv_cache.dtype in FP8_DTYPES
    scale_log2, cap_log2 = score_scales(scale * (k_scale if kv_fp8 else 1.0), soft_cap)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        kv_cache,
        query_start_loc,
        seq_lens,
        block_tables,
        out,
        part_out,
        part_m,
        part_l,
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
        num_heads,
        num_splits,
        GROUP=group,
        GROUP_PAD=max(triton.next_power_of_2(group), 16),
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        PAGE_SIZE=page_size,
        BLOCK_N=tiles.block_n,
        SPLIT=split,
        IEEE=query.dtype == torch.float32,
        STAGES=tiles.num_stages,
        DEEP_STAGES=tiles.deep_stages,
        DEEP_MIN_TILES=tiles.deep_min_tiles,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        WINDOW=sliding_window is not None,
        SOFT_CAP=soft_cap is not None,
        HAS_SINKS=sinks is not None,
        CHUNK=chunk_size is not None,
        KV_FP8=kv_fp8,
        **pdl,
    )
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            query_start_loc,
            out,
            part_out,
            part_m,
            part_l,
            query if sinks is None else sinks,
            out.stride(0),
            out.stride(1),
            num_heads,
            num_splits,
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HAS_SINKS=sinks is not None,
            num_warps=4,
            **pdl,
        )
