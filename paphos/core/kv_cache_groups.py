"""KV cache groups: the attention layers that share one block table per request.

Full-attention layers form one group; layers with a sliding window w form a group per distinct w.
Each group has its own pool of blocks (its layers' cache tensors have that many blocks), so a
sliding group can stay window-sized while the full group holds every token. In a sliding group a
block whose tokens no query can see any more (all before position - w + 1) is returned to its
pool and its table entry becomes the group's null block (id 0, never handed out, never written).
Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

NULL_BLOCK_ID = 0  # in a sliding group: the entry of a block no query sees any more


@dataclass(frozen=True)
class KVCacheGroup:
    """One group: its window (None: full attention) and how many blocks its pool holds."""

    sliding_window: int | None
    num_blocks: int

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window!r} is invalid: expected >= 1")
        # a sliding group reserves its null block
        least = 1 if self.sliding_window is None else 2
        if not isinstance(self.num_blocks, int) or self.num_blocks < least:
            raise ValueError(f"num_blocks={self.num_blocks!r} is invalid: expected >= {least}")

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - int(self.is_sliding)


@dataclass(frozen=True)
class KVCacheLayout:
    """Every group of the model's KV cache (the full group first, when there is one)."""

    groups: tuple[KVCacheGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a KV cache layout needs at least one group")
        full = [g for g in self.groups if not g.is_sliding]
        if len(full) > 1 or (full and self.groups[0].is_sliding):
            raise ValueError(f"groups={self.groups!r}: at most one full group, and it comes first")

    @classmethod
    def single(cls, num_blocks: int) -> KVCacheLayout:
        """One full-attention group (every model without sliding-window layers)."""
        return cls((KVCacheGroup(None, num_blocks),))

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def has_full_group(self) -> bool:
        return not self.groups[0].is_sliding

    @property
    def num_blocks(self) -> int:
        """The count that bounds one sequence's context: the full group's blocks, or (every
        layer sliding) the first group's."""
        return self.groups[0].num_blocks

    def token_capacity(self, block_size: int) -> int | None:
        """Tokens one sequence may hold: the full group's, or None (every layer slides: any
        length fits, since a sliding group never holds more than its window's blocks)."""
        return self.groups[0].num_blocks * block_size if self.has_full_group else None

    def min_with(self, other: KVCacheLayout) -> KVCacheLayout:
        """Group-wise fewest blocks (tensor-parallel ranks each size their own cache)."""
        if [g.sliding_window for g in self.groups] != [g.sliding_window for g in other.groups]:
            raise ValueError(f"ranks disagree on the KV cache groups: {self} vs {other}")
        return KVCacheLayout(
            tuple(
                KVCacheGroup(a.sliding_window, min(a.num_blocks, b.num_blocks))
                for a, b in zip(self.groups, other.groups)
            )
        )


def first_live_block(num_computed_tokens: int, sliding_window: int, block_size: int) -> int:
    """Index of the first block a query at position num_computed_tokens (or later) can see
    through a window of sliding_window positions (positions > own - window, as transformers)."""
    return max(0, num_computed_tokens - sliding_window + 1) // block_size


def sliding_group_bound(
    sliding_window: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    num_scheduler_steps: int = 1,
) -> int:
    """Blocks a sliding group's pool needs so that it never runs out (null block included).

    At the start of each step every running request holds at most the blocks of its last
    window - 1 positions, plus the block its next token goes to (ceil((w - 1) / bs) + 1); the
    step then adds at most the blocks of its scheduled tokens (all requests together:
    max_num_batched_tokens, one partial block each) or of a multi-step decode's tokens."""
    held = -(-(sliding_window - 1) // block_size) + 1
    new = -(-max_num_batched_tokens // block_size) + max_num_seqs
    ahead = max_num_seqs * -(-num_scheduler_steps // block_size)
    return 1 + max_num_seqs * held + new + ahead


def windows_of(layer_windows: Sequence[int | None]) -> tuple[int | None, ...]:
    """The layout's group order for these layers: None (full) first if present, then each
    distinct window in ascending order."""
    distinct = set(layer_windows)
    full = (None,) if None in distinct else ()
    return full + tuple(sorted(w for w in distinct if w is not None))
