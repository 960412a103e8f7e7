"""Triton MLA decode (the weight-absorbed form): one query token per sequence, every head against
the sequence's cached latent rows (paphos.ops.mla_attention.mla_decode_attention is the reference);
and the latent cache write (one program per token; a negative slot, a padded graph row, skipped).

A row is [latent (kv_lora_rank) | rope key]; scores are q_latent . latent + q_rope . k_rope and
the values are the latents themselves, so each tile of rows is loaded once for both products. One
program per (sequence, block of BLOCK_H heads, split of the context); with several splits the
partial results are merged by a few torch ops. Grid and split count depend only on shapes (the
block table's width bounds the context), never on data: a captured CUDA graph stays valid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim, check_float_dtype, check_size, num_sms

LOG2_E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _mla_decode_kernel(
    q_ptr,
    cache_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    part_out_ptr,
    part_m_ptr,
    part_l_ptr,
    stride_qt,
    stride_qh,
    stride_blk,
    stride_tok,
    stride_bt,
    scale_log2,
    num_heads,
    num_splits,
    LATENT: tl.constexpr,
    LATENT_PAD: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    head_ok = heads < num_heads
    dc = tl.arange(0, LATENT_PAD)  # [LATENT_PAD]
    dr = tl.arange(0, ROPE_PAD)  # [ROPE_PAD]
    q_rows = q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q_c = tl.load(q_rows + dc[None, :], mask=head_ok[:, None] & (dc < LATENT)[None, :], other=0.0)
    q_r = tl.load(
        q_rows + LATENT + dr[None, :], mask=head_ok[:, None] & (dr < ROPE)[None, :], other=0.0
    )  # [BLOCK_H, ROPE_PAD]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, LATENT_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_start, tile_end):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < seq_len
        block = tl.load(bt_row + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        rows = cache_ptr + block * stride_blk + (pos % PAGE_SIZE).to(tl.int64) * stride_tok
        k_c = tl.load(
            rows[:, None] + dc[None, :], mask=valid[:, None] & (dc < LATENT)[None, :], other=0.0
        )  # [BLOCK_N, LATENT_PAD]: keys and values at once
        k_r = tl.load(
            rows[:, None] + LATENT + dr[None, :],
            mask=valid[:, None] & (dr < ROPE)[None, :],
            other=0.0,
        )  # [BLOCK_N, ROPE_PAD]
        s = _dot(q_c, tl.trans(k_c), IEEE) + _dot(q_r, tl.trans(k_r), IEEE)  # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(k_c.dtype), k_c, IEEE)
        m = m_new
    # partials [num_seqs, num_heads, num_splits, (LATENT_PAD)]
    part = (seq.to(tl.int64) * num_heads + heads) * num_splits + split  # [BLOCK_H]
    tl.store(part_m_ptr + part, m, mask=head_ok)
    tl.store(part_l_ptr + part, l_sum, mask=head_ok)
    tl.store(
        part_out_ptr + part[:, None] * LATENT_PAD + dc[None, :],
        acc,
        mask=head_ok[:, None] & (dc < LATENT)[None, :],
    )


@triton.jit
def _write_latent_kernel(
    latent_ptr,
    k_pe_ptr,
    cache_ptr,
    slot_ptr,
    stride_latent,
    stride_k_pe,
    stride_slot,
    LATENT: tl.constexpr,
    ROPE: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        dims = tl.arange(0, ROW_PAD)  # [ROW_PAD]: latent dims, then rope dims
        is_latent = dims < LATENT
        row = token.to(tl.int64)
        c = tl.load(latent_ptr + row * stride_latent + dims, mask=is_latent, other=0.0)
        rope_dims = tl.where(is_latent, 0, dims - LATENT)
        is_rope = (dims >= LATENT) & (dims < LATENT + ROPE)
        r = tl.load(k_pe_ptr + row * stride_k_pe + rope_dims, mask=is_rope, other=0.0)
        values = tl.where(is_latent, c, r).to(cache_ptr.dtype.element_ty)
        tl.store(cache_ptr + slot * stride_slot + dims, values, mask=dims < LATENT + ROPE)


def write_latent_cache(
    latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """As the reference: rows [latent | k_pe] into kv_cache [num_blocks, page_size, latent +
    rope] at slot_mapping [num_tokens]; negative slots skipped."""
    check_dim("latent", latent, 2)
    check_dim("k_pe", k_pe, 2)
    check_size("kv_cache", kv_cache.shape[2], latent.shape[1] + k_pe.shape[1], "row size")
    if latent.stride(1) != 1 or k_pe.stride(1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("latent, k_pe rows and kv_cache must be contiguous")
    num_tokens, row = latent.shape[0], kv_cache.shape[2]
    if num_tokens == 0:
        return
    _write_latent_kernel[(num_tokens,)](
        latent, k_pe, kv_cache, slot_mapping, latent.stride(0), k_pe.stride(0), kv_cache.stride(1),
        LATENT=latent.shape[1], ROPE=k_pe.shape[1], ROW_PAD=triton.next_power_of_2(row),
    )  # fmt: skip


def num_mla_splits(num_programs: int, max_len: int, block_n: int, sms: int) -> int:
    """Split the context when (sequence, head block) programs fill the chip less than twice: aim
    at four programs per SM, no split shorter than 256 rows, at most 32."""
    if num_programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, num_programs), triton.cdiv(max_len, 256), 32))


def mla_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    latent_dim: int,
) -> torch.Tensor:
    """As the reference: query [num_seqs, heads, latent_dim + rope] against kv_cache [num_blocks,
    page_size, latent_dim + rope]; returns [num_seqs, heads, latent_dim] in the query's dtype."""
    check_dim("query", query, 3)
    check_dim("kv_cache", kv_cache, 3)
    check_float_dtype("query", query)
    check_size("kv_cache", kv_cache.shape[2], query.shape[2], "row size")
    check_size("seq_lens", seq_lens.shape[0], query.shape[0], "number of sequences")
    if kv_cache.stride(2) != 1 or query.stride(2) != 1:
        raise ValueError("query and kv_cache rows must be contiguous")
    num_seqs, num_heads, row = query.shape
    rope = row - latent_dim
    if not 0 < latent_dim < row:
        raise ValueError(f"latent_dim={latent_dim} must be in (0, {row})")
    page_size = kv_cache.shape[1]
    latent_pad = max(triton.next_power_of_2(latent_dim), 16)
    block_h = 16
    block_n = 32 if latent_pad <= 256 else 16
    head_blocks = triton.cdiv(num_heads, block_h)
    max_len = block_tables.shape[1] * page_size  # a host-side bound on every context
    num_splits = num_mla_splits(num_seqs * head_blocks, max_len, block_n, num_sms(query.device))
    f32 = dict(dtype=torch.float32, device=query.device)
    part_out = torch.empty(num_seqs, num_heads, num_splits, latent_pad, **f32)
    part_m = torch.empty(num_seqs, num_heads, num_splits, **f32)  # [seqs, heads, splits]
    part_l = torch.empty_like(part_m)
    _mla_decode_kernel[(num_seqs, head_blocks, num_splits)](
        query, kv_cache, seq_lens, block_tables, part_out, part_m, part_l,
        query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        block_tables.stride(0), scale * LOG2_E, num_heads, num_splits,
        LATENT=latent_dim, LATENT_PAD=latent_pad, ROPE=rope,
        ROPE_PAD=max(triton.next_power_of_2(rope), 16), PAGE_SIZE=page_size, BLOCK_H=block_h,
        BLOCK_N=block_n, IEEE=query.dtype == torch.float32, num_warps=4 if block_n == 32 else 8,
    )  # fmt: skip
    out = part_out[..., :latent_dim]  # [seqs, heads, splits, latent]
    # an empty context (a padded graph row) gives 0, not NaN
    if num_splits == 1:
        return (out[:, :, 0] / part_l.clamp_min(1e-30)).to(query.dtype)
    top = part_m.amax(dim=2, keepdim=True).clamp_min(-1e30)  # [seqs, heads, 1]
    weight = torch.exp2(part_m - top)  # [seqs, heads, splits]; empty splits: 0
    total = (weight * part_l).sum(dim=2).clamp_min(1e-30)  # [seqs, heads]
    return ((out * weight[..., None]).sum(dim=2) / total[..., None]).to(query.dtype)
