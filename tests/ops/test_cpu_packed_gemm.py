"""The batched bf16 product over pair-packed weights (matvec.c's paphos_gemm_packed, built at the
AVX-512 BF16 level; every lower level reports it absent and dense.linear runs torch), against a
float64 F.linear, and dense.linear's routing to it through a layer's batch copy.

Tolerance as tests/ops/test_cpu_matvec.py: fp32 sums (1e-4 of sum |x_i w_i|), plus one bf16
rounding of the output (2^-8 relative) for bf16 outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.kernels.cpu import isa, matvec
from paphos.layers.linear import ReplicatedLinear
from paphos.ops import dense
from tests.ops.test_cpu_matvec import assert_close_to_reference

each_level = pytest.mark.parametrize("level", isa.available())
# (out, in): panel tails (16/32 columns, a partial vector), an odd `in`, SmolLM2's shapes
SIZES = [(1, 1), (5, 7), (13, 31), (37, 64), (96, 77), (129, 576), (960, 576), (49, 1536)]


@each_level
def test_only_the_bf16_level_builds_the_packed_product(level) -> None:
    lib = matvec.load_library(level)
    if lib is None:
        pytest.skip("matvec kernel unavailable (no cc)")
    assert matvec.has_packed_gemm(lib) == (level == "avx512_bf16")
    if not matvec.has_packed_gemm(lib):
        packed = torch.zeros(lib.paphos_packed_numel(16, 8), dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="isa"):
            matvec.gemm_packed(lib, torch.zeros(8, 8).bfloat16(), packed, 16, None, 1)


def packed_library():
    lib = matvec.load_library("avx512_bf16") if "avx512_bf16" in isa.available() else None
    if lib is None:
        pytest.skip("the CPU has no AVX-512 BF16: the packed product is not built here")
    return lib


@pytest.mark.parametrize("rows", [5, 8, 9, 17, 64])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_packed_product_matches_float64_linear(rows, out_dtype, num_threads) -> None:
    lib = packed_library()
    gen = torch.Generator().manual_seed(rows)
    for out, in_ in SIZES:
        weight = torch.randn(out, in_, generator=gen).bfloat16()  # [out, in]
        x = torch.randn(rows, in_, generator=gen).bfloat16()  # [rows, in]
        bias = torch.randn(out, generator=gen)  # [out]
        packed = matvec.pack_bf16_pairs(lib, weight)
        for b in (None, bias):
            y = matvec.gemm_packed(lib, x, packed, out, b, num_threads, out_dtype)
            assert y.shape == (rows, out) and y.dtype == out_dtype
            assert_close_to_reference(y, x, weight, b)


def test_each_row_is_bitwise_independent_of_batch_and_thread_count() -> None:
    lib = packed_library()
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(1000, 200, generator=gen).bfloat16()  # [out, in]
    x = torch.randn(40, 200, generator=gen).bfloat16()  # [rows, in]
    packed = matvec.pack_bf16_pairs(lib, weight)
    whole = matvec.gemm_packed(lib, x, packed, 1000, None, 2)
    for rows, threads in ((5, 1), (13, 2), (39, 1)):
        part = matvec.gemm_packed(lib, x[:rows], packed, 1000, None, threads)
        assert torch.equal(part, whole[:rows]), (rows, threads)


def test_nan_and_infinity_pass_through_as_in_torch() -> None:
    lib = packed_library()
    weight = torch.ones(16, 8).bfloat16()  # [out, in]
    x = torch.ones(6, 8).bfloat16()  # [rows, in]
    x[0, 0], x[1, 0] = float("nan"), float("inf")
    y = matvec.gemm_packed(lib, x, matvec.pack_bf16_pairs(lib, weight), 16, None, 1)
    assert y[0].isnan().all() and y[1].isinf().all() and (y[2:] == 8).all()


@pytest.mark.parametrize("rows", [1, 4, 5, 64])
def test_layer_batch_copy_routes_large_bf16_batches_and_matches_f_linear(rows) -> None:
    """At any ISA level: a bf16 layer's batches equal F.linear within bf16 rounding; where the
    process runs at the AVX-512 BF16 level the batch copy is the pair-packed one."""
    torch.manual_seed(0)
    layer = ReplicatedLinear(96, 80, bias=True, params_dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.bias.normal_(0, 0.05)
    layer.linear_method.process_weights_after_loading(layer)
    copy = getattr(layer, "batch_weight", None)
    packs = dense.pair_packing_library() is not None and not dense._cpu_prepack["enabled"]
    assert (copy is not None and dense.is_pair_packed(copy)) == packs
    x = torch.randn(rows, 96).bfloat16()  # [rows, in]
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 80)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1e-2)
    fp32 = dense.linear(x, layer.weight, layer.bias, copy, out_dtype=torch.float32)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, want, rtol=1e-2, atol=1e-2)
