"""GPU kernel tests: run on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

Collected everywhere without Triton; each test asks for the `device` fixture, which skips when
neither a CUDA device nor the interpreter is available.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def device() -> torch.device:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if interpreting():
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels on the CPU)")


def skip_interpreted_bf16_dot(device: torch.device, dtype: torch.dtype) -> None:
    """Triton 3.6's CPU interpreter gets bfloat16 tl.dot wrong; those cases run on CUDA only."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bfloat16 tl.dot is wrong; checked on CUDA only")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    diff = (out.double() - ref.double()).norm().item()
    if diff != diff:
        return float("inf")
    return diff / max(ref.double().norm().item(), 1e-30)


# Relative-norm bound for a low-precision result against its reference computed the same way.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
