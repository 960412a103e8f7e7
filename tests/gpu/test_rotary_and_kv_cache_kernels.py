"""Triton rotary embedding and KV cache write against their paphos.ops references."""

from __future__ import annotations

import math

import pytest
import torch

from paphos.ops.kv_cache import write_kv_cache as ref_write_kv_cache
from paphos.ops.rotary import rotary_and_write_kv as ref_rotary_and_write_kv
from paphos.ops.rotary import rotary_embedding as ref_rotary_embedding
from tests.gpu.conftest import TOLERANCE, rel_error

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


def llama3_cos_sin_cache(rot_dim: int, max_position: int, base: float) -> torch.Tensor:
    """cos | sin table with Llama 3.1 frequency scaling (factor 8, low 1, high 4, original 8192)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)  # [half]
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    wavelen = 2 * math.pi / inv_freq  # [half]
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)  # [half]
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq  # [half]
    scaled = torch.where(wavelen < original / high, inv_freq, scaled)
    scaled = torch.where(wavelen > original / low, inv_freq / factor, scaled)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), scaled)  # [pos, half]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()  # [max_position, rot_dim]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (128, 128), (256, 256), (128, 64)])
def test_rotary_matches_reference_with_llama3_scaling(device, dtype, is_neox, head_size, rot_dim):
    from paphos.kernels.rotary import rotary_embedding

    num_tokens, num_heads, num_kv_heads, max_position = 11, 8, 2, 4096
    cache = llama3_cos_sin_cache(rot_dim, max_position, 500000.0).to(device)  # [pos, rot_dim]
    positions = torch.randint(0, max_position, (num_tokens,), device=device)  # [num_tokens]
    qkv_width = (num_heads + 2 * num_kv_heads) * head_size
    qkv = torch.randn(num_tokens, qkv_width, device=device).to(dtype)  # [num_tokens, qkv_width]
    # Strided views of a fused qkv projection, as the attention layer passes them.
    query = qkv[:, : num_heads * head_size]  # [num_tokens, num_heads * head_size]
    key = qkv[:, num_heads * head_size : (num_heads + num_kv_heads) * head_size]
    q_out, k_out = rotary_embedding(positions, query, key, cache, head_size, is_neox)
    q_ref, k_ref = ref_rotary_embedding(positions, query, key, cache, head_size, is_neox)
    assert q_out.shape == q_ref.shape and k_out.shape == k_ref.shape
    assert rel_error(q_out, q_ref) < TOLERANCE[dtype]
    assert rel_error(k_out, k_ref) < TOLERANCE[dtype]
    if rot_dim < head_size:  # the dims past rot_dim pass through untouched
        q_heads = q_out.view(num_tokens, num_heads, head_size)  # [num_tokens, heads, head_size]
        in_heads = query.reshape(num_tokens, num_heads, head_size)
        assert torch.equal(q_heads[..., rot_dim:], in_heads[..., rot_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (128, 128), (256, 256), (128, 64)])
def test_fused_rotary_and_kv_write_matches_rotary_then_write(
    device, dtype, is_neox, head_size, rot_dim
):
    from paphos.kernels.rotary import rotary_and_write_kv

    num_tokens, num_heads, num_kv_heads, max_position, block_size, num_blocks = (
        13,
        8,
        2,
        4096,
        16,
        6,
    )
    cache = llama3_cos_sin_cache(rot_dim, max_position, 500000.0).to(device)  # [pos, rot_dim]
    positions = torch.randint(0, max_position, (num_tokens,), device=device)  # [num_tokens]
    qkv_width = (num_heads + 2 * num_kv_heads) * head_size
    qkv = torch.randn(num_tokens, qkv_width, device=device).to(dtype)  # [num_tokens, qkv_width]
    q_end, k_end = num_heads * head_size, (num_heads + num_kv_heads) * head_size
    query, key, value = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]  # strided views
    # [2, num_blocks, block_size, num_kv_heads, head_size], filled so untouched slots show
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, device=device)
    kv_cache = kv_cache.to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]  # [num_tokens]
    slots[3] = -1  # padding: nothing written
    expected = kv_cache.clone()
    valid = slots >= 0
    q_ref = ref_rotary_and_write_kv(
        positions[valid],
        query[valid],
        key[valid],
        value[valid],
        cache,
        head_size,
        is_neox,
        expected,
        slots[valid],
    )
    q_out = rotary_and_write_kv(
        positions, query, key, value, cache, head_size, is_neox, kv_cache, slots
    )
    assert rel_error(q_out[valid], q_ref) < TOLERANCE[dtype]
    assert rel_error(kv_cache, expected) < TOLERANCE[dtype]
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[valid]] = False
    flat, flat_expected = (
        kv_cache.view(2, -1, num_kv_heads, head_size),
        expected.view(2, -1, num_kv_heads, head_size),
    )
    assert torch.equal(flat[:, untouched], flat_expected[:, untouched])  # bitwise: not rewritten
    assert torch.equal(flat[1, slots[valid]], value[valid].reshape(-1, num_kv_heads, head_size))


def test_rotary_rejects_rot_dim_wider_than_head(device):
    from paphos.kernels.rotary import rotary_embedding

    cache = torch.randn(16, 128, device=device)  # [16, 128]
    q = torch.randn(2, 64, device=device)  # [2, 64]
    with pytest.raises(ValueError, match="rot_dim=128"):
        rotary_embedding(torch.zeros(2, dtype=torch.long, device=device), q, q, cache, 64, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_size", [(1, 64), (8, 128), (2, 256)])
def test_write_kv_cache_matches_reference(device, dtype, block_size, num_kv_heads, head_size):
    from paphos.kernels.kv_cache import write_kv_cache

    num_blocks, num_tokens = 6, 37
    # [2, num_blocks, block_size, num_kv_heads, head_size]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, device=device).to(dtype)
    ref_cache = cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]  # [num_tokens]
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_size, device=device).to(dtype)
    key, value = kv[:, 0], kv[:, 1]  # strided [num_tokens, num_kv_heads, head_size] views
    write_kv_cache(key, value, cache, slots)
    ref_write_kv_cache(key, value, ref_cache, slots)
    assert torch.equal(cache, ref_cache)


def test_write_kv_cache_skips_negative_slots(device):
    from paphos.kernels.kv_cache import write_kv_cache

    cache = torch.randn(2, 2, 16, 1, 64, device=device)  # [2, 2, 16, 1, 64]
    before = cache.clone()
    key = torch.randn(3, 1, 64, device=device)  # [3, 1, 64]
    write_kv_cache(key, key, cache, torch.tensor([5, -1, 20], device=device))
    flat, flat_before = cache.view(2, 32, 64), before.view(2, 32, 64)  # [2, slots, 64]
    for slot, token in ((5, 0), (20, 2)):
        assert torch.equal(flat[0, slot], key[token, 0])
        assert torch.equal(flat[1, slot], key[token, 0])
    untouched = [s for s in range(32) if s not in (5, 20)]
    assert torch.equal(flat[:, untouched], flat_before[:, untouched])


def test_write_kv_cache_rejects_mismatched_slots(device):
    from paphos.kernels.kv_cache import write_kv_cache

    cache = torch.randn(2, 2, 16, 1, 64, device=device)  # [2, 2, 16, 1, 64]
    key = torch.randn(3, 1, 64, device=device)  # [3, 1, 64]
    with pytest.raises(ValueError, match="slot_mapping has 2 slots for 3 tokens"):
        write_kv_cache(key, key, cache, torch.tensor([0, 1], device=device))
