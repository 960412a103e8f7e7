"""BlockPool: allocation, ref counts, LRU eviction order, prefix-hash reuse and eviction."""

from __future__ import annotations

import random

import pytest

from paphos.core.block_pool import (
    BlockHash,
    BlockPool,
    FreeBlockQueue,
    KVCacheBlock,
    hash_block_tokens,
    hash_full_blocks,
)


def ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def test_new_pool_is_all_free_in_id_order() -> None:
    pool = BlockPool(4, enable_caching=True)
    pool.check_invariants()
    assert pool.num_free_blocks == 4
    assert pool.usage == 0.0
    assert ids(list(pool.free_queue)) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_num_blocks_raises_value_error_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(bad, enable_caching=True)  # type: ignore[arg-type]


def test_allocate_takes_from_head_and_free_returns_to_tail() -> None:
    pool = BlockPool(4, enable_caching=False)
    taken = pool.get_new_blocks(2)
    pool.check_invariants()
    assert ids(taken) == [0, 1]
    assert all(b.ref_cnt == 1 for b in taken)
    assert pool.num_free_blocks == 2 and pool.usage == 0.5
    pool.free_blocks(reversed(taken))
    pool.check_invariants()
    # Freed in reverse: 1 then 0 go behind 2 and 3.
    assert ids(list(pool.free_queue)) == [2, 3, 1, 0]
    assert ids(pool.get_new_blocks(3)) == [2, 3, 1]
    pool.check_invariants()


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    with pytest.raises(ValueError, match="num_blocks=3"):
        pool.get_new_blocks(3)
    pool.check_invariants()
    assert pool.num_free_blocks == 2


def test_shared_block_is_freed_only_when_last_reference_goes() -> None:
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    pool.check_invariants()
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([block])
    pool.check_invariants()
    assert block.ref_cnt == 0 and pool.num_free_blocks == 3


def test_touching_a_free_cached_block_removes_it_from_middle_of_queue() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_block(blocks[2], h)
    pool.free_blocks(blocks)
    assert ids(list(pool.free_queue)) == [0, 1, 2, 3]
    hit = pool.get_cached_block(h)
    assert hit is blocks[2]
    pool.touch([hit])
    pool.check_invariants()
    assert ids(list(pool.free_queue)) == [0, 1, 3]
    assert hit.ref_cnt == 1 and hit.block_hash == h


def test_freed_cached_block_stays_findable_until_reused_then_hash_is_dropped() -> None:
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [7, 7, 7])
    pool.cache_block(a, h)
    pool.free_blocks([a, b])  # a is at the head: evicted first
    pool.check_invariants()
    assert pool.get_cached_block(h) is a
    (reused,) = pool.get_new_blocks(1)
    pool.check_invariants()
    assert reused is a
    assert reused.block_hash is None
    assert pool.get_cached_block(h) is None


def test_lru_eviction_keeps_recently_freed_cached_blocks() -> None:
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    hashes = [hash_block_tokens(None, [i]) for i in range(3)]
    for block, h in zip(blocks, hashes, strict=True):
        pool.cache_block(block, h)
    for block in blocks:  # freed 0, 1, 2: block 0 is least recently used
        pool.free_blocks([block])
    pool.get_new_blocks(2)
    pool.check_invariants()
    assert pool.get_cached_block(hashes[0]) is None
    assert pool.get_cached_block(hashes[1]) is None
    assert pool.get_cached_block(hashes[2]) is blocks[2]


def test_second_block_with_same_content_is_not_registered() -> None:
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [3, 4])
    pool.cache_block(a, h)
    pool.cache_block(b, h)
    pool.check_invariants()
    assert pool.get_cached_block(h) is a and b.block_hash is None


def test_caching_off_never_registers_or_finds_blocks() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_block(a, h)
    pool.check_invariants()
    assert a.block_hash is None and pool.get_cached_block(h) is None


def test_hash_chain_depends_on_parent_and_tokens() -> None:
    first = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) == first
    assert hash_block_tokens(first, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(first, [3, 4]) == hash_block_tokens(first, (3, 4))
    chain = hash_full_blocks([1, 2, 3, 4, 5], block_size=2)
    assert chain == [first, hash_block_tokens(first, [3, 4])]  # the partial block is not hashed
    assert (
        hash_full_blocks([1, 2, 3, 4, 5, 6], 2, chain[:1])[1:]
        == hash_full_blocks([1, 2, 3, 4, 5, 6], 2)[1:]
    )


def test_block_hash_equality_needs_equal_tokens_even_if_values_collide() -> None:
    assert BlockHash(5, (1, 2)) != BlockHash(5, (1, 3))
    assert len({BlockHash(5, (1, 2)), BlockHash(5, (1, 3))}) == 2


def test_hash_is_deterministic_across_processes() -> None:
    import subprocess
    import sys

    code = (
        "from paphos.core.block_pool import hash_full_blocks;"
        "print(hash_full_blocks(list(range(9)), 4)[-1].value)"
    )
    values = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(values) == 1
    assert values == {str(hash_full_blocks(list(range(9)), 4)[-1].value)}


def test_invariant_check_catches_corruption() -> None:
    pool = BlockPool(2, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    a.ref_cnt = 0  # lost: neither free nor held
    with pytest.raises(AssertionError, match="lost"):
        pool.check_invariants()


def test_free_queue_remove_from_middle_and_ends() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    queue.remove(blocks[4])
    assert ids(list(queue)) == [1, 3] and len(queue) == 2
    assert queue.popleft() is blocks[1] and queue.popleft() is blocks[3]
    with pytest.raises(ValueError, match="no free"):
        queue.popleft()


def test_random_operations_keep_invariants() -> None:
    rng = random.Random(1234)
    pool = BlockPool(16, enable_caching=True)
    held: list[KVCacheBlock] = []
    for step in range(600):
        op = rng.random()
        if op < 0.4 and pool.num_free_blocks:
            new = pool.get_new_blocks(rng.randint(1, min(3, pool.num_free_blocks)))
            for block in new:
                if rng.random() < 0.5:
                    pool.cache_block(block, hash_block_tokens(None, [rng.randint(0, 20)]))
            held.extend(new)
        elif op < 0.6:
            hit = pool.get_cached_block(hash_block_tokens(None, [rng.randint(0, 20)]))
            if hit is not None:
                pool.touch([hit])
                held.append(hit)
        elif held:
            pool.free_blocks([held.pop(rng.randrange(len(held)))])
        pool.check_invariants()
        assert pool.num_free_blocks == 16 - len({id(b) for b in held}), step
    pool.free_blocks(held)
    pool.check_invariants()
    assert pool.num_free_blocks == 16


def test_reset_prefix_cache_only_when_nothing_is_held() -> None:
    pool = BlockPool(2, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_block(a, h)
    assert pool.reset_prefix_cache() is False and pool.get_cached_block(h) is a
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is True
    pool.check_invariants()
    assert pool.get_cached_block(h) is None and a.block_hash is None
