"""Sampler behaviour: greedy, bans, min_tokens, logprobs, seeded reproducibility independent of the
batch, and distribution checks (chi-square) for the stochastic parts."""

from __future__ import annotations

import math

import pytest
import torch

from paphos.layers.sampler import (
    RequestSamplingState,
    Sampler,
    SamplingMetadata,
    compute_prompt_logprobs,
)
from paphos.sampling_params import SamplingParams

VOCAB = 32
CPU = torch.device("cpu")
CHI2_CRIT_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}  # p = 0.001


def _state(
    params: SamplingParams, output: list[int] | None = None, eos: int | None = None
) -> RequestSamplingState:
    return RequestSamplingState(params, [1, 2, 3], output or [], eos, VOCAB, CPU)


def _sample(states: list[RequestSamplingState], logits: torch.Tensor, sampler=None):
    md = SamplingMetadata.build(states, VOCAB, CPU)
    return (sampler or Sampler())(logits, md)


def test_greedy_takes_argmax_after_penalties() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 3.0
    logits[:, 6] = 2.9
    states = [
        _state(SamplingParams(temperature=0)),
        _state(SamplingParams(temperature=0, repetition_penalty=2.0), output=[5]),
    ]
    out = _sample(states, logits)
    assert out.sampled_token_ids.tolist() == [5, 6]
    assert out.logprobs is None


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 50.0  # EOS
    logits[:, 8] = 40.0  # stop token
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[8])
    states = [
        _state(params, [], eos=7),
        _state(params, [4, 4], eos=7),
        _state(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), [], eos=7),
    ]
    assert _sample(states, logits).sampled_token_ids.tolist() == [0, 7, 7]


def test_logit_bias_allowed_tokens_and_custom_bans() -> None:
    logits = torch.zeros(3, VOCAB)
    states = [
        _state(SamplingParams(temperature=0, logit_bias={9: 5.0})),
        _state(SamplingParams(temperature=0, allowed_token_ids=[3, 4], logit_bias={4: 1})),
        _state(SamplingParams(temperature=0, custom_token_bans=list(range(0, 20)))),
    ]
    assert _sample(states, logits).sampled_token_ids.tolist() == [9, 4, 20]


class _CharTokenizer:
    """One token per character: ord(c) % VOCAB."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % VOCAB for c in text]


def test_bad_words_ban_single_tokens_and_completions_of_longer_words() -> None:
    params = SamplingParams(temperature=0, bad_words=["ab"], dry_sequence_breakers=[])
    params.resolve_token_ids(_CharTokenizer())
    a, b = ord("a") % VOCAB, ord("b") % VOCAB
    logits = torch.zeros(2, VOCAB)
    logits[:, b] = 10.0
    states = [_state(params, output=[a]), _state(params, output=[b])]
    tokens = _sample(states, logits).sampled_token_ids.tolist()
    assert tokens[0] != b and tokens[1] == b


def test_string_fields_without_tokenizer_raise() -> None:
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["x"]).resolve_token_ids(None)
    with pytest.raises(ValueError, match="dry_sequence_breakers"):
        SamplingParams(dry_multiplier=1.0).resolve_token_ids(None)
    with pytest.raises(ValueError, match="bad_words"):
        _state(SamplingParams(bad_words=["x"]))
    with pytest.raises(ValueError, match="logit_bias"):
        _state(SamplingParams(logit_bias={VOCAB + 3: 1.0}))


def test_logprobs_report_the_raw_distribution_with_ranks() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    states = [
        _state(SamplingParams(temperature=0.3, top_k=2, logprobs=2)),
        _state(SamplingParams(logprobs=4)),
        _state(SamplingParams(temperature=0)),
    ]
    out = _sample(states, logits)
    raw = logits.log_softmax(dim=-1)
    lp = out.logprobs
    assert lp is not None and lp.token_ids.shape == (3, 5)
    tokens = out.sampled_token_ids
    assert torch.equal(lp.token_ids[:, 0], tokens)
    torch.testing.assert_close(lp.logprobs[:, 0], raw.gather(1, tokens[:, None]).squeeze(1))
    torch.testing.assert_close(lp.logprobs[:, 1:], raw.topk(4, dim=-1).values)
    expected_rank = (raw > raw.gather(1, tokens[:, None])).sum(dim=-1) + 1
    assert torch.equal(lp.ranks[:, 0], expected_rank)
    assert lp.ranks[0, 1:].tolist() == [1, 2, 3, 4]


def test_prompt_logprobs_of_targets() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    targets = torch.tensor([3, 1, 4, 1])
    lp = compute_prompt_logprobs(logits, targets, 2)
    raw = logits.log_softmax(dim=-1)
    torch.testing.assert_close(lp.logprobs[:, 0], raw[torch.arange(4), targets])
    assert torch.equal(lp.token_ids[:, 1:], raw.topk(2, dim=-1).indices)


def _run_steps(
    params: SamplingParams, companions: list[SamplingParams], position: int, steps: int = 6
) -> list[int]:
    """Sample `steps` tokens for one request placed at `position` among companions."""
    gen = torch.Generator().manual_seed(123)
    logits_per_step = [torch.randn(1, VOCAB, generator=gen) * 2 for _ in range(steps)]
    target = _state(params)
    others = [_state(p) for p in companions]
    out_tokens = []
    for step in range(steps):
        states = others[:position] + [target] + others[position:]
        logits = torch.randn(len(states), VOCAB)
        logits[position] = logits_per_step[step][0]
        tokens = _sample(states, logits).sampled_token_ids.tolist()
        for s, t in zip(states, tokens, strict=True):
            s.append_output_token(t)
        out_tokens.append(tokens[position])
    return out_tokens


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"xtc_probability": 0.5, "xtc_threshold": 0.05},
        {"mirostat_mode": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.1},
    ],
)
def test_seeded_request_is_independent_of_batch_composition(extra: dict) -> None:
    params = SamplingParams(seed=42, temperature=1.5, **extra)
    alone = _run_steps(params, [], 0)
    crowded = _run_steps(
        params,
        [SamplingParams(seed=7), SamplingParams(top_p=0.5), SamplingParams(temperature=0)],
        2,
    )
    assert alone == crowded
    assert _run_steps(SamplingParams(seed=43, temperature=1.5, **extra), [], 0) != alone


def _chi2(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


def test_draws_follow_the_processed_distribution() -> None:
    """top_k=4 and temperature 0.7: draws over many rows match softmax(top-4 logits / 0.7)."""
    torch.manual_seed(3)
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.4] + [-1.0] * (VOCAB - 5))
    rows = 4000
    states = [_state(SamplingParams(top_k=4, temperature=0.7))] * rows
    tokens = _sample(states, base.expand(rows, VOCAB).clone()).sampled_token_ids
    counts = torch.bincount(tokens, minlength=VOCAB)
    assert counts[4:].sum() == 0
    probs = (base[:4] / 0.7).softmax(dim=0).tolist()
    assert _chi2(counts[:4].tolist(), probs) < CHI2_CRIT_001[3]


def test_xtc_fires_with_its_probability() -> None:
    """Two tokens above the threshold: XTC removes the top one in xtc_probability of the rows."""
    torch.manual_seed(4)
    base = torch.full((VOCAB,), -20.0)
    base[0], base[1] = 5.0, 4.0  # the top two hold almost all the mass
    rows = 4000
    states = [_state(SamplingParams(xtc_probability=0.3, xtc_threshold=0.1))] * rows
    tokens = _sample(states, base.expand(rows, VOCAB).clone()).sampled_token_ids
    p_top = math.exp(5) / (math.exp(5) + math.exp(4))
    # Not fired: token 0 with p_top; fired: always token 1.
    expected = [0.7 * p_top, 0.7 * (1 - p_top) + 0.3]
    counts = [int((tokens == 0).sum()), int((tokens == 1).sum())]
    assert sum(counts) == rows
    assert _chi2(counts, expected) < CHI2_CRIT_001[1]


def test_mirostat_updates_mu_from_the_sampled_surprisal() -> None:
    torch.manual_seed(5)
    logits = torch.randn(1, VOCAB)
    state = _state(SamplingParams(mirostat_mode=2, mirostat_tau=3.0, mirostat_eta=0.5))
    out = _sample([state], logits)
    mu0 = 6.0
    kept = logits[0].clone()
    surprisal = -logits[0].log_softmax(dim=0) / math.log(2)
    kept[(surprisal > mu0) & (torch.arange(VOCAB) != logits[0].argmax())] = float("-inf")
    token = int(out.sampled_token_ids[0])
    picked = float(-kept.log_softmax(dim=0)[token] / math.log(2))
    assert math.isfinite(picked)
    assert state.mirostat_mu == pytest.approx(mu0 - 0.5 * (picked - 3.0), rel=1e-5)


def test_unused_samplers_are_skipped() -> None:
    md = SamplingMetadata.build(
        [_state(SamplingParams()), _state(SamplingParams(top_k=3))], VOCAB, CPU
    )
    ((order, rows_for),) = [g for g in md.groups if g[1]]
    assert list(rows_for) == ["top_k"] and rows_for["top_k"].tolist() == [1]
    assert md.history is None and md.bans is None and md.logit_bias is None
