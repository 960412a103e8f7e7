"""Depthwise causal conv1d over a flat batch of sequences with a per-request conv window (the
state cache of Mamba2 and Gated DeltaNet layers): the reference, and the CPU path.

Each sequence continues its slot's window (the K - 1 inputs before its first token) when it has
context, else starts from zeros; its last K - 1 inputs become the slot's new window. A batch of
one token per sequence (decode) is one batched update with no host sync (CUDA-graph safe);
otherwise each sequence is a chunk of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation={activation!r} is invalid: expected silu/swish or None")


def causal_conv1d_chunk(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    window: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's chunk. x: [seq_len, dim]; weight: [dim, K]; window: [dim, K - 1] (the
    inputs before x; None: zeros). Returns (out [seq_len, dim], new window [dim, K - 1])."""
    seq_len, dim = x.shape
    width = weight.shape[1] - 1
    if window is None:
        window = x.new_zeros(dim, width)  # [dim, K - 1]
    inputs = torch.cat([window.to(x.dtype), x.t()], dim=1)  # [dim, K - 1 + seq_len]
    out = F.conv1d(inputs.unsqueeze(0), weight.unsqueeze(1), bias, groups=dim)  # [1, dim, len]
    new_window = inputs[:, inputs.shape[1] - width :]  # [dim, K - 1]
    return _activate(out[0].t(), activation), new_window


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial: torch.Tensor,
    activation: str | None,
) -> torch.Tensor:
    """One token per sequence. x: [num_seqs, dim]; conv_states: [num_slots, dim, K - 1], updated
    at state_indices [num_seqs]; has_initial [num_seqs] bool. Returns [num_seqs, dim]."""
    window = conv_states.index_select(0, state_indices)  # [num_seqs, dim, K - 1]
    window = window * has_initial[:, None, None].to(window.dtype)  # fresh: zeros
    inputs = torch.cat([window.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [num_seqs, dim, K]
    out = (inputs * weight).sum(-1)  # [num_seqs, dim]
    if bias is not None:
        out = out + bias
    conv_states.index_copy_(0, state_indices, inputs[..., 1:].to(conv_states.dtype))
    return _activate(out, activation)


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
    """x: [num_tokens, dim], sequence b's tokens at query_start_loc[b]:[b + 1]; weight [dim, K];
    conv_states [num_slots, dim, K - 1] (read and written at state_indices). Returns
    [num_tokens, dim]."""
    if max_query_len == 1:
        return causal_conv1d_update(
            x, weight, bias, conv_states, state_indices, has_initial, activation
        )
    out = torch.empty_like(x)  # [num_tokens, dim]
    bounds = query_start_loc.tolist()
    for b, slot, initial in zip(
        range(len(bounds) - 1), state_indices.tolist(), has_initial.tolist()
    ):
        start, end = bounds[b], bounds[b + 1]
        window = conv_states[slot] if initial else None
        out[start:end], new_window = causal_conv1d_chunk(
            x[start:end], weight, bias, window, activation
        )
        conv_states[slot] = new_window.to(conv_states.dtype)
    return out
