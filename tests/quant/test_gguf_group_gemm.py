"""GGUF on CUDA (quant/gguf_gemm.py): Q4_0/Q4_1/Q8_0 parts repacked for the dequant GEMM, other
types dense rows. Run here through the layout's torch reference (the Triton kernel itself is
tests/gpu/test_dequant_gemm_kernel.py): apply and the embedding lookup equal the gguf package's
dequantize-then-matmul for a fused layer of three kinds of part; selection keeps such files
quantized on CUDA and dequantizes the others."""

from __future__ import annotations

import pytest
import torch
from test_gguf_method import ATOL, T, _loaded, _packed

from paphos.config import default_model_path
from paphos.layers.embedding import VocabParallelEmbedding
from paphos.layers.linear import QKVParallelLinear
from paphos.quant.gguf import GGUFLinearMethod
from paphos.quantization import resolve_quant_method


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_group_gemm_parts_equal_dequantize_then_matmul(num_tokens):
    layer = QKVParallelLinear(256, 64, 4, 2, linear_method=GGUFLinearMethod(group_gemm=True))
    parts = {}
    for shard, ggml_type, rows in (("q", T.Q4_1, 256), ("k", T.Q8_0, 128), ("v", T.Q6_K, 128)):
        packed, parts[shard] = _packed(ggml_type, rows, 256, rows + len(shard))
        layer.weight.weight_loader(layer.weight, packed, shard)
    _loaded(layer)
    kinds = [(start, rows, type(w).__name__) for start, rows, w in layer.gguf_group]
    assert kinds == [(0, 256, "GroupWeights"), (256, 128, "GroupWeights"), (384, 128, "Tensor")]
    x = torch.randn(num_tokens, 256)
    weight = torch.cat([parts["q"], parts["k"], parts["v"]])
    torch.testing.assert_close(layer(x), x @ weight.T, atol=ATOL, rtol=0)


def test_group_gemm_embedding_lookup_and_tied_head():
    layer = VocabParallelEmbedding(100, 64, linear_method=GGUFLinearMethod(group_gemm=True))
    packed, values = _packed(T.Q4_0, 100, 64, 5)
    layer.weight.weight_loader(layer.weight, packed)
    _loaded(layer)
    ids = torch.tensor([[0, 99], [42, 7]])
    torch.testing.assert_close(layer(ids), values[ids].to(layer.params_dtype))
    x = torch.randn(2, 64)
    logits = layer.linear_method.apply(layer, x)  # as the (tied) LM head
    torch.testing.assert_close(logits[:, :100], x @ values.T, atol=ATOL, rtol=0)


def test_cuda_keeps_q4_q8_files_quantized():
    path = default_model_path()  # SmolLM2 Q4_1 (+ one Q8_0 tensor, F32 norms)
    assert resolve_quant_method("gguf", path, path, None, "cuda") == "gguf"
    assert resolve_quant_method("auto", path, path, None, "cuda") == "gguf"
    assert resolve_quant_method("none", path, path, None, "cuda") is None


def test_group_gemm_repacked_tensors_count_as_weight_memory():
    from paphos.runner.model_runner import weight_bytes

    layer = QKVParallelLinear(256, 64, 4, 2, linear_method=GGUFLinearMethod(group_gemm=True))
    for shard, rows in (("q", 256), ("k", 128), ("v", 128)):
        layer.weight.weight_loader(layer.weight, _packed(T.Q4_1, rows, 256, rows)[0], shard)
    _loaded(layer)
    # Q4_1: 16 value bytes + float16 scale and minimum per 32 weights: the file's 20 bytes
    assert weight_bytes(layer) == 512 * 256 * 20 // 32
