"""Triton GEMM for fp8 weights with block scales (DeepSeek-V3/Qwen3-FP8, compressed-tensors FP8
block) and fp8 activations quantized per token and column block: where torch._scaled_mm's
block-scaled path does not go (it needs the transposed scale layout and fails at M=1, so
decode needs this one).

  out[m, n] = sum_b s_x[m, b] * s_w[n, b] * sum_{k in block b} q_x[m, k] * q_w[n, k]
q_x [M, K], q_w [N, K] e4m3 (read as bytes, converted in registers); s_x [M, K / BK],
s_w [N, K / BK] float32 (the weight's row blocks already expanded to rows, quant/scaled.py).
The reference is ops.scaled_mm.reference_linear with the same activation quantization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_block_gemm_kernel(
    x_ptr,
    w_ptr,
    sx_ptr,
    sw_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    NUM_BLOCKS,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # the scales' column block
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, NUM_BLOCKS):
        ks = b * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0,
        )  # [BLOCK_M, BLOCK_K] bytes
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0,
        )  # [BLOCK_N, BLOCK_K] bytes
        x = x.to(tl.float8e4nv, bitcast=True).to(tl.float16)  # e4m3 is exact in fp16
        w = w.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        part = tl.dot(x, tl.trans(w))  # [BLOCK_M, BLOCK_N] fp32
        sx = tl.load(sx_ptr + rows.to(tl.int64) * NUM_BLOCKS + b, mask=row_mask, other=0.0)
        sw = tl.load(sw_ptr + cols.to(tl.int64) * NUM_BLOCKS + b, mask=col_mask, other=0.0)
        acc += part * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_rows = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out_rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def fp8_block_gemm(
    q_x: torch.Tensor,
    scale_x: torch.Tensor,
    q_w: torch.Tensor,
    scale_w: torch.Tensor,
    block: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[M, N] in out_dtype; operands as in the module docstring (contiguous)."""
    num_tokens, in_features = q_x.shape
    out_features = q_w.shape[0]
    num_blocks = triton.cdiv(in_features, block)
    if scale_x.shape != (num_tokens, num_blocks) or scale_w.shape != (out_features, num_blocks):
        raise ValueError(
            f"scales {tuple(scale_x.shape)}/{tuple(scale_w.shape)} for {block}-wide blocks"
        )
    if block & (block - 1) or block < 16:
        raise ValueError(f"block={block}: the fp8 block GEMM takes power-of-two blocks >= 16")
    out = torch.empty(num_tokens, out_features, dtype=out_dtype, device=q_x.device)  # [M, N]
    block_m = 16 if num_tokens <= 16 else 64
    block_n = 64 if num_tokens <= 16 else 128
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n))
    _fp8_block_gemm_kernel[grid](
        q_x.contiguous().view(torch.uint8),
        q_w.contiguous().view(torch.uint8),
        scale_x.float().contiguous(),
        scale_w.float().contiguous(),
        scale_w if bias is None else bias,
        out,
        num_tokens,
        out_features,
        in_features,
        num_blocks,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block,
        num_warps=4,
    )
    return out
