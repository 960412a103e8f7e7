"""The Triton fp8 block-scaled GEMM (fp8 weights with block scales, activations per token and
block column) against dequantize-then-matmul, for decode (M = 1..16) and prefill tiles, whole
and partial last blocks, with and without bias."""

from __future__ import annotations

import pytest
import torch

from paphos.ops import scaled_mm
from tests.gpu.conftest import interpreting, rel_error

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("block, k", [(32, 96), (128, 256), (128, 200)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_fp8_block_gemm_matches_dequantize_then_matmul(device, m, block, k, out_dtype):
    from paphos.kernels.fp8_block_gemm import fp8_block_gemm

    n = 80 if interpreting() else 1000
    gen = torch.Generator().manual_seed(m + k)
    blocks = -(-k // block)
    x = torch.randn(m, k, generator=gen)  # [M, K]
    act = scaled_mm.ActivationQuant(scaled_mm.FP8_DTYPE, "group", block, scaled_mm.FP8_MAX)
    q_x, s_x = scaled_mm.quantize_activation(x, act)  # [M, K], [M, blocks]
    q_w = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(scaled_mm.FP8_DTYPE)
    s_w = torch.rand(n, blocks, generator=gen) * 0.01 + 1e-3  # [N, blocks]
    bias = torch.randn(n, generator=gen) if m % 2 else None
    columns = torch.arange(k) // block
    x_seen = q_x.float() * s_x[:, columns]
    want = x_seen @ scaled_mm.dequantize_rows(q_w, s_w, None, columns).t()
    if bias is not None:
        want += bias
    out = fp8_block_gemm(
        q_x.to(device), s_x.to(device), q_w.to(device), s_w.to(device), block,
        None if bias is None else bias.to(device), out_dtype,
    )  # fmt: skip
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert rel_error(out.cpu(), want) < (1e-5 if out_dtype == torch.float32 else 2e-3)
