"""Triton Mamba2 SSD decode step: one program per (sequence, head, block of head_dim rows); it
reads its slice of the float32 state [head_dim, state_size], decays and updates it with this
token, writes it back and emits y = state C + D x. Prompt chunks run the reference
(paphos.ops.ssd). No host sync on the decode path: CUDA graphs capture it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim
from paphos.ops.ssd import ssd as reference_ssd


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
    """paphos.ops.ssd.ssd with the decode step on the GPU."""
    if max_query_len == 1:
        return ssd_update(
            x, dt, A, B, C, D, dt_bias, ssm_states, state_indices, has_initial, dt_limit
        )
    return reference_ssd(
        x, dt, A, B, C, D, dt_bias, ssm_states, query_start_loc, state_indices, has_initial,
        max_query_len, chunk_size, dt_limit,
    )  # fmt: skip
