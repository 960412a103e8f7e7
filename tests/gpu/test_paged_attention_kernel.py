"""Triton paged attention (decode + prefill kernels) against the paphos.ops reference.

Mixed batches put decode rows and prefill chunks with cached context side by side; context lengths
straddle block boundaries. Both are checked against the reference run in float32 on upcast inputs.
"""

from __future__ import annotations

import pytest
import torch

from paphos.ops.paged_attention import paged_attention as ref_paged_attention
from tests.gpu.conftest import TOLERANCE, rel_error, skip_interpreted_bf16_dot

pytestmark = pytest.mark.gpu
# Kernel vs float32 reference: bf16/fp16 inputs, probabilities rounded to the input dtype.
ATTN_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
MIXED_BATCH = [(1, 1), (7, 7), (1, 33), (5, 32), (1, 200), (40, 40), (17, 64), (1, 16)]


def make_batch(
    lens: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    spare_blocks: int = 0,
) -> dict:
    """Random query and paged cache for sequences given as (q_len, seq_len); blocks shuffled."""
    q_lens = torch.tensor([q for q, _ in lens])
    seq_lens = torch.tensor([s for _, s in lens], device=device)  # [num_seqs]
    blocks_per_seq = [-(-s // block_size) for _, s in lens]
    max_blocks = max(blocks_per_seq) + spare_blocks
    num_blocks = sum(blocks_per_seq) + 3
    block_ids = torch.randperm(num_blocks, device=device)
    block_tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = block_ids[used : used + n]
        used += n
    # [2, num_blocks, block_size, num_kv_heads, head_size]
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, device=device)
    query = torch.randn(int(q_lens.sum()), num_heads, head_size, device=device)  # [tokens, h, d]
    starts = torch.zeros(len(lens) + 1, dtype=torch.int32)  # [num_seqs + 1]
    starts[1:] = torch.cumsum(q_lens, 0)
    return dict(
        query=query.to(dtype),
        kv_cache=kv_cache.to(dtype),
        query_start_loc=starts.to(device),
        seq_lens=seq_lens,
        block_tables=block_tables,
        scale=head_size**-0.5,
    )


def float32_reference(batch: dict) -> torch.Tensor:
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    return ref_paged_attention(**upcast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_matches_reference(device, dtype, head_size, group, block_size):
    from paphos.kernels.paged_attention import paged_attention

    skip_interpreted_bf16_dot(device, dtype)
    num_kv_heads = 2
    batch = make_batch(
        MIXED_BATCH, group * num_kv_heads, num_kv_heads, head_size, block_size, dtype, device, 2
    )
    out = paged_attention(**batch, max_query_len=40)
    exact = float32_reference(batch)
    assert out.shape == batch["query"].shape and out.dtype == dtype
    assert rel_error(out, exact) < ATTN_TOLERANCE[dtype]
    same_dtype_ref = ref_paged_attention(**batch)
    assert rel_error(out, same_dtype_ref) < 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_splits_over_long_context_match_reference(device, num_splits):
    from paphos.kernels.decode_attention import decode_attention

    lens = [(1, 700), (1, 1), (1, 513), (1, 64)]
    batch = make_batch(lens, 8, 2, 128, 16, torch.float16, device)
    out = torch.full_like(batch["query"], float("nan"))  # [num_seqs, heads, head_size], poisoned
    decode_attention(**batch, out=out, num_splits=num_splits)
    assert rel_error(out, float32_reference(batch)) < ATTN_TOLERANCE[torch.float16]


@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("deep_min_tiles", [1, 4])
def test_decode_deep_pipelining_matches_reference(device, head_size, num_splits, deep_min_tiles):
    """Programs on either side of the deep-loop threshold (4 tiles of 64 keys: 255/256/257 keys,
    one tile, many) agree with the reference, with and without splits."""
    from paphos.kernels.decode_attention import DecodeTiles, decode_attention

    lens = [(1, 255), (1, 256), (1, 257), (1, 1), (1, 64), (1, 900)]
    batch = make_batch(lens, 8, 2, head_size, 16, torch.float16, device)
    out = torch.full_like(batch["query"], float("nan"))  # [num_seqs, heads, head_size], poisoned
    tiles = DecodeTiles(64, 4, 3, deep_stages=7, deep_min_tiles=deep_min_tiles)
    decode_attention(**batch, out=out, num_splits=num_splits, tiles=tiles)
    assert rel_error(out, float32_reference(batch)) < ATTN_TOLERANCE[torch.float16]


def test_decode_runs_deep_only_unsplit_and_when_every_program_fits(device):
    from paphos.kernels.decode_attention import default_decode_tiles

    assert default_decode_tiles(64, 64 * 8, 1, 132).deep_stages == 7  # 1B, 64 seqs: 3.9 per SM
    assert default_decode_tiles(64, 128 * 8, 1, 132).deep_stages == 0  # 128 sequences: too many
    assert default_decode_tiles(128, 64 * 8, 1, 132).deep_stages == 0  # 8B: twice the shared memory
    assert default_decode_tiles(64, 1 * 8, 8, 132).deep_stages == 0  # one sequence in 8 splits
    assert default_decode_tiles(64).deep_stages == 0  # the launch's programs not given


def test_prefill_only_batch_without_host_hints(device):
    from paphos.kernels.paged_attention import paged_attention

    batch = make_batch([(33, 33), (16, 80), (2, 2)], 4, 4, 64, 16, torch.float16, device)
    out = paged_attention(**batch)  # no max_query_len: bounded by num_tokens
    assert rel_error(out, float32_reference(batch)) < ATTN_TOLERANCE[torch.float16]


def test_rejects_heads_not_multiple_of_kv_heads(device):
    from paphos.kernels.paged_attention import paged_attention

    batch = make_batch([(1, 5)], 4, 4, 64, 16, torch.float16, device)
    batch["query"] = torch.randn(1, 6, 64, device=device).half()  # [1, 6, 64]: 6 % 4 != 0
    with pytest.raises(ValueError, match="num_heads=6"):
        paged_attention(**batch)


def test_decode_cuda_graph_replays_with_new_lengths(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    from paphos.kernels.paged_attention import paged_attention

    batch = make_batch([(1, 300), (1, 17), (1, 90)], 16, 2, 128, 16, torch.bfloat16, device)
    static = dict(batch)
    paged_attention(**static, max_query_len=1, max_seq_len=320)  # warm up: compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(**static, max_query_len=1, max_seq_len=320)
    static["seq_lens"].copy_(torch.tensor([5, 300, 129], device=device))
    static["query"].copy_(torch.randn_like(static["query"]))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out, float32_reference(static)) < ATTN_TOLERANCE[torch.bfloat16]


def test_decode_split_count_follows_occupancy_and_context(device):
    from paphos.kernels.decode_attention import num_decode_splits

    assert num_decode_splits(64, 8, 2048, 132) == 1  # 512 programs already fill 132 SMs
    assert num_decode_splits(4, 8, 32768, 132) == 17  # 32 programs: about 4 per SM after splitting
    assert num_decode_splits(1, 1, 300, 132) == 2  # no split shorter than 256 keys
    assert num_decode_splits(1, 1, 10**6, 132) == 32  # capped


# Windows shorter than, equal to and longer than contexts; block-unaligned; head sizes 32..256.
LIMITED_BATCH = [(1, 1), (9, 9), (1, 100), (6, 70), (1, 300), (40, 40), (17, 64), (1, 33)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [32, 80, 96, 256])
@pytest.mark.parametrize(
    "sliding_window, soft_cap", [(7, None), (64, None), (None, 5.0), (20, 30.0)]
)
def test_sliding_window_and_soft_cap_match_reference(
    device, dtype, head_size, sliding_window, soft_cap
):
    """Gemma 2/3 and Mistral attention: a window shorter than most prompts, a soft-cap, both;
    the mixed batch has decodes, prefill chunks with cached context and whole prompts."""
    from paphos.kernels.paged_attention import paged_attention

    skip_interpreted_bf16_dot(device, dtype)
    batch = make_batch(LIMITED_BATCH, 8, 2, head_size, 16, dtype, device, 1)
    batch["query"] = batch["query"] * 3  # large scores, so the cap bites
    limits = dict(sliding_window=sliding_window, soft_cap=soft_cap)
    out = paged_attention(**batch, max_query_len=40, **limits)
    exact = ref_paged_attention(
        **dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float()), **limits
    )
    assert rel_error(out, exact) < ATTN_TOLERANCE[dtype]
    plain = ref_paged_attention(**dict(batch, query=batch["query"].float(),
                                       kv_cache=batch["kv_cache"].float()))  # fmt: skip
    # the limits changed the result by far more than any dtype's tolerance of the kernel (a
    # 64-key window leaves most of this batch's rows alone: ~0.12 in all)
    assert rel_error(plain, exact) > 0.05


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_splits_with_sliding_window_match_reference(device, num_splits):
    """Splits share only the tiles inside the window; some splits see none."""
    from paphos.kernels.decode_attention import decode_attention

    lens = [(1, 700), (1, 1), (1, 513), (1, 64)]
    batch = make_batch(lens, 8, 2, 128, 16, torch.float16, device)
    out = torch.full_like(batch["query"], float("nan"))  # [num_seqs, heads, head_size], poisoned
    decode_attention(**batch, out=out, num_splits=num_splits, sliding_window=100, soft_cap=20.0)
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    exact = ref_paged_attention(**upcast, sliding_window=100, soft_cap=20.0)
    assert rel_error(out, exact) < ATTN_TOLERANCE[torch.float16]


def _sinks(num_heads: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(num_heads, generator=gen) * 2 + 1).to(device)  # [num_heads], float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 20])
def test_attention_sinks_match_reference(device, dtype, sliding_window):
    """gpt-oss: one sink logit per head joins every row's softmax (prefill and decode rows)."""
    from paphos.kernels.paged_attention import paged_attention

    skip_interpreted_bf16_dot(device, dtype)
    batch = make_batch(LIMITED_BATCH, 8, 2, 64, 16, dtype, device, 1)
    sinks = _sinks(8, device)
    out = paged_attention(**batch, max_query_len=40, sliding_window=sliding_window, sinks=sinks)
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    exact = ref_paged_attention(**upcast, sliding_window=sliding_window, sinks=sinks)
    assert rel_error(out, exact) < ATTN_TOLERANCE[dtype]
    assert rel_error(ref_paged_attention(**upcast, sliding_window=sliding_window), exact) > 0.05


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_splits_with_sinks_match_reference(device, num_splits):
    """The sinks join once, where the splits merge (and in the unsplit kernel's last step)."""
    from paphos.kernels.decode_attention import decode_attention

    lens = [(1, 700), (1, 1), (1, 513), (1, 64)]
    batch = make_batch(lens, 8, 2, 64, 16, torch.float16, device)
    sinks = _sinks(8, device)
    out = torch.full_like(batch["query"], float("nan"))  # poisoned: every row must be written
    decode_attention(**batch, out=out, num_splits=num_splits, sliding_window=100, sinks=sinks)
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    exact = ref_paged_attention(**upcast, sliding_window=100, sinks=sinks)
    assert rel_error(out, exact) < ATTN_TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [8, 32, 100])
def test_chunked_attention_matches_reference(device, dtype, chunk_size):
    """Llama 4: each query sees only its own chunk (blocks of queries straddle chunk starts)."""
    from paphos.kernels.paged_attention import paged_attention

    skip_interpreted_bf16_dot(device, dtype)
    batch = make_batch(LIMITED_BATCH, 8, 2, 64, 16, dtype, device, 1)
    out = paged_attention(**batch, max_query_len=40, chunk_size=chunk_size)
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    exact = ref_paged_attention(**upcast, chunk_size=chunk_size)
    assert rel_error(out, exact) < ATTN_TOLERANCE[dtype]
    assert rel_error(ref_paged_attention(**upcast), exact) > 0.02  # the chunks matter


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_splits_with_chunks_match_reference(device, num_splits):
    from paphos.kernels.decode_attention import decode_attention

    lens = [(1, 700), (1, 1), (1, 513), (1, 64), (1, 129)]
    batch = make_batch(lens, 8, 2, 64, 16, torch.float16, device)
    out = torch.full_like(batch["query"], float("nan"))  # poisoned: every row must be written
    decode_attention(
        **batch, out=out, num_splits=num_splits, chunk_size=128, sinks=_sinks(8, device)
    )
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    exact = ref_paged_attention(**upcast, chunk_size=128, sinks=_sinks(8, device))
    assert rel_error(out, exact) < ATTN_TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32])
def test_sliding_window_ignores_table_entries_before_the_window(device, dtype, block_size):
    """A sliding group's table points every block before the window at its null block (a zero
    block, never written): the kernels give what the full table gives, and what the reference
    gives over the real blocks."""
    from paphos.kernels.paged_attention import paged_attention

    window = 20
    batch = make_batch(LIMITED_BATCH, 8, 2, 64, block_size, dtype, device, 1)
    cache = batch["kv_cache"]
    null_id = cache.shape[1]
    zero = torch.zeros_like(cache[:, :1])  # [2, 1, block_size, kv_heads, head_size]
    with_null = torch.cat([cache, zero], dim=1)
    tables = batch["block_tables"].clone()
    starts = batch["query_start_loc"].tolist()
    num_nulled = 0
    for b, seq_len in enumerate(batch["seq_lens"].tolist()):
        first_query = seq_len - (starts[b + 1] - starts[b])
        first_live = max(0, first_query - window + 1) // block_size
        tables[b, :first_live] = null_id
        num_nulled += first_live
    assert num_nulled > 0, "the batch has no sequence past its window"
    limits = dict(sliding_window=window, max_query_len=40)
    full = paged_attention(**dict(batch, kv_cache=with_null), **limits)
    nulled = paged_attention(**dict(batch, kv_cache=with_null, block_tables=tables), **limits)
    assert torch.equal(full, nulled)
    upcast = dict(batch, query=batch["query"].float(), kv_cache=cache.float())
    exact = ref_paged_attention(**upcast, sliding_window=window)
    assert rel_error(nulled, exact) < ATTN_TOLERANCE[dtype]
