"""Tensor parallelism of the configurable decoder on CPU over gloo: TP=2 gives the logits of TP=1
(both ranks, a prefill and a decode step) for the features that shard in their own way: q/k norm
over the whole projection (a cross-rank mean of squares, with one kv head replicated), per-head
q/k LayerNorms (loaded head by head: StableLM; whole: Cohere) in a parallel block, Gemma 3's
sandwich norms and windows, Gemma 4's per-layer shapes (a replicated single kv head) with KV
shared across layers and per-layer inputs."""

from __future__ import annotations

import pytest
from torch.testing import assert_close

from paphos.runner.model_runner import ModelRunner
from tests.engine.test_tensor_parallel import (
    _run_two_ranks,
    _runner_config,
    no_process_left_behind,  # noqa: F401 - autouse: no rank process survives a test
    prefill_then_decode_logits,
)
from tests.models.test_zoo import CASES
from tests.models.zoo_harness import make_tiny_model


@pytest.mark.parametrize(
    "name",
    ["olmo2-1kv-bias", "stablelm-parallel-qknorm", "cohere-qknorm-bias", "gemma3", "gemma4"],
)
def test_two_ranks_give_the_logits_of_one_rank(tmp_path, name):
    config_class, overrides, _ = CASES[name]
    make_tiny_model(tmp_path, config_class, **overrides)
    expected = prefill_then_decode_logits(ModelRunner(_runner_config(tmp_path)))
    by_rank = _run_two_ranks(tmp_path)
    for rank in (0, 1):  # every rank holds the full (all-gathered) logits
        for got, want in zip(by_rank[rank], expected, strict=True):
            assert_close(got, want, rtol=1e-4, atol=1e-4)
