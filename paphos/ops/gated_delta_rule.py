"""The gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5) over a flat batch with per-request
recurrent states: the chunked form for prompts, the recurrent step for decode (the reference,
and the CPU path).

Per value head, with L2-normalised q, k (q also scaled by head_dim ** -0.5):
  S <- exp(g) * S;  S <- S + k (beta * (v - S^T k))^T;  o = S^T q
S is [k_head_dim, v_head_dim], kept in the state cache's dtype (float32), computed in float32.
Each key head serves num_v_heads // num_k_heads consecutive value heads.
"""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare_qk(
    q: torch.Tensor, k: torch.Tensor, num_v_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, Hk, Dk] each -> float32 [T, Hv, Dk]: normalised, q scaled, heads repeated."""
    q, k = l2_normalize(q.float()), l2_normalize(k.float())
    q = q * q.shape[-1] ** -0.5
    repeat = num_v_heads // q.shape[1]
    return q.repeat_interleave(repeat, dim=1), k.repeat_interleave(repeat, dim=1)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, prepared q/k. q, k: [L, H, Dk]; v: [L, H, Dv]; g (log decay), beta: [L, H];
    state: [H, Dk, Dv] float32. Returns (o [L, H, Dv] float32, the state after the sequence).

    Within a chunk the delta-rule updates are solved at once (the UT transform: a unit lower
    triangular system), the chunk then reads and updates the state with a few matmuls."""
    q, k, v, g, beta = (t.float().transpose(0, 1) for t in (q, k, v, g, beta))  # heads first
    outs = []
    for start in range(0, q.shape[1], chunk_size):
        qc, kc, vc, gc, bc = (t[:, start : start + chunk_size] for t in (q, k, v, g, beta))
        cum = gc.cumsum(-1)  # [H, l]: log decay from the chunk start
        causal = torch.ones(cum.shape[1], cum.shape[1], dtype=torch.bool, device=q.device).tril()
        seg = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf"))
        decay = seg.exp()  # [H, l, l]: decay from s to t (t >= s)
        k_beta = kc * bc[..., None]  # [H, l, Dk]
        system = (k_beta @ kc.transpose(-1, -2)) * decay  # [H, l, l]; its diagonal is ignored
        rhs = torch.cat([vc * bc[..., None], k_beta * cum.exp()[..., None]], dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        new_values, k_cumdecay = solved.split([vc.shape[-1], kc.shape[-1]], dim=-1)
        v_new = new_values - k_cumdecay @ state  # [H, l, Dv]: what the old state misses
        attn = (qc @ kc.transpose(-1, -2)) * decay  # [H, l, l]
        outs.append((qc * cum.exp()[..., None]) @ state + attn @ v_new)  # [H, l, Dv]
        to_end = (cum[:, -1:] - cum).exp()[..., None]  # [H, l, 1]
        state = state * cum[:, -1].exp()[:, None, None] + (kc * to_end).transpose(-1, -2) @ v_new
    return torch.cat(outs, dim=1).transpose(0, 1), state


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence, prepared q/k. q, k: [n, H, Dk]; v: [n, H, Dv]; g, beta: [n, H];
    states: [n, H, Dk, Dv] float32. Returns (o [n, H, Dv] float32, the new states)."""
    states = states * g.float().exp()[..., None, None]
    predicted = torch.einsum("nhkv,nhk->nhv", states, k)  # [n, H, Dv]
    delta = (v.float() - predicted) * beta.float()[..., None]  # [n, H, Dv]
    states = states + k[..., :, None] * delta[..., None, :]  # [n, H, Dk, Dv]
    return torch.einsum("nhkv,nhk->nhv", states, q), states


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
    """q, k: [num_tokens, Hk, Dk] (raw: normalised here); v: [num_tokens, Hv, Dv]; g, beta:
    [num_tokens, Hv]; recurrent_states: [num_slots, Hv, Dk, Dv] (read and written at
    state_indices). Returns o [num_tokens, Hv, Dv] in v's dtype."""
    q, k = _prepare_qk(q, k, v.shape[1])  # [num_tokens, Hv, Dk] each
    if max_query_len == 1:
        states = recurrent_states.index_select(0, state_indices).float()  # [n, Hv, Dk, Dv]
        states = states * has_initial[:, None, None, None].to(states.dtype)  # fresh: zeros
        out, states = gated_delta_rule_step(q, k, v, g, beta, states)
        recurrent_states.index_copy_(0, state_indices, states.to(recurrent_states.dtype))
        return out.to(v.dtype)
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)  # [num_tokens, Hv, Dv]
    bounds = query_start_loc.tolist()
    slots, initial = state_indices.tolist(), has_initial.tolist()
    zeros = torch.zeros(recurrent_states.shape[1:], dtype=torch.float32, device=v.device)
    for b in range(len(bounds) - 1):
        start, end, slot = bounds[b], bounds[b + 1], slots[b]
        state = recurrent_states[slot].float() if initial[b] else zeros
        out[start:end], state = chunk_gated_delta_rule(
            q[start:end], k[start:end], v[start:end], g[start:end], beta[start:end], state,
            chunk_size,
        )  # fmt: skip
        recurrent_states[slot] = state.to(recurrent_states.dtype)
    return out.to(v.dtype)
