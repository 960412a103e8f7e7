"""The hybrid models' state ops (causal conv1d, Mamba2's SSD, the gated delta rule) against
transformers' own torch fallbacks: a flat batch of sequences run in two steps (a chunk boundary
inside each prompt, then decode steps through the state slots) equals each whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mamba2 import modeling_mamba2 as hf_mamba2
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen

from paphos.ops.causal_conv1d import causal_conv1d
from paphos.ops.gated_delta_rule import gated_delta_rule
from paphos.ops.ssd import ssd

LENGTHS = (13, 7, 1)  # the last: a one-token prompt (no context, fresh state)
SLOTS = (2, 0, 3)  # deliberately not in order; slot 1 and 4 (scratch) stay untouched
ATOL = 2e-5


def _runs(split: tuple[int, ...], num_decodes: int) -> list[list[tuple[int, int]]]:
    """Steps of (start, count) per sequence: a first chunk, the rest of the prompt, decodes."""
    steps = [[(0, s) for s in split], [(s, n - s) for s, n in zip(split, LENGTHS)]]
    steps += [[(n + i, 1) for n in LENGTHS] for i in range(num_decodes)]
    return steps


def _step_metadata(step: list[tuple[int, int]], slots: list[int]) -> dict[str, torch.Tensor | int]:
    counts = [c for _, c in step]
    qsl = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    seq_lens = torch.tensor([s + c for s, c in step])
    return dict(
        query_start_loc=qsl,
        state_indices=torch.tensor(slots),
        has_initial=seq_lens > torch.tensor(counts),
        max_query_len=max(counts),
    )


def _drive(run_step, full: list[torch.Tensor], split=(5, 3, 0)) -> list[torch.Tensor]:
    """Feed each sequence's rows of `full` [len_i + 3, ...] through the steps; returns the
    outputs gathered per sequence. Sequences with nothing left in a step are left out of it."""
    outs: list[list[torch.Tensor]] = [[] for _ in full]
    for step in _runs(split, 3):
        live = [i for i, (_, c) in enumerate(step) if c > 0]
        rows = [full[i][s : s + c] for i, (s, c) in enumerate(step) if c > 0]
        md = _step_metadata([step[i] for i in live], [SLOTS[i] for i in live])
        out = run_step(torch.cat(rows), md)
        offset = 0
        for i, r in zip(live, rows):
            outs[i].append(out[offset : offset + len(r)])
            offset += len(r)
    return [torch.cat(o) for o in outs]


def test_causal_conv1d_matches_transformers_across_chunks_and_decodes() -> None:
    torch.manual_seed(0)
    dim, width = 12, 4
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    full = [torch.randn(n + 3, dim) for n in LENGTHS]
    states = torch.full((5, dim, width - 1), 7.0)  # stale garbage: fresh sequences ignore it

    def run(x, md):
        return causal_conv1d(x, weight, bias, states, activation="silu", **md)

    ours = _drive(run, full)
    for x, got in zip(full, ours):
        ref = hf_mamba2.causal_conv1d_fn(x.t()[None], weight, bias, activation="silu")[0].t()
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert (states[1] == 7.0).all() and (states[4] == 7.0).all()


@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_matches_transformers_chunk_scan(groups: int) -> None:
    torch.manual_seed(1)
    heads, head_dim, n = 4, 8, 6
    A = -torch.rand(heads) - 0.5
    D, dt_bias = torch.randn(heads), torch.randn(heads) * 0.3
    full = [torch.randn(m + 3, heads * head_dim + heads + 2 * groups * n) for m in LENGTHS]
    states = torch.full((5, heads, head_dim, n), 3.0)

    def split(t):
        x, dt, B, C = t.split([heads * head_dim, heads, groups * n, groups * n], dim=-1)
        return (
            x.reshape(-1, heads, head_dim),
            dt,
            B.reshape(-1, groups, n),
            C.reshape(-1, groups, n),
        )

    def run(t, md):
        x, dt, B, C = split(t)
        y = ssd(x, dt, A, B, C, D, dt_bias, states, chunk_size=4, **md)
        return y.reshape(len(t), -1)

    ours = _drive(run, full)
    for t, got in zip(full, ours):
        x, dt, B, C = split(t)
        ref = hf_mamba2.mamba2_chunk_scan(
            x[None], dt[None], A, B[None], C[None], chunk_size=4, D=D, dt_bias=dt_bias,
            dt_softplus=True,
        )[0]  # fmt: skip
        torch.testing.assert_close(got, ref.reshape(len(t), -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_k_heads", [1, 2])
def test_gated_delta_rule_matches_transformers(num_k_heads: int) -> None:
    torch.manual_seed(2)
    hv, dk, dv = 2, 8, 6
    full = [torch.randn(m + 3, 2 * num_k_heads * dk + hv * dv + 2 * hv) for m in LENGTHS]
    states = torch.full((5, hv, dk, dv), 5.0)
    a_log, dt_bias = torch.randn(hv) * 0.5, torch.randn(hv)

    def split(t):
        q, k, v, a, b = t.split([num_k_heads * dk, num_k_heads * dk, hv * dv, hv, hv], dim=-1)
        g = -a_log.exp() * F.softplus(a + dt_bias)
        shape = (-1, num_k_heads, dk)
        return q.reshape(shape), k.reshape(shape), v.reshape(-1, hv, dv), g, b.sigmoid()

    def run(t, md):
        out = gated_delta_rule(*split(t), states, chunk_size=4, **md)
        return out.reshape(len(t), -1)

    ours = _drive(run, full)
    for t, got in zip(full, ours):
        q, k, v, g, beta = (x[None] for x in split(t))
        ref, _ = hf_qwen.torch_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=4, use_qk_l2norm_in_kernel=True
        )
        torch.testing.assert_close(got, ref[0].reshape(len(t), -1), atol=ATOL, rtol=0)
        step, _ = hf_qwen.torch_recurrent_gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=True
        )
        torch.testing.assert_close(got, step[0].reshape(len(t), -1), atol=ATOL, rtol=0)
