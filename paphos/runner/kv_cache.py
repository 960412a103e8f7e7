"""Sizing and allocating the paged KV cache: one tensor per attention layer, from the memory left.

CPU: a configured number of GiB. CUDA: total memory x gpu_memory_utilization, minus weights and the
peak activation memory of one profiled step of max_num_batched_tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from paphos.config import CacheConfig

GiB = 1 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_size * element_size
        return per_layer * self.num_layers


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, device: torch.device
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_size] zeroed tensor per layer.

    On CPU the zeros come from calloc (numpy), so the OS hands out zero pages lazily: start-up does
    not pay for touching gigabytes of cache that short workloads never use. Zeros (not garbage)
    matter: attention masks padded positions in the scores, and 0 * NaN would still poison the
    output.
    """
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
    if device.type == "cpu":
        num_bytes = spec.bytes_per_block * num_blocks
        raw = torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8))  # [num_bytes], lazily zeroed
        caches = raw.view(spec.dtype).view(shape)
    else:
        caches = torch.zeros(shape, dtype=spec.dtype, device=device)
    return list(caches.unbind(0))


def num_blocks_for_device(
    spec: KVCacheSpec,
    cache: CacheConfig,
    device: torch.device,
    profile: Callable[[], None],
    reserved_bytes: int = 0,
) -> int:
    """Blocks that fit the cache budget less `reserved_bytes` (a hybrid model's state cache)."""
    if device.type == "cpu":
        budget = int(cache.kv_cache_space * GiB) - reserved_bytes
        if budget < spec.bytes_per_block:
            raise ValueError(
                f"kv_cache_space={cache.kv_cache_space} GiB leaves no room for KV blocks beside "
                f"the state cache ({reserved_bytes / GiB:.3f} GiB): raise kv_cache_space or "
                "lower num_state_slots / max_num_seqs"
            )
        return budget // spec.bytes_per_block
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    # Memory others hold on this card (total - free - ours) is not ours to take.
    others = total - free - torch.cuda.memory_reserved(device)
    budget = total * cache.gpu_memory_utilization - peak - max(others, 0) - reserved_bytes
    torch.cuda.empty_cache()
    if budget < spec.bytes_per_block:
        raise ValueError(
            f"no GPU memory left for the KV cache: weights + activations peak at "
            f"{peak / GiB:.2f} GiB, the state cache takes {reserved_bytes / GiB:.2f} GiB, "
            f"of {total / GiB:.2f} GiB x gpu_memory_utilization={cache.gpu_memory_utilization}; "
            "raise --gpu-memory-utilization or lower --max-num-batched-tokens / --max-num-seqs"
        )
    return int(budget // spec.bytes_per_block)
