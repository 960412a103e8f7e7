"""KV cache groups at start-up: how the budget is split between full and sliding-window layers
(`plan_kv_cache_layout`), what is reported, and the layout's checks."""

from __future__ import annotations

import pytest
import torch

from paphos.attention.cache_spec import LayerCacheSpec
from paphos.core.kv_cache_groups import KVCacheGroup, KVCacheLayout, sliding_group_bound
from paphos.runner.kv_cache import (
    KVCacheSpec,
    allocate_kv_caches,
    describe_kv_cache_layout,
    plan_kv_cache_layout,
)

WINDOW = 64


def spec(*windows: int | None) -> KVCacheSpec:
    layers = tuple(LayerCacheSpec("kv", 2, 8, sliding_window=w) for w in windows)
    return KVCacheSpec(block_size=16, dtype=torch.float32, layers=layers)


def test_ample_memory_gives_sliding_layers_their_bound_and_the_rest_to_full_layers() -> None:
    s = spec(None, WINDOW, None, WINDOW)
    bound = sliding_group_bound(WINDOW, 16, max_num_seqs=4, max_num_batched_tokens=64)
    budget = 1000 * s.bytes_per_block  # every layer 1000 blocks without sliding groups
    layout = plan_kv_cache_layout(s, budget, {WINDOW: bound})
    full, sliding = layout.groups
    assert (full.sliding_window, sliding.sliding_window) == (None, WINDOW)
    assert sliding.num_blocks == bound
    used = 2 * s.layer_bytes_per_block(0) * (full.num_blocks + sliding.num_blocks)
    assert used <= budget < used + 2 * s.layer_bytes_per_block(0)  # nothing left for one more
    assert full.num_blocks == 2000 - bound
    report = describe_kv_cache_layout(s, layout, budget)
    assert f"{(2000 - bound - 1000) * 16} more tokens of context" in report


def test_scarce_memory_splits_evenly_as_without_sliding_groups() -> None:
    s = spec(None, WINDOW)
    budget = 50 * s.bytes_per_block
    layout = plan_kv_cache_layout(s, budget, {WINDOW: 10_000})
    full, sliding = layout.groups
    assert sliding.num_blocks == full.num_blocks + 1  # + its null block
    assert full.num_blocks == 49


def test_every_layer_sliding_takes_only_what_the_window_needs() -> None:
    s = spec(WINDOW, WINDOW, 16)
    bounds = {WINDOW: 40, 16: 20}
    layout = plan_kv_cache_layout(s, 10_000 * s.bytes_per_block, bounds)
    assert [(g.sliding_window, g.num_blocks) for g in layout.groups] == [(16, 20), (WINDOW, 40)]
    assert not layout.has_full_group and layout.token_capacity(16) is None
    assert "any context length fits" in describe_kv_cache_layout(s, layout, 10_000)


def test_caches_of_a_group_have_its_block_count() -> None:
    s = spec(WINDOW, None, WINDOW)
    layout = KVCacheLayout((KVCacheGroup(None, 7), KVCacheGroup(WINDOW, 3)))
    caches = allocate_kv_caches(s, layout, torch.device("cpu"))
    assert [c.shape[1] for c in caches] == [3, 7, 3]
    assert s.layer_groups() == (1, 0, 1)


def test_layout_checks() -> None:
    with pytest.raises(ValueError, match="at most one full group"):
        KVCacheLayout((KVCacheGroup(WINDOW, 4), KVCacheGroup(None, 4)))
    with pytest.raises(ValueError, match="num_blocks=1"):
        KVCacheGroup(WINDOW, 1)  # no room beside its null block
    a = KVCacheLayout((KVCacheGroup(None, 9), KVCacheGroup(WINDOW, 5)))
    b = KVCacheLayout((KVCacheGroup(None, 7), KVCacheGroup(WINDOW, 6)))
    assert [g.num_blocks for g in a.min_with(b).groups] == [7, 5]
    with pytest.raises(ValueError, match="ranks disagree"):
        a.min_with(KVCacheLayout.single(9))
    with pytest.raises(ValueError, match="holds no block"):
        plan_kv_cache_layout(spec(None, WINDOW), 10, {WINDOW: 5})


def test_layers_of_different_shapes_get_caches_of_their_own_shape() -> None:
    """Gemma 4: sliding layers (2 kv heads of 16) beside full ones (1 kv head of 32)."""
    layers = tuple(
        LayerCacheSpec("kv", heads, size, sliding_window=w)
        for (heads, size), w in zip(((2, 16), (1, 32), (2, 16)), (WINDOW, None, WINDOW))
    )
    s = KVCacheSpec(block_size=16, dtype=torch.float32, layers=layers)
    assert s.group_bytes_per_block(WINDOW) == 2 * s.group_bytes_per_block(None)
    layout = KVCacheLayout((KVCacheGroup(None, 5), KVCacheGroup(WINDOW, 4)))
    caches = allocate_kv_caches(s, layout, torch.device("cpu"))
    assert [tuple(c.shape[1:]) for c in caches] == [(4, 16, 2, 16), (5, 16, 1, 32), (4, 16, 2, 16)]


def test_latent_layers_stay_in_the_full_group_beside_sliding_kv_layers() -> None:
    """MLA's latent rows take the full group's block count, sliding K/V layers their own; the
    budget counts each layer's bytes; `without_windows` (hybrid models) leaves one group."""
    latent = LayerCacheSpec("latent", 1, 40)
    sliding = LayerCacheSpec("kv", 2, 8, sliding_window=WINDOW)
    s = KVCacheSpec(block_size=16, dtype=torch.float32, layers=(latent, sliding, latent))
    assert s.group_windows == (None, WINDOW) and s.layer_groups() == (0, 1, 0)
    layout = plan_kv_cache_layout(s, 100 * s.bytes_per_block, {WINDOW: 12})
    assert [g.num_blocks for g in layout.groups] == [
        (100 * s.bytes_per_block - 12 * s.layer_bytes_per_block(1)) // (2 * 16 * 40 * 4),
        12,
    ]
    caches = allocate_kv_caches(s, layout, torch.device("cpu"))
    assert [tuple(c.shape) for c in caches] == [
        (layout.groups[0].num_blocks, 16, 40),
        (2, 12, 16, 2, 8),
        (layout.groups[0].num_blocks, 16, 40),
    ]
    assert "window 64" in s.describe()
    full = s.without_windows()
    assert full.group_windows == (None,) and full.bytes_per_block == s.bytes_per_block
