"""Sizing and allocating the paged KV cache: one tensor per attention layer, from the memory left.
Blocks are sized by bytes per token summed over the layers, whatever each layer keeps per token
(K/V per head, or MLA's one latent "head").

CPU: a configured number of GiB. CUDA: total memory x gpu_memory_utilization, minus weights and the
peak activation memory of one profiled step of max_num_batched_tokens. Either less the bytes a
hybrid model's state cache takes. Layers with a sliding window form KV cache groups of their own
(`paphos.core.kv_cache_groups`), whose tensors hold only the blocks their window can need; the
memory this leaves goes to the full-attention layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from paphos.attention.cache_spec import LayerCacheSpec
from paphos.config import CacheConfig
from paphos.core.kv_cache_groups import KVCacheGroup, KVCacheLayout, windows_of

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
        """Bytes of one block in every layer (the cost of a block without sliding groups)."""
        return self.bytes_per_token * self.block_size

    def layer_bytes_per_block(self, layer: int) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return self.layers[layer].values_per_token * self.block_size * element_size

    def group_bytes_per_block(self, window: int | None) -> int:
        """Bytes of one block in every layer of the group with this window."""
        layers = [i for i, w in enumerate(self.windows) if w == window]
        return sum(self.layer_bytes_per_block(i) for i in layers)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        return tuple(layer.sliding_window for layer in self.layers)

    @property
    def group_windows(self) -> tuple[int | None, ...]:
        """The window of each KV cache group, in the layout's order (full first; a model
        without attention layers has one, empty, full group)."""
        return windows_of(self.windows) or (None,)

    def layer_groups(self) -> tuple[int, ...]:
        """The KV cache group of each layer."""
        order = self.group_windows
        return tuple(order.index(w) for w in self.windows)

    def without_windows(self) -> KVCacheSpec:
        """Every layer in the full group (it keeps every block; its attention still slides)."""
        layers = tuple(dataclasses.replace(layer, sliding_window=None) for layer in self.layers)
        return dataclasses.replace(self, layers=layers)

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
            if layer.sliding_window is not None:
                what += f"; window {layer.sliding_window}"
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
    K and V cast with a per-tensor scale of 1.0, saturated; on CPU the torch reference attention
    reads them (the C kernels take fp32/bf16 caches and fall back to it), on CUDA the Triton
    kernels (upcast per tile); MLA layers take fp8 on CPU only (ModelRunner.kv_cache_spec)."""
    return model_dtype if name == "auto" else FP8_CACHE_DTYPES[name]


def plan_kv_cache_layout(
    spec: KVCacheSpec, budget_bytes: int, sliding_bounds: dict[int, int]
) -> KVCacheLayout:
    """The groups' block counts for a budget: the largest n such that n blocks for the full
    layers plus min(n + 1, bound) for each sliding group's layers fit (the + 1: its null block;
    a sliding group never needs more than its bound). Without full layers the sliding groups
    take what they need and leave the rest of the budget unused."""
    per_block = {w: spec.group_bytes_per_block(w) for w in spec.group_windows}

    def cost(n: int) -> int:
        return kv_cache_bytes(spec, layout_with_blocks(spec, n, sliding_bounds))

    low, high = 0, max(budget_bytes // min(per_block.values()), *sliding_bounds.values(), 1)
    while low < high:  # largest n with cost(n) <= budget (cost is non-decreasing in n)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= budget_bytes else (low, mid - 1)
    if low < 1:
        raise ValueError(
            f"the KV cache budget of {budget_bytes / GiB:.3f} GiB holds no block "
            f"({cost(1) / GiB:.3f} GiB for one block of every layer)"
        )
    return layout_with_blocks(spec, low, sliding_bounds)


def layout_with_blocks(
    spec: KVCacheSpec, num_blocks: int, sliding_bounds: dict[int, int]
) -> KVCacheLayout:
    """num_blocks for the full group, min(num_blocks + 1, bound) for each sliding group (its
    null block on top, and never more than it can use)."""
    return KVCacheLayout(
        tuple(
            KVCacheGroup(w, num_blocks if w is None else min(num_blocks + 1, sliding_bounds[w]))
            for w in spec.group_windows
        )
    )


def kv_cache_bytes(spec: KVCacheSpec, layout: KVCacheLayout) -> int:
    """Bytes the layout's cache tensors take, over every layer."""
    return sum(
        group.num_blocks * spec.group_bytes_per_block(window)
        for group, window in zip(layout.groups, spec.group_windows, strict=True)
    )


def describe_kv_cache_layout(spec: KVCacheSpec, layout: KVCacheLayout, budget_bytes: int) -> str:
    """What each group holds, and what freeing out-of-window blocks saves against every layer
    holding the same blocks (the layout without sliding groups)."""
    bs = spec.block_size
    parts = []
    for group, window in zip(layout.groups, spec.group_windows):
        num_layers = spec.windows.count(window)
        kind = "full attention" if window is None else f"window {window}"
        parts.append(f"{kind}: {num_layers} layers x {group.num_blocks} blocks")
    text = "; ".join(parts)
    if not any(g.is_sliding for g in layout.groups):
        return text
    uniform = budget_bytes // spec.bytes_per_block
    if layout.has_full_group:
        gained = (layout.num_blocks - uniform) * bs
        return (
            f"{text}. Sliding layers free blocks out of their window: {gained} more tokens of "
            f"context ({layout.num_blocks * bs} instead of {uniform * bs} with every layer "
            "holding every block)"
        )
    used = kv_cache_bytes(spec, layout)
    return (
        f"{text}. Every layer slides and frees blocks out of its window: {used / GiB:.3f} GiB "
        f"of the {budget_bytes / GiB:.3f} GiB budget used, any context length fits"
    )


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int | KVCacheLayout, device: torch.device
) -> list[torch.Tensor]:
    """One zeroed tensor per layer, shaped by its layout (attention/cache_spec.py) with the block
    count of the layer's group (`num_blocks` an int: every layer the same), all views of one flat
    allocation.

    On CPU the zeros come from calloc (numpy), so the OS hands out zero pages lazily: start-up does
    not pay for touching gigabytes of cache that short workloads never use. Zeros (not garbage)
    matter: attention masks padded positions in the scores, and 0 * NaN would still poison the
    output.
    """
    if isinstance(num_blocks, int):
        num_blocks = KVCacheLayout(_uniform(spec, num_blocks))
    counts = [num_blocks.groups[group].num_blocks for group in spec.layer_groups()]
    sizes = [layer.numel(n, spec.block_size) for layer, n in zip(spec.layers, counts, strict=True)]
    if device.type == "cpu":
        element_size = torch.empty((), dtype=spec.dtype).element_size()
        raw = torch.from_numpy(np.zeros(sum(sizes) * element_size, dtype=np.uint8))
        flat = raw.view(spec.dtype)  # [total values], lazily zeroed
    else:
        flat = torch.zeros(sum(sizes), dtype=spec.dtype, device=device)  # [total values]
    return [
        part.view(layer.shape(n, spec.block_size))
        for part, layer, n in zip(flat.split(sizes), spec.layers, counts, strict=True)
    ]


def _uniform(spec: KVCacheSpec, num_blocks: int) -> tuple[KVCacheGroup, ...]:
    """Every group the same block count (a profiling step, a test's hand-made cache)."""
    return tuple(
        KVCacheGroup(w, num_blocks if w is None else max(num_blocks, 2)) for w in spec.group_windows
    )


def kv_cache_budget(
    spec: KVCacheSpec,
    cache: CacheConfig,
    device: torch.device,
    profile: Callable[[], None],
    reserved_bytes: int = 0,
) -> int:
    """Bytes the KV cache may take on this device, less `reserved_bytes` (a hybrid model's state
    cache)."""
    if device.type == "cpu":
        budget = int(cache.kv_cache_space * GiB) - reserved_bytes
        if budget < spec.bytes_per_block:
            raise ValueError(
                f"kv_cache_space={cache.kv_cache_space} GiB leaves no room for KV blocks beside "
                f"the state cache ({reserved_bytes / GiB:.3f} GiB): raise kv_cache_space or "
                "lower num_state_slots / max_num_seqs"
            )
        return budget
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
    return int(budget)
