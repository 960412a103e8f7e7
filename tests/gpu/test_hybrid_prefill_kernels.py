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
from paphos.ops.registry import REFERENCES
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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # the tolerances are checked over seeds 0-5 on the interpreter


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
    """A 100-token prompt as 45 + 55 (the second call continuing the slot) equals one call, and
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
    got = torch.cat([call(two, 0, 45, fresh), call(two, 45, length, cont)])
    stepped = torch.cat([call(steps, t, t + 1, cont if t else fresh) for t in range(length)])
    assert rel_error(got, want) < 2e-5 and rel_error(two, one) < 2e-5
    assert rel_error(stepped, want) < 2e-5 and rel_error(steps, one) < 2e-5


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
    """A 70-token prompt as 27 + 43 (the second call continuing the slot) equals one call, and
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
    got = torch.cat([call(two, 0, 27, fresh), call(two, 27, length, cont)])
    stepped = torch.cat([call(steps, t, t + 1, cont if t else fresh) for t in range(length)])
    assert rel_error(got, want) < 2e-5 and rel_error(two, one) < 2e-5
    assert rel_error(stepped, want) < 2e-5 and rel_error(steps, one) < 2e-5


def _layer_batch(spec: list[tuple[int, int]], device: torch.device):
    """AttentionMetadata for (query length, context before) per sequence, scattered slots; the
    runner's dtypes (int64 query_start_loc and state_indices)."""
    from paphos.attention import AttentionMetadata

    lens = torch.tensor([q for q, _ in spec])
    seq_lens = lens + torch.tensor([c for _, c in spec])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    num_tokens, n = int(qsl[-1]), len(spec)
    return AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.long, device=device),
        query_start_loc=qsl.to(device),
        seq_lens=seq_lens.to(device),
        block_tables=torch.zeros(n, 1, dtype=torch.long, device=device),
        logits_indices=(qsl[1:] - 1).to(device),
        max_query_len=int(lens.max()),
        max_seq_len=int(seq_lens.max()),
        state_indices=torch.randperm(NUM_SLOTS - 1)[:n].to(device),
    )


def _run_both(layer, kernels: dict[str, object], md, hidden, num_slots):
    """The layer's forward with the Triton kernels and with the references, from the same
    random state slots: (out, states) of each."""
    shapes = layer.state_shapes()
    gen = torch.Generator().manual_seed(5)
    states = [
        torch.randn(num_slots, *s, generator=gen).to(dt).to(hidden.device) for s, dt in shapes
    ]
    results = []
    for fns in (kernels, {name: REFERENCES[name] for name in kernels}):
        for name, fn in fns.items():
            setattr(layer, f"_{name}", fn)
        cache = tuple(s.clone() for s in states)
        results.append((layer(None, hidden, cache, md), cache))
    return results


@pytest.mark.parametrize("layer_kind", ["mamba2", "gated_deltanet"])
def test_hybrid_layer_prompt_batch_matches_references(device, layer_kind):
    """A Mamba2 mixer and a Gated DeltaNet layer over a batch of a 1-token fresh prompt, a
    40-token chunk continuing a prompt, a decode row and a 37-token fresh prompt: the layer
    forward with the Triton kernels (what CUDA picks) equals the one with the references."""
    from paphos.kernels import CUDA_KERNELS
    from paphos.parallel import ParallelInfo

    md = _layer_batch([(1, 0), (40, 16), (1, 9), (37, 0)], device)
    torch.manual_seed(0)
    with torch.device(device):
        if layer_kind == "mamba2":
            from paphos.layers.mamba2 import Mamba2Mixer, Mamba2Spec

            spec = Mamba2Spec(64, 4, 16, 2, 16, 4, 16, 1e-5, dt_limit=(0.0, 8.0))
            layer, names = Mamba2Mixer(spec, None, ParallelInfo()), ("causal_conv1d", "ssd")
        else:
            from paphos.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetSpec

            spec = GatedDeltaNetSpec(64, 2, 4, 16, 24, 4, 1e-6, chunk_size=16)
            layer = GatedDeltaNet(spec, None, ParallelInfo())
            names = ("causal_conv1d", "gated_delta_rule")
        for p in layer.parameters():
            p.data.normal_(0.0, 0.2)
        hidden = torch.randn(int(md.query_start_loc[-1]), 64)
    if device.type == "cuda":  # the kernels were picked at start-up
        assert all(getattr(layer, f"_{name}") is CUDA_KERNELS[name] for name in names)
    (out, states), (ref, ref_states) = _run_both(
        layer, {name: CUDA_KERNELS[name] for name in names}, md, hidden, NUM_SLOTS
    )
    assert rel_error(out, ref) < 1e-4
    for got, want in zip(states, ref_states):
        assert rel_error(got, want) < 1e-5


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t * torch.rsqrt((t * t).sum(-1, keepdim=True) + 1e-6)


def _ssd_exact(x, dt, A, B, C, D, dt_bias, states, qsl, indices, has_initial, dt_limit):
    """Mamba2's recurrence token by token in float64: what both chunked forms approximate."""
    heads, qsl = x.shape[1], qsl.tolist()
    x, dt = x.double(), F.softplus(dt.double() + dt_bias.double()).clamp(*dt_limit)
    B, C = (t.double().repeat_interleave(heads // t.shape[1], 1) for t in (B, C))  # [T, H, N]
    y, states = torch.zeros_like(x), states.double().clone()  # [T, H, P], [slots, H, P, N]
    for b in range(len(qsl) - 1):
        s = states[indices[b]] if has_initial[b] else torch.zeros_like(states[0])  # [H, P, N]
        for t in range(qsl[b], qsl[b + 1]):
            s = s * torch.exp(dt[t] * A.double())[:, None, None]
            s = s + (dt[t][:, None] * x[t])[..., None] * B[t][:, None, :]
            y[t] = torch.einsum("hpn,hn->hp", s, C[t]) + D.double()[:, None] * x[t]
        states[indices[b]] = s
    return y, states


def _gdn_exact(q, k, v, g, beta, states, qsl, indices, has_initial):
    """The gated delta rule token by token in float64."""
    repeat, qsl = v.shape[1] // q.shape[1], qsl.tolist()
    q = (_l2(q.double()) * q.shape[-1] ** -0.5).repeat_interleave(repeat, 1)  # [T, Hv, Dk]
    k = _l2(k.double()).repeat_interleave(repeat, 1)  # [T, Hv, Dk]
    v, g, beta = v.double(), g.double(), beta.double()
    out, states = torch.zeros_like(v), states.double().clone()  # [T, Hv, Dv], [slots, ...]
    for b in range(len(qsl) - 1):
        s = states[indices[b]] if has_initial[b] else torch.zeros_like(states[0])  # [Hv, K, V]
        for t in range(qsl[b], qsl[b + 1]):
            s = s * torch.exp(g[t])[:, None, None]
            delta = (v[t] - torch.einsum("hkv,hk->hv", s, k[t])) * beta[t][:, None]  # [Hv, V]
            s = s + k[t][:, :, None] * delta[:, None, :]
            out[t] = torch.einsum("hkv,hk->hv", s, q[t])
        states[indices[b]] = s
    return out, states


def test_ssd_prefill_with_strong_decay_matches_float64(device):
    """Decays down to exp(-80) a token: the kernel against the float64 recurrence (interpreter,
    seeds 0-5: out <= 1.6e-6, state <= 4.4e-7; the reference: 3.1e-6, 2.0e-6)."""
    from paphos.kernels.ssd_update import ssd

    qsl, indices, has_initial, max_len = _batch(BATCHES["mixed"], device)
    num_tokens, heads, head_dim, groups, state = int(qsl[-1]), 4, 16, 2, 32
    x = torch.randn(num_tokens, heads, head_dim, device=device)
    dt = torch.randn(num_tokens, heads, device=device) * 3  # [T, H] raw: dt up to ~10
    B, C = (torch.randn(num_tokens, groups, state, device=device) for _ in range(2))
    A = -torch.rand(heads, device=device) * 8  # [H]
    D, dt_bias = torch.randn(heads, device=device), torch.randn(heads, device=device)
    states = torch.randn(NUM_SLOTS, heads, head_dim, state, device=device)
    args = (qsl, indices, has_initial)
    want, want_states = _ssd_exact(
        *(t.cpu() for t in (x, dt, A, B, C, D, dt_bias, states, *args)), (0.0, 10.0)
    )
    y = ssd(x, dt, A, B, C, D, dt_bias, states, *args, max_len, 256, (0.0, 10.0))
    touched = indices.cpu()  # (the float64 truth is on the CPU)
    assert rel_error(y.cpu(), want) < 5e-6
    assert rel_error(states[indices].cpu(), want_states[touched]) < 2e-6


def test_gated_delta_rule_prefill_with_strong_decay_matches_float64(device):
    """Log decays down to -60 a token (Qwen3.5's gates reach them) against the float64
    recurrence (interpreter, seeds 0-5: out <= 7.1e-7, state <= 9.9e-8; the reference: 3.2e-6,
    3.6e-6). A chunk's total decay summed apart from its cumsum once put the newest token's
    weight exp(total - cum) off 1 by the rounding: state errors 6.5e-7 to 4.1e-6."""
    from paphos.kernels.gated_delta_rule import gated_delta_rule

    qsl, indices, has_initial, max_len = _batch(BATCHES["mixed"], device)
    q, k, v, g, beta = _gdn_inputs(int(qsl[-1]), 1, 2, 32, 16, torch.float32, device)
    g = g * torch.rand(g.shape, device=device) * 60  # [T, Hv]: log decays in (-60 x, 0]
    states = torch.randn(NUM_SLOTS, 2, 32, 16, device=device) * 0.1
    args = (qsl, indices, has_initial)
    want, want_states = _gdn_exact(*(t.cpu() for t in (q, k, v, g, beta, states, *args)))
    out = gated_delta_rule(q, k, v, g, beta, states, *args, max_len)
    touched = indices.cpu()  # (the float64 truth is on the CPU)
    assert rel_error(out.cpu(), want) < 3e-6
    assert rel_error(states[indices].cpu(), want_states[touched]) < 5e-7
