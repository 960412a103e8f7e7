"""Triton prompt-chunk kernels of the hybrid models' state ops (causal conv1d, Mamba2 SSD, gated
delta rule) against their ops references over flat batches: fresh and continuing sequences
beside each other (a 1-token fresh prompt beside a 40-token continuing one), lengths that are
not multiples of the chunk size, a prompt split at a chunk boundary over two calls, scattered
slots (the others untouched), fp32 and bf16. Small shapes, so that TRITON_INTERPRET=1 runs them
on the CPU in seconds."""

from __future__ import annotations

import pytest
import torch

from paphos.ops.causal_conv1d import causal_conv1d as ref_conv
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
