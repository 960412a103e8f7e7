"""Triton gated delta rule over the flat batch with float32 states in slots. Decode: one program
per (sequence, value head, block of value columns); q and k are L2-normalised in the program,
its [k_head_dim, block] slice of the state decays, takes the delta-rule update and is written
back, o = S^T q. Prompt chunks: one program per (sequence, value head, block of value columns)
walks the sequence's chunks with its state columns in registers (the columns of the state are
independent: column c only sees v's column c), computing each chunk in the chunked (UT
transform) form of paphos.ops.gated_delta_rule, the unit lower triangular system inverted by
forward substitution. No host sync, no loop over sequences on the host; the decode path is what
CUDA graphs capture."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim

# The prompt kernel's tiles: tokens per step of its walk over a sequence and value columns per
# program; larger tiles spill (ptxas for sm90, notes/hybrid.md)
PREFILL_CHUNK, PREFILL_BLOCK_V, PREFILL_WARPS = 16, 16, 8


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


@triton.jit
def _unit_lower_inverse(strict_lower, BLOCK_L: tl.constexpr):
    """(I + strict_lower)^-1 for a strictly lower triangular [BLOCK_L, BLOCK_L] matrix, by
    forward substitution: row i of the inverse is e_i - sum_{j < i} L[i, j] (row j)."""
    idx = tl.arange(0, BLOCK_L)
    eye = (idx[:, None] == idx[None, :]).to(tl.float32)  # [BLOCK_L, BLOCK_L]
    inverse = eye
    for i in range(1, BLOCK_L):
        row = tl.sum(tl.where(idx[:, None] == i, strict_lower, 0.0), axis=0)  # L[i, :]
        below = tl.sum(row[:, None] * inverse, axis=0)  # [BLOCK_L]: sum_j L[i, j] inverse[j, :]
        inverse = tl.where(idx[:, None] == i, eye - below[None, :], inverse)
    return inverse


@triton.jit
def _gdn_prefill_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, states_ptr, qsl_ptr, indices_ptr, initial_ptr, o_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_g_tok, stride_beta_tok, stride_slot, stride_state_head, stride_o_tok, stride_o_head,
    scale,
    DK: tl.constexpr, DV: tl.constexpr, V_PER_K: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    vcols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] value columns
    krows = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    steps = tl.arange(0, BLOCK_L)  # [BLOCK_L] token offsets in a chunk
    k_mask, v_mask = krows < DK, vcols < DV
    start = tl.load(qsl_ptr + seq).to(tl.int64)
    seq_len = (tl.load(qsl_ptr + seq + 1) - start).to(tl.int32)
    slot = tl.load(indices_ptr + seq).to(tl.int64)
    keep = tl.load(initial_ptr + seq).to(tl.int32)  # 0: a fresh sequence starts from zeros
    k_head = head // V_PER_K
    state_ptrs = states_ptr + slot * stride_slot + head * stride_state_head
    state_ptrs += krows[:, None] * DV + vcols[None, :]  # [BLOCK_K, BLOCK_V]
    state_mask = k_mask[:, None] & v_mask[None, :]
    state = tl.load(state_ptrs, mask=state_mask & (krows * 0 + keep != 0)[:, None], other=0.0)
    causal = steps[:, None] >= steps[None, :]  # [BLOCK_L, BLOCK_L]: token t sees s <= t
    for chunk_start in range(0, seq_len, BLOCK_L):
        times = chunk_start + steps  # [BLOCK_L]
        t_mask = times < seq_len
        tokens = start + times
        qk_mask = t_mask[:, None] & k_mask[None, :]
        q = tl.load(
            q_ptr + tokens[:, None] * stride_q_tok + k_head * stride_q_head + krows[None, :],
            mask=qk_mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_L, BLOCK_K]
        k = tl.load(
            k_ptr + tokens[:, None] * stride_k_tok + k_head * stride_k_head + krows[None, :],
            mask=qk_mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_L, BLOCK_K]
        q = q * (tl.rsqrt(tl.sum(q * q, axis=1) + 1e-6) * scale)[:, None]
        k = k * tl.rsqrt(tl.sum(k * k, axis=1) + 1e-6)[:, None]
        ov_mask = t_mask[:, None] & v_mask[None, :]
        v = tl.load(
            v_ptr + tokens[:, None] * stride_v_tok + head * stride_v_head + vcols[None, :],
            mask=ov_mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_L, BLOCK_V]
        g = tl.load(g_ptr + tokens * stride_g_tok + head, mask=t_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + tokens * stride_beta_tok + head, mask=t_mask, other=0.0)
        beta = beta.to(tl.float32)  # tokens past the end: g = beta = 0, q = k = v = 0
        cum = tl.cumsum(g, axis=0)  # [BLOCK_L]: log decay from the chunk start
        # the chunk's log decay: cum's last entry itself (padded tokens add 0), so that the
        # last token's exp(total - cum) is exactly 1 (a separate sum rounds differently)
        total = tl.sum(tl.where(steps == BLOCK_L - 1, cum, 0.0), axis=0)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))  # [L, L]
        k_beta = k * beta[:, None]  # [BLOCK_L, BLOCK_K]
        system = tl.dot(k_beta, tl.trans(k), input_precision="ieee") * decay  # [L, L]
        inverse = _unit_lower_inverse(
            tl.where(steps[:, None] > steps[None, :], system, 0.0), BLOCK_L
        )
        # the UT transform: the chunk's corrected values and its keys' cumulative decays
        new_values = tl.dot(inverse, v * beta[:, None], input_precision="ieee")  # [L, V]
        k_cumdecay = tl.dot(inverse, k_beta * tl.exp(cum)[:, None], input_precision="ieee")
        v_new = new_values - tl.dot(k_cumdecay, state, input_precision="ieee")  # [L, V]
        attn = tl.dot(q, tl.trans(k), input_precision="ieee") * decay  # [L, L]
        o = tl.dot(q * tl.exp(cum)[:, None], state, input_precision="ieee")  # the past
        o += tl.dot(attn, v_new, input_precision="ieee")  # [BLOCK_L, BLOCK_V]
        o_ptrs = o_ptr + tokens[:, None] * stride_o_tok + head * stride_o_head + vcols[None, :]
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=ov_mask)
        k_to_end = k * tl.exp(total - cum)[:, None]  # [BLOCK_L, BLOCK_K]
        update = tl.dot(tl.trans(k_to_end), v_new, input_precision="ieee")  # [K, V]
        state = state * tl.exp(total) + update
    tl.debug_barrier()  # (a replicated element is read by every thread before it is written)
    tl.store(state_ptrs, state, mask=state_mask)


def gated_delta_rule_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
) -> torch.Tensor:
    """Any query lengths (the prompt path). q, k [T, Hk, Dk] (raw; views with strided tokens
    are fine); v [T, Hv, Dv]; g, beta [T, Hv]; recurrent_states [num_slots, Hv, Dk, Dv]
    float32, read and written at state_indices. Returns o [T, Hv, Dv] in v's dtype."""
    check_dim("q", q, 3)
    check_dim("recurrent_states", recurrent_states, 4)
    num_tokens, num_k_heads, dk = q.shape
    num_v_heads, dv = v.shape[1], v.shape[2]
    expected = (num_v_heads, dk, dv)
    if recurrent_states.dtype != torch.float32 or recurrent_states.shape[1:] != expected:
        raise ValueError(f"recurrent_states {tuple(recurrent_states.shape)} do not fit q, v")
    if not recurrent_states[0].is_contiguous():
        raise ValueError("each slot of recurrent_states must be contiguous")
    q, k, v, g, beta = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, g, beta))
    out = torch.empty((num_tokens, num_v_heads, dv), dtype=v.dtype, device=v.device)
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = max(16, min(triton.next_power_of_2(dv), PREFILL_BLOCK_V))
    grid = (state_indices.shape[0], num_v_heads, triton.cdiv(dv, block_v))
    _gdn_prefill_kernel[grid](
        q, k, v, g, beta, recurrent_states, query_start_loc, state_indices, has_initial, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), recurrent_states.stride(0), recurrent_states.stride(1),
        out.stride(0), out.stride(1), dk**-0.5, DK=dk, DV=dv,
        V_PER_K=num_v_heads // num_k_heads, BLOCK_L=PREFILL_CHUNK, BLOCK_K=block_k,
        BLOCK_V=block_v, num_warps=PREFILL_WARPS,
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
    """paphos.ops.gated_delta_rule.gated_delta_rule on the GPU: the decode step when every
    sequence has one token (CUDA-graph safe), the chunked kernel otherwise (its own chunk
    length: the chunked form is exact for any; `chunk_size` only sizes the reference's)."""
    if max_query_len == 1:
        return gated_delta_rule_update(
            q, k, v, g, beta, recurrent_states, state_indices, has_initial
        )
    return gated_delta_rule_prefill(
        q, k, v, g, beta, recurrent_states, query_start_loc, state_indices, has_initial
    )
