"""The AVX2 paged-attention kernel against the torch reference (paphos.ops.paged_attention), its
fallbacks, its input checks and the registry's choice.

Tolerance: both compute in fp32 but in different orders (online softmax, base-2 exponentials), so
fp32 outputs may differ by a few 1e-6; bf16 outputs are each a rounding of such a value, so they
may differ by one bf16 step (2^-7 relative).
"""

from __future__ import annotations

import pytest
import torch

from paphos.kernels.cpu import attention
from paphos.ops import registry
from paphos.ops.paged_attention import paged_attention as reference

LIB = attention.load_library()
needs_kernel = pytest.mark.skipif(LIB is None, reason="attention kernel unavailable (no AVX2/cc)")


def make_batch(
    specs: list[tuple[int, int]],
    *,
    num_kv_heads: int,
    group: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    """specs: (q_len, seq_len) per sequence. Blocks are handed out in a shuffled order, so every
    block table is non-contiguous; unused table columns point at random blocks."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-seq_len // block_size) for _, seq_len in specs) + 1
    num_blocks = len(specs) * max_blocks + 3
    shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)  # [2, blocks, block, kv_heads, head]
    order = torch.randperm(num_blocks, generator=gen)  # [num_blocks]
    block_tables = order[: len(specs) * max_blocks].view(len(specs), max_blocks)  # [seqs, blocks]
    q_lens = torch.tensor([q for q, _ in specs])  # [num_seqs]
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)])  # [seqs+1]
    seq_lens = torch.tensor([s for _, s in specs])  # [num_seqs]
    num_tokens = int(q_lens.sum())
    query = 2 * torch.randn(num_tokens, num_kv_heads * group, head_size, generator=gen)
    return query.to(dtype), kv_cache, query_start_loc, seq_lens, block_tables.contiguous()


def assert_matches_reference(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    err = (out.double() - expected.double()).abs()
    if out.dtype == torch.bfloat16:
        allowed = 2.0**-7 * expected.double().abs() + 1e-4
    else:
        allowed = 1e-4 * expected.double().abs() + 2e-5
    assert bool((err <= allowed).all()), f"max error {err.max().item()}"


def run_both(batch: tuple[torch.Tensor, ...], num_threads: int) -> tuple[torch.Tensor, ...]:
    query, kv_cache, starts, lens, tables = batch
    scale = query.shape[-1] ** -0.5
    out = attention.launch(LIB, query, kv_cache, starts, lens, tables, scale, num_threads)
    return out, reference(query, kv_cache, starts, lens, tables, scale)


SHAPES = [(64, 3, 16), (128, 1, 32), (64, 4, 32), (128, 3, 16)]  # (head_size, group, block_size)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size, group, block_size", SHAPES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_decode_batch_matches_reference_across_block_boundaries(
    dtype: torch.dtype, head_size: int, group: int, block_size: int, num_threads: int
) -> None:
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 7, 77]
    batch = make_batch(
        [(1, s) for s in seq_lens],
        num_kv_heads=2,
        group=group,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        seed=head_size + group + block_size,
    )
    assert_matches_reference(*run_both(batch, num_threads))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size, group, block_size", SHAPES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_mixed_batch_of_decodes_chunks_and_prompts_matches_reference(
    dtype: torch.dtype, head_size: int, group: int, block_size: int, num_threads: int
) -> None:
    specs = [
        (1, 40),  # decode
        (13, 13 + 2 * block_size + 3),  # prefill chunk over cached context
        (1, block_size),  # decode at a block's last slot
        (block_size + 5, block_size + 5),  # whole prompt
        (2, 2),  # two-token prompt
        (9, 9 + block_size),  # chunk starting exactly on a block boundary
    ]
    batch = make_batch(
        specs,
        num_kv_heads=2,
        group=group,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        seed=3 * head_size + group,
    )
    assert_matches_reference(*run_both(batch, num_threads))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_contexts_spanning_several_softmax_steps_match_reference(dtype: torch.dtype) -> None:
    """The kernel folds keys into its running softmax 256 at a time: rows whose context crosses
    one or more of those steps, and a prefill chunk whose rows straddle a step's edge."""
    specs = [(1, 600), (20, 530), (1, 257), (300, 300)]
    batch = make_batch(
        specs, num_kv_heads=3, group=3, head_size=64, block_size=16, dtype=dtype, seed=12
    )
    assert_matches_reference(*run_both(batch, 2))


@needs_kernel
def test_fp32_queries_over_a_bf16_cache_keep_the_query_dtype() -> None:
    query, kv_cache, starts, lens, tables = make_batch(
        [(1, 50), (7, 30)], num_kv_heads=3, group=3, head_size=64, block_size=16,
        dtype=torch.bfloat16, seed=11,
    )  # fmt: skip
    batch = (query.float(), kv_cache, starts, lens, tables)
    assert_matches_reference(*run_both(batch, 2))


@needs_kernel
def test_rows_are_bitwise_independent_of_thread_count_and_batch() -> None:
    specs = [(1, 300), (40, 90), (1, 17), (5, 5)]
    query, kv_cache, starts, lens, tables = make_batch(
        specs, num_kv_heads=3, group=3, head_size=64, block_size=16, dtype=torch.float32, seed=5
    )
    one = attention.launch(LIB, query, kv_cache, starts, lens, tables, 0.125, 1)
    two = attention.launch(LIB, query, kv_cache, starts, lens, tables, 0.125, 2)
    assert torch.equal(one, two)
    s, e = int(starts[1]), int(starts[2])
    alone = attention.launch(
        LIB, query[s:e], kv_cache, torch.tensor([0, e - s]), lens[1:2], tables[1:2], 0.125, 2
    )
    assert torch.equal(alone, one[s:e])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_decode_batches_match_reference_and_each_row_alone(dtype: torch.dtype) -> None:
    """From 4 decodes per thread one work item takes all kv heads of a sequence: same numbers."""
    specs = [(1, 3 + 11 * b) for b in range(20)] + [(6, 40)]
    query, kv_cache, starts, lens, tables = make_batch(
        specs, num_kv_heads=2, group=4, head_size=64, block_size=16, dtype=dtype, seed=13
    )
    out = attention.launch(LIB, query, kv_cache, starts, lens, tables, 0.125, 2)
    assert_matches_reference(out, reference(query, kv_cache, starts, lens, tables, 0.125))
    for b in (0, 7, 19):
        alone = attention.launch(
            LIB, query[b : b + 1], kv_cache, torch.tensor([0, 1]), lens[b : b + 1],
            tables[b : b + 1], 0.125, 1,
        )  # fmt: skip
        assert torch.equal(alone, out[b : b + 1])


@needs_kernel
def test_strided_query_and_int32_indices_match_reference() -> None:
    query, kv_cache, starts, lens, tables = make_batch(
        [(3, 20), (1, 33)], num_kv_heads=2, group=2, head_size=64, block_size=16,
        dtype=torch.float32, seed=6,
    )  # fmt: skip
    qkv = torch.randn(query.shape[0], 8 * 64)  # [num_tokens, (heads + 2 * kv_heads) * head]
    qkv[:, : 4 * 64] = query.flatten(1)
    strided = qkv[:, : 4 * 64].view(-1, 4, 64)  # [num_tokens, heads, head], token stride 512
    out = attention.paged_attention(
        strided, kv_cache, starts.int(), lens.int(), tables.int(), 0.125, max_query_len=3
    )
    assert_matches_reference(out, reference(query, kv_cache, starts, lens, tables, 0.125))


@pytest.mark.parametrize("available", [False, True])
def test_unavailable_library_or_unsupported_dtype_runs_the_reference(
    monkeypatch, available: bool
) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("kernel called although it should not run")

    dtype = torch.float16 if available else torch.float32
    if not available:
        monkeypatch.setattr(attention, "load_library", lambda level=None: None)
    monkeypatch.setattr(attention, "launch", must_not_run)
    batch = make_batch(
        [(1, 9), (4, 12)], num_kv_heads=1, group=2, head_size=16, block_size=4, dtype=dtype, seed=7
    )
    out = attention.paged_attention(*batch, 0.25)
    assert torch.equal(out, reference(*batch, 0.25))


def test_registry_picks_kernel_only_where_it_loaded(monkeypatch) -> None:
    expected = reference if LIB is None else attention.paged_attention
    assert registry.pick("paged_attention", "cpu") is expected
    monkeypatch.setattr(attention, "load_library", lambda level=None: None)
    assert registry.pick("paged_attention", "cpu") is reference


def test_failed_build_disables_the_kernel_without_raising(monkeypatch, tmp_path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(attention, "SOURCE", broken)
    broken_path = tmp_path / "x.so"
    monkeypatch.setattr(attention, "library_path", lambda compiler, source, level: broken_path)
    attention.load_library.cache_clear()
    try:
        assert attention.load_library() is None
        assert list(tmp_path.iterdir()) == [broken]  # no library, no temporary left behind
    finally:
        attention.load_library.cache_clear()


@needs_kernel
@pytest.mark.parametrize(
    "specs, seq_lens, bad_block, match",
    [
        ([(3, 2)], None, None, r"more query tokens than context\) at sequence 0"),
        ([(1, 5), (1, 5)], [5, 40], None, r"longer than its block table row\) at sequence 1"),
        ([(1, 5), (1, 5)], None, 10_000, r"block id outside the cache\) at sequence 0"),
    ],
)
def test_bad_indices_raise_value_error_naming_the_sequence(specs, seq_lens, bad_block, match):
    query, kv_cache, starts, lens, tables = make_batch(
        [(q, max(q, s)) for q, s in specs], num_kv_heads=1, group=1, head_size=16, block_size=4,
        dtype=torch.float32, seed=8,
    )  # fmt: skip
    if seq_lens is not None or specs[0][0] > specs[0][1]:
        lens = torch.tensor(seq_lens or [s for _, s in specs])  # [num_seqs]
    if bad_block is not None:
        tables[0, 0] = bad_block
    with pytest.raises(ValueError, match=match):
        attention.launch(LIB, query, kv_cache, starts, lens, tables, 1.0, 1)


@needs_kernel
def test_mismatched_shapes_raise_value_error() -> None:
    query, kv_cache, starts, lens, tables = make_batch(
        [(1, 5)], num_kv_heads=2, group=1, head_size=16, block_size=4, dtype=torch.float32, seed=9
    )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention.launch(LIB, query[:, :1], kv_cache, starts, lens, tables, 1.0, 1)
    with pytest.raises(ValueError, match="block_tables has 2 rows for 1 sequences"):
        attention.launch(LIB, query, kv_cache, starts, lens, tables.repeat(2, 1), 1.0, 1)
