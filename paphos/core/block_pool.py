"""The pool of fixed-size KV cache blocks: ref counts, an LRU free queue, the prefix-cache hash map.

Invariant: every block is either in the free queue with ref_cnt 0, or out of it with ref_cnt > 0; a
hash-map entry always points at a block that holds that hash (free blocks keep their hash, and stay
findable, until they are handed out again). A pool may reserve block 0 as its null block (the table
entry of a sliding-window block no query sees any more): never free, never cached, never counted
as held. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

# Parent value of the first block of a sequence. A fixed int (not None) keeps hashes identical
# across processes: hash(None) is address-based before Python 3.12, hashes of int tuples never are.
ROOT_HASH_VALUE = 0x9A7F05


@dataclass(frozen=True)
class BlockHash:
    """Identity of a full block: a chained hash of all tokens up to its end, plus its own tokens.

    Equality also compares the block's token ids, so a collision of `value` alone never makes two
    different blocks equal.
    """

    value: int
    token_ids: tuple[int, ...]

    def __hash__(self) -> int:
        return self.value


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one full block given the hash of the block before it (None for the first block)."""
    tokens = tuple(token_ids)
    parent_value = ROOT_HASH_VALUE if parent is None else parent.value
    return BlockHash(value=hash((parent_value, tokens)), token_ids=tokens)


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, parents: Sequence[BlockHash] = ()
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`, continuing the already hashed chain `parents`."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size!r} is invalid: expected >= 1")
    hashes = list(parents)
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[start : start + block_size]))
    return hashes


@dataclass(eq=False)
class KVCacheBlock:
    """One block of the paged KV cache; `block_id` is its index in every layer's cache tensor."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Links of the free queue (None when the block is at an end of it, or not in it).
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)
    in_free_queue: bool = False


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head (least recently freed), append at the
    tail, remove from the middle in O(1) when a cached free block is reused."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self.head: KVCacheBlock | None = None
        self.tail: KVCacheBlock | None = None
        self.num_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_blocks

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self.head
        while block is not None:
            yield block
            block = block.next_free

    def append(self, block: KVCacheBlock) -> None:
        assert not block.in_free_queue, f"block {block.block_id} is already free"
        block.prev_free, block.next_free = self.tail, None
        if self.tail is None:
            self.head = block
        else:
            self.tail.next_free = block
        self.tail = block
        block.in_free_queue = True
        self.num_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        assert block.in_free_queue, f"block {block.block_id} is not free"
        if block.prev_free is None:
            self.head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self.tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        block.in_free_queue = False
        self.num_blocks -= 1

    def popleft(self) -> KVCacheBlock:
        if self.head is None:
            raise ValueError("no free KV cache block left")
        block = self.head
        self.remove(block)
        return block


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups, counted in tokens: `queries` tokens asked for, `hits` found cached."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    """Owns every KV cache block: hands them out, takes them back, remembers full ones by hash."""

    def __init__(
        self, num_blocks: int, enable_caching: bool, reserve_null_block: bool = False
    ) -> None:
        least = 2 if reserve_null_block else 1
        if not isinstance(num_blocks, int) or num_blocks < least:
            raise ValueError(f"num_blocks={num_blocks!r} is invalid: expected an int >= {least}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        self.null_block: KVCacheBlock | None = None
        if reserve_null_block:
            self.null_block = self.blocks[0]
            self.null_block.ref_cnt = 1  # held forever, by nobody
        self.free_queue = FreeBlockQueue(b for b in self.blocks if b is not self.null_block)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - (self.null_block is not None)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        if not self.enable_caching:
            return None
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the head of the free queue (ref_cnt 1, hash dropped)."""
        if num_blocks < 0 or num_blocks > self.num_free_blocks:
            raise ValueError(
                f"num_blocks={num_blocks!r} is invalid: expected 0..{self.num_free_blocks} free"
            )
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._drop_hash(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block (a prefix-cache hit), taking free ones out of the queue."""
        for block in blocks:
            if block is self.null_block:
                continue
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 go to the tail in this order, so
        the first block given here is the first to be evicted among them."""
        for block in ordered_blocks:
            if block is self.null_block:
                continue
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Register a full, held block under its hash. If another block already caches the same
        content, this one stays unregistered (no hash) and is simply reused when freed."""
        if not self.enable_caching or block.block_hash is not None or block is self.null_block:
            return
        assert block.ref_cnt > 0, f"block {block.block_id} must be held to be cached"
        if block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_stats.queries += num_query_tokens
        self.prefix_cache_stats.hits += num_hit_tokens

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only when no block is held (returns False otherwise)."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        return True

    def _drop_hash(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None

    def check_invariants(self) -> None:
        """Assert the whole pool is consistent: queue links, ref counts, hash map, counts."""
        queued = list(self.free_queue)
        assert len(queued) == len(self.free_queue), "free queue length disagrees with its links"
        assert len({id(b) for b in queued}) == len(queued), "a block is twice in the free queue"
        prev = None
        for block in queued:
            assert block.prev_free is prev, f"block {block.block_id}: broken back link"
            prev = block
        assert self.free_queue.tail is prev, "free queue tail is not its last block"
        queued_ids = {b.block_id for b in queued}
        for block in self.blocks:
            in_queue = block.block_id in queued_ids
            assert in_queue == block.in_free_queue, f"block {block.block_id}: stale queue flag"
            if block is self.null_block:
                assert not in_queue and block.block_hash is None, "the null block was handed out"
            elif in_queue:
                assert block.ref_cnt == 0, f"free block {block.block_id} has refs"
            else:
                assert block.ref_cnt > 0, f"block {block.block_id} is lost (no refs, not free)"
        for block_hash, block in self.cached_blocks.items():
            assert block.block_hash == block_hash, f"hash map entry of block {block.block_id} stale"
        num_hashed = sum(b.block_hash is not None for b in self.blocks)
        assert num_hashed == len(self.cached_blocks), "a block holds a hash the map does not know"
        if not self.enable_caching:
            assert not self.cached_blocks, "caching is off but blocks are cached"
