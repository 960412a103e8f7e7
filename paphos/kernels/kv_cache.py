"""Triton KV cache write: one program per token copies its keys and values into its slot.

Cache layout [2, num_blocks, block_size, num_kv_heads, head_size]; slot = block * block_size +
offset. A negative slot (padding in a captured CUDA graph) is skipped. An fp8 cache (e4m3 or
e5m2) stores each value divided by its per-tensor scale, saturated to the type's largest finite
value (a plain cast past it would be NaN / inf), as paphos.ops.kv_cache does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim, check_float_dtype, check_same_device
from paphos.kernels.pdl import pdl_options, pdl_prologue

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(cache_dtype: torch.dtype) -> float:
    """The FP8_MAX constexpr of a cache dtype: its largest finite value, 0.0 for float caches."""
    return float(torch.finfo(cache_dtype).max) if cache_dtype in FP8_DTYPES else 0.0


@triton.jit
def to_cache(x, inv_scale, dst_ty: tl.constexpr, FP8_MAX: tl.constexpr):
    """A K/V tile as the cache stores it: cast, or (FP8_MAX > 0) divided by the scale (times its
    inverse), saturated in float32 and rounded to the fp8 type."""
    if FP8_MAX > 0:
        x = tl.clamp(x.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
    return x.to(dst_ty)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv,
    stride_slot,
    num_kv_heads,
    inv_k_scale,
    inv_v_scale,
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
        dims = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
        mask = (heads < num_kv_heads) & (dims < HEAD_SIZE)
        dst = cache_ptr + slot * stride_slot + heads * HEAD_SIZE + dims
        k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
        cache_ty = cache_ptr.dtype.element_ty
        tl.store(dst, to_cache(k, inv_k_scale, cache_ty, FP8_MAX), mask=mask)
        tl.store(dst + stride_kv, to_cache(v, inv_v_scale, cache_ty, FP8_MAX), mask=mask)


def check_kv_write(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    check_dim("key", key, 3)
    check_dim("value", value, 3)
    check_dim("kv_cache", kv_cache, 5)
    check_dim("slot_mapping", slot_mapping, 1)
    check_float_dtype("key", key)
    check_float_dtype("value", value)
    if kv_cache.dtype not in FP8_DTYPES:
        check_float_dtype("kv_cache", kv_cache)
    check_same_device(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    if kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != tuple(key.shape[1:]):
        raise ValueError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not match key heads "
            f"{tuple(key.shape[1:])}; expected [2, num_blocks, block_size, num_kv_heads, head_size]"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} tokens"
        )
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping has dtype {slot_mapping.dtype}; expected int32 or int64")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """key, value: [num_tokens, num_kv_heads, head_size]; as paphos.ops.kv_cache.write_kv_cache
    (k_scale, v_scale: an fp8 cache's per-tensor scales)."""
    check_kv_write(key, value, kv_cache, slot_mapping)
    num_tokens, num_kv_heads, head_size = key.shape
    if key.stride(2) != 1:
        key = key.contiguous()  # [num_tokens, num_kv_heads, head_size]
    if value.stride(2) != 1:
        value = value.contiguous()  # [num_tokens, num_kv_heads, head_size]
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        num_kv_heads * head_size,
        num_kv_heads,
        1.0 / k_scale,
        1.0 / v_scale,
        HEAD_SIZE=head_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_size),
        FP8_MAX=fp8_max(kv_cache.dtype),
        num_warps=4,
        **pdl_options(key.device),
    )
