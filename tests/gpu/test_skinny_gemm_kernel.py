"""The Triton skinny GEMM (2-64-row linear layers on CUDA) against F.linear in float64: every rows
tile, split-K with its in-kernel reduction (repeated, so a missing ordering would show), odd sizes
that need the K mask and the wrapped columns, bias; `ops.dense.linear` routing 2-64 half rows to it
and float32 or more rows to cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.ops import dense
from tests.gpu.conftest import interpreting, rel_error, skip_interpreted_bf16_dot

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _operands(device, dtype, m, n, k, with_bias):  # noqa: ANN001, ANN202
    gen = torch.Generator().manual_seed(m * 7919 + n * k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)  # [M, K]
    w = torch.randn(n, k, generator=gen).to(device, dtype)  # [N, K]
    b = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None  # [N]
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())  # [M, N]
    return x, w, b, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 5, 16, 33, 64])
@pytest.mark.parametrize("n,k", [(48, 256), (100, 520), (2048, 2048)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_gemm_matches_linear_with_and_without_split_k(device, dtype, m, n, k, with_bias):
    from paphos.kernels.skinny_gemm import GemmConfig, _launch

    skip_interpreted_bf16_dot(device, dtype)
    if interpreting() and n * k > 100_000:
        pytest.skip("large shapes are slow in the interpreter")
    x, w, b, ref = _operands(device, dtype, m, n, k, with_bias)
    for config in (GemmConfig(32, 128, 1), GemmConfig(64, 128, 2), GemmConfig(32, 64, 4, 4, 3)):
        for _ in range(3):  # the tickets reset themselves: repeated launches stay right
            out = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poisoned
            _launch(x, w, b, out, config)
            assert rel_error(out, ref) < TOL[dtype], config  # NaN left anywhere fails


def test_skinny_gemm_split_k_tickets_are_zero_after_every_launch(device):
    from paphos.kernels.skinny_gemm import GemmConfig, skinny_gemm
    from paphos.kernels.tickets import TICKETS

    x, w, _, ref = _operands(device, torch.float16, 8, 96, 1024, False)
    out = skinny_gemm(x, w, None, GemmConfig(32, 64, 8))
    assert rel_error(out, ref) < TOL[torch.float16]
    assert int(TICKETS.get(x.device, 1).abs().sum()) == 0


def test_skinny_gemm_rejects_what_it_does_not_take(device):
    from paphos.kernels.skinny_gemm import skinny_gemm

    with pytest.raises(ValueError, match="skinny_gemm takes"):
        skinny_gemm(
            torch.zeros(1, 8, device=device, dtype=torch.float16),
            torch.zeros(4, 8, device=device, dtype=torch.float16),
        )
    with pytest.raises(ValueError, match="skinny_gemm takes"):
        skinny_gemm(torch.zeros(4, 8, device=device), torch.zeros(4, 8, device=device))


def test_skinny_gemm_picks_a_config_and_dense_linear_routes_rows_2_to_64_to_it():
    if not torch.cuda.is_available():
        pytest.skip("choosing a config times kernels on a CUDA device")
    from paphos.kernels.skinny_gemm import CANDIDATES, choose_config, skinny_gemm

    for m, n, k in ((2, 3000, 1000), (24, 3000, 1000), (64, 32000, 2048)):
        x, w, _, ref = _operands("cuda", torch.bfloat16, m, n, k, False)
        assert rel_error(skinny_gemm(x, w), ref) < TOL[torch.bfloat16]
        assert choose_config(x, w) in (None, *CANDIDATES)  # None: cuBLAS timed faster
        assert torch.equal(dense.linear(x, w), skinny_gemm(x, w))  # the same choice: bitwise
    x, w, _, ref = _operands("cuda", torch.bfloat16, 65, 3000, 1000, False)
    assert torch.equal(dense.linear(x, w), F.linear(x, w))  # cuBLAS beyond 64 rows
    x, w, _, ref = _operands("cuda", torch.float32, 8, 300, 100, False)
    assert torch.equal(dense.linear(x, w), F.linear(x, w))  # float32 stays exact on cuBLAS


@pytest.mark.parametrize("m", [1, 8, 64])
def test_float32_output_keeps_the_float32_sums(device, m):
    """out_dtype=float32 (the LM head's logits): the kernels store their float32 sums unrounded,
    far closer to the float64 product than the half-precision output would be."""
    from paphos.kernels.gemv import gemv
    from paphos.kernels.skinny_gemm import GemmConfig, skinny_gemm

    x, w, _, ref = _operands(device, torch.float16, m, 96, 512, False)
    if m == 1:
        out = gemv(x, w, None, (2, 256, 4), out_dtype=torch.float32)
    else:
        out = skinny_gemm(x, w, None, GemmConfig(32, 128, 2), out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (m, 96)
    assert rel_error(out, ref) < 1e-5  # a float16 output alone rounds at ~3e-4
