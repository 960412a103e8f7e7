"""The Triton dequant GEMM (W4A16/W8A16 group formats) against its torch reference, for decode
(M <= 16: one row tile) and prefill tiles (M = 33: one part-filled 64-row tile, 80: two), 4-bit
with offset-binary values and float zeros, 8-bit, GGUF Q4_0/Q4_1/Q8_0 blocks repacked, with and
without bias, K tiles of 16-128 columns; fp16/fp32 (the interpreter's bf16 tl.dot is wrong: bf16
runs on CUDA only). On the H200 the first version failed its 128-column-group cases with 64-row
tiles (and fp32 asymmetric with 16-row tiles): each k's scale/zero/word was loaded separately and
the pipeline's shared-memory stages needed 245-524 KB (notes/quant.md)."""

from __future__ import annotations

import pytest
import torch

from paphos.ops import dequant_gemm as ref
from tests.gpu.conftest import interpreting, rel_error, skip_interpreted_bf16_dot

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _weights(
    kind: str, n: int, k: int, gen: torch.Generator, group: int | None = None
) -> ref.GroupWeights:
    if kind.startswith("Q"):  # GGUF blocks made by the gguf package
        import gguf

        dense = torch.randn(n, k, generator=gen).numpy()
        blocks = gguf.quantize(dense, gguf.GGMLQuantizationType[kind])
        return ref.from_gguf(torch.from_numpy(blocks), kind, k)
    group = group or (32 if k % 128 else 128)
    scale = torch.rand(n, k // group, generator=gen) * 0.1 + 0.01  # [N, groups]
    if kind == "int8":
        q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        return ref.GroupWeights(q, scale, group, 8)
    q = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int32)
    zero = (
        torch.randint(-8, 8, (n, k // group), generator=gen).float()
        if kind == "int4-asym"
        else None
    )
    return ref.GroupWeights(q, scale, group, 4, zero_offset=8, zero=zero)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 16, 33, 80])
@pytest.mark.parametrize("kind", ["int4", "int4-asym", "int8", "Q4_0", "Q4_1", "Q8_0"])
def test_dequant_gemm_matches_reference(device, dtype, m, kind):
    from paphos.kernels.dequant_gemm import dequant_gemm

    skip_interpreted_bf16_dot(device, dtype)
    n, k = (96, 256) if interpreting() else (1000, 2048)
    gen = torch.Generator().manual_seed(m * 31 + len(kind))
    w = _weights(kind, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)  # [M, K]
    bias = torch.randn(n, generator=gen).to(dtype) if m % 2 else None
    want = ref.dequant_gemm(x.double().float(), w, None if bias is None else bias.float())
    dev = w.to(device)
    out = dequant_gemm(
        x.to(device), dev.q, dev.scale, dev.group, dev.bits, dev.zero_offset, dev.zero,
        dev.minimum, None if bias is None else bias.to(device),
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_error(out.cpu(), want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("kind", ["int4", "int4-asym", "int8"])
@pytest.mark.parametrize("group", [16, 64, 384])
def test_dequant_gemm_group_sizes(device, dtype, m, kind, group):
    """K tiles of 16/64/128 columns (the largest power of two dividing the group): GPTQ group 64,
    channel-wise weights (group = K = 384: 3 tiles a group), a 16-column group."""
    from paphos.kernels.dequant_gemm import dequant_gemm

    skip_interpreted_bf16_dot(device, dtype)
    n, k = 80, 384
    gen = torch.Generator().manual_seed(m + group)
    w = _weights(kind, n, k, gen, group)
    x = torch.randn(m, k, generator=gen).to(dtype)  # [M, K]
    want = ref.dequant_gemm(x.float(), w, None)
    dev = w.to(device)
    out = dequant_gemm(
        x.to(device), dev.q, dev.scale, dev.group, dev.bits, dev.zero_offset, dev.zero, dev.minimum
    )
    assert rel_error(out.cpu(), want) < TOL[dtype]


def test_dequant_gemm_refuses_groups_below_one_tile():
    from paphos.kernels.dequant_gemm import dequant_gemm, tile_k

    assert [tile_k(g) for g in (32, 48, 128, 256, 576, 8, 40)] == [32, 16, 128, 128, 64, None, None]
    w = _weights("int8", 8, 40, torch.Generator().manual_seed(0), 8)
    with pytest.raises(ValueError, match="group=8"):
        dequant_gemm(torch.randn(1, 40), w.q, w.scale, w.group, w.bits)
