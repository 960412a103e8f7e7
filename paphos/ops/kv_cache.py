"""Writing this step's keys and values into the paged KV cache.

Cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_size], K then V.
A slot is `block_id * block_size + offset`.
"""

from __future__ import annotations

import torch


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key, value: [num_tokens, num_kv_heads, head_size]; slot_mapping: [num_tokens] (int64)."""
    num_kv_heads, head_size = key.shape[1], key.shape[2]
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)  # [2, num_slots, num_kv_heads, head_size]
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))
