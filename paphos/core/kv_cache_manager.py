"""Per-request KV block tables on top of the `BlockPool`, with prefix caching over full blocks.

Invariant: a request holding blocks has exactly enough for the tokens it was allocated
(ceil(tokens / block_size)); its first `num_cached_blocks` blocks are registered under the request's
hash chain. A block is registered as soon as the tokens filling it are scheduled: the runner writes
a whole step's K/V before any attention reads it, so a request scheduled in the same step may reuse
it. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from paphos.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_full_blocks
from paphos.request import Request


class KVCacheManager:
    """Allocates, caches and frees the KV blocks of each request."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} is invalid: expected an int >= 1")
        self.block_size = block_size
        self.enable_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Hash chain of each request's full blocks so far (tokens only ever get appended).
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of each request have been offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.block_pool.prefix_cache_stats.queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.block_pool.prefix_cache_stats.hits

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request's full blocks, and how many tokens it covers.

        Never the whole sequence: the last token is always left to compute so the step yields
        logits. Requests asking for prompt logprobs get no hits (those must be computed).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        block_hashes = self._block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        computed: list[KVCacheBlock] = []
        for block_hash in block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed.append(block)
        return computed, len(computed) * self.block_size

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks `allocate_slots(request, num_new_tokens)` would take from the pool (no cache
        hits): those num_computed_tokens + num_new_tokens need beyond what the request holds."""
        held = len(self.req_to_blocks.get(request.request_id, ()))
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - held)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[int] | None:
        """Give the request blocks for num_computed_tokens + cached + num_new_tokens tokens.

        `new_computed_blocks` (prefix-cache hits, only at a request's first allocation) count on top
        of `request.num_computed_tokens`. Returns the ids of newly allocated blocks, or None (and
        changes nothing) when the pool has too few free blocks.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens={num_new_tokens!r} is invalid: expected >= 0")
        req_id = request.request_id
        held = self.req_to_blocks.get(req_id, [])
        num_total_tokens = request.num_computed_tokens + num_new_tokens
        if held and not new_computed_blocks and num_total_tokens <= len(held) * self.block_size:
            # the common decode step: the blocks it holds suffice
            self._cache_full_blocks(request, min(num_total_tokens, request.num_tokens))
            return []
        if new_computed_blocks and held:
            raise ValueError(f"request {req_id!r} already holds blocks; cache hits come first")
        num_total_tokens += len(new_computed_blocks) * self.block_size
        num_required = -(-num_total_tokens // self.block_size)  # ceil
        num_new_blocks = max(0, num_required - len(held) - len(new_computed_blocks))
        # Touching a free cached block takes it out of the free queue too.
        num_reused_free = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.num_free_blocks - num_reused_free:
            return None
        if req_id not in self.req_to_blocks:
            self._record_lookup(request, len(new_computed_blocks))
        self.block_pool.touch(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        blocks = self.req_to_blocks.setdefault(req_id, [])
        blocks.extend(new_computed_blocks)
        blocks.extend(new_blocks)
        self.num_cached_blocks.setdefault(req_id, len(new_computed_blocks))
        self._cache_full_blocks(request, min(num_total_tokens, request.num_tokens))
        return [block.block_id for block in new_blocks]

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so the end of a sequence is evicted first."""
        req_id = request.request_id
        blocks = self.req_to_blocks.pop(req_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self.req_to_block_hashes.pop(req_id, None)
        self.num_cached_blocks.pop(req_id, None)

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

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
        blocks = self.req_to_blocks[req_id]
        for i in range(start, num_full):
            self.block_pool.cache_block(blocks[i], block_hashes[i])
        self.num_cached_blocks[req_id] = num_full

    def _record_lookup(self, request: Request, num_hit_blocks: int) -> None:
        # Counted once per admission (not per failed attempt), only when a lookup really happened.
        if self.enable_caching and request.sampling_params.prompt_logprobs is None:
            self.block_pool.record_prefix_lookup(
                request.num_tokens, num_hit_blocks * self.block_size
            )

    def check_invariants(self) -> None:
        """Assert pool consistency and that every block is referenced exactly as often as held."""
        self.block_pool.check_invariants()
        holders: dict[int, int] = {}
        for req_id, blocks in self.req_to_blocks.items():
            assert len({b.block_id for b in blocks}) == len(blocks), f"{req_id}: duplicate block"
            assert self.num_cached_blocks[req_id] <= len(blocks), f"{req_id}: cached > held"
            for block in blocks:
                holders[block.block_id] = holders.get(block.block_id, 0) + 1
        for block in self.block_pool.blocks:
            expected = holders.get(block.block_id, 0)
            assert block.ref_cnt == expected, (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but held by {expected} requests"
            )
        assert set(self.num_cached_blocks) == set(self.req_to_blocks), "stale per-request state"
