"""Writing this step's keys and values into the paged KV cache.

Cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_size], K then V.
A slot is `block_id * block_size + offset`. The cache may be fp8 (values cast with scale 1.0,
saturated); readers upcast it.
"""

from __future__ import annotations

import torch

# fp8 caches (--kv-cache-dtype fp8*): values stored with a per-tensor scale of 1.0
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key, value: [num_tokens, num_kv_heads, head_size]; slot_mapping: [num_tokens] (int64)."""
    num_kv_heads, head_size = key.shape[1], key.shape[2]
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)  # [2, num_slots, num_kv_heads, head_size]
    if kv_cache.dtype in FP8_DTYPES:  # saturate (a cast past the largest value is NaN), then
        limit = torch.finfo(kv_cache.dtype).max  # copy bytes: torch has no fp8 index_copy
        fp8 = [t.clamp(-limit, limit).to(kv_cache.dtype).view(torch.uint8) for t in (key, value)]
        flat = flat.view(torch.uint8)
        flat[0].index_copy_(0, slot_mapping, fp8[0])
        flat[1].index_copy_(0, slot_mapping, fp8[1])
        return
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))
