"""Which captured decode graph a step replays, decided on the host (CPU): batch-size buckets, the
short-context bounds small batches get (fewer decode splits), and `InputBuffers.prepare` taking
the smallest bound that holds the step's longest sequence - its multi-step lookahead included -
or no graph at all."""

from __future__ import annotations

import torch

from paphos.runner.cuda_graph import DecodeGraphs, batch_size_buckets
from paphos.runner.inputs import InputBuffers, RunnerRequestState


def _graphs(buffers: InputBuffers, max_seq_len: int) -> DecodeGraphs:
    return DecodeGraphs(torch.nn.Identity(), [], buffers, [1, 2, 4, 8, 16], max_seq_len, 10)


def test_batch_buckets_are_powers_of_two_then_multiples_of_eight():
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_size_buckets(1) == [1]


def test_small_batches_get_short_context_graphs_below_the_longest():
    graphs = _graphs(InputBuffers(16, 64, 4096, 16, torch.device("cpu")), 2048)
    assert graphs.seq_lens_for(1) == (256, 1024, 2048)
    assert graphs.seq_lens_for(8) == (256, 1024, 2048)
    assert graphs.seq_lens_for(16) == (2048,)
    assert _graphs(InputBuffers(16, 64, 512, 16, torch.device("cpu")), 512).seq_lens_for(2) == (
        256,
        512,
    )


def _decoding(buffers: InputBuffers, rid: str, length: int) -> RunnerRequestState:
    state = RunnerRequestState(
        rid, [3] * length, length, list(range(-(-length // 16))), length - 1, None
    )
    buffers.add(state)
    return state


def test_prepare_takes_the_smallest_bound_that_holds_the_longest_sequence():
    buffers = InputBuffers(8, 64, 4096, 16, torch.device("cpu"))
    states = [_decoding(buffers, "a", 100), _decoding(buffers, "b", 256)]
    bounds = (256, 1024, 2048)
    inputs = buffers.prepare(states, [1, 1], 2, bounds)
    assert (inputs.padded_to, inputs.graph_seq_len) == (2, 256)
    inputs = buffers.prepare(states, [1, 1], 2, bounds, lookahead=3)  # a 4-step decode: 259
    assert (inputs.padded_to, inputs.graph_seq_len) == (2, 1024)
    inputs = buffers.prepare(states, [1, 1], 2, (128,))  # longer than every graph: eager
    assert (inputs.padded_to, inputs.graph_seq_len) == (None, None)
