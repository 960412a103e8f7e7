"""Sizing and allocating the paged KV cache: one tensor per attention layer, from the memory left.
Blocks are sized by bytes per token summed over the layers, whatever each layer keeps per token
(K/V per head, or MLA's one latent "head").

CPU: a configured number of GiB. CUDA: total memory x gpu_memory_utilization, minus weights and the
peak activation memory of one profiled step of max_num_batched_tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from paphos.attention.cache_spec import LayerCacheSpec
from paphos.config import CacheConfig

GiB = 1 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    """The cache of every attention layer (layer i uses `layers[i]`), sized in bytes per token."""

    block_size: int
    dtype: torch.dtype
    layers: tuple[LayerCacheSpec, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_token(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return sum(layer.values_per_token for layer in self.layers) * element_size

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def describe(self) -> str:
        """One start-up line: bytes per token and what each kind of layer keeps per token."""
        kinds: dict[LayerCacheSpec, int] = {}
        for layer in self.layers:
            kinds[layer] = kinds.get(layer, 0) + 1
        parts = []
        for layer, count in kinds.items():
            what = f"2 x {layer.num_kv_heads} heads x {layer.head_size}"
            if layer.layout == "latent":
                what = f"latent {layer.head_size}"
                if layer.per_head_equivalent is not None:
                    heads, size = layer.per_head_equivalent
                    what += (
                        f"; per-head K/V would be 2 x {heads} heads x {size} = {2 * heads * size}"
                    )
            values = layer.values_per_token
            parts.append(f"{count} {layer.layout} layers x {values} values ({what})")
        dtype = str(self.dtype).removeprefix("torch.")
        layers = ", ".join(parts)
        return f"KV cache layout: {self.bytes_per_token} bytes per token ({dtype}; {layers})"


FP8_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for `--kv-cache-dtype` (auto: the model's). fp8 caches hold
    K and V cast with a per-tensor scale of 1.0 and are read by the torch reference attention
    (the C kernels take fp32/bf16 caches and fall back to it); CPU only (EngineConfig)."""
    return model_dtype if name == "auto" else FP8_CACHE_DTYPES[name]


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, device: torch.device
) -> list[torch.Tensor]:
    """One zeroed tensor per layer, shaped by its layout (attention/cache_spec.py), all views of
    one flat allocation.

    On CPU the zeros come from calloc (numpy), so the OS hands out zero pages lazily: start-up does
    not pay for touching gigabytes of cache that short workloads never use. Zeros (not garbage)
    matter: attention masks padded positions in the scores, and 0 * NaN would still poison the
    output.
    """
    sizes = [layer.numel(num_blocks, spec.block_size) for layer in spec.layers]
    if device.type == "cpu":
        raw = torch.from_numpy(np.zeros(spec.bytes_per_block * num_blocks, dtype=np.uint8))
        flat = raw.view(spec.dtype)  # [total values], lazily zeroed
    else:
        flat = torch.zeros(sum(sizes), dtype=spec.dtype, device=device)  # [total values]
    return [
        part.view(layer.shape(num_blocks, spec.block_size))
        for part, layer in zip(flat.split(sizes), spec.layers, strict=True)
    ]


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
