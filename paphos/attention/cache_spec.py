"""What one attention layer keeps per token in the paged KV cache, and the shape that holds it.

A K/V layer (full or sliding attention) keeps a key and a value per kv head:
[2, num_blocks, block_size, num_kv_heads, head_size]. A latent layer (MLA) keeps one compressed
"head" per token, the latent and the rotated shared key side by side: [num_blocks, block_size,
head_size]. The runner sums layers' values per token to size blocks in bytes (runner/kv_cache.py);
a layer's sliding window puts it in the KV cache group of that window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LayerCacheSpec:
    layout: Literal["kv", "latent"]
    num_kv_heads: int  # 1 for a latent layer
    head_size: int  # per kv head; a latent layer: kv_lora_rank + qk_rope_head_dim
    # a latent layer's (heads, q/k head size): what per-head K and V would keep instead, reported
    per_head_equivalent: tuple[int, int] | None = None
    # a sliding-window layer's window: its KV cache group (core/kv_cache_groups.py) frees the
    # blocks before it; None: the full-attention group
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("kv", "latent"):
            raise ValueError(f"cache layout {self.layout!r} is not 'kv' or 'latent'")
        if self.layout == "latent" and self.num_kv_heads != 1:
            raise ValueError(f"a latent cache holds one head per token, not {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1")

    @property
    def values_per_token(self) -> int:
        per_head = self.head_size if self.layout == "latent" else 2 * self.head_size
        return self.num_kv_heads * per_head

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        if self.layout == "latent":
            return (num_blocks, block_size, self.head_size)
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_size)

    def numel(self, num_blocks: int, block_size: int) -> int:
        return math.prod(self.shape(num_blocks, block_size))
