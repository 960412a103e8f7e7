"""The dequant GEMM's layout (ops.dequant_gemm, what the Triton kernel reads) holds each format's
weight exactly: GGUF Q4_0/Q4_1/Q8_0 repacked from the gguf package's blocks dequantize as the
gguf package does; compressed-tensors' packed words are read as stored; GPTQ (v1 zeros, 4 and 8
bits) and AWQ repacked equal those methods' own dequantization."""

from __future__ import annotations

import gguf
import pytest
import torch

from paphos.layers.linear import ReplicatedLinear
from paphos.ops import dequant_gemm as ref


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_repack_exactly(type_name):
    dense = torch.randn(24, 96, generator=torch.Generator().manual_seed(0)).numpy()
    blocks = gguf.quantize(dense, gguf.GGMLQuantizationType[type_name])
    want = gguf.dequantize(blocks, gguf.GGMLQuantizationType[type_name])
    weights = ref.from_gguf(torch.from_numpy(blocks), type_name, 96)
    torch.testing.assert_close(ref.dequantize(weights), torch.from_numpy(want), rtol=0, atol=0)


def test_int4_words_round_trip():
    values = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ref.unpack_int4_rows(ref.pack_int4_rows(values)), values.int())


@pytest.mark.parametrize("bits, desc_act", [(4, False), (8, False), (4, True)])
def test_gptq_repack_equals_its_dequantization(bits, desc_act):
    from test_gptq import gptq_quantize

    from paphos.quant.gptq import GPTQLinearMethod

    dense = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.1
    tensors, _ = gptq_quantize(dense, bits, 32, desc_act, True, seed=3)
    method = GPTQLinearMethod(bits, 32, desc_act)
    layer = ReplicatedLinear(128, 64, linear_method=method)
    for name, tensor in tensors.items():
        getattr(layer, name).data.copy_(tensor)
    method.process_weights_after_loading(layer)
    weights, perm = method.group_weights(layer)
    want = method.dequantize(layer, 0, 64).t()  # [out, in]
    torch.testing.assert_close(ref.dequantize(weights), want[:, perm], rtol=0, atol=0)


def test_awq_repack_equals_its_dequantization():
    from test_awq import awq_quantize

    from paphos.quant.awq import AWQLinearMethod

    dense = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.1
    tensors, _ = awq_quantize(dense, 32)
    method = AWQLinearMethod(32)
    layer = ReplicatedLinear(128, 64, linear_method=method)
    for name, tensor in tensors.items():
        getattr(layer, name).data.copy_(tensor)
    want = method.dequantize(layer, 0, 64).t()  # [out, in]
    torch.testing.assert_close(ref.dequantize(method.group_weights(layer)), want, rtol=0, atol=0)
