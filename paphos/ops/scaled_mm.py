"""Products with quantized weights and (optionally) quantized activations: the torch references
(the CPU path and the oracle of the CUDA kernels) and the exact int8 path (`torch._int_mm`).

Weights: values q [out, in] (int8/int4 held in int8, or fp8 e4m3), one scale per (row, column
block) and, when asymmetric, a zero point beside it: W[o, i] = (q[o, i] - z[o, c(i)]) * s[o, c(i)]
with c(i) = i // column_block. Per-tensor, per-channel and row-block
scales arrive expanded to one row per output feature (quant/scaled.py does that at load).
Activations (`ActivationQuant`), symmetric: s_x = amax / half_range per token, per token group or
per tensor (a static scale); q = clamp(round(x / s_x)) for int8, (x / s_x) cast for fp8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import paphos.kernels as triton_kernels

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# compressed-tensors divides the range (max - min = 255) by 2; vLLM's and `-q int8` use 127
INT8_HALF_RANGE_CT = 127.5
INT8_HALF_RANGE = 127.0
TILE_ELEMENTS = 1 << 20  # weights dequantized per step of the reference (4 MiB of fp32)


@dataclass(frozen=True)
class ActivationQuant:
    """How a layer's input is quantized before the product."""

    dtype: torch.dtype  # torch.int8 or FP8_DTYPE
    strategy: str  # "token" | "group" | "tensor"
    group_size: int | None = None  # columns per scale for "group"
    half_range: float = INT8_HALF_RANGE  # s = amax / half_range (FP8_MAX for fp8)
    static: bool = False  # "tensor" with the checkpoint's input_scale

    def __post_init__(self) -> None:
        if self.dtype not in (torch.int8, FP8_DTYPE):
            raise ValueError(f"activation dtype {self.dtype} is not supported: int8 or fp8 e4m3")
        if self.strategy not in ("token", "group", "tensor"):
            raise ValueError(f"activation strategy {self.strategy!r}: token, group or tensor")
        if self.strategy == "group" and not self.group_size:
            raise ValueError("group activation quantization needs a group_size")
        if self.static and self.strategy != "tensor":
            raise ValueError("static activation scales are per tensor")


def activation_scales(x: torch.Tensor, spec: ActivationQuant) -> torch.Tensor:
    """Dynamic scales of x [M, K]: [M, 1] (token), [M, ceil(K / group)] (group), [1, 1]."""
    x = x.float()
    if spec.strategy == "token":  # max |x| per row in one op (abs + amax would be two)
        amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True)  # [M, 1]
    elif spec.strategy == "group":
        amax = _grouped(x, spec.group_size).abs().amax(dim=2)  # [M, groups]
    else:
        amax = x.abs().amax().reshape(1, 1)  # [1, 1]
    scale = amax / spec.half_range
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


def quantize_activation(
    x: torch.Tensor, spec: ActivationQuant, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] in spec.dtype, scale) of x [M, K]; scale as `activation_scales` gives it."""
    scale = static_scale.reshape(1, 1).float() if spec.static else activation_scales(x, spec)
    scaled = _divide(x.float(), scale, spec)  # [M, K], a new tensor: rounded in place
    if spec.dtype == torch.int8:
        return scaled.round_().clamp_(-128, 127).to(torch.int8), scale
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fake_quantize_activation(
    x: torch.Tensor, spec: ActivationQuant, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] quantized and dequantized, float32: what the product sees."""
    q, scale = quantize_activation(x, spec, static_scale)
    return _multiply(q.float(), scale, spec)


def dequantize_rows(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    columns: torch.Tensor,
) -> torch.Tensor:
    """W [rows, in] float32 from q [rows, in], scale/zero [rows, blocks] and each input
    column's block index `columns` [in] (int64)."""
    values = q.float()  # [rows, in]
    if zero is not None:
        values = values - zero.float()[:, columns]
    return values * scale.float()[:, columns]


def reference_linear(
    x: torch.Tensor,
    rows_of: Callable[
        [int, int], torch.Tensor
    ],  # (start, stop) -> W rows [stop - start, in] float32
    out_features: int,
    bias: torch.Tensor | None,
    act: ActivationQuant | None = None,
    static_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize-then-matmul in float32, a tile of rows at a time: x [M, in] -> [M, out] in
    x's dtype, the input fake-quantized first when `act` says so."""
    x32 = x.float() if act is None else fake_quantize_activation(x, act, static_scale)
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    step = max(1, TILE_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[:, start:stop] = x32 @ rows_of(start, stop).t()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def quantize_rows_int8(
    weight: torch.Tensor, half_range: float = INT8_HALF_RANGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of weight [out, in]: (q [out, in] int8, scale [out, 1] float32)."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / half_range  # [out, 1]
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return (w / scale).round().clamp(-128, 127).to(torch.int8), scale


def quantize_rows_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 e4m3 of weight [out, in]: (q [out, in] fp8, scale [out, 1] float32)."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [out, 1]
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_tokens_int8(
    x: torch.Tensor, half_range: float = INT8_HALF_RANGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 of x [M, K]: (q [M, K] int8, scale [M, 1])."""
    return quantize_activation(x, ActivationQuant(torch.int8, "token", half_range=half_range))


def int8_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: ActivationQuant | None = None,
    static_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 with one scale per weight row: x [M, K] quantized per token (or by its static
    scale), the int8 product summed exactly in int32 (torch._int_mm: oneDNN's VNNI/AMX kernels
    on CPUs), then rescaled: [M, N] in x's dtype. q_weight [N, K] int8, weight_scale [N, 1]."""
    act = act or ActivationQuant(torch.int8, "token")
    q_x, scale_x = quantize_activation(x, act, static_scale)  # [M, K], [M, 1] or [1, 1]
    if x.is_cuda and x.shape[0] <= 16:  # cuBLAS's int8 GEMM needs M > 16: pad the rows
        padded = torch.zeros(17, q_x.shape[1], dtype=torch.int8, device=x.device)
        padded[: q_x.shape[0]] = q_x
        acc = torch._int_mm(padded, q_weight.t())[: q_x.shape[0]]  # [M, N] int32
    else:
        acc = torch._int_mm(q_x, q_weight.t())  # [M, N] int32
    # [M, N] float32: int32 * float32 promotes; one outer product of the two scales
    out = acc * (scale_x * weight_scale.reshape(1, -1))
    if bias is not None:
        out += bias
    return out.to(x.dtype)


def takes_scaled_mm(weight: torch.Tensor) -> bool:
    """torch._scaled_mm takes this fp8 weight [N, K]: CUDA with fp8 tensor cores (sm 8.9+),
    N and K multiples of 16."""
    if not weight.is_cuda or weight.dtype != FP8_DTYPE:
        return False
    n, k = weight.shape
    return torch.cuda.get_device_capability(weight.device) >= (8, 9) and n % 16 == 0 and k % 16 == 0


def fp8_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: ActivationQuant,
    static_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 fp8 with row-wise scales on CUDA: x [M, K] quantized per token (or per tensor),
    torch._scaled_mm with scale_a [M, 1] and scale_b [1, N] (bf16 out, as row-wise scaling
    requires) -> [M, N] in x's dtype. q_weight [N, K] e4m3, weight_scale [N, 1] float32."""
    q_x, scale_x = quantize_activation(x, act, static_scale)  # [M, K] fp8, [M or 1, 1]
    scale_a = scale_x.expand(x.shape[0], 1).contiguous()  # [M, 1]
    out = torch._scaled_mm(
        q_x,
        q_weight.t(),  # [K, N] column-major
        scale_a=scale_a,
        scale_b=weight_scale.reshape(1, -1).float().contiguous(),  # [1, N]
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )
    return out.to(x.dtype)


def fp8_block_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: ActivationQuant,
) -> torch.Tensor:
    """fp8 weights with block scales [N, K / block] (rows expanded) against activations
    quantized per token and block: the Triton kernel (CUDA, any M) -> [M, N] in x's dtype."""
    q_x, scale_x = quantize_activation(x, act)  # [M, K] fp8, [M, K / block]
    kernel = triton_kernels.CUDA_KERNELS["fp8_block_gemm"]
    return kernel(q_x, scale_x, q_weight, weight_scale, act.group_size, bias, x.dtype)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] -> [M, ceil(K / group), group], zero-padded."""
    pad = -x.shape[1] % group
    return F.pad(x, (0, pad)).reshape(x.shape[0], -1, group)


def _divide(x: torch.Tensor, scale: torch.Tensor, spec: ActivationQuant) -> torch.Tensor:
    if spec.strategy != "group":
        return x / scale
    return (_grouped(x, spec.group_size) / scale.unsqueeze(2)).flatten(1)[:, : x.shape[1]]


def _multiply(x: torch.Tensor, scale: torch.Tensor, spec: ActivationQuant) -> torch.Tensor:
    if spec.strategy != "group":
        return x * scale
    return (_grouped(x, spec.group_size) * scale.unsqueeze(2)).flatten(1)[:, : x.shape[1]]
