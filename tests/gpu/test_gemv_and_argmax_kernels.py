"""The Triton GEMV (one-row linear layers on CUDA) against F.linear in float64, for every tile
config, odd sizes, bias; `ops.dense.linear` routing one CUDA row to it; the two-stage argmax of
logits equal to torch.argmax, ties included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.ops import argmax as argmax_op
from paphos.ops import dense
from tests.gpu.conftest import interpreting, rel_error

pytestmark = pytest.mark.gpu
# bf16/fp16 inputs, fp32 sums: the output's own rounding dominates.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(1, 64), (37, 515), (300, 2048), (130, 4100)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear_for_every_tile_config(device, dtype, n, k, with_bias):
    from paphos.kernels.gemv import CONFIGS, gemv

    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(device, dtype)  # [1, K]
    w = torch.randn(n, k, generator=gen).to(device, dtype)  # [N, K]
    b = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None  # [N]
    ref = _reference(x, w, b)
    configs = CONFIGS[:2] if interpreting() else CONFIGS
    for config in configs:
        out = gemv(x, w, b, config)
        assert out.shape == (1, n) and out.dtype == dtype
        assert rel_error(out, ref) < TOL[dtype], config


def test_gemv_autotuned_and_routed_by_dense_linear_for_one_cuda_row():
    if not torch.cuda.is_available():
        pytest.skip("autotuning times kernels on a CUDA device")
    from paphos.kernels.gemv import gemv

    x = torch.randn(1, 1000, device="cuda", dtype=torch.bfloat16)  # [1, K]
    w = torch.randn(3000, 1000, device="cuda", dtype=torch.bfloat16)  # [N, K]
    ref = _reference(x, w, None)
    assert rel_error(gemv(x, w), ref) < TOL[torch.bfloat16]
    routed = dense.linear(x, w)
    assert torch.equal(routed, gemv(x, w))  # the same kernel and tile: bitwise
    two_rows = dense.linear(x.expand(2, -1).contiguous(), w)  # cuBLAS
    assert rel_error(two_rows[:1], ref) < TOL[torch.bfloat16]


def test_gemv_rejects_more_than_one_row(device):
    from paphos.kernels.gemv import gemv

    with pytest.raises(ValueError, match="x \\[1, K\\]"):
        gemv(torch.zeros(2, 8, device=device), torch.zeros(4, 8, device=device))


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 49152), (64, 32000), (2, 199)])
def test_two_stage_argmax_equals_torch_argmax_with_ties(device, rows, vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=gen).to(device)  # [rows, vocab]
    x[0, vocab // 3] = x[0, vocab - 1] = 50.0  # a tie across chunks: the first one wins
    if rows > 1:
        x[1] = 0.0  # all equal: index 0
    assert torch.equal(argmax_op.argmax_rows(x), torch.argmax(x, dim=-1))
    out = torch.empty(rows, dtype=torch.long, device=device)
    assert torch.equal(argmax_op.argmax_rows(x, out=out), out)
    size = argmax_op.chunk_size(vocab)
    if size is not None:  # the two-stage path itself, also where argmax_rows would not take it
        assert torch.equal(argmax_op.two_stage_argmax(x, size), torch.argmax(x, dim=-1))
