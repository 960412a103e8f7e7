"""Triton rotary embedding: one program per token rotates all query and key heads, cos/sin once;
`rotary_and_write_kv` also writes the rotated keys and the values into the paged KV cache in the
same launch (one kernel per layer fewer than rotary + paphos.kernels.kv_cache).

Writes new tensors (the reference does not modify its inputs); dims past rot_dim are copied through.
neox style rotates the halves of the first rot_dim dims, gptj style interleaved pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim, check_float_dtype, check_same_device
from paphos.kernels.kv_cache import check_kv_write, fp8_max, to_cache
from paphos.kernels.pdl import pdl_options, pdl_prologue


@triton.jit
def _rotate_heads(
    src,
    dst,
    num_heads,
    cos,
    sin,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    inv_scale=1.0,
    FP8_MAX: tl.constexpr = 0.0,
):
    """Rotate the heads of one token row: src and dst point at the row's first head. FP8_MAX > 0:
    dst is an fp8 cache (paphos.kernels.kv_cache.to_cache), the rotated values rounded to src's
    dtype first, as the unfused rotary + write do."""
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    pairs = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = (heads < num_heads) & (pairs < HALF)
    if IS_NEOX:
        i1 = pairs
        i2 = pairs + HALF
    else:
        i1 = pairs * 2
        i2 = pairs * 2 + 1
    src = src + heads * HEAD_SIZE
    dst = dst + heads * HEAD_SIZE
    x1 = tl.load(src + i1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2, mask=mask, other=0.0).to(tl.float32)
    out_type = dst.dtype.element_ty
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if FP8_MAX > 0:
        y1, y2 = y1.to(src.dtype.element_ty), y2.to(src.dtype.element_ty)
    tl.store(dst + i1, to_cache(y1, inv_scale, out_type, FP8_MAX), mask=mask)
    tl.store(dst + i2, to_cache(y2, inv_scale, out_type, FP8_MAX), mask=mask)
    if BLOCK_PASS > 0:
        rest = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]  # [1, BLOCK_PASS]
        pass_mask = (heads < num_heads) & (rest < HEAD_SIZE)
        kept = to_cache(tl.load(src + rest, mask=pass_mask), inv_scale, out_type, FP8_MAX)
        tl.store(dst + rest, kept, mask=pass_mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    q_out_ptr,
    k_out_ptr,
    v_ptr,
    kv_cache_ptr,
    slot_ptr,
    stride_q,
    stride_k,
    stride_q_out,
    stride_k_out,
    stride_v,
    stride_cache,
    stride_kv,
    num_q_heads,
    num_k_heads,
    inv_k_scale,
    inv_v_scale,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    WRITE_KV: tl.constexpr,  # rotated keys and the values go to the paged cache, not k_out
    FP8_MAX: tl.constexpr,  # > 0: the cache is fp8 (paphos.kernels.kv_cache.to_cache)
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    cos = tl.load(cache_ptr + pos * stride_cache + pairs, mask=pairs < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + pairs, mask=pairs < HALF, other=0.0)
    cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_q,
        q_out_ptr + token * stride_q_out,
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
    # keys: rotated into k_out, or (WRITE_KV) into their cache slot with the values beside them
    k_dst = k_out_ptr + token * stride_k_out
    write = True
    if WRITE_KV:
        # slot = block * block_size + offset; its row of kv heads is contiguous in the cache
        slot = tl.load(slot_ptr + token).to(tl.int64)
        k_dst = kv_cache_ptr + slot * num_k_heads * HEAD_SIZE
        write = slot >= 0  # a negative slot is padding (captured CUDA graphs): nothing is written
    if write:
        _rotate_heads(
            k_ptr + token * stride_k,
            k_dst,
            num_k_heads,
            cos,
            sin,
            HEAD_SIZE,
            HALF,
            IS_NEOX,
            BLOCK_KH,
            BLOCK_HALF,
            BLOCK_PASS,
            inv_k_scale,
            FP8_MAX,
        )
        if WRITE_KV:
            heads = tl.arange(0, BLOCK_KH)[:, None]  # [BLOCK_KH, 1]
            dims = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
            mask = (heads < num_k_heads) & (dims < HEAD_SIZE)
            v = tl.load(v_ptr + token * stride_v + heads * HEAD_SIZE + dims, mask=mask)
            dst = k_dst + stride_kv + heads * HEAD_SIZE + dims
            v = to_cache(v, inv_v_scale, kv_cache_ptr.dtype.element_ty, FP8_MAX)
            tl.store(dst, v, mask=mask)


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
    k = key if key.stride(1) == 1 else key.contiguous()  # [num_tokens, num_kv_heads * head_size]
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [num_tokens, k width]
    q_out = _launch(positions, query, k, k_out, None, None, None, cos_sin_cache, head_size, is_neox)
    return q_out, k_out


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
    """Same contract as paphos.ops.rotary.rotary_and_write_kv: one launch rotates query and key
    and writes the rotated keys and the values into their cache slots (the rotated keys are not
    returned: attention reads them from the cache; an fp8 cache as paphos.kernels.kv_cache
    writes it). Returns the rotated query."""
    _check(positions, query, key, cos_sin_cache, head_size)
    num_tokens, num_kv_heads = key.shape[0], key.shape[1] // head_size
    check_kv_write(
        key.view(num_tokens, num_kv_heads, head_size),
        value.view(num_tokens, num_kv_heads, head_size),
        kv_cache,
        slot_mapping,
    )
    k = key if key.stride(1) == 1 else key.contiguous()  # [num_tokens, num_kv_heads * head_size]
    v = value if value.stride(1) == 1 else value.contiguous()  # [num_tokens, kv width]
    return _launch(
        positions, query, k, None, v, kv_cache, slot_mapping, cos_sin_cache, head_size, is_neox,
        (k_scale, v_scale),
    )  # fmt: skip


def _launch(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    key_out: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """One program per token; keys to key_out, or with the values to kv_cache when it is given
    (kv_scales: an fp8 cache's K and V scales). Returns the rotated query."""
    q = query if query.stride(1) == 1 else query.contiguous()  # [num_tokens, heads * head_size]
    cache = cos_sin_cache.contiguous()  # [max_position, rot_dim]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, q width]
    num_q_heads, num_k_heads = q.shape[1] // head_size, key.shape[1] // head_size
    half = cache.shape[1] // 2
    num_pass = head_size - 2 * half
    write_kv = kv_cache is not None
    unused = q_out  # pointer arguments the variant does not touch
    if positions.shape[0] > 0:
        _rotary_kernel[(positions.shape[0],)](
            positions,
            q,
            key,
            cache,
            q_out,
            key_out if key_out is not None else unused,
            value if value is not None else unused,
            kv_cache if write_kv else unused,
            slot_mapping if slot_mapping is not None else positions,
            q.stride(0),
            key.stride(0),
            q_out.stride(0),
            key_out.stride(0) if key_out is not None else 0,
            value.stride(0) if value is not None else 0,
            cache.stride(0),
            kv_cache.stride(0) if write_kv else 0,
            num_q_heads,
            num_k_heads,
            1.0 / kv_scales[0],
            1.0 / kv_scales[1],
            HEAD_SIZE=head_size,
            HALF=half,
            IS_NEOX=is_neox,
            WRITE_KV=write_kv,
            FP8_MAX=fp8_max(kv_cache.dtype) if write_kv else 0.0,
            BLOCK_QH=triton.next_power_of_2(num_q_heads),
            BLOCK_KH=triton.next_power_of_2(num_k_heads),
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_PASS=triton.next_power_of_2(num_pass) if num_pass else 0,
            BLOCK_D=triton.next_power_of_2(head_size),
            num_warps=4,
            **pdl_options(q.device),
        )
    return q_out
