"""The batch copy a CPU layer keeps for products of more than SMALL_BATCH_ROWS rows
(paphos.ops.dense.batch_copy): oneDNN-prepacked half-precision weights when turned on (default:
AMX CPUs only), fp32 copies only where the CPU lacks native half GEMMs, bf16 pairs for matvec.c's
product at the AVX-512 BF16 level (tests/ops/test_cpu_packed_gemm.py); the products equal F.linear
within the weight dtype's rounding and small batches keep using the weight itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.kernels.cpu import isa
from paphos.layers.embedding import ParallelLMHead
from paphos.layers.linear import ReplicatedLinear
from paphos.layers.logits import LogitsProcessor
from paphos.ops import dense
from paphos.runner.model_runner import describe_weight_memory, weight_bytes


@pytest.fixture
def prepack():
    """Turns prepacking on for the test, and back to the default after it."""
    dense.set_cpu_prepack(True)
    yield
    dense.set_cpu_prepack(None)


def _linear(dtype: torch.dtype, bias: bool = True) -> ReplicatedLinear:
    torch.manual_seed(0)
    layer = ReplicatedLinear(96, 80, bias=bias, params_dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.05)
    layer.linear_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.skipif(not dense.cpu_has_native_half_gemm(), reason="oneDNN has no bf16 GEMM here")
@pytest.mark.parametrize("rows", [1, 4, 5, 64])
def test_prepacked_batch_copy_matches_f_linear(prepack, rows) -> None:
    layer = _linear(torch.bfloat16)
    assert layer.batch_weight.is_mkldnn
    x = torch.randn(rows, 96).bfloat16()
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 80)
    torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1e-2)
    assert "batch copies" in describe_weight_memory(layer)
    assert weight_bytes(layer) == 2 * (80 * 96 * 2) + 80 * 2  # weight, its packed copy, bias


@pytest.mark.skipif(not dense.cpu_has_native_half_gemm(), reason="oneDNN has no bf16 GEMM here")
def test_prepacked_lm_head_gives_float32_logits(prepack) -> None:
    head = ParallelLMHead(200, 64, params_dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.normal_(0, 0.05)
    head.process_weights_after_loading()
    hidden = torch.randn(16, 64).bfloat16()
    logits = LogitsProcessor(200)(head, hidden)
    assert logits.dtype == torch.float32 and logits.shape == (16, 200)
    want = F.linear(hidden.float(), head.weight.float())[:, :200]  # rows padded to 256
    torch.testing.assert_close(logits, want, rtol=1.6e-2, atol=1e-2)


def test_fp32_weights_and_prepack_off_keep_no_batch_copy(prepack) -> None:
    assert not hasattr(_linear(torch.float32), "batch_weight")  # fp32: nothing to gain
    dense.set_cpu_prepack(False)
    layer = _linear(torch.bfloat16)
    pairs = dense.pair_packing_library() is not None  # the AVX-512 BF16 level's own product
    assert hasattr(layer, "batch_weight") == (dense.wants_fp32_copy(layer.weight) or pairs)


def test_prepack_default_is_on_only_at_the_amx_level(monkeypatch) -> None:
    for level, native_half, expected in (
        ("amx", True, True),
        ("avx512_bf16", True, False),
        ("avx2", False, False),
        ("amx", False, False),
    ):
        monkeypatch.setattr(isa, "selected", lambda level=level: level)
        monkeypatch.setattr(dense, "cpu_has_native_half_gemm", lambda v=native_half: v)
        assert dense.set_cpu_prepack(None) is expected
    monkeypatch.undo()
    dense.set_cpu_prepack(None)
