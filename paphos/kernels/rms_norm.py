"""Triton RMSNorm and fused residual-add + RMSNorm: one program per row, one read, one write.

Same rounding as paphos.ops.rms_norm: the sum is rounded to x's dtype before the norm, the
normalized row is rounded to x's dtype before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim, check_float_dtype, check_same_device, rows_of
from paphos.kernels.pdl import pdl_options, pdl_prologue


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    summed_ptr,
    stride_x,
    stride_r,
    stride_out,
    stride_sum,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(summed_ptr + row * stride_sum + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(variance + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, normed * w, mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_float_dtype("x", x)
    check_float_dtype("weight", weight)
    check_dim("weight", weight, 1)
    if eps <= 0:
        raise ValueError(f"eps={eps!r} must be > 0")
    hidden = weight.shape[0]
    x2 = rows_of("x", x, hidden)  # [num_tokens, hidden]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)  # [num_tokens, hidden]
    summed = r2 = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        check_same_device(x=x, residual=residual, weight=weight)
        r2 = rows_of("residual", residual, hidden)  # [num_tokens, hidden]
        summed = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # [num_tokens, hidden]
    else:
        check_same_device(x=x, weight=weight)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2 if r2 is not None else x2,
            weight.contiguous(),
            out,
            summed if summed is not None else out,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            out.stride(0),
            summed.stride(0) if summed is not None else 0,
            hidden,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
            **pdl_options(x.device),
        )
    out = out.view(x.shape)  # [..., hidden]
    return out, None if summed is None else summed.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden]; weight: [hidden]. Same contract as paphos.ops.rms_norm.rms_norm."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual), as paphos.ops.rms_norm.fused_add_rms_norm."""
    out, summed = _launch(x, residual, weight, eps)
    assert summed is not None
    return out, summed
