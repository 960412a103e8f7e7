"""Triton SiLU-and-mul: [num_tokens, 2 * d] = [gate | up] -> silu(gate) * up, one pass.

Same rounding as paphos.ops.activation: silu(gate) is rounded to x's dtype before the multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_float_dtype
from paphos.kernels.pdl import pdl_options, pdl_prologue

BLOCK = 1024


@triton.jit
def silu_times(gate, up):
    """silu(gate) * up in float32, silu rounded to gate's dtype first (the reference's rounding);
    also the epilogue of the gated GEMV and skinny GEMM (`*_silu_and_mul`)."""
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype).to(tl.float32)
    return silu * up.to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, silu_times(gate, up), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d]; returns [num_tokens, d], as paphos.ops.activation.silu_and_mul."""
    check_float_dtype("x", x)
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; the last dimension must be even")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)  # [num_tokens, 2 * d]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # [num_tokens, 2 * d]
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)  # [num_tokens, d]
    if x2.shape[0] > 0 and d > 0:
        block = min(BLOCK, triton.next_power_of_2(d))
        grid = (x2.shape[0], triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](
            x2,
            out,
            x2.stride(0),
            out.stride(0),
            d,
            BLOCK=block,
            num_warps=4,
            **pdl_options(x.device),
        )
    return out.view(*x.shape[:-1], d)  # [..., d]
