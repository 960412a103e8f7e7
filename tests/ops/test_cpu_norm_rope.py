"""The C RMSNorm / fused add+RMSNorm / rotary kernels against the torch references, the registry's
choice of them on CPU, and the fallback to the references.

The norm sums its squares in the order of torch's AVX2 reduction: on a torch built for AVX2 the
results are bitwise torch's; torch built for AVX-512 sums in another order, so the test allows the
last bit of fp32 and one bf16 rounding of the normed value (the residual sum stays bitwise)."""

from __future__ import annotations

import pytest
import torch

from paphos.kernels.cpu import norm_rope
from paphos.ops import registry
from paphos.ops import rms_norm as ref_norm
from paphos.ops import rotary as ref_rotary

pytestmark = pytest.mark.skipif(norm_rope.load_library() is None, reason="C kernel not built")
EPS = 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 4096, 13, 3000])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_rms_norm_and_fused_add_match_reference(
    dtype: torch.dtype, hidden: int, tokens: int
) -> None:
    gen = torch.Generator().manual_seed(hidden * 100 + tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)  # [tokens, hidden]
    residual = (torch.randn(tokens, hidden, generator=gen) * 3).to(dtype)  # [tokens, hidden]
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)  # [hidden]
    fp32 = dtype == torch.float32
    tolerance = {"rtol": 2e-6, "atol": 1e-6} if fp32 else {"rtol": 2**-7, "atol": 0}
    got = norm_rope.rms_norm(x, weight, EPS)
    torch.testing.assert_close(got, ref_norm.rms_norm(x, weight, EPS), **tolerance)
    out, summed = norm_rope.fused_add_rms_norm(x, residual, weight, EPS)
    want_out, want_summed = ref_norm.fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(summed, want_summed)  # one rounding of the same sum: bitwise
    torch.testing.assert_close(out, want_out, **tolerance)


def _cache(max_pos: int, rot_dim: int, dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))  # [rot_dim // 2]
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)  # [max_pos, rot_dim // 2]
    return torch.cat((freqs.cos(), freqs.sin()), -1).to(dtype)  # [max_pos, rot_dim]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head,heads,kv_heads", [(64, 9, 3), (128, 3, 1)])
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("partial", [False, True])
def test_rotary_matches_reference_bitwise_on_fused_qkv_views(
    dtype: torch.dtype,
    head: int,
    heads: int,
    kv_heads: int,
    tokens: int,
    is_neox: bool,
    partial: bool,
) -> None:
    gen = torch.Generator().manual_seed(tokens + head)
    rot_dim = head // 2 if partial else head
    width = (heads + 2 * kv_heads) * head
    qkv = torch.randn(tokens, width, generator=gen).to(dtype)  # [tokens, q + k + v]
    query, key, _ = qkv.split([heads * head, kv_heads * head, kv_heads * head], dim=-1)
    positions = torch.randint(0, 500, (tokens,), generator=gen)  # [tokens]
    for cache_dtype in (torch.float32, dtype):
        cache = _cache(512, rot_dim, cache_dtype)  # [512, rot_dim]
        args = (positions, query, key, cache, head, is_neox)
        q, k = norm_rope.rotary_embedding(*args)
        want_q, want_k = ref_rotary.rotary_embedding(*args)
        assert q.is_contiguous() and k.is_contiguous()
        assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_rotary_rejects_positions_outside_the_cache() -> None:
    query, key = torch.randn(1, 64), torch.randn(1, 64)  # [1, 64] each
    with pytest.raises(ValueError, match="positions"):
        norm_rope.rotary_embedding(
            torch.tensor([9]), query, key, _cache(8, 64, torch.float32), 64, True
        )


def test_registry_picks_the_c_kernels_on_cpu() -> None:
    assert registry.pick("rms_norm", "cpu") is norm_rope.rms_norm
    assert registry.pick("fused_add_rms_norm", "cpu") is norm_rope.fused_add_rms_norm
    assert registry.pick("rotary_embedding", "cpu") is norm_rope.rotary_embedding


def test_fp16_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 32).half()  # [2, 32]
    weight = torch.rand(32).half()  # [32]
    calls: list[str] = []
    real = ref_norm.rms_norm
    monkeypatch.setattr(ref_norm, "rms_norm", lambda *a: calls.append("ref") or real(*a))
    assert torch.equal(norm_rope.rms_norm(x, weight, EPS), real(x, weight, EPS))
    assert calls == ["ref"]


def test_no_library_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm_rope, "load_library", lambda level=None: None)
    x, residual = torch.randn(3, 64), torch.randn(3, 64)  # [3, 64] each
    weight = torch.rand(64)  # [64]
    out, summed = norm_rope.fused_add_rms_norm(x, residual, weight, EPS)
    want_out, want_summed = ref_norm.fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(out, want_out) and torch.equal(summed, want_summed)
    query, key = torch.randn(2, 128), torch.randn(2, 64)  # [2, 128], [2, 64]
    positions = torch.tensor([0, 5])  # [2]
    args = (positions, query, key, _cache(8, 64, torch.float32), 64, False)
    got, want = norm_rope.rotary_embedding(*args), ref_rotary.rotary_embedding(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
