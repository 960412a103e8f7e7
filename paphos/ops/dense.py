"""Dense products on CPUs without native bf16/fp16 matrix units (no AVX512-BF16/AMX).

There, torch's bf16 GEMM is several times slower than its fp32 GEMM (measured on this project's AVX2
machine: 6x for a 64-row batch), while a bf16 matrix-vector product is as fast as fp32 (it is bound
by memory, and bf16 halves the bytes). So a layer with half-precision weights keeps an fp32 copy for
batches of more than SMALL_BATCH_ROWS rows and uses its own weights for small batches. Results are
the fp32 product rounded to the activation dtype: at least as accurate as the bf16 one.
Small batches on the CPU go to the AVX2 kernel in paphos.kernels.cpu.matvec (~1.5x torch's read
rate for bf16 weights) where it could be built; `reference_linear` is the torch path and the oracle.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

import paphos.kernels as triton_kernels
from paphos.kernels._checks import FLOAT_DTYPES, takes_skinny_gemm
from paphos.kernels.cpu import matvec
from paphos.ops.registry import pick

SMALL_BATCH_ROWS = matvec.MAX_ROWS  # 4


@cache
def cpu_has_native_half_gemm() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def wants_fp32_copy(weight: torch.Tensor) -> bool:
    half = weight.dtype in (torch.bfloat16, torch.float16)
    return half and weight.device.type == "cpu" and not cpu_has_native_half_gemm()


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_fp32: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch only: x [num_tokens, in]; weight [out, in] -> [num_tokens, out] in x's dtype."""
    if weight_fp32 is None or x.shape[0] <= SMALL_BATCH_ROWS:
        return F.linear(x, weight, bias)
    out = F.linear(x.float(), weight_fp32, None if bias is None else bias.float())
    return out.to(x.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_fp32: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x: [num_tokens, in]; weight: [out, in] -> [num_tokens, out] in out_dtype (default: x's).
    The Triton kernels store out_dtype directly (float32 logits need no conversion pass).

    Batches of at most SMALL_BATCH_ROWS rows use the CPU kernel when it loaded (decided once per
    process by `matvec.load_library`) and takes these operands; on CUDA one row uses the Triton
    GEMV and 2-64 half-precision rows the Triton skinny GEMM (both faster than cuBLAS there), more
    rows cuBLAS; all else is `reference_linear`.
    """
    if x.is_cuda:
        kernels = triton_kernels.CUDA_KERNELS
        if "gemv" in kernels and _gemv_supports(x, weight):
            return kernels["gemv"](x, weight, bias, out_dtype=out_dtype)
        if "skinny_gemm" in kernels and takes_skinny_gemm(x, weight):
            return kernels["skinny_gemm"](x, weight, bias, out_dtype=out_dtype)
        return _cast(F.linear(x, weight, bias), out_dtype)
    if matvec.supports(x, weight):
        lib = matvec.load_library()
        if lib is not None:
            return _cast(matvec.launch(lib, x, weight, bias, torch.get_num_threads()), out_dtype)
    return _cast(reference_linear(x, weight, bias, weight_fp32), out_dtype)


def linear_silu_and_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_fp32: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias)) for a [gate | up] weight [2N, K] -> [num_tokens, N]:
    an MLP's gate_up product and activation. On CUDA one kernel where the GEMV or the skinny GEMM
    takes the operands (the output of the product is never stored); elsewhere `linear`, then the
    activation op."""
    if x.is_cuda and weight.shape[0] % 2 == 0:
        kernels = triton_kernels.CUDA_KERNELS
        if "gemv_silu_and_mul" in kernels and _gemv_supports(x, weight):
            return kernels["gemv_silu_and_mul"](x, weight, bias)
        if "skinny_gemm_silu_and_mul" in kernels and takes_skinny_gemm(x, weight):
            return kernels["skinny_gemm_silu_and_mul"](x, weight, bias)
    return pick("silu_and_mul", x.device.type)(linear(x, weight, bias, weight_fp32))


def _cast(out: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return out if dtype is None else out.to(dtype)


def _gemv_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row against a 2-D weight with contiguous rows: what paphos.kernels.gemv takes."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.shape[1] == weight.shape[1]
        and weight.dtype in FLOAT_DTYPES
        and x.dtype in FLOAT_DTYPES
    )
