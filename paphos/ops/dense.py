"""Dense products, and the batch copy a CPU layer may keep of its weight for large batches.

Small batches on the CPU (up to SMALL_BATCH_ROWS rows) go to the C kernel in
paphos.kernels.cpu.matvec (~1.5x torch's read rate for bf16 weights) where it could be built. A
layer with half-precision weights may keep a second copy for batches of more rows (`batch_copy`):
- an fp32 copy on CPUs without native bf16/fp16 matrix units (no AVX512-BF16/AMX): there torch's
  bf16 GEMM is several times slower than its fp32 GEMM (measured on this project's AVX2 machine: 6x
  for a 64-row batch), while a bf16 matrix-vector product is as fast as fp32 (it is bound by
  memory, and bf16 halves the bytes). Results are the fp32 product rounded to the activation
  dtype: at least as accurate as the bf16 one;
- oneDNN's prepacked (blocked) layout where `set_cpu_prepack` turned it on (by default on AMX
  CPUs): oneDNN then skips reordering the weight on every call (a 64-row SmolLM2 decode step 41.3
  -> 33.4 ms on a 2-core AMX host; no gain seen on a Zen 4 with AVX512-BF16);
- else, where the C kernels run at the AVX-512 BF16 level (no AMX), bf16 weights packed in bf16
  pairs for matvec.c's own `vdpbf16ps` product (a flat bf16 tensor, `is_pair_packed`): oneDNN
  reorders the weight on every call instead (SmolLM2's 64-row products 1.2x faster on one Zen 4
  core, notes/cpu.md).
`reference_linear` is the torch path and the oracle.
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


# Process-wide, as the thread count: the runner sets it from --cpu-prepack-weights before loading.
_cpu_prepack = {"enabled": False}


@cache
def cpu_has_native_half_gemm() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def wants_fp32_copy(weight: torch.Tensor) -> bool:
    half = weight.dtype in (torch.bfloat16, torch.float16)
    return half and weight.device.type == "cpu" and not cpu_has_native_half_gemm()


def set_cpu_prepack(enabled: bool | None) -> bool:
    """Whether half-precision CPU weights loaded from now on keep a oneDNN-prepacked batch copy
    (None: where the CPU has AMX, the only kind on which it was measured to pay). Returns it."""
    if enabled is None:
        from paphos.kernels.cpu import isa

        enabled = isa.selected() == "amx" and cpu_has_native_half_gemm()
    _cpu_prepack["enabled"] = bool(enabled)
    return _cpu_prepack["enabled"]


def pair_packing_library():
    """The matvec library where it was built with the packed bf16 product (the process's ISA level
    is AVX-512 BF16 or AMX), else None."""
    lib = matvec.load_library()
    return lib if matvec.has_packed_gemm(lib) else None


def is_pair_packed(batch_weight: torch.Tensor) -> bool:
    """A `batch_copy` in matvec.c's bf16-pair layout (flat), not a matrix."""
    return batch_weight.dim() == 1


def batch_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The copy of `weight` [out, in] that products of more than SMALL_BATCH_ROWS rows use
    (module docstring), or None: they use the weight itself."""
    if wants_fp32_copy(weight):
        return weight.float()
    half = weight.dtype in (torch.bfloat16, torch.float16)
    if half and weight.device.type == "cpu" and _cpu_prepack["enabled"]:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    takes_pairs = weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.numel() > 0
    if takes_pairs and weight.device.type == "cpu":
        lib = pair_packing_library()
        if lib is not None:
            return matvec.pack_bf16_pairs(lib, weight.detach().contiguous())
    return None


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    batch_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch only: x [num_tokens, in]; weight [out, in] -> [num_tokens, out] in x's dtype;
    batch_weight: the layer's `batch_copy`, for more than SMALL_BATCH_ROWS rows."""
    if batch_weight is None or x.shape[0] <= SMALL_BATCH_ROWS or is_pair_packed(batch_weight):
        return F.linear(x, weight, bias)
    if batch_weight.is_mkldnn:  # prepacked: the product in the weight's dtype, as F.linear
        x = x.to(weight.dtype).contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, batch_weight, bias, "none", [], "")
    out = F.linear(x.float(), batch_weight, None if bias is None else bias.float())
    return out.to(x.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    batch_weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x: [num_tokens, in]; weight: [out, in] -> [num_tokens, out] in out_dtype (default: x's).
    The Triton kernels store out_dtype directly (float32 logits need no conversion pass).

    Batches of at most SMALL_BATCH_ROWS rows use the CPU kernel when it loaded (decided once per
    process by `matvec.load_library`) and takes these operands, larger bf16 batches its packed
    product where the layer keeps a pair-packed batch copy; on CUDA one row uses the Triton
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
    if batch_weight is not None and is_pair_packed(batch_weight) and _takes_pairs(x, weight):
        lib = matvec.load_library()  # it packed the copy, so it loaded
        y_dtype = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
        y = matvec.gemm_packed(
            lib, x, batch_weight, weight.shape[0], bias, torch.get_num_threads(), y_dtype
        )  # [num_tokens, out]
        return _cast(y, None if out_dtype == y_dtype else out_dtype)
    return _cast(reference_linear(x, weight, bias, batch_weight), out_dtype)


def _takes_pairs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 rows the packed product takes (more than SMALL_BATCH_ROWS of them)."""
    return (
        x.dim() == 2
        and x.shape[0] > SMALL_BATCH_ROWS
        and x.dtype == torch.bfloat16
        and x.is_cpu
        and x.shape[1] == weight.shape[1]
    )


def linear_silu_and_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    batch_weight: torch.Tensor | None = None,
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
    return pick("silu_and_mul", x.device.type)(linear(x, weight, bias, batch_weight))


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
