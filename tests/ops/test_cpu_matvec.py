"""The small-batch matvec kernel, at every ISA level this CPU has (AVX2, AVX-512, AVX-512 BF16),
against a float64 F.linear, and dense.linear's torch fallback.

Tolerance: every output is an fp32 dot product of `in` terms, so its error against float64 is at
most ~in * 2^-24 * sum|x_i * w_i| (about 1e-5 relative for in <= 600); we allow 1e-4 of that sum
for fp32 outputs. bf16 outputs add one rounding of 2^-8 relative, so we allow 2^-8 of |y| + 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.kernels.cpu import isa, matvec
from paphos.ops import dense

LIB = matvec.load_library()
needs_kernel = pytest.mark.skipif(LIB is None, reason="matvec kernel unavailable (no AVX2/cc)")
each_level = pytest.mark.parametrize("level", isa.available())

SIZES = [(1, 1), (5, 7), (13, 31), (37, 64), (96, 77), (129, 576)]  # (out, in): tails and blocks


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b = None if bias is None else bias.double()
    return F.linear(x.double(), weight.double(), b)  # [rows, out] float64


def assert_close_to_reference(y: torch.Tensor, x, weight, bias) -> None:
    ref = reference(x, weight, bias)
    scale = F.linear(x.double().abs(), weight.double().abs())  # [rows, out]: sum |x_i w_i|
    allowed = 1e-4 * scale + 1e-6
    if y.dtype == torch.bfloat16:
        allowed = allowed + 2.0**-8 * ref.abs()
    err = (y.double() - ref).abs()
    assert bool((err <= allowed).all()), f"max error {err.max().item()} over {allowed.min()}"


@needs_kernel
@each_level
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_kernel_matches_float64_linear_for_every_row_count_and_odd_size(
    level: str, weight_dtype: torch.dtype, x_dtype: torch.dtype, rows: int, num_threads: int
) -> None:
    lib = matvec.load_library(level)
    gen = torch.Generator().manual_seed(rows * 10 + num_threads)
    for out, in_ in SIZES:
        x = torch.randn(rows, in_, generator=gen).to(x_dtype)  # [rows, in]
        weight = torch.randn(out, in_, generator=gen).to(weight_dtype)  # [out, in]
        bias = torch.randn(out, generator=gen).to(weight_dtype)  # [out]
        for b in (None, bias):
            y = matvec.matvec(lib, x, weight, b, num_threads)
            assert y.shape == (rows, out) and y.dtype == x_dtype
            assert_close_to_reference(y, x, weight, b)


@needs_kernel
@each_level
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_large_matrix_split_over_threads_matches_reference(level, x_dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4099, 576, generator=gen).bfloat16()  # [out, in]: > 64 KiB per thread
    x = torch.randn(3, 576, generator=gen).to(x_dtype)  # [rows, in]
    y = matvec.matvec(matvec.load_library(level), x, weight, None, 2)
    assert_close_to_reference(y, x, weight, None)


@needs_kernel
@each_level
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_row_is_bitwise_independent_of_batch_and_thread_count(level, dtype) -> None:
    lib = matvec.load_library(level)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(1027, 200, generator=gen).to(dtype)  # [out, in]
    x = torch.randn(4, 200, generator=gen).to(dtype)  # [rows, in]
    alone = torch.cat([matvec.matvec(lib, x[i : i + 1], weight, None, 1) for i in range(4)])
    for rows in (2, 3, 4):
        for threads in (1, 2):
            batched = matvec.matvec(lib, x[:rows], weight, None, threads)
            assert torch.equal(batched, alone[:rows]), (rows, threads)


@needs_kernel
def test_non_contiguous_input_is_accepted() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 33, generator=gen)  # [out, in]
    x = torch.randn(33, 2, generator=gen).t()  # [2, 33], strided
    assert_close_to_reference(matvec.matvec(LIB, x, weight, None, 2), x, weight, None)


@needs_kernel
@pytest.mark.parametrize(
    "x_shape, weight, bias_shape, match",
    [
        ((5, 8), torch.zeros(3, 8), None, "rows 1..4"),
        ((1, 7), torch.zeros(3, 8), None, "matching in"),
        ((1, 8), torch.zeros(3, 8, dtype=torch.float16), None, "float16"),
        ((1, 8), torch.zeros(8, 3).t(), None, "contiguous=False"),
        ((1, 0), torch.zeros(3, 0), None, "non-empty"),
        ((1, 8), torch.zeros(3, 8), (4,), r"bias shape \(4,\)"),
    ],
)
def test_bad_operands_raise_value_error_naming_them(x_shape, weight, bias_shape, match) -> None:
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=match):
        matvec.matvec(LIB, torch.zeros(x_shape), weight, bias, 1)


@needs_kernel
def test_dense_linear_uses_kernel_for_small_batches_and_matches_reference() -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 96, generator=gen).bfloat16()  # [out, in]
    for rows in (1, 4, 5):
        x = torch.randn(rows, 96, generator=gen).bfloat16()  # [rows, in]
        y = dense.linear(x, weight, None, weight.float())
        assert y.dtype == torch.bfloat16
        assert_close_to_reference(y, x, weight, None)


def test_dense_linear_falls_back_to_torch_when_library_is_unavailable(monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("kernel called although the library is unavailable")

    monkeypatch.setattr(matvec, "load_library", lambda level=None: None)
    monkeypatch.setattr(matvec, "launch", must_not_run)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(20, 24, generator=gen)  # [out, in]
    bias = torch.randn(20, generator=gen)  # [out]
    x = torch.randn(2, 24, generator=gen)  # [rows, in]
    assert torch.equal(dense.linear(x, weight, bias), F.linear(x, weight, bias))


def test_failed_build_disables_the_kernel_without_raising(monkeypatch, tmp_path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(matvec, "SOURCE", broken)
    monkeypatch.setattr(matvec, "library_path", lambda compiler, source, level: tmp_path / "x.so")
    matvec.load_library.cache_clear()
    try:
        assert matvec.load_library() is None
        assert not (tmp_path / "x.so").exists()
        assert list(tmp_path.iterdir()) == [broken]  # the temporary output was removed
    finally:
        matvec.load_library.cache_clear()


def test_missing_compiler_disables_the_kernel(monkeypatch) -> None:
    monkeypatch.setattr(matvec, "find_compiler", lambda: None)
    matvec.load_library.cache_clear()
    try:
        assert matvec.load_library() is None
    finally:
        matvec.load_library.cache_clear()
