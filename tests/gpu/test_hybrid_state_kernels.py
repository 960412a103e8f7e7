"""Triton decode steps of the hybrid models' state ops (causal conv1d, Mamba2 SSD, gated delta
rule) against their ops references: outputs and updated state slots, over shapes, fresh and
continuing sequences, scattered slots (others untouched), and a CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.ops.causal_conv1d import causal_conv1d_update as ref_conv_update
from paphos.ops.gated_delta_rule import gated_delta_rule as ref_gdn
from paphos.ops.ssd import ssd as ref_ssd
from tests.gpu.conftest import TOLERANCE, rel_error

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_SLOTS = 9


def _slots(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scattered slot ids [n] and has_initial [n] (every third sequence fresh)."""
    indices = torch.randperm(NUM_SLOTS - 1)[:n].to(device)
    has_initial = (torch.arange(n) % 3 != 0).to(device)
    return indices, has_initial


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,dim,width,bias", [(1, 64, 4, True), (5, 300, 4, False), (7, 1024, 3, True)]
)
def test_causal_conv1d_update_matches_reference(device, dtype, n, dim, width, bias):
    from paphos.kernels.causal_conv1d import causal_conv1d_update

    x = torch.randn(n, dim, device=device).to(dtype)  # [n, dim]
    weight = torch.randn(dim, width, device=device).to(dtype)  # [dim, K]
    b = torch.randn(dim, device=device).to(dtype) if bias else None
    states = torch.randn(NUM_SLOTS, dim, width - 1, device=device).to(dtype)  # [slots, dim, K-1]
    indices, has_initial = _slots(n, device)
    ref_states = states.clone()
    out = causal_conv1d_update(x, weight, b, states, indices, has_initial, "silu")
    ref = ref_conv_update(x, weight, b, ref_states, indices, has_initial, "silu")
    assert rel_error(out, ref) < _tol(dtype)
    assert torch.equal(states, ref_states)  # the window shift is exact, untouched slots too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,heads,head_dim,groups,state", [(1, 4, 16, 1, 16), (6, 8, 64, 2, 128), (3, 24, 48, 8, 64)]
)
def test_ssd_update_matches_reference(device, dtype, n, heads, head_dim, groups, state):
    from paphos.kernels.ssd_update import ssd

    x = torch.randn(n, heads, head_dim, device=device).to(dtype)  # [n, H, P]
    dt = torch.randn(n, heads, device=device).to(dtype)  # [n, H]
    B = torch.randn(n, groups, state, device=device).to(dtype)  # [n, G, N]
    C = torch.randn(n, groups, state, device=device).to(dtype)
    A = -torch.rand(heads, device=device) * 4  # [H]
    D, dt_bias = torch.randn(heads, device=device), torch.randn(heads, device=device)
    states = torch.randn(NUM_SLOTS, heads, head_dim, state, device=device)  # float32
    indices, has_initial = _slots(n, device)
    ref_states = states.clone()
    qsl = torch.arange(n + 1, device=device)
    args = (qsl, indices, has_initial, 1, 8, (0.01, 10.0))
    y = ssd(x, dt, A, B, C, D, dt_bias, states, *args)
    ref = ref_ssd(x, dt, A, B, C, D, dt_bias, ref_states, *args)
    assert rel_error(y, ref) < _tol(dtype)
    assert rel_error(states, ref_states) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,hk,hv,dk,dv", [(1, 1, 1, 16, 16), (5, 2, 4, 128, 128), (4, 4, 8, 64, 96)]
)
def test_gated_delta_rule_update_matches_reference(device, dtype, n, hk, hv, dk, dv):
    from paphos.kernels.gated_delta_rule import gated_delta_rule

    q = torch.randn(n, hk, dk, device=device).to(dtype)
    k = torch.randn(n, hk, dk, device=device).to(dtype)
    v = torch.randn(n, hv, dv, device=device).to(dtype)
    g = -F.softplus(torch.randn(n, hv, device=device))  # [n, Hv] log decay <= 0
    beta = torch.rand(n, hv, device=device)
    states = torch.randn(NUM_SLOTS, hv, dk, dv, device=device) * 0.1  # float32
    indices, has_initial = _slots(n, device)
    ref_states = states.clone()
    qsl = torch.arange(n + 1, device=device)
    out = gated_delta_rule(q, k, v, g, beta, states, qsl, indices, has_initial, 1)
    ref = ref_gdn(q, k, v, g, beta, ref_states, qsl, indices, has_initial, 1)
    assert rel_error(out, ref) < _tol(dtype)
    assert rel_error(states, ref_states) < 1e-5


def test_decode_steps_replay_in_a_cuda_graph(device):
    """Captured once, replayed with new inputs and slots: the same as eager calls."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    from paphos.kernels.causal_conv1d import causal_conv1d_update
    from paphos.kernels.gated_delta_rule import gated_delta_rule_update

    n, dim, hk, hv, dk, dv = 4, 256, 2, 4, 64, 64
    x = torch.randn(n, dim, device=device)
    weight = torch.randn(dim, 4, device=device)
    conv = torch.zeros(NUM_SLOTS, dim, 3, device=device)
    q, k = torch.randn(n, hk, dk, device=device), torch.randn(n, hk, dk, device=device)
    v, g, beta = (
        torch.randn(n, hv, dv, device=device),
        -torch.rand(n, hv, device=device),
        torch.rand(n, hv, device=device),
    )
    rec = torch.zeros(NUM_SLOTS, hv, dk, dv, device=device)
    indices, has_initial = _slots(n, device)

    def step():
        return (
            causal_conv1d_update(x, weight, None, conv, indices, has_initial, "silu"),
            gated_delta_rule_update(q, k, v, g, beta, rec, indices, has_initial),
        )

    step()  # compile outside the capture
    conv_before, rec_before = conv.clone(), rec.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    conv.copy_(conv_before)
    rec.copy_(rec_before)
    for _ in range(3):
        x.normal_()
        v.normal_()
        indices.copy_(torch.randperm(NUM_SLOTS - 1, device=device)[:n])
        eager_conv, eager_rec = conv.clone(), rec.clone()
        want = (
            ref_conv_update(x, weight, None, eager_conv, indices, has_initial, "silu"),
            ref_gdn(
                q,
                k,
                v,
                g,
                beta,
                eager_rec,
                torch.arange(n + 1, device=device),
                indices,
                has_initial,
                1,
            ),
        )
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert rel_error(got, ref) < 1e-5
        assert rel_error(conv, eager_conv) < 1e-6 and rel_error(rec, eager_rec) < 1e-5
