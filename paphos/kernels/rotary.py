"""Triton rotary embedding: one program per token rotates all query and key heads, cos/sin once.

Writes new tensors (the reference does not modify its inputs); dims past rot_dim are copied through.
neox style rotates the halves of the first rot_dim dims, gptj style interleaved pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim, check_float_dtype, check_same_device


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    token,
    num_heads,
    cos,
    sin,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    pairs = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = (heads < num_heads) & (pairs < HALF)
    if IS_NEOX:
        i1 = pairs
        i2 = pairs + HALF
    else:
        i1 = pairs * 2
        i2 = pairs * 2 + 1
    src = x_ptr + token * stride_x + heads * HEAD_SIZE
    dst = out_ptr + token * stride_out + heads * HEAD_SIZE
    x1 = tl.load(src + i1, mask=mask, other=0.0)
    x2 = tl.load(src + i2, mask=mask, other=0.0).to(tl.float32)
    x1f = x1.to(tl.float32)
    tl.store(dst + i1, (x1f * cos - x2 * sin).to(x1.dtype), mask=mask)
    tl.store(dst + i2, (x2 * cos + x1f * sin).to(x1.dtype), mask=mask)
    if BLOCK_PASS > 0:
        rest = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]  # [1, BLOCK_PASS]
        pass_mask = (heads < num_heads) & (rest < HEAD_SIZE)
        tl.store(dst + rest, tl.load(src + rest, mask=pass_mask), mask=pass_mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_q,
    stride_k,
    stride_q_out,
    stride_k_out,
    stride_cache,
    num_q_heads,
    num_k_heads,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    cos = tl.load(cache_ptr + pos * stride_cache + pairs, mask=pairs < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + pairs, mask=pairs < HALF, other=0.0)
    cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        stride_q,
        stride_q_out,
        token,
        num_q_heads,
        cos,
        sin,
        HEAD_SIZE,
        HALF,
        IS_NEOX,
        BLOCK_QH,
        BLOCK_HALF,
        BLOCK_PASS,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        stride_k,
        stride_k_out,
        token,
        num_k_heads,
        cos,
        sin,
        HEAD_SIZE,
        HALF,
        IS_NEOX,
        BLOCK_KH,
        BLOCK_HALF,
        BLOCK_PASS,
    )


def _check(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cache: torch.Tensor,
    head_size: int,
) -> None:
    check_dim("positions", positions, 1)
    check_dim("query", query, 2)
    check_dim("key", key, 2)
    check_dim("cos_sin_cache", cache, 2)
    check_float_dtype("query", query)
    check_float_dtype("key", key)
    check_float_dtype("cos_sin_cache", cache)
    check_same_device(positions=positions, query=query, key=key, cos_sin_cache=cache)
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions has dtype {positions.dtype}; expected int32 or int64")
    if head_size <= 0 or query.shape[1] % head_size or key.shape[1] % head_size:
        raise ValueError(
            f"head_size={head_size} does not divide query width {query.shape[1]} "
            f"and key width {key.shape[1]}"
        )
    rot_dim = cache.shape[1]
    if rot_dim % 2 or rot_dim > head_size:
        raise ValueError(
            f"cos_sin_cache rot_dim={rot_dim} must be even and <= head_size={head_size}"
        )
    if query.shape[0] != positions.shape[0] or key.shape[0] != positions.shape[0]:
        raise ValueError(
            f"positions ({positions.shape[0]}), query ({query.shape[0]}) and key "
            f"({key.shape[0]}) must have the same number of tokens"
        )


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as paphos.ops.rotary.rotary_embedding; returns new (query, key)."""
    _check(positions, query, key, cos_sin_cache, head_size)
    q = query if query.stride(1) == 1 else query.contiguous()  # [num_tokens, num_heads * head_size]
    k = key if key.stride(1) == 1 else key.contiguous()  # [num_tokens, num_kv_heads * head_size]
    cache = cos_sin_cache.contiguous()  # [max_position, rot_dim]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, q width]
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [num_tokens, k width]
    num_q_heads, num_k_heads = q.shape[1] // head_size, k.shape[1] // head_size
    half = cache.shape[1] // 2
    num_pass = head_size - 2 * half
    if positions.shape[0] > 0:
        _rotary_kernel[(positions.shape[0],)](
            positions,
            q,
            k,
            cache,
            q_out,
            k_out,
            q.stride(0),
            k.stride(0),
            q_out.stride(0),
            k_out.stride(0),
            cache.stride(0),
            num_q_heads,
            num_k_heads,
            HEAD_SIZE=head_size,
            HALF=half,
            IS_NEOX=is_neox,
            BLOCK_QH=triton.next_power_of_2(num_q_heads),
            BLOCK_KH=triton.next_power_of_2(num_k_heads),
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_PASS=triton.next_power_of_2(num_pass) if num_pass else 0,
            num_warps=4,
        )
    return q_out, k_out
