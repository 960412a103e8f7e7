"""Triton gated delta rule decode step: one program per (sequence, value head, block of value
columns); q and k are L2-normalised in the program, its [k_head_dim, block] slice of the float32
state decays, takes the delta-rule update and is written back, o = S^T q. Prompt chunks run the
reference (paphos.ops.gated_delta_rule). No host sync on the decode path: CUDA graphs capture
it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim
from paphos.ops.gated_delta_rule import gated_delta_rule as reference_gated_delta_rule


@triton.jit
def _gdn_update_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, states_ptr, indices_ptr, initial_ptr, o_ptr,
    stride_qk_seq, stride_qk_head, stride_v_seq, stride_v_head, stride_g, stride_slot,
    stride_state_head, scale,
    DK: tl.constexpr, DV: tl.constexpr, V_PER_K: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    vcols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
    krows = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    k_mask, v_mask = krows < DK, vcols < DV
    mask = k_mask[:, None] & v_mask[None, :]
    slot = tl.load(indices_ptr + seq).to(tl.int64)
    keep = tl.load(initial_ptr + seq).to(tl.float32)
    k_head = head // V_PER_K
    qk_off = seq * stride_qk_seq + k_head * stride_qk_head + krows
    q = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    v_off = seq * stride_v_seq + head * stride_v_head + vcols
    v = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + seq * stride_g + head).to(tl.float32)
    beta = tl.load(beta_ptr + seq * stride_g + head).to(tl.float32)
    state_ptrs = states_ptr + slot * stride_slot + head * stride_state_head
    state_ptrs += krows[:, None] * DV + vcols[None, :]  # [BLOCK_K, BLOCK_V]
    state = tl.load(state_ptrs, mask=mask, other=0.0) * keep * tl.exp(g)
    predicted = tl.sum(state * k[:, None], axis=0)  # [BLOCK_V]
    state += k[:, None] * ((v - predicted) * beta)[None, :]
    tl.store(state_ptrs, state, mask=mask)
    out = tl.sum(state * q[:, None], axis=0)  # [BLOCK_V]
    tl.store(o_ptr + v_off, out.to(o_ptr.dtype.element_ty), mask=v_mask)


def gated_delta_rule_update(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_states: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
) -> torch.Tensor:
    """One token per sequence. q, k [n, Hk, Dk] (raw); v [n, Hv, Dv]; g, beta [n, Hv];
    recurrent_states [num_slots, Hv, Dk, Dv] float32, updated at state_indices."""
    check_dim("q", q, 3)
    check_dim("recurrent_states", recurrent_states, 4)
    n, num_k_heads, dk = q.shape
    num_v_heads, dv = v.shape[1], v.shape[2]
    expected = (num_v_heads, dk, dv)
    if recurrent_states.dtype != torch.float32 or recurrent_states.shape[1:] != expected:
        raise ValueError(f"recurrent_states {tuple(recurrent_states.shape)} do not fit q, v")
    if not recurrent_states[0].is_contiguous():
        raise ValueError("each slot of recurrent_states must be contiguous")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.float().contiguous(), beta.float().contiguous()
    out = torch.empty_like(v)  # [n, Hv, Dv]
    block_v = min(triton.next_power_of_2(dv), 32)
    grid = (n, num_v_heads, triton.cdiv(dv, block_v))
    _gdn_update_kernel[grid](
        q, k, v, g, beta, recurrent_states, state_indices, has_initial, out, q.stride(0),
        q.stride(1), v.stride(0), v.stride(1), g.stride(0), recurrent_states.stride(0),
        recurrent_states.stride(1), dk**-0.5, DK=dk, DV=dv, V_PER_K=num_v_heads // num_k_heads,
        BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=block_v,
    )  # fmt: skip
    return out


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    max_query_len: int,
    chunk_size: int = 64,
) -> torch.Tensor:
    """paphos.ops.gated_delta_rule.gated_delta_rule with the decode step on the GPU."""
    if max_query_len == 1:
        return gated_delta_rule_update(
            q, k, v, g, beta, recurrent_states, state_indices, has_initial
        )
    return reference_gated_delta_rule(
        q, k, v, g, beta, recurrent_states, query_start_loc, state_indices, has_initial,
        max_query_len, chunk_size,
    )  # fmt: skip
