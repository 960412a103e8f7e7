"""Multi-head latent attention: the absorbed decode (query through W_UK, attention over the cached
latent rows, output through W_UV) equals the expanded form (per-head K/V up-projected from the
latents), a mixed batch through `LatentAttention` equals the expanded form row by row, and the
cache spec sizes MLA layers by their one latent "head" (DeepSeek-V3: 576 values per token)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from paphos.attention import AttentionMetadata, LatentAttention
from paphos.attention.cache_spec import LayerCacheSpec
from paphos.layers.rotary import get_rope
from paphos.ops.mla_attention import (
    absorb_query,
    mla_decode_attention,
    mla_expanded_attention,
    unabsorb_output,
    write_latent_cache,
)
from paphos.runner.kv_cache import KVCacheSpec, allocate_kv_caches

HEADS, RANK, NOPE, ROPE, V_DIM, BLOCK = 4, 32, 16, 8, 12, 16


def random_cache(num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(num_blocks, BLOCK, RANK + ROPE, generator=gen)  # [blocks, block, rank+rope]


def test_absorbed_decode_equals_expanded_form():
    gen = torch.Generator().manual_seed(0)
    seq_lens = [1, 17, 40, 16]
    cache = random_cache(16, gen)
    tables = torch.randperm(16, generator=gen)[:12].view(4, 3)  # [num_seqs, max_blocks]
    w_kv_b = torch.randn(HEADS, NOPE + V_DIM, RANK, generator=gen) * 0.3
    q_nope = torch.randn(4, HEADS, NOPE, generator=gen)
    q_pe = torch.randn(4, HEADS, ROPE, generator=gen)
    scale = 0.17
    query = absorb_query(q_nope, q_pe, w_kv_b)  # [num_seqs, heads, rank + rope]
    latent_out = mla_decode_attention(query, cache, torch.tensor(seq_lens), tables, scale, RANK)
    absorbed = unabsorb_output(latent_out, w_kv_b, V_DIM)  # [num_seqs, heads, v]
    for b, seq_len in enumerate(seq_lens):
        expanded = mla_expanded_attention(
            q_nope[b : b + 1], q_pe[b : b + 1], cache, seq_len, tables[b], w_kv_b, scale
        )  # [1, heads, v]
        assert_close(absorbed[b : b + 1], expanded, rtol=1e-5, atol=1e-5)
    # the absorbed form depends on every cached row the sequence owns, and on no other
    cache[tables[2, 2], 40 - 33] += 1.0  # position 39 of sequence 2
    changed = unabsorb_output(
        mla_decode_attention(query, cache, torch.tensor(seq_lens), tables, scale, RANK),
        w_kv_b,
        V_DIM,
    )
    assert not torch.allclose(changed[2], absorbed[2])
    assert_close(changed[[0, 1, 3]], absorbed[[0, 1, 3]])


def test_latent_attention_mixed_batch_equals_expanded_form():
    """A prefill chunk with cached context, a decode and a whole prompt in one step."""
    gen = torch.Generator().manual_seed(1)
    q_lens, seq_lens = [5, 1, 9], [21, 30, 9]
    tables = torch.tensor([[3, 7], [1, 4], [6, 0]])
    cache = random_cache(8, gen)
    num_tokens = sum(q_lens)
    starts = torch.tensor([0, 5, 6, 15])
    slots = torch.cat(
        [
            tables[b, torch.arange(s - q, s) // BLOCK] * BLOCK + torch.arange(s - q, s) % BLOCK
            for b, (q, s) in enumerate(zip(q_lens, seq_lens))
        ]
    )  # [num_tokens]
    meta = AttentionMetadata(
        slots, starts, torch.tensor(seq_lens), tables, torch.arange(num_tokens), 9, 30
    )
    layer = LatentAttention(HEADS, RANK, NOPE, ROPE, V_DIM, scale=0.2)
    assert layer.cache_spec() == LayerCacheSpec("latent", 1, RANK + ROPE, (HEADS, NOPE + ROPE))
    w_kv_b = torch.randn(HEADS, NOPE + V_DIM, RANK, generator=gen) * 0.3
    q_nope = torch.randn(num_tokens, HEADS, NOPE, generator=gen)
    q_pe = torch.randn(num_tokens, HEADS, ROPE, generator=gen)
    latent = torch.randn(num_tokens, RANK, generator=gen)
    k_pe = torch.randn(num_tokens, ROPE, generator=gen)
    out = layer(q_nope, q_pe, latent, k_pe, w_kv_b, cache, meta)  # [num_tokens, heads * v]
    written = cache.view(-1, RANK + ROPE)[slots]
    assert_close(written, torch.cat([latent, k_pe], -1))
    for b, seq_len in enumerate(seq_lens):
        s, e = int(starts[b]), int(starts[b + 1])
        q = (q_nope[s:e], q_pe[s:e])
        want = mla_expanded_attention(*q, cache, seq_len, tables[b], w_kv_b, 0.2)
        assert_close(out[s:e].view(e - s, HEADS, V_DIM), want, rtol=1e-5, atol=1e-5)


def test_write_latent_cache_writes_each_slot_once_and_skips_padding():
    cache = torch.zeros(2, BLOCK, RANK + ROPE)
    latent, k_pe = torch.randn(4, RANK), torch.randn(4, ROPE)
    write_latent_cache(latent, k_pe, cache, torch.tensor([17, 0, -1, 31]))  # -1: a padded row
    assert_close(cache[1, 1], torch.cat([latent[0], k_pe[0]]))
    assert_close(cache[0, 0], torch.cat([latent[1], k_pe[1]]))
    assert_close(cache[1, 15], torch.cat([latent[3], k_pe[3]]))
    assert cache.abs().sum(-1).count_nonzero() == 3


def test_deepseek_v3_cache_is_576_values_per_token_per_layer():
    mla = LatentAttention(128, 512, 128, 64, 128, scale=192**-0.5).cache_spec()
    mha = LayerCacheSpec("kv", 128, 192)  # what per-head K/V of the same heads would keep
    assert mla.values_per_token == 576 and mha.values_per_token == 2 * 128 * 192
    spec = KVCacheSpec(block_size=64, dtype=torch.bfloat16, layers=(mla,) * 61)
    assert spec.bytes_per_token == 61 * 576 * 2
    assert spec.bytes_per_block == 64 * 61 * 576 * 2
    line = spec.describe()
    assert "70272 bytes per token" in line and "latent 576" in line
    assert "2 x 128 heads x 192 = 49152" in line


def test_allocation_holds_kv_and_latent_layers_side_by_side():
    kv, latent = LayerCacheSpec("kv", 2, 8), LayerCacheSpec("latent", 1, 40)
    spec = KVCacheSpec(block_size=4, dtype=torch.float32, layers=(kv, latent, kv))
    caches = allocate_kv_caches(spec, 3, torch.device("cpu"))
    assert [tuple(c.shape) for c in caches] == [(2, 3, 4, 2, 8), (3, 4, 40), (2, 3, 4, 2, 8)]
    assert sum(c.numel() * 4 for c in caches) == spec.bytes_per_block * 3
    for i, c in enumerate(caches):
        c.fill_(float(i))  # disjoint views: each keeps only its own writes
    assert all(bool((c == i).all()) for i, c in enumerate(caches))
    with pytest.raises(ValueError, match="one head per token"):
        LayerCacheSpec("latent", 2, 40)


def test_latent_attention_refuses_a_quantized_kv_b_proj():
    from paphos.models.decoder_mla import LatentDecoderAttention
    from paphos.models.decoder_spec import LatentSpec, LayerSpec, NormSpec, RopeSpec
    from paphos.parallel import ParallelInfo
    from paphos.quant.gptq import GPTQLinearMethod

    spec = LayerSpec(
        hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=NOPE + ROPE, intermediate_size=64,
        norm=NormSpec("rms", 1e-6), rope=RopeSpec(10000.0, ROPE, False),
        latent=LatentSpec(RANK, NOPE, ROPE, V_DIM, q_lora_rank=None),
    )  # fmt: skip
    rope = get_rope(ROPE, ROPE, 64, 10000.0, is_neox_style=False)
    with pytest.raises(ValueError, match="kv_b_proj cannot be quantized"):
        LatentDecoderAttention(spec, rope, GPTQLinearMethod(bits=4, group_size=32), ParallelInfo())


def test_expanded_form_in_query_blocks_equals_one_block(monkeypatch):
    """A long prefill runs its queries in blocks (bounded score memory): same result."""
    import paphos.ops.mla_attention as mla

    gen = torch.Generator().manual_seed(3)
    cache = random_cache(4, gen)
    table = torch.tensor([2, 0, 3, 1])
    w_kv_b = torch.randn(HEADS, NOPE + V_DIM, RANK, generator=gen) * 0.3
    q_nope = torch.randn(37, HEADS, NOPE, generator=gen)
    q_pe = torch.randn(37, HEADS, ROPE, generator=gen)
    whole = mla.mla_expanded_attention(q_nope, q_pe, cache, 50, table, w_kv_b, 0.2)
    monkeypatch.setattr(mla, "MAX_SCORES", HEADS * 50 * 5)  # blocks of 5 queries
    blocks = mla.mla_expanded_attention(q_nope, q_pe, cache, 50, table, w_kv_b, 0.2)
    assert_close(blocks, whole, rtol=1e-6, atol=1e-6)
