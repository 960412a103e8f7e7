"""The only way a model does attention: write this step's K/V into the paged cache, attend over it.

A model may hand its rotary embedding to the layer (`rotary_emb=`, `positions=`): the layer then
rotates q and k itself, and where the device has a fused kernel (CUDA) the rotation and the cache
write are one launch.

A layer may attend within a sliding window (each query sees its last `sliding_window` positions)
and soft-cap its scores (`logits_soft_cap`: c * tanh(s / c)); both travel to the attention op.
A layer with `chunk_size` c attends only within its query's chunk of c positions (Llama 4).
A layer built with `use_sinks` takes each call's per-head sink logits (`sinks=`, the model's
parameter, gpt-oss): they join every query's softmax.
An fp8 cache holds K / k_scale and V / v_scale (per-tensor scales, 1.0 unless the checkpoint
gives them: `set_kv_scales`); caches in the model's dtype ignore them.
A layer that shares another layer's KV cache (Gemma 4's last layers) is called with key and value
None on the other layer's `Attention` and cache: it rotates the query alone and writes nothing.
The runner binds each layer to its KV cache group (`kv_cache_group`: sliding-window layers have
block tables of their own); unbound layers use group 0, the only one of a model without windows.

The implementation (torch reference on CPU, Triton on CUDA) is picked once when the layer is built.
A kernel that takes the batch's host-side bounds (`max_query_len`, `max_seq_len`) gets them from the
metadata: with them the Triton path launches no prefill kernel for decode-only batches and sizes its
decode split count from a bound that stays fixed across CUDA graph replays.
"""

from __future__ import annotations

import inspect
import math
from typing import Protocol

import torch
from torch import nn

from paphos.attention.cache_spec import LayerCacheSpec
from paphos.attention.metadata import AttentionMetadata
from paphos.ops.registry import pick, pick_fast, pick_paged_attention


class Rotary(Protocol):
    """What the layer needs of a rotary embedding (paphos.layers.rotary.RotaryEmbedding)."""

    cos_sin_cache: torch.Tensor  # [max_position, rot_dim]
    head_size: int
    is_neox_style: bool

    def __call__(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        rotary_emb: Rotary | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        use_sinks: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or None)")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window} must be >= 1 (or None)")
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap={logits_soft_cap} must be > 0 (or None)")
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.kv_cache_group = 0  # set by the runner (ModelRunner.initialize_kv_cache)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        device_type = torch.empty(0).device.type
        self._write_kv_cache = pick("write_kv_cache", device_type)
        self.rotary_emb = rotary_emb  # the model's own module, shared (no weights)
        self._rotary_and_write_kv = None
        if rotary_emb is not None:
            self._rotary_and_write_kv = pick_fast("rotary_and_write_kv", device_type)
        self.use_sinks = use_sinks
        self._paged_attention = pick_paged_attention(
            device_type, head_size, sliding_window, logits_soft_cap, use_sinks, chunk_size
        )
        params = inspect.signature(self._paged_attention).parameters
        self._takes_bounds = "max_query_len" in params and "max_seq_len" in params
        self.k_scale = self.v_scale = 1.0
        self._kv_scales: dict[str, float] = {}  # given to the ops only when not 1.0
        self._limits: dict[str, float] = {}  # only this layer's features: plain calls unchanged
        if sliding_window is not None:
            self._limits["sliding_window"] = sliding_window
        if logits_soft_cap is not None:
            self._limits["soft_cap"] = logits_soft_cap
        if chunk_size is not None:
            self._limits["chunk_size"] = chunk_size

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        """An fp8 cache's per-tensor scales for this layer (the checkpoint's)."""
        for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a positive finite number")
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        self._kv_scales = {} if (k_scale, v_scale) == (1.0, 1.0) else scales

    def cache_spec(self) -> LayerCacheSpec:
        return LayerCacheSpec(
            "kv", self.num_kv_heads, self.head_size, sliding_window=self.sliding_window
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        positions: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query: [num_tokens, num_heads * head_size]; key/value: [num_tokens, num_kv_heads *
        head_size], or both None to attend over the cache as it is (a layer sharing another's);
        positions [num_tokens] when the layer has a rotary embedding; sinks [num_heads] when
        built with use_sinks. Returns [num_tokens, num_heads * head_size]."""
        if (sinks is None) == self.use_sinks:
            raise ValueError(
                f"this Attention layer was built with use_sinks={self.use_sinks}: pass sinks= "
                "exactly when it is set"
            )
        num_tokens = query.shape[0]
        slots, block_tables = attn_metadata.kv_group(self.kv_cache_group)
        if key is None or value is None:
            if key is not None or value is not None:
                raise ValueError("pass key and value both, or neither (a KV-sharing layer)")
            query = self._rotate_query(query, positions)
        else:
            query = self._rotate_and_write_kv(query, key, value, kv_cache, slots, positions)
        q = query.view(num_tokens, self.num_heads, self.head_size)
        bounds = {}
        if self._takes_bounds:
            bounds = {
                "max_query_len": attn_metadata.max_query_len,
                "max_seq_len": attn_metadata.max_seq_len,
            }
        out = self._paged_attention(
            q,
            kv_cache,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            block_tables,
            self.scale,
            **bounds,
            **self._limits,
            **self._kv_scales,
            **({} if sinks is None else {"sinks": sinks}),
        )  # [num_tokens, num_heads, head_size]
        return out.reshape(num_tokens, self.num_heads * self.head_size)

    def _rotate_query(self, query: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        rope = self.rotary_emb
        if rope is None:
            return query
        if positions is None:
            raise ValueError("this Attention layer has a rotary embedding: pass positions=")
        query, _ = rope(positions, query, query[:, : rope.head_size])  # one head as a dummy key
        return query

    def _rotate_and_write_kv(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rotate q and k (with a rotary embedding), write k and v to the cache slots [num_tokens];
        returns q."""
        rope = self.rotary_emb
        if rope is not None and positions is None:
            raise ValueError("this Attention layer has a rotary embedding: pass positions=")
        if rope is not None and self._rotary_and_write_kv is not None:
            return self._rotary_and_write_kv(
                positions,
                query,
                key,
                value,
                rope.cos_sin_cache,
                rope.head_size,
                rope.is_neox_style,
                kv_cache,
                slots,
                **self._kv_scales,
            )  # [num_tokens, num_heads * head_size]
        if rope is not None:
            query, key = rope(positions, query, key)
        shape = (query.shape[0], self.num_kv_heads, self.head_size)
        self._write_kv_cache(key.view(shape), value.view(shape), kv_cache, slots, **self._kv_scales)
        return query
