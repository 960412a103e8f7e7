"""Triton causal conv1d over the state cache's conv windows. Decode: one program per (sequence,
block of channels); the window is read, shifted and written in place. Prompt chunks: one program
per (sequence, block of channels, block of tokens) over the flat batch; the first token block
of each sequence reads the slot's window (fresh sequences: zeros) and then writes the new one.
No host sync, no loop over sequences on the host; the decode path is what CUDA graphs capture."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim


@triton.jit
def _conv1d_update_kernel(
    x_ptr, weight_ptr, bias_ptr, states_ptr, indices_ptr, initial_ptr, out_ptr,
    dim, stride_x, stride_slot, stride_chan, stride_out,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    chans = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = chans < dim
    slot = tl.load(indices_ptr + seq).to(tl.int64)
    keep = tl.load(initial_ptr + seq).to(tl.float32)  # 0: a fresh sequence, zeros
    window = states_ptr + slot * stride_slot + chans * stride_chan  # [BLOCK] column pointers
    x = tl.load(x_ptr + seq * stride_x + chans, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chans, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(WIDTH - 1):  # window columns, oldest first
        column = tl.load(window + k, mask=mask, other=0.0).to(tl.float32) * keep
        acc += column * tl.load(weight_ptr + chans * WIDTH + k, mask=mask, other=0.0).to(tl.float32)
        if k > 0:  # shift: column k moves to k - 1 (columns before k are read already)
            tl.store(window + (k - 1), column.to(states_ptr.dtype.element_ty), mask=mask)
    acc += x * tl.load(weight_ptr + chans * WIDTH + (WIDTH - 1), mask=mask, other=0.0).to(
        tl.float32
    )
    tl.store(window + (WIDTH - 2), x.to(states_ptr.dtype.element_ty), mask=mask)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + seq * stride_out + chans, acc.to(out_ptr.dtype.element_ty), mask=mask)


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    activation: str | None,
) -> torch.Tensor:
    """As paphos.ops.causal_conv1d.causal_conv1d_update: x [num_seqs, dim]; weight [dim, K];
    conv_states [num_slots, dim, K - 1] updated at state_indices."""
    check_dim("x", x, 2)
    check_dim("conv_states", conv_states, 3)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation={activation!r} is invalid: expected silu/swish or None")
    num_seqs, dim = x.shape
    width = weight.shape[1]
    if width < 2 or conv_states.shape[1:] != (dim, width - 1) or conv_states.stride(2) != 1:
        raise ValueError(f"conv_states of shape {tuple(conv_states.shape)} do not fit x {x.shape}")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)  # [num_seqs, dim]
    block = min(triton.next_power_of_2(dim), 256)
    _conv1d_update_kernel[(num_seqs, triton.cdiv(dim, block))](
        x, weight, bias if bias is not None else weight, conv_states, state_indices,
        has_initial, out, dim, x.stride(0), conv_states.stride(0), conv_states.stride(1),
        out.stride(0), WIDTH=width, HAS_BIAS=bias is not None, SILU=activation is not None,
        BLOCK=block,
    )  # fmt: skip
    return out


@triton.jit
def _conv1d_prefill_kernel(
    x_ptr, weight_ptr, bias_ptr, states_ptr, qsl_ptr, indices_ptr, initial_ptr, out_ptr,
    dim, stride_x, stride_slot, stride_chan, stride_out,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    t_block = tl.program_id(2)
    start = tl.load(qsl_ptr + seq).to(tl.int64)
    seq_len = (tl.load(qsl_ptr + seq + 1) - start).to(tl.int32)
    chan_mask = chans < dim
    slot = tl.load(indices_ptr + seq).to(tl.int64)
    keep = tl.load(initial_ptr + seq).to(tl.int32)  # 0: a fresh sequence (zeros before it)
    window = states_ptr + slot * stride_slot + chans * stride_chan  # [BLOCK_D] column pointers
    times = t_block * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] token positions in the chunk
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chans, mask=chan_mask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):  # input position times - (WIDTH - 1) + j
        pos = times - (WIDTH - 1) + j  # [BLOCK_T]; < 0: the window's column WIDTH - 1 + pos
        in_x = (pos >= 0) & (pos < seq_len)
        from_x = tl.load(
            x_ptr + (start + pos)[:, None] * stride_x + chans[None, :],
            mask=in_x[:, None] & chan_mask[None, :], other=0.0,
        )  # fmt: skip
        in_window = (pos < 0) & (pos * 0 + keep != 0)  # (the interpreter wants no scalar mask)
        from_window = tl.load(
            window[None, :] + (WIDTH - 1 + pos)[:, None],
            mask=in_window[:, None] & chan_mask[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(weight_ptr + chans * WIDTH + j, mask=chan_mask, other=0.0).to(tl.float32)
        acc += (from_x.to(tl.float32) + from_window.to(tl.float32)) * w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out_ptrs = out_ptr + (start + times)[:, None] * stride_out + chans[None, :]
    out_mask = (times < seq_len)[:, None] & chan_mask[None, :]  # blocks past the end: nothing
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if t_block == 0:  # the new window: the last WIDTH - 1 inputs of [old window | chunk]
        cols = tl.arange(0, BLOCK_W)
        src = seq_len - (WIDTH - 1) + cols  # [BLOCK_W] input positions of the new columns
        col_mask = cols < WIDTH - 1
        new_x = tl.load(
            x_ptr + (start + src)[None, :] * stride_x + chans[:, None],
            mask=chan_mask[:, None] & (col_mask & (src >= 0))[None, :], other=0.0,
        )  # fmt: skip
        new_old = tl.load(
            window[:, None] + (WIDTH - 1 + src)[None, :],
            mask=chan_mask[:, None] & (col_mask & (src < 0) & (src * 0 + keep != 0))[None, :],
            other=0.0,
        )  # fmt: skip
        new = new_x.to(states_ptr.dtype.element_ty) + new_old.to(states_ptr.dtype.element_ty)
        tl.debug_barrier()  # every thread has read the old window before any overwrites it
        new_mask = chan_mask[:, None] & col_mask[None, :]
        tl.store(window[:, None] + cols[None, :], new, mask=new_mask)


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    max_query_len: int,
    activation: str | None,
) -> torch.Tensor:
    """As paphos.ops.causal_conv1d.causal_conv1d for any query lengths (the prompt path):
    x [num_tokens, dim] (rows may be strided); conv_states [num_slots, dim, K - 1] updated at
    state_indices. Returns [num_tokens, dim]."""
    check_dim("x", x, 2)
    check_dim("conv_states", conv_states, 3)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation={activation!r} is invalid: expected silu/swish or None")
    num_tokens, dim = x.shape
    width = weight.shape[1]
    if width < 2 or conv_states.shape[1:] != (dim, width - 1) or conv_states.stride(2) != 1:
        raise ValueError(f"conv_states of shape {tuple(conv_states.shape)} do not fit x {x.shape}")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty((num_tokens, dim), dtype=x.dtype, device=x.device)  # [num_tokens, dim]
    num_seqs = state_indices.shape[0]
    block_t = max(16, triton.next_power_of_2(width - 1))  # >= K - 1: only block 0 reads the window
    block_d = min(triton.next_power_of_2(dim), 128)
    grid = (num_seqs, triton.cdiv(dim, block_d), triton.cdiv(max(max_query_len, 1), block_t))
    _conv1d_prefill_kernel[grid](
        x, weight, bias if bias is not None else weight, conv_states, query_start_loc,
        state_indices, has_initial, out, dim, x.stride(0), conv_states.stride(0),
        conv_states.stride(1), out.stride(0), WIDTH=width, HAS_BIAS=bias is not None,
        SILU=activation is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        BLOCK_W=triton.next_power_of_2(width - 1),
    )  # fmt: skip
    return out


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    max_query_len: int,
    activation: str | None = "silu",
) -> torch.Tensor:
    """paphos.ops.causal_conv1d.causal_conv1d on the GPU: the decode step when every sequence
    has one token (CUDA-graph safe), the chunked kernel otherwise."""
    if max_query_len == 1:
        return causal_conv1d_update(
            x, weight, bias, conv_states, state_indices, has_initial, activation
        )
    return causal_conv1d_prefill(
        x, weight, bias, conv_states, query_start_loc, state_indices, has_initial,
        max_query_len, activation,
    )  # fmt: skip
