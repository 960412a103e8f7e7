"""Triton causal conv1d decode step (the state cache's conv window): one program per (sequence,
block of channels); the window is read, shifted and written in place, fresh sequences start
from zeros. Prompt chunks run the reference (paphos.ops.causal_conv1d). No host sync on the
decode path: CUDA graphs capture it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim
from paphos.ops.causal_conv1d import causal_conv1d as reference_causal_conv1d


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
    """paphos.ops.causal_conv1d.causal_conv1d with the decode step on the GPU."""
    if max_query_len == 1:
        return causal_conv1d_update(
            x, weight, bias, conv_states, state_indices, has_initial, activation
        )
    return reference_causal_conv1d(
        x, weight, bias, conv_states, query_start_loc, state_indices, has_initial,
        max_query_len, activation,
    )  # fmt: skip
