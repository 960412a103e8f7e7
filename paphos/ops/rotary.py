"""Rotary position embedding applied in place of a table lookup: cos/sin come from a precomputed
cache."""

from __future__ import annotations

import torch

from paphos.ops.kv_cache import write_kv_cache


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `rot_dim` dims of every head of query and key.

    positions: [num_tokens]; query: [num_tokens, num_heads * head_size];
    key: [num_tokens, num_kv_heads * head_size];
    cos_sin_cache: [max_position, rot_dim] (cos | sin halves).
    is_neox: rotate halves (GPT-NeoX/Llama style); else interleaved pairs (GPT-J style).
    """
    num_tokens = positions.shape[0]
    num_q_heads = query.shape[-1] // head_size
    cos_sin = cos_sin_cache.index_select(0, positions)  # [num_tokens, rot_dim]
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)  # [num_tokens, 1, rot_dim // 2] each
    # query and key heads rotated together: [num_tokens, num_heads + num_kv_heads, head_size]
    qk = torch.cat((query.view(num_tokens, -1, head_size), key.view(num_tokens, -1, head_size)), 1)
    rot_dim = cos.shape[-1] * 2
    x = qk[..., :rot_dim].float()
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rot_dim < head_size:
        rotated = torch.cat((rotated.to(qk.dtype), qk[..., rot_dim:]), dim=-1)
    out = rotated.to(qk.dtype)  # [num_tokens, num_heads + num_kv_heads, head_size]
    q_out, k_out = out.split([num_q_heads, out.shape[1] - num_q_heads], dim=1)
    return q_out.reshape(num_tokens, -1), k_out.reshape(num_tokens, -1)


def rotary_and_write_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """rotary_embedding, then write_kv_cache of the rotated keys and the values (value: [num_tokens,
    num_kv_heads * head_size]). Returns the rotated query [num_tokens, num_heads * head_size]."""
    q, k = rotary_embedding(positions, query, key, cos_sin_cache, head_size, is_neox)
    num_tokens = positions.shape[0]
    shape = (num_tokens, -1, head_size)
    write_kv_cache(k.view(shape), value.reshape(shape), kv_cache, slot_mapping, k_scale, v_scale)
    return q
