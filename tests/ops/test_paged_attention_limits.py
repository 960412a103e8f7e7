"""The paged-attention reference with a sliding window, a soft-cap and attention sinks against
attention written out token by token (transformers' definition), and the registry's routing of
such layers."""

from __future__ import annotations

import pytest
import torch

from paphos.ops import registry
from paphos.ops.paged_attention import paged_attention
from tests.ops.test_cpu_paged_attention import make_batch


def naive(query, kv_cache, starts, lens, tables, scale, window, cap, sinks=None, chunk=None):
    """Each query token on its own: scores over the visible context, capped, softmaxed (with
    each head's sink logit as one more column, then dropped: gpt-oss's eager attention)."""
    block_size = kv_cache.shape[2]
    out = torch.empty_like(query)
    for b in range(lens.shape[0]):
        seq_len, q_len = int(lens[b]), int(starts[b + 1] - starts[b])
        slots = [int(tables[b, p // block_size]) * block_size + p % block_size
                 for p in range(seq_len)]  # fmt: skip
        k = kv_cache[0].flatten(0, 1)[slots]  # [seq_len, kv_heads, head]
        v = kv_cache[1].flatten(0, 1)[slots]
        group = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [len, heads, head]
        for i in range(q_len):
            pos = seq_len - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            if chunk is not None:
                lo = max(lo, pos // chunk * chunk)
            q = query[int(starts[b]) + i]  # [heads, head]
            s = torch.einsum("hd,thd->ht", q, k[lo : pos + 1]) * scale  # [heads, visible]
            if cap is not None:
                s = torch.tanh(s / cap) * cap
            if sinks is None:
                p = s.softmax(-1)
            else:
                p = torch.cat([s, sinks[:, None]], dim=-1).softmax(-1)[:, :-1]
            out[int(starts[b]) + i] = torch.einsum("ht,thd->hd", p, v[lo : pos + 1])
    return out


@pytest.mark.parametrize("window, cap", [(5, None), (16, None), (None, 4.0), (9, 20.0), (1, None)])
def test_reference_limits_equal_token_by_token_attention(window, cap):
    specs = [(1, 1), (1, 40), (7, 7), (6, 30), (20, 20), (1, 17)]
    batch = make_batch(specs, num_kv_heads=2, group=3, head_size=40, block_size=8,
                       dtype=torch.float32, seed=0)  # fmt: skip
    out = paged_attention(*batch, 0.3, sliding_window=window, soft_cap=cap)
    torch.testing.assert_close(out, naive(*batch, 0.3, window, cap), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_reference_sinks_equal_token_by_token_attention(window):
    specs = [(1, 1), (1, 40), (7, 7), (6, 30), (1, 17)]
    batch = make_batch(specs, num_kv_heads=2, group=3, head_size=16, block_size=8,
                       dtype=torch.float32, seed=1)  # fmt: skip
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(2)) * 2  # [num_heads]
    out = paged_attention(*batch, 0.3, sliding_window=window, sinks=sinks)
    want = naive(*batch, 0.3, window, None, sinks)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(out, naive(*batch, 0.3, window, None), atol=1e-3)  # they matter


@pytest.mark.parametrize("chunk", [1, 8, 13])
def test_reference_chunked_attention_equals_token_by_token_attention(chunk):
    specs = [(1, 1), (1, 40), (7, 7), (6, 30), (20, 20), (1, 17)]
    batch = make_batch(specs, num_kv_heads=2, group=3, head_size=16, block_size=8,
                       dtype=torch.float32, seed=3)  # fmt: skip
    out = paged_attention(*batch, 0.3, chunk_size=chunk)
    torch.testing.assert_close(
        out, naive(*batch, 0.3, None, None, chunk=chunk), atol=2e-5, rtol=1e-5
    )


def test_layers_with_limits_or_odd_head_sizes_get_the_reference_on_cpu():
    ref = registry.REFERENCES["paged_attention"]
    assert registry.pick_paged_attention("cpu", 64, sliding_window=128) is ref
    assert registry.pick_paged_attention("cpu", 64, soft_cap=50.0) is ref
    assert registry.pick_paged_attention("cpu", 64, sinks=True) is ref
    assert registry.pick_paged_attention("cpu", 64, chunk_size=32) is ref
    assert registry.pick_paged_attention("cpu", 40) is ref
    assert registry.pick_paged_attention("cpu", 64) is registry.pick("paged_attention", "cpu")
