"""Multi-head latent attention (MLA: DeepSeek V2/V3) over the paged latent cache.

Cache per layer: [num_blocks, block_size, kv_lora_rank + rope_dim]: per token the normed latent c
then the rotated key k_pe shared by all heads. Head h's key is [c @ W_UK[h]^T | k_pe] and its value
c @ W_UV[h]^T, where w_kv_b [num_heads, nope_dim + v_dim, kv_lora_rank] is kv_b_proj's weight by
head (W_UK its first nope_dim rows, W_UV the rest).

Decode absorbs the up-projections: q_h . k_h = (q_nope_h @ W_UK[h]) . c + q_pe_h . k_pe, so the
query [q_nope_h @ W_UK[h] | q_pe_h] attends to the cache rows themselves (one shared "head", MQA
with head size rank + rope and values the first rank of them), and o_h = (p . c) @ W_UV[h]^T.
Prefill expands the context into per-head keys and values (cheaper when many queries share it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SCORES = 1 << 27  # expanded prefill: float32 scores held at once (512 MiB)


def write_latent_cache(
    latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """latent: [num_tokens, kv_lora_rank]; k_pe: [num_tokens, rope_dim] (rotated); slot_mapping:
    [num_tokens] int64. A negative slot (a padded CUDA graph row) is skipped."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])  # [num_slots, kv_lora_rank + rope_dim]
    rows = torch.cat([latent, k_pe], dim=-1).to(kv_cache.dtype)  # [num_tokens, rank + rope]
    keep = slot_mapping >= 0  # [num_tokens]
    if not bool(keep.all()):
        rows, slot_mapping = rows[keep], slot_mapping[keep]
    flat.index_copy_(0, slot_mapping, rows)


def mla_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    latent_dim: int,
) -> torch.Tensor:
    """The absorbed form, one query token per sequence: query [num_seqs, num_heads, rank + rope]
    against the cache rows of each sequence's seq_lens[b] positions; values are the rows' first
    latent_dim (= kv_lora_rank) values. Returns the latent outputs [num_seqs, num_heads,
    latent_dim], in float32 arithmetic, the query's dtype."""
    rows = kv_cache[block_tables].flatten(1, 2).float()  # [num_seqs, max_len, rank + rope]
    scores = torch.matmul(query.float(), rows.transpose(1, 2)) * scale  # [num_seqs, heads, len]
    keys = torch.arange(rows.shape[1], device=query.device)[None, :]  # [1, max_len]
    scores.masked_fill_((keys >= seq_lens[:, None])[:, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), rows[..., :latent_dim])  # [num_seqs, heads, rank]
    return out.to(query.dtype)


def absorb_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_kv_b: torch.Tensor) -> torch.Tensor:
    """[q_nope @ W_UK | q_pe]: q_nope [num_tokens, heads, nope], q_pe [num_tokens, heads, rope]
    -> [num_tokens, heads, rank + rope]."""
    w_uk = w_kv_b[:, : q_nope.shape[-1]]  # [heads, nope, rank]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk.to(q_nope.dtype))  # [heads, tokens, rank]
    return torch.cat([q_latent.transpose(0, 1), q_pe], dim=-1)


def unabsorb_output(out_latent: torch.Tensor, w_kv_b: torch.Tensor, v_dim: int) -> torch.Tensor:
    """o_h = o_latent_h @ W_UV[h]^T: [num_tokens, heads, rank] -> [num_tokens, heads, v_dim]."""
    w_uv = w_kv_b[:, w_kv_b.shape[1] - v_dim :].to(out_latent.dtype)  # [heads, v_dim, rank]
    return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


def mla_expanded_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_len: int,
    block_table: torch.Tensor,
    w_kv_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The expanded form for one sequence's q_len query tokens (the last q_len of its seq_len
    positions, causal): its context's latents up-projected to per-head keys and values.
    q_nope [q_len, heads, nope], q_pe [q_len, heads, rope]. Returns [q_len, heads, v_dim]."""
    q_len, num_heads, nope = q_nope.shape
    rank = w_kv_b.shape[2]
    block_size = kv_cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)]
    rows = kv_cache[blocks].flatten(0, 1)[:seq_len].float()  # [seq_len, rank + rope]
    kv = torch.matmul(rows[:, :rank], w_kv_b.float().flatten(0, 1).t())  # [len, heads*(nope+v)]
    kv = kv.view(seq_len, num_heads, -1).transpose(0, 1)  # [heads, seq_len, nope + v]
    k_pe = rows[:, rank:].expand(num_heads, -1, -1)  # [heads, seq_len, rope]
    k = torch.cat([kv[..., :nope], k_pe], dim=-1)  # [heads, seq_len, nope + rope]
    v = kv[..., nope:]  # [heads, seq_len, v_dim]
    q = torch.cat([q_nope, q_pe], dim=-1).float().transpose(0, 1)  # [heads, q_len, nope + rope]
    out = torch.empty(num_heads, q_len, v.shape[-1], device=q.device)  # [heads, q_len, v_dim]
    keys = torch.arange(seq_len, device=q.device)[None, :]  # [1, seq_len]
    # queries in blocks: at most MAX_SCORES scores at once, whatever backend SDPA picks
    step = max(1, MAX_SCORES // (num_heads * seq_len))
    for start in range(0, q_len, step):
        end = min(start + step, q_len)
        positions = torch.arange(seq_len - q_len + start, seq_len - q_len + end, device=q.device)
        mask = keys <= positions[:, None]  # [block, seq_len]
        out[:, start:end] = F.scaled_dot_product_attention(
            q[:, start:end], k, v, attn_mask=mask, scale=scale
        )  # [heads, block, v_dim]
    return out.transpose(0, 1).to(q_nope.dtype)  # [q_len, heads, v_dim]
