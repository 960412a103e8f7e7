"""The only way a model does attention: write this step's K/V into the paged cache, attend over it.

The implementation (torch reference on CPU, Triton on CUDA) is picked once when the layer is built.
A kernel that takes the batch's host-side bounds (`max_query_len`, `max_seq_len`) gets them from the
metadata: with them the Triton path launches no prefill kernel for decode-only batches and sizes its
decode split count from a bound that stays fixed across CUDA graph replays.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from paphos.attention.metadata import AttentionMetadata
from paphos.ops.registry import pick


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None
    ) -> None:
        super().__init__()
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
        self._paged_attention = pick("paged_attention", device_type)
        params = inspect.signature(self._paged_attention).parameters
        self._takes_bounds = "max_query_len" in params and "max_seq_len" in params

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """query: [num_tokens, num_heads * head_size]; key/value: [num_tokens, num_kv_heads *
        head_size]. Returns [num_tokens, num_heads * head_size]."""
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_size)
        k = key.view(num_tokens, self.num_kv_heads, self.head_size)
        v = value.view(num_tokens, self.num_kv_heads, self.head_size)
        self._write_kv_cache(k, v, kv_cache, attn_metadata.slot_mapping)
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
            attn_metadata.block_tables,
            self.scale,
            **bounds,
        )  # [num_tokens, num_heads, head_size]
        return out.reshape(num_tokens, self.num_heads * self.head_size)
