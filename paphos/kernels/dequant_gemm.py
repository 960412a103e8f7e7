"""Triton GEMM/GEMV over group-quantized integer weights (W4A16/W8A16): the weight tile is
dequantized in registers and never stored, for decode (small M) and prefill alike.

One layout serves every 4/8-bit group format (quant/ repacks to it once, at load):
  q      4-bit: [N, K / 8] int32, value k of a row at bits 4 * (k % 8) of word k // 8
               (compressed-tensors pack-quantized as stored; GPTQ/AWQ/GGUF Q4 repacked)
         8-bit: [N, K] int8
  scale  [N, K / group] float; zero, minimum: same shape, optional
  W[n, k] = (q[n, k] - zero_offset - zero[n, g]) * scale[n, g] + minimum[n, g],  g = k // group
(compressed-tensors: zero_offset 8 for 4-bit offset-binary; GGUF Q4_0 zero_offset 8, Q4_1 a
minimum, Q8_0 none; GPTQ/AWQ a float zero.) The reference is paphos.ops.dequant_gemm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_K = 128


@triton.jit
def _dequant_gemm_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    zero_ptr,
    min_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding), else "tf32"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # BLOCK_K divides GROUP (the host picks it so), hence K: a K tile lies inside one group, whose
    # scale (zero, minimum) is one [BLOCK_N] vector, and needs no K mask. Every operand is loaded
    # once per tile (4-bit: each word once, unpacked in registers): the loads the pipeliner stages
    # in shared memory stay small (one element per k would need 128-393 KB at 128x128 tiles).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    row_mask, col_mask = rows < M, cols < N
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    q_rows = q_ptr + cols[:, None].to(tl.int64) * stride_qn  # [BLOCK_N, 1]
    group_rows = cols.to(tl.int64) * stride_sn  # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        if BITS == 4:
            words = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [BLOCK_K / 8]
            packed = tl.load(q_rows + words[None, :], mask=col_mask[:, None], other=0)
            shifts = tl.arange(0, 8) * 4  # [8]: value k of a word at bits 4 * (k % 8)
            nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_K/8, 8]
            values = tl.reshape(nibbles, (BLOCK_N, BLOCK_K))  # k = 8 * word + position
        else:
            values = tl.load(q_rows + ks[None, :], mask=col_mask[:, None], other=0).to(tl.int32)
        group = group_rows + k0 // GROUP  # [BLOCK_N]
        w = (values - ZERO_OFFSET).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        if HAS_ZERO:
            w -= tl.load(zero_ptr + group, mask=col_mask, other=0.0).to(tl.float32)[:, None]
        w *= tl.load(scale_ptr + group, mask=col_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_MIN:
            w += tl.load(min_ptr + group, mask=col_mask, other=0.0).to(tl.float32)[:, None]
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def tile_k(group: int) -> int | None:
    """The K tile for a group size: the largest power of two up to MAX_BLOCK_K dividing it (a
    tile inside one group), or None where that is below tl.dot's 16 (the reference serves)."""
    block_k = MAX_BLOCK_K
    while group % block_k:
        block_k //= 2
    return block_k if block_k >= 16 else None


def dequant_gemm(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    bits: int,
    zero_offset: int = 0,
    zero: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ W.T -> [M, N] in x's dtype, W as in the module docstring."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the dequant GEMM takes 4- or 8-bit weights")
    if tile_k(group) is None:
        raise ValueError(f"group={group}: the dequant GEMM takes groups of a multiple of 16")
    x = x.contiguous()
    num_tokens, in_features = x.shape
    out_features = q.shape[0]
    if q.shape[1] * (8 if bits == 4 else 1) != in_features or in_features % group:
        raise ValueError(f"weight {tuple(q.shape)} ({bits}-bit) does not fit x {tuple(x.shape)}")
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)  # [M, N]
    block_m = 16 if num_tokens <= 16 else 64  # decode: one row tile; prefill: square-ish tiles
    block_n = 64 if num_tokens <= 16 else 128
    block_k = tile_k(group)
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n))
    _dequant_gemm_kernel[grid](
        x,
        q,
        scale,
        scale if zero is None else zero,
        scale if minimum is None else minimum,
        scale if bias is None else bias,
        out,
        num_tokens,
        out_features,
        in_features,
        x.stride(0),
        q.stride(0),
        scale.stride(0),
        out.stride(0),
        GROUP=group,
        BITS=bits,
        ZERO_OFFSET=zero_offset,
        HAS_ZERO=zero is not None,
        HAS_MIN=minimum is not None,
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out
