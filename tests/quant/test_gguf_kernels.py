"""The GGUF block kernels (kernels/cpu/gguf_matvec.c, gguf_gemm.c) against the `gguf` package's
dequantizers: dequantization bit for bit; products from the blocks within fp32 summation error
(fp32 activations are not quantized: the reference is dequantize-then-matmul in float64), for 1-7
rows and every type; the batched product with 8-bit activations (gguf_gemm.c) against the
dequantized blocks times the activations quantized by the torch reference (bit for bit), for
1-256 rows, odd output counts, fp32 and bf16 inputs. Every ISA build this CPU runs, and every code
path of each (AVX2, AVX-512 / AVX512-VNNI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from gguf_blocks import ALL_TYPES, random_blocks

from paphos.kernels.cpu import gguf_matvec, isa
from paphos.quant.gguf import quantize_activations_reference

# |kernel - float64 reference| <= RTOL * max |reference| (fp32 sums over <= 768 products)
RTOL = 2e-6


@pytest.fixture(scope="module", params=isa.available() or ["none"])
def lib(request):
    lib = None if request.param == "none" else gguf_matvec.load_library(request.param)
    if lib is None:
        pytest.skip("the GGUF C kernel does not build here")
    return lib


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_the_gguf_package_bit_for_bit(lib, ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    blocks = random_blocks(ggml_type, 33, 512, rng)
    expected = dequantize(blocks, ggml_type).reshape(33, 512)
    for threads in (1, 2):
        got = gguf_matvec.dequantize(lib, ggml_type, torch.from_numpy(blocks), 512, threads)
        assert np.array_equal(got.numpy(), expected)
    half = torch.empty(33, 512, dtype=torch.bfloat16)  # rounded as torch rounds
    gguf_matvec.dequantize(lib, ggml_type, torch.from_numpy(blocks), 512, 2, half)
    assert torch.equal(half, torch.from_numpy(expected).to(torch.bfloat16))


def _isas(lib) -> list[int]:
    assert gguf_matvec.best_isa(lib) == (
        gguf_matvec.AVX2 if lib.paphos_isa_level == "avx2" else gguf_matvec.AVX512
    )
    return [gguf_matvec.AVX2] + ([gguf_matvec.AVX512] if lib.paphos_gguf_has_avx512() else [])


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_matvec_from_the_blocks_equals_dequantize_then_matmul(lib, ggml_type, rows):
    """Both code paths where the CPU has AVX-512 (this project's machine does), else AVX2."""
    rng = np.random.default_rng(rows * 100 + int(ggml_type))
    out, cols = 70, 768
    blocks = torch.from_numpy(random_blocks(ggml_type, out, cols, rng))
    weight = torch.from_numpy(dequantize(blocks.numpy(), ggml_type).reshape(out, cols))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    expected = x.double() @ weight.double().T  # [rows, out]
    wide = torch.full((rows, out + 5), float("nan"))  # written through a strided view
    for threads, path in [(t, p) for t in (1, 2) for p in _isas(lib)]:
        y = wide.narrow(1, 2, out)
        gguf_matvec.matvec_into(lib, ggml_type, x, blocks, y, threads, path)
        error = (y.double() - expected).abs().max() / expected.abs().max()
        assert error <= RTOL, f"{ggml_type.name} path {path}: relative error {error:.2e}"
    assert wide[:, :2].isnan().all() and wide[:, -3:].isnan().all()


def test_bad_arguments_raise_naming_them(lib):
    blocks = torch.zeros(4, 20, dtype=torch.uint8)  # 4 rows of one Q4_1 block
    x, y = torch.zeros(1, 32), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="type"):
        gguf_matvec.matvec_into(lib, 99, x, blocks, y, 1)
    with pytest.raises(ValueError, match="multiple of the block"):
        gguf_matvec.dequantize(lib, 3, blocks, 31, 1)


def _gemm_isas(lib) -> list[int]:
    vnni = lib.paphos_isa_level != "avx2" and lib.paphos_gguf_has_vnni()
    assert gguf_matvec.best_gemm_isa(lib) == (gguf_matvec.AVX512 if vnni else gguf_matvec.AVX2)
    return [gguf_matvec.AVX2] + ([gguf_matvec.AVX512] if vnni else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_activation_quantization_equals_the_torch_reference_bit_for_bit(lib, dtype):
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(1)) * 3
    x[3, 32:64] = 0  # a zero block: scale 0, values 0
    x[5, :32] = 1e-30  # a tiny block
    x = x.to(dtype)
    q, d = gguf_matvec.quantize_q8(lib, x)
    values = (q.float().reshape(37, 8, 32) * d.unsqueeze(-1)).reshape(37, 256)
    assert torch.equal(values, quantize_activations_reference(x))
    assert q.abs().max() <= 127 and (q[3, 32:64] == 0).all()


# |kernel - float64 reference| <= RTOL_Q8 * max |reference|: fp32 sums of per-block terms
RTOL_Q8 = 1e-5


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 8, 33, 64, 256, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_q8_equals_dequantized_blocks_times_quantized_activations(lib, ggml_type, rows, dtype):
    rng = np.random.default_rng(rows * 100 + int(ggml_type))
    out, cols = 37, 512  # 37: two whole tiles of 16 rows and a partial one
    blocks = torch.from_numpy(random_blocks(ggml_type, out, cols, rng))
    weight = torch.from_numpy(dequantize(blocks.numpy(), ggml_type).reshape(out, cols))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).to(dtype)
    expected = quantize_activations_reference(x).double() @ weight.double().T  # [rows, out]
    wide = torch.full((rows, out + 5), float("nan"))  # written through a strided view
    for threads, path in [(t, p) for t in (1, 2) for p in _gemm_isas(lib)]:
        y = wide.narrow(1, 2, out)
        gguf_matvec.gemm_q8_into(lib, ggml_type, x, blocks, y, threads, path)
        error = (y.double() - expected).abs().max() / expected.abs().max()
        assert error <= RTOL_Q8, f"{ggml_type.name} path {path}: relative error {error:.2e}"
        half = torch.empty(rows, out, dtype=torch.bfloat16)  # the same sums, rounded as torch
        gguf_matvec.gemm_q8_into(lib, ggml_type, x, blocks, half, threads, path)
        assert torch.equal(half, y.to(torch.bfloat16))
    assert wide[:, :2].isnan().all() and wide[:, -3:].isnan().all()


@pytest.mark.parametrize(
    "ggml_type", [t for t in ALL_TYPES if t.value < 10 or t.value == 20], ids=lambda t: t.name
)
@pytest.mark.parametrize("out, cols", [(1, 32), (23, 96), (49, 1568)])
def test_gemm_q8_odd_shapes_of_the_32_element_types(lib, ggml_type, out, cols):
    """An odd number of 32-element blocks per row (the unpacking takes them in pairs), a single
    output row, and more than 16 rows of 49 blocks."""
    rng = np.random.default_rng(out + cols)
    blocks = torch.from_numpy(random_blocks(ggml_type, out, cols, rng))
    weight = torch.from_numpy(dequantize(blocks.numpy(), ggml_type).reshape(out, cols))
    x = torch.randn(19, cols, generator=torch.Generator().manual_seed(cols)).to(torch.bfloat16)
    expected = quantize_activations_reference(x).double() @ weight.double().T
    for path in _gemm_isas(lib):
        y = torch.empty(19, out)
        gguf_matvec.gemm_q8_into(lib, ggml_type, x, blocks, y, 2, path)
        error = (y.double() - expected).abs().max() / expected.abs().max()
        assert error <= RTOL_Q8, f"{ggml_type.name} path {path}: relative error {error:.2e}"
