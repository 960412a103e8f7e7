"""Triton RMSNorm, fused residual-add + RMSNorm and SiLU-and-mul against their ops references."""

from __future__ import annotations

import pytest
import torch

from paphos.ops.activation import silu_and_mul as ref_silu_and_mul
from paphos.ops.rms_norm import fused_add_rms_norm as ref_fused_add_rms_norm
from paphos.ops.rms_norm import rms_norm as ref_rms_norm
from tests.gpu.conftest import TOLERANCE, rel_error

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 1000), (33, 4096)])
def test_rms_norm_matches_reference(device, dtype, num_tokens, hidden):
    from paphos.kernels.rms_norm import rms_norm

    x = torch.randn(num_tokens, hidden, device=device).to(dtype)  # [num_tokens, hidden]
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)  # [hidden]
    out = rms_norm(x, weight, 1e-6)
    ref = ref_rms_norm(x, weight, 1e-6)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(5, 96), (17, 2048)])
def test_fused_add_rms_norm_matches_reference_and_keeps_inputs(device, dtype, num_tokens, hidden):
    from paphos.kernels.rms_norm import fused_add_rms_norm

    x = torch.randn(num_tokens, hidden, device=device).to(dtype)  # [num_tokens, hidden]
    residual = torch.randn(num_tokens, hidden, device=device).to(dtype)  # [num_tokens, hidden]
    weight = torch.randn(hidden, device=device).to(dtype)  # [hidden]
    x_before, residual_before = x.clone(), residual.clone()
    out, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_summed = ref_fused_add_rms_norm(x, residual, weight, 1e-5)
    # Exact on CUDA; the interpreter's bfloat16 emulation may round the last bit differently.
    assert torch.equal(summed, ref_summed) or (
        device.type == "cpu" and rel_error(summed, ref_summed) < TOLERANCE[dtype]
    )
    assert rel_error(out, ref_out) < TOLERANCE[dtype]
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_rejects_bad_eps_and_weight(device):
    from paphos.kernels.rms_norm import rms_norm

    x = torch.randn(2, 8, device=device)  # [2, 8]
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(8, device=device), 0.0)
    with pytest.raises(ValueError, match="last dimension 8"):
        rms_norm(x, torch.ones(16, device=device), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,d", [(1, 16), (9, 1376), (64, 2816)])
def test_silu_and_mul_matches_reference(device, dtype, num_tokens, d):
    from paphos.kernels.activation import silu_and_mul

    x = (3 * torch.randn(num_tokens, 2 * d, device=device)).to(dtype)  # [num_tokens, 2 * d]
    out = silu_and_mul(x)
    ref = ref_silu_and_mul(x)
    assert out.shape == (num_tokens, d)
    assert rel_error(out, ref) < TOLERANCE[dtype]


def test_silu_and_mul_rejects_odd_width(device):
    from paphos.kernels.activation import silu_and_mul

    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(3, 7, device=device))
