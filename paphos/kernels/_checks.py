"""Input checks shared by the Triton wrappers: cheap shape/device facts only, never a device sync.

Each check raises ValueError naming the bad argument and its value.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_NUM_SMS = 132  # an H100 SXM; used when the device reports none (Triton's CPU interpreter)


def num_sms(device: torch.device) -> int:
    """The device's streaming multiprocessors (the kernels size their grids by it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    """A float16, bfloat16 or float32 tensor (the dtypes the kernels load and store)."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")


def check_dim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {ndim} dimensions")


def check_size(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name}: {what} is {actual}; expected {expected}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def rows_of(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """t viewed as [num_rows, width] with unit stride along the row (copies only if it must)."""
    if t.shape[-1] != width:
        raise ValueError(f"{name} has last dimension {t.shape[-1]}; expected {width}")
    rows = t.reshape(-1, width)  # [num_rows, width]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()  # [num_rows, width]
    return rows


SKINNY_GEMM_MAX_ROWS = 64  # CUDA rows up to which the Triton skinny GEMM beats cuBLAS


def takes_skinny_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What paphos.kernels.skinny_gemm takes: x [M, K] with 2 <= M <= SKINNY_GEMM_MAX_ROWS, weight
    [N, K] with contiguous rows, both float16 or both bfloat16 (float32 stays on cuBLAS, which keeps
    it exact where tl.dot would round to tf32)."""
    return (
        x.dim() == 2
        and 2 <= x.shape[0] <= SKINNY_GEMM_MAX_ROWS
        and weight.dim() == 2
        and x.shape[1] == weight.shape[1]
        and weight.stride(1) == 1
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
    )
