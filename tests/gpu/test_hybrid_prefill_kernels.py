"""Triton prompt-chunk kernels of the hybrid models' state ops (causal conv1d, Mamba2 SSD, gated
delta rule) against their ops references over flat batches: fresh and continuing sequences
beside each other (a 1-token fresh prompt beside a 40-token continuing one), lengths that are
not multiples of the chunk size, a prompt split at a chunk boundary over two calls, scattered
slots (the others untouched), fp32 and bf16. Small shapes, so that TRITON_INTERPRET=1 runs them
on the CPU in seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paphos.ops.causal_conv1d import causal_conv1d as ref_conv
from paphos.ops.gated_delta_rule import gated_delta_rule as ref_gdn
from paphos.ops.ssd import ssd as ref_ssd
from tests.gpu.conftest import TOLERANCE, rel_error

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16]
NUM_SLOTS = 9
# (query length, has initial state) per sequence
BATCHES = {
    "fresh1+cont40": [(1, False), (40, True)],
    "mixed": [(17, False), (70, True), (1, True), (33, False)],
    "one_long": [(130, True)],
}


def _batch(spec: list[tuple[int, bool]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """query_start_loc [n + 1] int32, scattered state_indices [n], has_initial [n] bool."""
    lens = torch.tensor([0] + [length for length, _ in spec])
    qsl = lens.cumsum(0).to(torch.int32).to(device)
    indices = torch.randperm(NUM_SLOTS - 1)[: len(spec)].to(device)
    has_initial = torch.tensor([initial for _, initial in spec], device=device)
    return qsl, indices, has_initial, max(length for length, _ in spec)


def _tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize(
    "dim,width,bias,activation", [(48, 4, True, "silu"), (160, 2, False, None)]
)
def test_causal_conv1d_prefill_matches_reference(
    device, dtype, batch, dim, width, bias, activation
):
    from paphos.kernels.causal_conv1d import causal_conv1d

    qsl, indices, has_initial, max_len = _batch(BATCHES[batch], device)
    num_tokens = int(qsl[-1])
    wide = torch.randn(num_tokens, dim + 8, device=device).to(dtype)  # a strided view, as in_proj
    x = wide[:, 4 : 4 + dim]  # [num_tokens, dim]
    weight = torch.randn(dim, width, device=device).to(dtype)  # [dim, K]
    b = torch.randn(dim, device=device).to(dtype) if bias else None
    states = torch.randn(NUM_SLOTS, dim, width - 1, device=device).to(dtype)  # [slots, dim, K-1]
    ref_states = states.clone()
    out = causal_conv1d(x, weight, b, states, qsl, indices, has_initial, max_len, activation)
    ref = ref_conv(x, weight, b, ref_states, qsl, indices, has_initial, max_len, activation)
    assert rel_error(out, ref) < _tol(dtype)
    assert torch.equal(states, ref_states)  # the new windows are copies of inputs, exact


def test_causal_conv1d_prefill_split_prompt_continues(device):
    """A prompt in two calls (the second continuing the slot) equals the prompt in one call."""
    from paphos.kernels.causal_conv1d import causal_conv1d

    dim, width, length, split = 64, 4, 37, 2  # the first call shorter than the window
    x = torch.randn(length, dim, device=device)
    weight, states = torch.randn(dim, width, device=device), torch.randn(3, dim, width - 1)
    states = states.to(device)
    one = states.clone()
    slot, no, yes = torch.tensor([1], device=device), torch.tensor([False]), torch.tensor([True])
    no, yes = no.to(device), yes.to(device)
    qsl = torch.tensor([0, length], dtype=torch.int32, device=device)
    want = causal_conv1d(x, weight, None, one, qsl, slot, no, length, "silu")
    first = torch.tensor([0, split], dtype=torch.int32, device=device)
    second = torch.tensor([0, length - split], dtype=torch.int32, device=device)
    got = torch.cat([
        causal_conv1d(x[:split], weight, None, states, first, slot, no, split, "silu"),
        causal_conv1d(x[split:], weight, None, states, second, slot, yes, length - split, "silu"),
    ])  # fmt: skip
    assert rel_error(got, want) < 1e-6
    assert torch.equal(states, one)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize(
    "heads,head_dim,groups,state,dt_limit",
    [
        (2, 16, 1, 16, (0.0, float("inf"))),
        (4, 48, 2, 40, (0.01, 10.0)),
        (2, 64, 2, 128, (0.0, 5.0)),
    ],
)
def test_ssd_prefill_matches_reference(
    device, dtype, batch, heads, head_dim, groups, state, dt_limit
):
    from paphos.kernels.ssd_update import ssd

    qsl, indices, has_initial, max_len = _batch(BATCHES[batch], device)
    num_tokens = int(qsl[-1])
    # x, B, C as strided views of one projection, as the Mamba2 layer hands them over
    width = heads * head_dim + 2 * groups * state
    xbc = torch.randn(num_tokens, width, device=device).to(dtype)  # [T, x | B | C]
    x, B, C = xbc.split([heads * head_dim, groups * state, groups * state], dim=-1)
    x = x.view(num_tokens, heads, head_dim)  # [T, H, P]
    B, C = B.view(num_tokens, groups, state), C.view(num_tokens, groups, state)  # [T, G, N]
    dt = torch.randn(num_tokens, heads, device=device).to(dtype)  # [T, H] raw
    A = -torch.rand(heads, device=device) * 2  # [H]
    D, dt_bias = torch.randn(heads, device=device), torch.randn(heads, device=device)
    states = torch.randn(NUM_SLOTS, heads, head_dim, state, device=device)  # float32
    ref_states = states.clone()
    args = (qsl, indices, has_initial, max_len, 16, dt_limit)  # the reference in 16-token chunks
    y = ssd(x, dt, A, B, C, D, dt_bias, states, *args)
    ref = ref_ssd(x, dt, A, B, C, D, dt_bias, ref_states, *args)
    assert rel_error(y, ref) < _tol(dtype)
    assert rel_error(states, ref_states) < 2e-5


def test_ssd_prefill_split_prompt_continues(device):
    """A 100-token prompt as 64 + 36 (the second call continuing the slot) equals one call, and
    both equal 100 recurrent decode steps."""
    from paphos.kernels.ssd_update import ssd

    heads, head_dim, groups, state, length = 2, 16, 1, 16, 100
    x = torch.randn(length, heads, head_dim, device=device)
    dt = torch.randn(length, heads, device=device)
    B, C = (torch.randn(length, groups, state, device=device) for _ in range(2))
    A, D, dt_bias = -torch.rand(heads, device=device), torch.randn(heads), torch.randn(heads)
    D, dt_bias = D.to(device), dt_bias.to(device)
    slot = torch.tensor([3], device=device)
    fresh, cont = torch.tensor([False], device=device), torch.tensor([True], device=device)

    def call(states, lo, hi, initial):
        qsl = torch.tensor([0, hi - lo], dtype=torch.int32, device=device)
        sl = slice(lo, hi)
        return ssd(x[sl], dt[sl], A, B[sl], C[sl], D, dt_bias, states, qsl, slot, initial,
                   hi - lo, 256)  # fmt: skip

    one, two, steps = (torch.zeros(4, heads, head_dim, state, device=device) for _ in range(3))
    want = call(one, 0, length, fresh)
    got = torch.cat([call(two, 0, 64, fresh), call(two, 64, length, cont)])
    stepped = torch.cat([call(steps, t, t + 1, cont if t else fresh) for t in range(length)])
    assert rel_error(got, want) < 1e-5 and rel_error(two, one) < 1e-5
    assert rel_error(stepped, want) < 1e-5 and rel_error(steps, one) < 1e-5


def _gdn_inputs(num_tokens, hk, hv, dk, dv, dtype, device):
    """q, k, v as strided views of one conv output (as the DeltaNet layer hands them over),
    g (log decay <= 0) and beta in float32."""
    qkv = torch.randn(num_tokens, 2 * hk * dk + hv * dv, device=device).to(dtype)
    q, k, v = qkv.split([hk * dk, hk * dk, hv * dv], dim=-1)
    q, k = q.view(num_tokens, hk, dk), k.view(num_tokens, hk, dk)  # [T, Hk, Dk]
    v = v.view(num_tokens, hv, dv)  # [T, Hv, Dv]
    g = -F.softplus(torch.randn(num_tokens, hv, device=device)) * 0.5  # [T, Hv]
    beta = torch.rand(num_tokens, hv, device=device)  # [T, Hv]
    return q, k, v, g, beta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("hk,hv,dk,dv", [(1, 1, 16, 16), (2, 4, 32, 16), (1, 2, 128, 40)])
def test_gated_delta_rule_prefill_matches_reference(device, dtype, batch, hk, hv, dk, dv):
    from paphos.kernels.gated_delta_rule import gated_delta_rule

    qsl, indices, has_initial, max_len = _batch(BATCHES[batch], device)
    q, k, v, g, beta = _gdn_inputs(int(qsl[-1]), hk, hv, dk, dv, dtype, device)
    states = torch.randn(NUM_SLOTS, hv, dk, dv, device=device) * 0.1  # float32
    ref_states = states.clone()
    args = (qsl, indices, has_initial, max_len, 16)  # the reference in 16-token chunks
    out = gated_delta_rule(q, k, v, g, beta, states, *args)
    ref = ref_gdn(q, k, v, g, beta, ref_states, *args)
    assert rel_error(out, ref) < _tol(dtype)
    assert rel_error(states, ref_states) < 2e-5


def test_gated_delta_rule_prefill_split_prompt_continues(device):
    """A 70-token prompt as 32 + 38 (the second call continuing the slot) equals one call, and
    both equal 70 recurrent decode steps."""
    from paphos.kernels.gated_delta_rule import gated_delta_rule

    hk, hv, dk, dv, length = 1, 2, 32, 16, 70
    q, k, v, g, beta = _gdn_inputs(length, hk, hv, dk, dv, torch.float32, device)
    slot = torch.tensor([2], device=device)
    fresh, cont = torch.tensor([False], device=device), torch.tensor([True], device=device)

    def call(states, lo, hi, initial):
        qsl = torch.tensor([0, hi - lo], dtype=torch.int32, device=device)
        sl = slice(lo, hi)
        return gated_delta_rule(q[sl], k[sl], v[sl], g[sl], beta[sl], states, qsl, slot,
                                initial, hi - lo)  # fmt: skip

    one, two, steps = (torch.zeros(4, hv, dk, dv, device=device) for _ in range(3))
    want = call(one, 0, length, fresh)
    got = torch.cat([call(two, 0, 32, fresh), call(two, 32, length, cont)])
    stepped = torch.cat([call(steps, t, t + 1, cont if t else fresh) for t in range(length)])
    assert rel_error(got, want) < 1e-5 and rel_error(two, one) < 1e-5
    assert rel_error(stepped, want) < 1e-5 and rel_error(steps, one) < 1e-5
