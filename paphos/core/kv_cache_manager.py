"""Per-request KV block tables on top of one `BlockPool` per KV cache group, with prefix caching
over full blocks.

Invariant: a request holding blocks has, in every group, exactly one table entry per block of the
tokens it was allocated (ceil(tokens / block_size)); its first `num_cached_blocks` blocks are
registered under the request's hash chain. In a sliding-window group the entries of blocks no query
of the request can see any more (`first_live_block`) are the group's null block, their blocks back
in the pool (`remove_skipped_blocks`, called before each allocation and by the scheduler at each
step's start: freed blocks are reused only by later steps, which the device runs after this one).
A block is registered as soon as the tokens filling it are scheduled: the runner writes a whole
step's K/V before any attention reads it, so a request scheduled in the same step may reuse it.
Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from paphos.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_full_blocks
from paphos.core.kv_cache_groups import KVCacheLayout, first_live_block
from paphos.request import Request

# Per group: blocks (a hit, a table) or their ids.
GroupBlocks = tuple[list[KVCacheBlock], ...]
GroupBlockIds = tuple[list[int], ...]


class KVCacheManager:
    """Allocates, caches and frees the KV blocks of each request, in every group."""

    def __init__(
        self, num_blocks: int | KVCacheLayout, block_size: int, enable_prefix_caching: bool
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} is invalid: expected an int >= 1")
        layout = num_blocks if isinstance(num_blocks, KVCacheLayout) else None
        self.layout = layout or KVCacheLayout.single(num_blocks)  # type: ignore[arg-type]
        self.block_size = block_size
        self.enable_caching = enable_prefix_caching
        self.windows = tuple(g.sliding_window for g in self.layout.groups)
        self.pools = tuple(
            BlockPool(g.num_blocks, enable_prefix_caching, reserve_null_block=g.is_sliding)
            for g in self.layout.groups
        )
        self.block_pool = self.pools[0]  # the full group's (or, every layer sliding, the first)
        self.sliding_groups = tuple(g for g, w in enumerate(self.windows) if w is not None)
        self.req_to_blocks: dict[str, GroupBlocks] = {}
        # Hash chain of each request's full blocks so far (tokens only ever get appended).
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of each request have been offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # Per request and group: how many leading entries are the null block (0 in full groups).
        self.num_skipped_blocks: dict[str, list[int]] = {}

    @property
    def num_groups(self) -> int:
        return len(self.pools)

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """The fullest group's fraction of blocks held."""
        return max(pool.usage for pool in self.pools)

    @property
    def prefix_cache_queries(self) -> int:
        return self.block_pool.prefix_cache_stats.queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.block_pool.prefix_cache_stats.hits

    def has_free_blocks(self, num_blocks: int) -> bool:
        """Whether every group could hand out num_blocks more blocks."""
        return all(pool.num_free_blocks >= num_blocks for pool in self.pools)

    def get_block_ids(self, request_id: str) -> GroupBlockIds:
        """The request's block table in every group (empty lists when it holds none)."""
        groups = self.req_to_blocks.get(request_id)
        if groups is None:
            return tuple([] for _ in self.pools)
        return tuple([block.block_id for block in blocks] for blocks in groups)

    def get_computed_blocks(self, request: Request) -> tuple[GroupBlocks, int]:
        """Longest cached prefix usable by every group, and how many tokens it covers.

        A full group needs every block of the prefix cached; a sliding group only those its
        window still sees from the first position after the prefix (the rest become null
        entries). Never the whole sequence: the last token is always left to compute so the
        step yields logits. Requests asking for prompt logprobs get no hits.
        """
        no_hits: GroupBlocks = tuple([] for _ in self.pools)
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return no_hits, 0
        block_hashes = self._block_hashes(request)[: (request.num_tokens - 1) // self.block_size]
        num_hit = len(block_hashes)
        found: list[list[KVCacheBlock | None]] = []  # per group, for the first num_hit blocks
        for pool, window in zip(self.pools, self.windows):  # the full group (if any) first
            blocks: list[KVCacheBlock | None] = []
            for block_hash in block_hashes[:num_hit]:
                block = pool.get_cached_block(block_hash)
                if block is None and window is None:
                    break  # a full group hits a prefix of cached blocks
                blocks.append(block)
            num_hit = len(blocks)
            found.append(blocks)
        num_hit = self._hit_all_windows_see(found, num_hit)
        if num_hit == 0:
            return no_hits, 0
        hits = []
        for group, blocks in enumerate(found):
            first = self._first_live(group, num_hit * self.block_size)
            null = [self.pools[group].null_block] * first
            hits.append(null + blocks[first:num_hit])
        return tuple(hits), num_hit * self.block_size  # type: ignore[arg-type]

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks `allocate_slots(request, num_new_tokens)` would take from each group's pool
        (no cache hits): those num_computed_tokens + num_new_tokens need beyond what it holds."""
        groups = self.req_to_blocks.get(request.request_id)
        held = len(groups[0]) if groups else 0
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - held)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[Sequence[KVCacheBlock]] = (),
    ) -> GroupBlockIds | None:
        """Give the request blocks for num_computed_tokens + cached + num_new_tokens tokens.

        `new_computed_blocks` (per group: prefix-cache hits, only at a request's first
        allocation) count on top of `request.num_computed_tokens`. Returns the ids of newly
        allocated blocks per group (an empty tuple when no group got any), or None (and changes
        nothing but freeing blocks out of every window) when a pool has too few free blocks.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens={num_new_tokens!r} is invalid: expected >= 0")
        req_id = request.request_id
        held = self.req_to_blocks.get(req_id)
        num_held = len(held[0]) if held else 0
        hits = [list(blocks) for blocks in new_computed_blocks] or [[] for _ in self.pools]
        num_hits = len(hits[0])
        num_total_tokens = request.num_computed_tokens + num_new_tokens
        if held is not None and self.sliding_groups:
            self.remove_skipped_blocks(request)
        if num_held and not num_hits and num_total_tokens <= num_held * self.block_size:
            # the common decode step: the blocks it holds suffice
            self._cache_full_blocks(request, min(num_total_tokens, request.num_tokens))
            return ()
        if num_hits and num_held:
            raise ValueError(f"request {req_id!r} already holds blocks; cache hits come first")
        num_total_tokens += num_hits * self.block_size
        num_required = -(-num_total_tokens // self.block_size)  # ceil
        num_new_blocks = max(0, num_required - num_held - num_hits)
        for pool, group_hits in zip(self.pools, hits):
            # Touching a free cached block takes it out of the free queue too.
            num_reused_free = sum(1 for block in group_hits if block.ref_cnt == 0)
            if num_new_blocks > pool.num_free_blocks - num_reused_free:
                return None
        if held is None:
            self._record_lookup(request, num_hits)
            held = self.req_to_blocks[req_id] = tuple([] for _ in self.pools)
            self.num_skipped_blocks[req_id] = [
                sum(b is pool.null_block for b in group_hits)
                for pool, group_hits in zip(self.pools, hits)
            ]
        new_ids = []
        for pool, blocks, group_hits in zip(self.pools, held, hits):
            pool.touch(group_hits)
            new_blocks = pool.get_new_blocks(num_new_blocks)
            blocks.extend(group_hits)
            blocks.extend(new_blocks)
            new_ids.append([block.block_id for block in new_blocks])
        self.num_cached_blocks.setdefault(req_id, num_hits)
        self._cache_full_blocks(request, min(num_total_tokens, request.num_tokens))
        return tuple(new_ids) if num_new_blocks else ()

    def remove_skipped_blocks(self, request: Request) -> None:
        """In each sliding group, return the blocks no query of the request can see any more
        (its next query sits at num_computed_tokens) to the pool; their entries become null."""
        groups = self.req_to_blocks.get(request.request_id)
        if groups is None:
            return
        skipped = self.num_skipped_blocks[request.request_id]
        for group in self.sliding_groups:
            blocks, pool = groups[group], self.pools[group]
            first = min(self._first_live(group, request.num_computed_tokens), len(blocks))
            if first <= skipped[group]:
                continue
            dead = blocks[skipped[group] : first]
            blocks[skipped[group] : first] = [pool.null_block] * len(dead)  # type: ignore[list-item]
            pool.free_blocks(dead)
            skipped[group] = first

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so the end of a sequence is evicted first."""
        req_id = request.request_id
        for pool, blocks in zip(self.pools, self.req_to_blocks.pop(req_id, ())):
            pool.free_blocks(reversed(blocks))
        self.req_to_block_hashes.pop(req_id, None)
        self.num_cached_blocks.pop(req_id, None)
        self.num_skipped_blocks.pop(req_id, None)

    def reset_prefix_cache(self) -> bool:
        if any(pool.num_free_blocks != pool.num_usable_blocks for pool in self.pools):
            return False
        return all(pool.reset_prefix_cache() for pool in self.pools)

    def _first_live(self, group: int, num_computed_tokens: int) -> int:
        window = self.windows[group]
        if window is None:
            return 0
        return first_live_block(num_computed_tokens, window, self.block_size)

    def _hit_all_windows_see(self, found: list[list[KVCacheBlock | None]], num_hit: int) -> int:
        """The longest hit <= num_hit for which every sliding group has cached each block its
        window sees from the first position after the hit."""
        runs = []  # per sliding group: runs[g][i] = cached blocks in a row ending at block i
        for group in self.sliding_groups:
            run, count = [], 0
            for block in found[group][:num_hit]:
                count = count + 1 if block is not None else 0
                run.append(count)
            runs.append((group, run))
        stable = False
        while not stable and num_hit:
            stable = True
            for group, run in runs:
                while num_hit and run[num_hit - 1] < num_hit - self._first_live(
                    group, num_hit * self.block_size
                ):
                    num_hit -= 1
                    stable = False
        return num_hit

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """The request's hash chain, extended to every full block of its current tokens."""
        req_id = request.request_id
        known = self.req_to_block_hashes.get(req_id, [])
        if (len(known) + 1) * self.block_size <= request.num_tokens:
            known = hash_full_blocks(request.all_token_ids, self.block_size, known)
            self.req_to_block_hashes[req_id] = known
        return known

    def _cache_full_blocks(self, request: Request, num_known_tokens: int) -> None:
        """Register blocks that became full with known tokens (scheduled or already computed)."""
        if not self.enable_caching:
            return
        req_id = request.request_id
        num_full = num_known_tokens // self.block_size
        start = self.num_cached_blocks[req_id]
        if num_full <= start:
            return
        block_hashes = self._block_hashes(request)
        for pool, blocks in zip(self.pools, self.req_to_blocks[req_id]):
            for i in range(start, num_full):
                pool.cache_block(blocks[i], block_hashes[i])  # (never the null block)
        self.num_cached_blocks[req_id] = num_full

    def _record_lookup(self, request: Request, num_hit_blocks: int) -> None:
        # Counted once per admission (not per failed attempt), only when a lookup really happened.
        if self.enable_caching and request.sampling_params.prompt_logprobs is None:
            self.block_pool.record_prefix_lookup(
                request.num_tokens, num_hit_blocks * self.block_size
            )

    def check_invariants(self) -> None:
        """Assert each pool is consistent, every block is referenced exactly as often as held,
        tables have one entry per block in every group, and null entries sit exactly where
        the window no longer sees (a prefix of each sliding table)."""
        for pool in self.pools:
            pool.check_invariants()
        holders: list[dict[int, int]] = [{} for _ in self.pools]
        for req_id, groups in self.req_to_blocks.items():
            assert len({len(blocks) for blocks in groups}) == 1, f"{req_id}: tables differ"
            assert self.num_cached_blocks[req_id] <= len(groups[0]), f"{req_id}: cached > held"
            skipped = self.num_skipped_blocks[req_id]
            for group, (pool, blocks) in enumerate(zip(self.pools, groups)):
                null = [i for i, b in enumerate(blocks) if b is pool.null_block]
                assert null == list(range(skipped[group])), f"{req_id}: null entries misplaced"
                live = blocks[skipped[group] :]
                assert len({b.block_id for b in live}) == len(live), f"{req_id}: duplicate block"
                for block in live:
                    holders[group][block.block_id] = holders[group].get(block.block_id, 0) + 1
        for group, pool in enumerate(self.pools):
            for block in pool.blocks:
                if block is pool.null_block:
                    continue
                expected = holders[group].get(block.block_id, 0)
                assert block.ref_cnt == expected, (
                    f"group {group} block {block.block_id}: ref_cnt {block.ref_cnt} but held by "
                    f"{expected} requests"
                )
        assert set(self.num_cached_blocks) == set(self.req_to_blocks), "stale per-request state"
        assert set(self.num_skipped_blocks) == set(self.req_to_blocks), "stale per-request state"
