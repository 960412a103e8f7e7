"""The gate_up product and SiLU-and-mul in one kernel (GEMV and skinny GEMM, `*_silu_and_mul`)
against the reference activation of a float64 product: every rows tile, split-K with both parts'
partials (repeated: the tickets reset), odd sizes (K mask, wrapped features), bias on both parts;
`ops.dense.linear_silu_and_mul` routing decode rows to them on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.ops import activation, dense
from tests.gpu.conftest import interpreting, rel_error, skip_interpreted_bf16_dot

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _operands(device, dtype, m, n, k, with_bias):  # noqa: ANN001, ANN202
    """x [M, K], a [gate | up] weight [2N, K], bias [2N]; the reference silu(gate) * up [M, N]
    from the float64 product rounded to dtype (as the unfused path rounds it)."""
    gen = torch.Generator().manual_seed(m * 7919 + n * k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)  # [M, K]
    w = (torch.randn(2 * n, k, generator=gen) / k**0.5).to(device, dtype)  # [2N, K]
    b = torch.randn(2 * n, generator=gen).to(device, dtype) if with_bias else None  # [2N]
    product = F.linear(x.double(), w.double(), None if b is None else b.double())  # [M, 2N]
    return x, w, b, activation.silu_and_mul(product.to(dtype)).double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 17, 64])
@pytest.mark.parametrize("n,k", [(48, 256), (100, 520)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_gemm_silu_and_mul_matches_product_then_activation(
    device, dtype, m, n, k, with_bias
):
    from paphos.kernels.skinny_gemm import GemmConfig, _launch

    skip_interpreted_bf16_dot(device, dtype)
    x, w, b, ref = _operands(device, dtype, m, n, k, with_bias)
    for config in (GemmConfig(16, 128, 1), GemmConfig(32, 128, 2), GemmConfig(16, 64, 4, 4, 3)):
        for _ in range(2):  # split-K tickets reset themselves: repeated launches stay right
            out = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poisoned
            _launch(x, w, b, out, config, gated=True)
            assert rel_error(out, ref) < TOL[dtype], config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(37, 515), (300, 2048)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_silu_and_mul_matches_product_then_activation(device, dtype, n, k, with_bias):
    from paphos.kernels.gemv import CONFIGS, gemv_silu_and_mul

    x, w, b, ref = _operands(device, dtype, 1, n, k, with_bias)
    for config in CONFIGS[:2] if interpreting() else CONFIGS:
        out = gemv_silu_and_mul(x, w, b, config)
        assert out.shape == (1, n) and out.dtype == dtype
        assert rel_error(out, ref) < TOL[dtype], config


def test_gated_products_reject_an_odd_weight(device):
    from paphos.kernels.gemv import gemv_silu_and_mul
    from paphos.kernels.skinny_gemm import skinny_gemm_silu_and_mul

    x = torch.zeros(4, 64, device=device, dtype=torch.float16)
    w = torch.zeros(33, 64, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="even number of rows"):
        skinny_gemm_silu_and_mul(x, w)
    with pytest.raises(ValueError, match="even number of rows"):
        gemv_silu_and_mul(x[:1], w)


@pytest.mark.parametrize("m", [1, 8, 64, 65])
def test_dense_routes_decode_rows_to_the_gated_kernels(m):
    """On CUDA, 1 row takes the GEMV, 2-64 the skinny GEMM (or, where its first call timed it
    faster, the product's choice and the activation kernel), more rows cuBLAS and the kernel."""
    if not torch.cuda.is_available():
        pytest.skip("choosing configs times kernels on a CUDA device")
    from paphos.kernels.gemv import gemv_silu_and_mul
    from paphos.kernels.skinny_gemm import GATED_CANDIDATES, choose_config

    x, w, b, ref = _operands("cuda", torch.bfloat16, m, 3000, 1024, True)
    out = dense.linear_silu_and_mul(x, w, b)
    assert out.shape == (m, 3000) and rel_error(out, ref) < TOL[torch.bfloat16]
    if m == 1:
        assert torch.equal(out, gemv_silu_and_mul(x, w, b))
    elif m <= 64:
        assert choose_config(x, w, b, gated=True) in (None, *GATED_CANDIDATES)
