"""Each batched sampler against its slow per-sequence reference (test_sampler_refs), on random
logits and histories: removed tokens must match exactly, kept logits within float32 tolerance.
Every batch mixes rows that use the sampler (with different values) and rows that do not."""

from __future__ import annotations

import random

import numpy as np
import pytest
import test_sampler_refs as ref
import torch

from paphos.layers.sampler import RequestSamplingState, Sampler, SamplingMetadata
from paphos.layers.sampling import shaping
from paphos.sampling_params import SamplingParams

VOCAB = 48
CPU = torch.device("cpu")


def _processed(
    params: list[SamplingParams], histories: list[tuple[list[int], list[int]]], logits: torch.Tensor
) -> tuple[np.ndarray, list[RequestSamplingState]]:
    states = [
        RequestSamplingState(p, pr, out, None, VOCAB, CPU)
        for p, (pr, out) in zip(params, histories, strict=True)
    ]
    md = SamplingMetadata.build(states, VOCAB, CPU)
    return Sampler().process_logits(logits, md).double().numpy(), states


def _assert_rows_match(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def _random_case(seed: int, rows: int = 6):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    logits = torch.randn(rows, VOCAB) * rng.choice([1.0, 2.0, 4.0])  # [rows, vocab]
    histories = []
    for _ in range(rows):
        prompt = [rng.randrange(8) for _ in range(rng.randrange(1, 20))]
        output = [rng.randrange(8) for _ in range(rng.randrange(0, 20))]
        histories.append((prompt, output))
    return rng, logits, histories


# (field values drawn per row, reference call) for the history-free samplers.
SIMPLE = {
    "top_k": (lambda r: {"top_k": r.randrange(1, 30)}, lambda x, p: ref.top_k(x, p.top_k)),
    "top_p": (lambda r: {"top_p": r.uniform(0.2, 0.95)}, lambda x, p: ref.top_p(x, p.top_p)),
    "top_a": (lambda r: {"top_a": r.uniform(0.05, 0.9)}, lambda x, p: ref.top_a(x, p.top_a)),
    "min_p": (lambda r: {"min_p": r.uniform(0.01, 0.5)}, lambda x, p: ref.min_p(x, p.min_p)),
    "tfs": (lambda r: {"tfs": r.uniform(0.3, 0.99)}, lambda x, p: ref.tfs(x, p.tfs)),
    "eta": (
        lambda r: {"eta_cutoff": r.uniform(1, 500)},
        lambda x, p: ref.eta_cutoff(x, p.eta_cutoff),
    ),
    "epsilon": (
        lambda r: {"epsilon_cutoff": r.uniform(1, 500)},
        lambda x, p: ref.epsilon_cutoff(x, p.epsilon_cutoff),
    ),
    "typical": (
        lambda r: {"typical_p": r.uniform(0.2, 0.95)},
        lambda x, p: ref.typical_p(x, p.typical_p),
    ),
    "nsigma": (lambda r: {"nsigma": r.uniform(0.3, 3)}, lambda x, p: ref.top_nsigma(x, p.nsigma)),
    "temperature": (
        lambda r: {"temperature": r.uniform(0.1, 3)},
        lambda x, p: ref.temperature(x, p.temperature, 0, 0, 1),
    ),
    "dynatemp": (
        lambda r: {
            "dynatemp_min": r.uniform(0.1, 1),
            "dynatemp_max": r.uniform(1, 3),
            "dynatemp_exponent": r.uniform(0.5, 2),
        },
        lambda x, p: ref.temperature(x, 1, p.dynatemp_min, p.dynatemp_max, p.dynatemp_exponent),
    ),
    "quadratic": (
        lambda r: {"smoothing_factor": r.uniform(0.1, 1), "smoothing_curve": r.uniform(0.5, 3)},
        lambda x, p: ref.quadratic(x, p.smoothing_factor, p.smoothing_curve),
    ),
    "xtc": (
        lambda r: {"xtc_probability": 1.0, "xtc_threshold": r.uniform(0.02, 0.2)},
        lambda x, p: ref.xtc(x, p.xtc_threshold),
    ),
    "mirostat": (
        lambda r: {"mirostat_mode": 2, "mirostat_tau": r.uniform(1, 4)},
        lambda x, p: ref.mirostat(x, 2 * p.mirostat_tau),
    ),
}


@pytest.mark.parametrize("name", sorted(SIMPLE))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_history_free_sampler_matches_reference(name: str, seed: int) -> None:
    rng, logits, histories = _random_case(seed)
    draw, reference = SIMPLE[name]
    params = [SamplingParams(**draw(rng)) if i % 3 != 1 else SamplingParams() for i in range(6)]
    got, _ = _processed(params, histories, logits)
    for i, p in enumerate(params):
        x = logits[i].double().numpy()
        want = reference(x, p) if i % 3 != 1 else x
        _assert_rows_match(got[i], want)


@pytest.mark.parametrize("seed", range(4))
def test_penalties_match_reference(seed: int) -> None:
    rng, logits, histories = _random_case(seed)
    params = [
        SamplingParams(
            presence_penalty=rng.uniform(-2, 2),
            frequency_penalty=rng.uniform(-2, 2),
            repetition_penalty=rng.uniform(0.5, 2),
            repetition_penalty_range=rng.choice([0, 3, 10]),
        )
        if i != 2
        else SamplingParams()
        for i in range(6)
    ]
    got, _ = _processed(params, histories, logits)
    for i, p in enumerate(params):
        x = logits[i].double().numpy()
        want = ref.penalties(
            x,
            *histories[i],
            p.presence_penalty,
            p.frequency_penalty,
            p.repetition_penalty,
            p.repetition_penalty_range,
        )
        _assert_rows_match(got[i], want)


@pytest.mark.parametrize("seed", range(4))
def test_no_repeat_ngram_matches_reference(seed: int) -> None:
    rng, logits, histories = _random_case(seed)
    params = [SamplingParams(no_repeat_ngram_size=rng.choice([0, 1, 2, 3, 4])) for _ in range(6)]
    got, _ = _processed(params, histories, logits)
    for i, p in enumerate(params):
        x = logits[i].double().numpy()
        seq = histories[i][0] + histories[i][1]
        want = ref.no_repeat_ngram(x, seq, p.no_repeat_ngram_size) if p.no_repeat_ngram_size else x
        _assert_rows_match(got[i], want)


@pytest.mark.parametrize("seed", range(6))
def test_dry_matches_reference(seed: int) -> None:
    rng, logits, histories = _random_case(seed)
    # Repetitive histories over a tiny alphabet so that long matches occur.
    histories = [([rng.randrange(3) for _ in range(rng.randrange(5, 40))], []) for _ in range(6)]
    params = []
    for i in range(6):
        breakers = rng.sample(range(3), rng.choice([0, 1]))
        params.append(
            SamplingParams(
                dry_multiplier=rng.uniform(0.2, 2) if i != 3 else 0.0,
                dry_base=rng.uniform(1.1, 2),
                dry_allowed_length=rng.choice([1, 2, 3]),
                dry_range=rng.choice([0, 8, 20]),
                dry_sequence_breakers=[],
                dry_sequence_breaker_ids=breakers,
            )
        )
    got, _ = _processed(params, histories, logits)
    for i, p in enumerate(params):
        x = logits[i].double().numpy()
        want = (
            x
            if p.dry_multiplier == 0
            else ref.dry(
                x,
                histories[i][0],
                p.dry_multiplier,
                p.dry_base,
                p.dry_allowed_length,
                set(p.dry_sequence_breaker_ids),
                p.dry_range,
            )
        )
        _assert_rows_match(got[i], want)


def test_skew_matches_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 2  # [rows, vocab]
    skews = torch.tensor([-1.0, 0.3, 1.5, 0.0])
    got = shaping.apply_skew(logits, skews).exp().double().numpy()
    for i in range(4):
        want = ref.skew_probs(logits[i].double().numpy(), float(skews[i]))
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_full_default_chain_matches_references_in_order() -> None:
    """All samplers on in one row, applied in Aphrodite's default order."""
    rng, logits, histories = _random_case(7, rows=2)
    p = SamplingParams(
        repetition_penalty=1.3,
        presence_penalty=0.3,
        temperature=0.8,
        top_k=30,
        top_p=0.95,
        top_a=0.01,
        min_p=0.01,
        tfs=0.99,
        eta_cutoff=1,
        epsilon_cutoff=1,
        typical_p=0.99,
        nsigma=3.0,
        smoothing_factor=0.2,
        dry_multiplier=0.5,
        dry_sequence_breakers=[],
        no_repeat_ngram_size=3,
    )
    got, _ = _processed([p, SamplingParams()], histories, logits)
    x = logits[0].double().numpy()
    prompt, output = histories[0]
    seq = prompt + output
    x = ref.dry(x, seq, 0.5, 1.75, 2, set(), 0)
    x = ref.penalties(x, prompt, output, 0.3, 0.0, 1.3, 0)
    x = ref.no_repeat_ngram(x, seq, 3)
    x = ref.temperature(x, 0.8, 0, 0, 1)
    x = ref.top_nsigma(x, 3.0)
    x = ref.top_p(ref.top_k(x, 30), 0.95)
    x = ref.tfs(ref.min_p(ref.top_a(x, 0.01), 0.01), 0.99)
    x = ref.typical_p(ref.epsilon_cutoff(ref.eta_cutoff(x, 1), 1), 0.99)
    x = ref.quadratic(x, 0.2, 1.0)
    _assert_rows_match(got[0], x)
    _assert_rows_match(got[1], logits[1].double().numpy())
