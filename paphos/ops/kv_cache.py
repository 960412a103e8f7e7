"""Writing this step's keys and values into the paged KV cache.

Cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_size], K then V.
A slot is `block_id * block_size + offset`. The cache may be fp8: values divided by a per-tensor
scale (k_scale, v_scale; 1.0 unless given), saturated and cast; readers upcast and multiply back.
"""

from __future__ import annotations

import torch

# fp8 caches (--kv-cache-dtype fp8*): values stored divided by a per-tensor scale
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """key, value: [num_tokens, num_kv_heads, head_size]; slot_mapping: [num_tokens] (int64);
    k_scale, v_scale: an fp8 cache's per-tensor scales (float caches ignore them)."""
    num_kv_heads, head_size = key.shape[1], key.shape[2]
    flat = kv_cache.view(2, -1, num_kv_heads, head_size)  # [2, num_slots, num_kv_heads, head_size]
    if kv_cache.dtype in FP8_DTYPES:  # saturated and cast, then bytes copied: torch has no fp8
        fp8 = [  # index_copy
            to_fp8(t, kv_cache.dtype, scale).view(torch.uint8)
            for t, scale in ((key, k_scale), (value, v_scale))
        ]
        flat = flat.view(torch.uint8)
        flat[0].index_copy_(0, slot_mapping, fp8[0])
        flat[1].index_copy_(0, slot_mapping, fp8[1])
        return
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def to_fp8(t: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """t / scale saturated to the fp8 type's largest finite value, then cast (scale 1.0: t as it
    is, in its own dtype; else in float32, as the Triton write computes it)."""
    limit = torch.finfo(dtype).max
    if scale != 1.0:
        t = t.float() * (1.0 / scale)
    return t.clamp(-limit, limit).to(dtype)
