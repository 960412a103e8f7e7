"""Triton Mamba2 SSD over the flat batch with float32 states in slots. Decode: one program per
(sequence, head, block of head_dim rows); it decays and updates its slice of the state
[head_dim, state_size] with this token, writes it back and emits y = state C + D x. Prompt
chunks: one program per (sequence, head, block of head_dim rows) walks the sequence's chunks
with its state rows in registers (the rows of the state are independent: x's row p only feeds
row p), computing each chunk in the chunked form of paphos.ops.ssd. No host sync, no loop over
sequences on the host; the decode path is what CUDA graphs capture."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim

# The prompt kernel's tiles: tokens per step of its walk over a sequence, head_dim rows per
# program; larger tiles spill (ptxas for sm90, notes/hybrid.md)
PREFILL_CHUNK, PREFILL_BLOCK_P, PREFILL_WARPS = 32, 32, 8


@triton.jit
def _ssd_update_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, states_ptr, indices_ptr,
    initial_ptr, y_ptr, dt_min, dt_max,
    stride_x_seq, stride_x_head, stride_dt, stride_b_seq, stride_b_group, stride_slot,
    stride_state_head, stride_y_seq, stride_y_head,
    HEAD_DIM: tl.constexpr, STATE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask, col_mask = rows < HEAD_DIM, cols < STATE
    mask = row_mask[:, None] & col_mask[None, :]
    slot = tl.load(indices_ptr + seq).to(tl.int64)
    keep = tl.load(initial_ptr + seq).to(tl.float32)
    raw = tl.load(dt_ptr + seq * stride_dt + head).to(tl.float32) + tl.load(dt_bias_ptr + head)
    dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))  # softplus (torch's threshold)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * tl.load(a_ptr + head).to(tl.float32))
    group = head // HEADS_PER_GROUP
    b = tl.load(
        b_ptr + seq * stride_b_seq + group * stride_b_group + cols, mask=col_mask, other=0.0
    )
    c = tl.load(
        c_ptr + seq * stride_b_seq + group * stride_b_group + cols, mask=col_mask, other=0.0
    )
    x = tl.load(x_ptr + seq * stride_x_seq + head * stride_x_head + rows, mask=row_mask, other=0.0)
    x = x.to(tl.float32)
    state_ptrs = states_ptr + slot * stride_slot + head * stride_state_head
    state_ptrs += rows[:, None] * STATE + cols[None, :]  # [BLOCK_P, BLOCK_N]
    state = tl.load(state_ptrs, mask=mask, other=0.0) * keep
    state = state * decay + (dt * x)[:, None] * b.to(tl.float32)[None, :]
    tl.store(state_ptrs, state, mask=mask)
    y = tl.sum(state * c.to(tl.float32)[None, :], axis=1) + tl.load(d_ptr + head).to(tl.float32) * x
    y_ptrs = y_ptr + seq * stride_y_seq + head * stride_y_head + rows
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def ssd_update(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_states: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    dt_limit: tuple[float, float],
) -> torch.Tensor:
    """One token per sequence. x [n, H, P]; dt [n, H] (raw); B, C [n, G, N]; ssm_states
    [num_slots, H, P, N] float32, updated at state_indices. Returns y [n, H, P] in x's dtype."""
    check_dim("x", x, 3)
    check_dim("ssm_states", ssm_states, 4)
    n, heads, head_dim = x.shape
    groups, state = B.shape[1], B.shape[2]
    if ssm_states.dtype != torch.float32 or ssm_states.shape[1:] != (heads, head_dim, state):
        raise ValueError(f"ssm_states {tuple(ssm_states.shape)} {ssm_states.dtype} do not fit x")
    if not ssm_states[0].is_contiguous():
        raise ValueError("each slot of ssm_states must be contiguous")
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    y = torch.empty_like(x)  # [n, H, P]
    block_p, block_n = min(triton.next_power_of_2(head_dim), 32), triton.next_power_of_2(state)
    grid = (n, heads, triton.cdiv(head_dim, block_p))
    _ssd_update_kernel[grid](
        x, dt, A.float().contiguous(), B, C, D.float().contiguous(), dt_bias.float().contiguous(),
        ssm_states, state_indices, has_initial, y, float(dt_limit[0]), float(dt_limit[1]),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), ssm_states.stride(0),
        ssm_states.stride(1), y.stride(0), y.stride(1), HEAD_DIM=head_dim, STATE=state,
        HEADS_PER_GROUP=heads // groups, BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return y


@triton.jit
def _ssd_prefill_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, states_ptr, qsl_ptr, indices_ptr,
    initial_ptr, y_ptr, dt_min, dt_max,
    stride_x_tok, stride_x_head, stride_dt_tok, stride_b_tok, stride_b_group, stride_c_tok,
    stride_c_group, stride_slot, stride_state_head, stride_y_tok, stride_y_head,
    HEAD_DIM: tl.constexpr, STATE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] head_dim rows
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N] state columns
    steps = tl.arange(0, BLOCK_L)  # [BLOCK_L] token offsets in a chunk
    row_mask, col_mask = rows < HEAD_DIM, cols < STATE
    start = tl.load(qsl_ptr + seq).to(tl.int64)
    seq_len = (tl.load(qsl_ptr + seq + 1) - start).to(tl.int32)
    slot = tl.load(indices_ptr + seq).to(tl.int64)
    keep = tl.load(initial_ptr + seq).to(tl.int32)  # 0: a fresh sequence starts from zeros
    group = head // HEADS_PER_GROUP
    a_head = tl.load(a_ptr + head).to(tl.float32)
    d_head = tl.load(d_ptr + head).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32)
    state_ptrs = states_ptr + slot * stride_slot + head * stride_state_head
    state_ptrs += rows[:, None] * STATE + cols[None, :]  # [BLOCK_P, BLOCK_N]
    state_mask = row_mask[:, None] & col_mask[None, :]
    state = tl.load(state_ptrs, mask=state_mask & (rows * 0 + keep != 0)[:, None], other=0.0)
    causal = steps[:, None] >= steps[None, :]  # [BLOCK_L, BLOCK_L]: token t sees s <= t
    for chunk_start in range(0, seq_len, BLOCK_L):
        times = chunk_start + steps  # [BLOCK_L]
        t_mask = times < seq_len
        tokens = start + times
        raw = tl.load(dt_ptr + tokens * stride_dt_tok + head, mask=t_mask, other=0.0)
        raw = raw.to(tl.float32) + dt_bias
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))  # softplus (torch's threshold)
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dt = tl.where(t_mask, dt, 0.0)  # tokens past the end: no decay, no input
        log_decay = dt * a_head  # [BLOCK_L]
        cum = tl.cumsum(log_decay, axis=0)  # [BLOCK_L]: log decay from the chunk start
        # the chunk's log decay: cum's last entry itself (padded tokens add 0), so that the
        # last token's exp(total - cum) is exactly 1 (a separate sum rounds differently)
        total = tl.sum(tl.where(steps == BLOCK_L - 1, cum, 0.0), axis=0)
        bc_mask = t_mask[:, None] & col_mask[None, :]
        b = tl.load(
            b_ptr + tokens[:, None] * stride_b_tok + group * stride_b_group + cols[None, :],
            mask=bc_mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_L, BLOCK_N]
        c = tl.load(
            c_ptr + tokens[:, None] * stride_c_tok + group * stride_c_group + cols[None, :],
            mask=bc_mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_L, BLOCK_N]
        x_ptrs = x_ptr + tokens[:, None] * stride_x_tok + head * stride_x_head + rows[None, :]
        x_mask = t_mask[:, None] & row_mask[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_P]
        # within the chunk: y_t = sum_{s <= t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s
        seg = tl.where(causal, cum[:, None] - cum[None, :], float("-inf"))
        scores = tl.dot(c, tl.trans(b), input_precision="ieee") * tl.exp(seg)  # [L, L]
        y = tl.dot(scores, x * dt[:, None], input_precision="ieee")  # [BLOCK_L, BLOCK_P]
        # the past: the state before the chunk, decayed to t, read by C_t
        past = tl.dot(c, tl.trans(state), input_precision="ieee")  # [BLOCK_L, BLOCK_P]
        y += past * tl.exp(cum)[:, None] + d_head * x
        y_ptrs = y_ptr + tokens[:, None] * stride_y_tok + head * stride_y_head + rows[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=x_mask)
        # the state after the chunk: decayed over it, plus each token's input decayed to its end
        to_end = tl.exp(total - cum) * dt  # [BLOCK_L]
        update = tl.dot(tl.trans(x * to_end[:, None]), b, input_precision="ieee")  # [P, N]
        state = state * tl.exp(total) + update
    tl.debug_barrier()  # (a replicated element is read by every thread before it is written)
    tl.store(state_ptrs, state, mask=state_mask)


def ssd_prefill(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    dt_limit: tuple[float, float],
) -> torch.Tensor:
    """Any query lengths (the prompt path). x [T, H, P]; dt [T, H] (raw); B, C [T, G, N] (views
    with strided tokens are fine); ssm_states [num_slots, H, P, N] float32, read and written at
    state_indices. Returns y [T, H, P] in x's dtype."""
    check_dim("x", x, 3)
    check_dim("ssm_states", ssm_states, 4)
    num_tokens, heads, head_dim = x.shape
    groups, state = B.shape[1], B.shape[2]
    if ssm_states.dtype != torch.float32 or ssm_states.shape[1:] != (heads, head_dim, state):
        raise ValueError(f"ssm_states {tuple(ssm_states.shape)} {ssm_states.dtype} do not fit x")
    if not ssm_states[0].is_contiguous():
        raise ValueError("each slot of ssm_states must be contiguous")
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    y = torch.empty((num_tokens, heads, head_dim), dtype=x.dtype, device=x.device)  # [T, H, P]
    block_p = max(16, min(triton.next_power_of_2(head_dim), PREFILL_BLOCK_P))
    block_n = max(16, triton.next_power_of_2(state))
    grid = (state_indices.shape[0], heads, triton.cdiv(head_dim, block_p))
    _ssd_prefill_kernel[grid](
        x, dt, A.float().contiguous(), B, C, D.float().contiguous(), dt_bias.float().contiguous(),
        ssm_states, query_start_loc, state_indices, has_initial, y, float(dt_limit[0]),
        float(dt_limit[1]), x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1),
        C.stride(0), C.stride(1), ssm_states.stride(0), ssm_states.stride(1), y.stride(0),
        y.stride(1), HEAD_DIM=head_dim, STATE=state, HEADS_PER_GROUP=heads // groups,
        BLOCK_L=PREFILL_CHUNK, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=PREFILL_WARPS,
    )  # fmt: skip
    return y


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    max_query_len: int,
    chunk_size: int,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """paphos.ops.ssd.ssd on the GPU: the decode step when every sequence has one token
    (CUDA-graph safe), the chunked kernel otherwise (its own chunk length: the chunked form is
    exact for any; `chunk_size` only sizes the reference's)."""
    if max_query_len == 1:
        return ssd_update(
            x, dt, A, B, C, D, dt_bias, ssm_states, state_indices, has_initial, dt_limit
        )
    return ssd_prefill(
        x, dt, A, B, C, D, dt_bias, ssm_states, query_start_loc, state_indices, has_initial,
        dt_limit,
    )  # fmt: skip
