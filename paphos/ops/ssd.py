"""Mamba2's selective state-space scan (SSD) over a flat batch with per-request recurrent states:
the chunked scan for prompts, the recurrent step for decode (the reference, and the CPU path).

Per head h: dt = clamp(softplus(dt_raw + dt_bias)), state <- exp(dt * A) * state + dt * x B^T,
y = state C + D * x; B and C are shared by the heads of a group. States are [heads, head_dim,
state_size], kept in the state cache's dtype (float32) and computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _discretize(
    dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]
) -> torch.Tensor:
    return F.softplus(dt.float() + dt_bias.float()).clamp(dt_limit[0], dt_limit[1])


def _expand_groups(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., groups, n] -> [..., heads, n]: each group serves heads // groups consecutive heads."""
    return t.float().repeat_interleave(num_heads // t.shape[-2], dim=-2)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, discretized dt. x: [L, H, P]; dt: [L, H] float32; A: [H]; B, C: [L, H, N]
    (per head); state: [H, P, N] float32 before x. Returns (y [L, H, P] without the D skip,
    the state after x)."""
    ys = []
    for start in range(0, x.shape[0], chunk_size):
        xc = x[start : start + chunk_size].float()  # [l, H, P]
        dtc, Bc, Cc = (t[start : start + chunk_size] for t in (dt, B, C))
        cum = torch.cumsum(dtc * A, dim=0)  # [l, H]: log decay from the chunk start
        seg = cum[:, None, :] - cum[None, :, :]  # [l, l, H]: log decay from s to t
        causal = torch.ones(seg.shape[:2], dtype=torch.bool, device=x.device).tril()  # [l, l]
        decay = torch.exp(seg.masked_fill(~causal[..., None], float("-inf")))  # [l, l, H]
        scores = torch.einsum("thn,shn->tsh", Cc, Bc) * decay  # [l, l, H]
        y = torch.einsum("tsh,shp->thp", scores, xc * dtc[..., None])  # within the chunk
        y = y + torch.einsum("thn,hpn->thp", Cc, state) * torch.exp(cum)[..., None]  # the past
        to_end = torch.exp(cum[-1:] - cum) * dtc  # [l, H]: decay to the chunk end, times dt
        state = state * torch.exp(cum[-1])[:, None, None] + torch.einsum(
            "sh,shn,shp->hpn", to_end, Bc, xc
        )  # [H, P, N]
        ys.append(y)
    return torch.cat(ys), state


def ssd_state_update(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    states: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence. x: [n, H, P]; dt: [n, H] discretized; B, C: [n, H, N]; states:
    [n, H, P, N] float32. Returns (y [n, H, P] without the D skip, the new states)."""
    decay = torch.exp(dt * A)[..., None, None]  # [n, H, 1, 1]
    update = (dt[..., None] * x.float())[..., None] * B[:, :, None, :]  # [n, H, P, N]
    states = states * decay + update
    return torch.einsum("nhpk,nhk->nhp", states, C), states


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
    """x: [num_tokens, H, P]; dt: [num_tokens, H] (before softplus); A, D, dt_bias: [H]; B, C:
    [num_tokens, G, N]; ssm_states: [num_slots, H, P, N] (read and written at state_indices).
    Returns y [num_tokens, H, P] in x's dtype."""
    num_heads = x.shape[1]
    dt = _discretize(dt, dt_bias, dt_limit)  # [num_tokens, H]
    A = A.float()
    B, C = _expand_groups(B, num_heads), _expand_groups(C, num_heads)  # [num_tokens, H, N]
    if max_query_len == 1:
        states = ssm_states.index_select(0, state_indices).float()  # [n, H, P, N]
        states = states * has_initial[:, None, None, None].to(states.dtype)  # fresh: zeros
        y, states = ssd_state_update(x, dt, A, B, C, states)
        ssm_states.index_copy_(0, state_indices, states.to(ssm_states.dtype))
    else:
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # [num_tokens, H, P]
        bounds = query_start_loc.tolist()
        slots, initial = state_indices.tolist(), has_initial.tolist()
        for b in range(len(bounds) - 1):
            start, end, slot = bounds[b], bounds[b + 1], slots[b]
            state = ssm_states[slot].float() if initial[b] else x.new_zeros(ssm_states.shape[1:])
            y[start:end], state = ssd_chunk_scan(
                x[start:end], dt[start:end], A, B[start:end], C[start:end], state.float(),
                chunk_size,
            )  # fmt: skip
            ssm_states[slot] = state.to(ssm_states.dtype)
    y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype)
