"""Rotary position embedding applied in place of a table lookup: cos/sin come from a precomputed
cache."""

from __future__ import annotations

import torch


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
    cos_sin = cos_sin_cache.index_select(0, positions)  # [num_tokens, rot_dim]
    cos, sin = cos_sin.chunk(2, dim=-1)  # [num_tokens, rot_dim // 2] each
    return _rotate(query, cos, sin, head_size, is_neox), _rotate(key, cos, sin, head_size, is_neox)


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int, is_neox: bool
) -> torch.Tensor:
    num_tokens = x.shape[0]
    x = x.view(num_tokens, -1, head_size)  # [num_tokens, heads, head_size]
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()  # [num_tokens, 1, rot_dim // 2]
    if is_neox:
        x1, x2 = x_rot.chunk(2, dim=-1)
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        rotated = torch.cat((o1, o2), dim=-1)
    else:
        rotated = torch.stack((o1, o2), dim=-1).flatten(-2)
    out = torch.cat((rotated.to(x.dtype), x_pass), dim=-1)  # [num_tokens, heads, head_size]
    return out.reshape(num_tokens, -1)
