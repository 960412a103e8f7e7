"""Triton matrix-vector product for one-token (batch-1 decode) linear layers on CUDA.

At M=1 cuBLAS picks tiles that leave SMs idle for some shapes (an H100 runs Llama-3-8B's o_proj,
4096x4096, at ~55% of its copy bandwidth); this kernel streams each weight row block once with
many programs in flight (measured with benchmarks/gemv.py inside CUDA graphs: 1.1-1.3x cuBLAS on
every Llama-3 1B/8B decode shape, 2.5-3.1 TB/s). Sums in float32 in a different order than cuBLAS:
results agree to rounding, not bitwise. Triton picks the tile per (N, K) among AUTOTUNED the first
time a shape runs (eagerly: before any CUDA graph capture). `gemv_silu_and_mul` is an MLP's
gate_up product and SiLU-and-mul in one kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from paphos.kernels._checks import check_float_dtype
from paphos.kernels.activation import silu_times
from paphos.kernels.pdl import pdl_options, pdl_prologue

# (BLOCK_N, BLOCK_K, num_warps): every config that won a shape in benchmarks/gemv.py (H100), then
# two with short K tiles for small models (hidden sizes of a few hundred: not measured yet).
CONFIGS = (
    (1, 2048, 4),
    (2, 2048, 4),
    (2, 4096, 8),
    (4, 2048, 4),
    (2, 4096, 4),
    (1, 1024, 2),
    (8, 512, 4),
    (16, 256, 4),
)
AUTOTUNED = (*CONFIGS[:4], *CONFIGS[6:])


@triton.jit
def _gemv_tile(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    N,  # output features (GATED: the weight has 2N rows, gate then up)
    K: tl.constexpr,  # one compiled kernel per input size (a model has a handful)
    stride_w,
    up_offset,  # GATED: elements from a feature's gate row to its up row (N * stride_w)
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,  # out = silu(x @ gate.T) * (x @ up.T)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w  # [BLOCK_N, 1]
    up_rows = w_rows + up_offset  # GATED: the up rows of these features
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # GATED only
    for chunk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        mask = row_mask[:, None] & col_mask[None, :]
        w = tl.load(w_rows + cols[None, :], mask=mask, other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        if GATED:
            w_up = tl.load(up_rows + cols[None, :], mask=mask, other=0.0)
            acc_up += w_up.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if GATED:  # rounded as the two kernels round: each product output to x's dtype first
        up = tl.sum(acc_up, axis=1)  # [BLOCK_N]
        if HAS_BIAS:
            up += tl.load(b_ptr + N + rows, mask=row_mask, other=0.0).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        out = silu_times(out.to(dtype), up.to(dtype))
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)


_gemv_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in AUTOTUNED],
    key=["N", "K", "GATED"],
    do_bench=lambda fn, quantiles: triton.testing.do_bench(
        fn, warmup=5, rep=20, quantiles=quantiles
    ),  # a few ms per shape at start-up
)(_gemv_tile)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T (+ bias [N]) -> [1, N] in out_dtype (default x's; float32
    sums). `config` (BLOCK_N, BLOCK_K, num_warps) fixes the tile; None lets the autotuner
    choose."""
    x = _checked(x, weight, bias)
    out = torch.empty((1, weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
    _launch(x, weight, bias, out, config, gated=False)
    return out  # [1, N]


def gemv_silu_and_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """silu_and_mul(gemv(x, weight, bias)) in one kernel, for a [gate | up] weight [2N, K]:
    -> [1, N] (each program sums the gate and the up rows of its features)."""
    x = _checked(x, weight, bias)
    if weight.shape[0] % 2:
        raise ValueError(f"a [gate | up] weight has an even number of rows; got {weight.shape[0]}")
    out = torch.empty((1, weight.shape[0] // 2), dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, out, config, gated=True)
    return out  # [1, N]


def _checked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x contiguous, after checking x [1, K] against weight [N, K] with contiguous rows."""
    check_float_dtype("x", x)
    check_float_dtype("weight", weight)
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"gemv takes x [1, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight with contiguous rows")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    return x.contiguous()  # [1, K]


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: tuple[int, int, int] | None,
    gated: bool,
) -> None:
    n, k = out.shape[1], weight.shape[1]  # output features, inputs
    stride_w = weight.stride(0)
    args = (x, weight, bias if bias is not None else out, out, n, k, stride_w, n * stride_w)
    options = dict(HAS_BIAS=bias is not None, GATED=gated, **pdl_options(x.device))
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemv_autotuned[grid](*args, **options)
        return
    block_n, block_k, num_warps = config
    _gemv_tile[(triton.cdiv(n, block_n),)](
        *args, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **options
    )
