"""Attention over the paged KV cache for a mixed batch: prefill chunks (with cached context) and
decodes.

Sequence b owns query tokens query_start_loc[b]:query_start_loc[b+1]; its context (cached tokens
plus this step's, already written to the cache) is seq_lens[b] tokens long, stored in the blocks
block_tables[b]. Query token i of a sequence with q_len query tokens sits at position
seq_len - q_len + i and attends causally to context positions <= its own; with a sliding window w
only to the last w of them (positions > its own - w, as transformers' mask); with chunks of c
(Llama 4's chunked attention) only to those of its own chunk (positions >= its own - its own % c).
A soft-cap c bounds
every scaled score s as c * tanh(s / c) before the softmax (Gemma 2). Attention sinks (gpt-oss)
are one learned logit per head that joins each query's softmax and is then dropped: the weights
of the real keys sum to less than one. An fp8 cache holds K / k_scale and V / v_scale
(paphos.ops.kv_cache): they are upcast and multiplied back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from paphos.ops.kv_cache import FP8_DTYPES


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """query: [num_tokens, num_heads, head_size]; kv_cache: [2, num_blocks, block_size,
    num_kv_heads, head_size]; query_start_loc: [num_seqs + 1]; seq_lens: [num_seqs]; block_tables:
    [num_seqs, max_blocks]; sinks: [num_heads] logits; k_scale, v_scale: an fp8 cache's scales
    (float caches ignore them). Returns [num_tokens, num_heads, head_size].

    Computed in float32 whatever the cache dtype (CPUs without native bf16 run fp32 products faster,
    and the reference doubles as the test oracle)."""
    limits = _Limits(sliding_window, soft_cap, None if sinks is None else sinks.float(), chunk_size)
    if kv_cache.dtype in FP8_DTYPES and (k_scale, v_scale) != (1.0, 1.0):
        scales = torch.tensor([k_scale, v_scale], device=kv_cache.device).view(2, 1, 1, 1, 1)
        kv_cache = kv_cache.float() * scales  # [2, num_blocks, block_size, kv_heads, head]
    if query.shape[0] == seq_lens.shape[0]:  # one query token per sequence: a pure decode step
        return _decode_attention(query, kv_cache, seq_lens, block_tables, scale, limits)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    out = torch.empty_like(query)
    decode_seqs = [b for b, q_len in enumerate(q_lens) if q_len == 1]
    if decode_seqs:
        rows = torch.tensor([starts[b] for b in decode_seqs], device=query.device)
        out[rows] = _decode_attention(
            query[rows], kv_cache, seq_lens[decode_seqs], block_tables[decode_seqs], scale, limits
        )
    for b, q_len in enumerate(q_lens):
        if q_len > 1:
            s, e = starts[b], starts[b + 1]
            out[s:e] = _prefill_attention(
                query[s:e], kv_cache, lens[b], block_tables[b], scale, limits
            )
    return out


class _Limits(NamedTuple):
    """What bounds a query's scores besides causality: a sliding window, a soft-cap, sinks."""

    sliding_window: int | None
    soft_cap: float | None
    sinks: torch.Tensor | None = None  # [num_heads] float32
    chunk_size: int | None = None

    def first_visible(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The first key position each query position sees (None: 0 for all)."""
        first = None
        if self.sliding_window is not None:
            first = positions - self.sliding_window + 1
        if self.chunk_size is not None:
            start = positions - positions % self.chunk_size
            first = start if first is None else torch.maximum(first, start)
        return first

    def cap(self, scores: torch.Tensor) -> torch.Tensor:
        if self.soft_cap is None:
            return scores
        return torch.tanh(scores / self.soft_cap) * self.soft_cap

    def softmax(self, scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
        """Softmax over the last dim; `sinks` (broadcast to scores[..., :1]) join and leave."""
        if sinks is None:
            return scores.softmax(dim=-1)
        sink = sinks.expand(*scores.shape[:-1], 1)
        return torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence's first num_tokens positions: [num_tokens, num_kv_heads,
    head_size]."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-num_tokens // block_size)
    blocks = block_table[:num_blocks]
    k = kv_cache[0, blocks].flatten(0, 1)[:num_tokens]  # [num_tokens, num_kv_heads, head_size]
    v = kv_cache[1, blocks].flatten(0, 1)[:num_tokens]
    return k, v


def _prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_len: int,
    block_table: torch.Tensor,
    scale: float,
    limits: _Limits,
) -> torch.Tensor:
    q_len = query.shape[0]
    k, v = gather_context(kv_cache, block_table, seq_len)
    q = query.float().transpose(0, 1)  # [num_heads, q_len, head_size]
    k, v = (
        k.float().transpose(0, 1),
        v.float().transpose(0, 1),
    )  # [num_kv_heads, seq_len, head_size]
    plain = all(limit is None for limit in limits)
    if q_len == seq_len and plain:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(0, 1).to(query.dtype)  # [q_len, num_heads, head_size]
    positions = torch.arange(seq_len - q_len, seq_len, device=query.device)  # [q_len]
    keys = torch.arange(seq_len, device=query.device)[None, :]  # [1, seq_len]
    mask = keys <= positions[:, None]  # [q_len, seq_len]
    first = limits.first_visible(positions)  # [q_len] or None
    if first is not None:
        mask &= keys >= first[:, None]
    if limits.soft_cap is None and limits.sinks is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [heads, len, head]
        scores = limits.cap(torch.matmul(q, k.transpose(1, 2)) * scale)  # [heads, q_len, len]
        sinks = None if limits.sinks is None else limits.sinks[:, None, None]  # [heads, 1, 1]
        o = torch.matmul(limits.softmax(scores.masked_fill(~mask, float("-inf")), sinks), v)
    return o.transpose(0, 1).to(query.dtype)  # [q_len, num_heads, head_size]


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    limits: _Limits,
) -> torch.Tensor:
    """One query token per sequence, batched: pad every context to the longest and mask the rest."""
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    blocks = block_tables  # [num_seqs, max_blocks]: columns past a sequence's end are masked
    # [num_seqs, num_blocks * block_size, num_kv_heads, head_size]
    k = kv_cache[0, blocks].flatten(1, 2).float()
    v = kv_cache[1, blocks].flatten(1, 2).float()
    q = query.float().view(num_seqs, num_kv_heads, group, head_size)
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * scale  # [num_seqs, kv_heads, group, len]
    scores = limits.cap(scores)
    keys = torch.arange(k.shape[1], device=query.device)[None, :]  # [1, len]
    padded = keys >= seq_lens[:, None]  # [num_seqs, len]
    first = limits.first_visible(seq_lens - 1)  # [num_seqs] or None
    if first is not None:
        padded |= keys < first[:, None]
    scores.masked_fill_(padded[:, None, None, :], float("-inf"))
    sinks = None if limits.sinks is None else limits.sinks.view(num_kv_heads, group, 1)
    probs = limits.softmax(scores, sinks)
    o = torch.matmul(probs, v.transpose(1, 2))  # [num_seqs, num_kv_heads, group, head_size]
    return o.reshape(num_seqs, num_heads, head_size).to(query.dtype)
