"""KVCacheManager: block tables, prefix-cache hits, allocation failure, freeing order."""

from __future__ import annotations

import pytest

from paphos.core.kv_cache_groups import (
    NULL_BLOCK_ID,
    KVCacheGroup,
    KVCacheLayout,
    first_live_block,
)
from paphos.core.kv_cache_manager import KVCacheManager
from paphos.request import Request
from paphos.sampling_params import SamplingParams

BLOCK = 4


def make_request(req_id: str, tokens: list[int], **params: object) -> Request:
    return Request(req_id, list(tokens), SamplingParams(**params))  # type: ignore[arg-type]


def admit(kv: KVCacheManager, request: Request) -> list[int] | None:
    """Allocate a waiting request the way the scheduler does: cache hits first, then the rest.
    Returns the new block ids of its one group."""
    blocks, num_cached = kv.get_computed_blocks(request)
    new_ids = kv.allocate_slots(request, request.num_tokens - num_cached, blocks)
    if new_ids is not None:
        request.num_computed_tokens = request.num_tokens  # the step computed everything
    kv.check_invariants()
    return None if new_ids is None else (list(new_ids[0]) if new_ids else [])


def test_allocation_covers_tokens_and_returns_new_block_ids() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    req = make_request("a", list(range(10)))
    assert admit(kv, req) == [0, 1, 2]
    assert kv.get_block_ids("a") == ([0, 1, 2],)
    # Decode: tokens 10 and 11 still fit block 2; token 12 needs a new block.
    for token, expected in ((10, ()), (11, ()), (12, ([3],))):
        req.output_token_ids.append(token)
        assert kv.allocate_slots(req, 1) == expected
        req.num_computed_tokens += 1
        kv.check_invariants()
    assert kv.usage == 0.5


def test_shared_prefix_hits_full_blocks_of_finished_request() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    first = make_request("a", list(range(10)))
    admit(kv, first)
    kv.free(first)
    kv.check_invariants()
    second = make_request("b", list(range(9)) + [99, 98])
    blocks, num_cached = kv.get_computed_blocks(second)
    assert [b.block_id for b in blocks[0]] == [0, 1] and num_cached == 8
    new_ids = kv.allocate_slots(second, second.num_tokens - num_cached, blocks)
    kv.check_invariants()
    assert kv.get_block_ids("b")[0][:2] == [0, 1] and new_ids is not None and len(new_ids[0]) == 1
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 11, 8)


def test_running_requests_share_cached_blocks_with_ref_counts() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    b = make_request("b", list(range(9)))
    admit(kv, a)
    admit(kv, b)
    assert kv.get_block_ids("a")[0][:2] == kv.get_block_ids("b")[0][:2]
    assert kv.block_pool.blocks[0].ref_cnt == 2
    kv.free(a)
    kv.check_invariants()
    assert kv.block_pool.blocks[0].ref_cnt == 1
    kv.free(b)
    kv.check_invariants()
    assert kv.num_free_blocks == 8


def test_never_the_whole_prompt_is_a_hit() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    prompt = list(range(8))  # exactly two full blocks
    first = make_request("a", prompt)
    admit(kv, first)
    kv.free(first)
    again = make_request("b", prompt)
    blocks, num_cached = kv.get_computed_blocks(again)
    assert num_cached == 4 and len(blocks[0]) == 1  # the last block is recomputed for its logits
    assert admit(kv, again) is not None


def test_no_hits_with_caching_off() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    first = make_request("a", list(range(10)))
    admit(kv, first)
    kv.free(first)
    assert kv.get_computed_blocks(make_request("b", list(range(10)))) == (([],), 0)
    assert all(b.block_hash is None for b in kv.block_pool.blocks)
    assert kv.prefix_cache_queries == 0


def test_no_hits_for_requests_asking_prompt_logprobs() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    first = make_request("a", list(range(10)))
    admit(kv, first)
    kv.free(first)
    wants_logprobs = make_request("b", list(range(10)), prompt_logprobs=0)
    assert kv.get_computed_blocks(wants_logprobs) == (([],), 0)
    assert kv.get_computed_blocks(make_request("c", list(range(10))))[1] == 8


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    cached = make_request("a", list(range(9)))
    admit(kv, cached)
    kv.free(cached)
    holder = make_request("h", [50, 51, 52, 53, 54])  # takes 2 of the free blocks (LRU first)
    admit(kv, holder)
    big = make_request("b", list(range(8)) + list(range(100, 110)))  # 18 tokens: 5 blocks
    blocks, num_cached = kv.get_computed_blocks(big)
    free_before = kv.num_free_blocks
    refs_before = [b.ref_cnt for b in kv.block_pool.blocks]
    queries_before = kv.prefix_cache_queries
    assert kv.allocate_slots(big, big.num_tokens - num_cached, blocks) is None
    kv.check_invariants()
    assert kv.num_free_blocks == free_before
    assert [b.ref_cnt for b in kv.block_pool.blocks] == refs_before
    assert kv.get_block_ids("b") == ([],) and kv.prefix_cache_queries == queries_before


def test_free_releases_tail_first_so_prefix_survives_longest() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK, enable_prefix_caching=True)
    req = make_request("a", list(range(12)))
    admit(kv, req)
    kv.free(req)
    assert [b.block_id for b in kv.block_pool.free_queue] == [2, 1, 0]
    other = make_request("o", [77] * 3)
    admit(kv, other)  # evicts block 2 (the tail of "a")
    blocks, num_cached = kv.get_computed_blocks(make_request("b", list(range(12)) + [5]))
    assert [b.block_id for b in blocks[0]] == [0, 1] and num_cached == 8


def test_blocks_filled_by_decode_are_registered() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    req = make_request("a", [1, 2, 3])
    admit(kv, req)
    assert kv.block_pool.blocks[0].block_hash is None  # 3 of 4 slots known
    req.output_token_ids.append(4)
    kv.allocate_slots(req, 1)
    assert kv.block_pool.blocks[0].block_hash is not None
    req.num_computed_tokens += 1
    req.output_token_ids.append(5)
    kv.free(req)
    blocks, num_cached = kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 9]))
    assert num_cached == 4


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0, enable_prefix_caching=True)
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="num_new_tokens=-1"):
        kv.allocate_slots(make_request("a", [1]), -1)


# ---- sliding-window groups ---------------------------------------------------------------------


def sliding_kv(window: int = 6, num_sliding_blocks: int = 16) -> KVCacheManager:
    """A full group of 16 blocks and a sliding group (window tokens) of num_sliding_blocks."""
    layout = KVCacheLayout((KVCacheGroup(None, 16), KVCacheGroup(window, num_sliding_blocks)))
    return KVCacheManager(layout, block_size=BLOCK, enable_prefix_caching=True)


def decode(kv: KVCacheManager, req: Request, num_tokens: int) -> None:
    for _ in range(num_tokens):
        req.output_token_ids.append(7)
        assert kv.allocate_slots(req, 1) is not None
        req.num_computed_tokens += 1
        kv.check_invariants()


def test_sliding_group_frees_blocks_behind_the_window_and_nulls_their_entries() -> None:
    kv = sliding_kv(window=6)
    req = make_request("a", list(range(10)))
    assert admit(kv, req) == [0, 1, 2]
    full, sliding = kv.get_block_ids("a")
    assert full == [0, 1, 2] and sliding == [1, 2, 3]  # block 0 of the sliding pool is null
    decode(kv, req, 6)  # the last query sat at 15: it saw 10..15, so blocks 0, 1 are dead
    full, sliding = kv.get_block_ids("a")
    assert full == [0, 1, 2, 3]
    assert sliding[:2] == [NULL_BLOCK_ID, NULL_BLOCK_ID] and NULL_BLOCK_ID not in sliding[2:]
    assert kv.pools[1].num_free_blocks == 15 - 2  # 2 live blocks of 15 usable
    kv.free(req)
    kv.check_invariants()
    assert [p.num_free_blocks for p in kv.pools] == [16, 15]


def test_first_live_block_matches_the_window_rule() -> None:
    # a query at position p sees positions > p - window
    assert first_live_block(5, window := 6, BLOCK) == 0
    assert first_live_block(9, window, BLOCK) == 1  # sees 4..9
    assert first_live_block(8, window, BLOCK) == 0  # sees 3..8


def test_a_prefix_hit_needs_only_the_blocks_the_window_still_sees() -> None:
    kv = sliding_kv(window=6)
    first = make_request("a", list(range(20)))
    admit(kv, first)
    decode(kv, first, 4)  # blocks 0..2 fall out of the window (and get freed, still cached)
    kv.free(first)
    again = make_request("b", list(range(20)) + [99])
    blocks, num_cached = kv.get_computed_blocks(again)
    assert num_cached == 20
    assert [b.block_id for b in blocks[0]] == [0, 1, 2, 3, 4]
    assert blocks[1][0] is kv.pools[1].null_block and blocks[1][3] is not kv.pools[1].null_block
    assert admit(kv, again) is not None
    assert kv.get_block_ids("b")[1][:3] == [NULL_BLOCK_ID] * 3


def test_a_prefix_hit_shrinks_to_what_the_sliding_group_still_caches() -> None:
    kv = sliding_kv(window=5, num_sliding_blocks=6)  # 5 usable sliding blocks
    first = make_request("a", list(range(20)))  # 5 blocks in each group
    admit(kv, first)
    kv.free(first)  # tail first: the sliding pool evicts blocks 4, 3 of "a" first
    admit(kv, make_request("o", [77] * 8))
    blocks, num_cached = kv.get_computed_blocks(make_request("b", list(range(20)) + [5]))
    # every full block is still cached in the full group, but a hit of 5 or 4 blocks would need
    # the sliding group's evicted block 3; a hit of 3 (next query at 12, sees 8..12) needs 2
    assert num_cached == 12
    assert [b.block_id for b in blocks[0]] == [0, 1, 2]
    assert blocks[1][:2] == [kv.pools[1].null_block] * 2
    assert blocks[1][2].block_hash is not None


def test_remove_skipped_blocks_is_idempotent_and_preemption_frees_everything() -> None:
    kv = sliding_kv(window=6)
    req = make_request("a", list(range(30)))
    admit(kv, req)  # computed 30: blocks 0..5 dead in the sliding group
    kv.remove_skipped_blocks(req)
    kv.remove_skipped_blocks(req)
    kv.check_invariants()
    assert kv.get_block_ids("a")[1][:6] == [NULL_BLOCK_ID] * 6
    kv.free(req)  # preemption frees the same way
    kv.check_invariants()
    assert [p.num_free_blocks for p in kv.pools] == [16, 15]
