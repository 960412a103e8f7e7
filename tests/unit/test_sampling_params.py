"""SamplingParams: defaults turn every sampler off, each field is validated with a ValueError
naming it, sampler_priority takes names and Kobold ints, resolved ids survive replace()."""

from __future__ import annotations

import dataclasses

import pytest

from paphos.layers.sampling.batch import used_samplers
from paphos.sampling_params import DEFAULT_SAMPLER_ORDER, SamplingParams


def test_default_params_use_no_sampler() -> None:
    assert used_samplers(SamplingParams(), vocab_size=100) == frozenset()
    assert used_samplers(SamplingParams(temperature=0), vocab_size=100) == frozenset()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_k", -2),
        ("top_a", -1.0),
        ("min_p", 1.5),
        ("tfs", 0.0),
        ("eta_cutoff", -1.0),
        ("epsilon_cutoff", 2000.0),
        ("typical_p", 1.5),
        ("smoothing_factor", -1.0),
        ("xtc_threshold", 1.5),
        ("xtc_probability", -0.1),
        ("nsigma", -1.0),
        ("skew", float("nan")),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty_range", -1),
        ("no_repeat_ngram_size", -1),
        ("dry_multiplier", -1.0),
        ("dry_base", 1.0),
        ("dry_allowed_length", 0),
        ("dry_range", -5),
        ("mirostat_mode", 1),
        ("mirostat_tau", -1.0),
        ("dynatemp_min", -1.0),
        ("allowed_token_ids", []),
        ("stop_token_ids", [-1]),
        ("logit_bias", {1: 500}),
        ("min_tokens", 100),
    ],
)
def test_bad_values_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampler_priority_accepts_kobold_ints_and_names() -> None:
    kobold = SamplingParams(sampler_order=[6, 0, 1, 3, 4, 2, 5])
    assert kobold.sampler_names[:7] == (
        "penalties",
        "top_k",
        "top_a",
        "tfs",
        "typical_p",
        "top_p",
        "temperature",
    )
    assert sorted(kobold.sampler_names) == sorted(DEFAULT_SAMPLER_ORDER)
    named = SamplingParams(sampler_priority=["TOP_P_TOP_K", "temperature", "dry"])
    assert named.sampler_names[:4] == ("top_k", "top_p", "temperature", "dry")
    with pytest.raises(ValueError, match="sampler_priority"):
        SamplingParams(sampler_priority=[0, 0])
    with pytest.raises(ValueError, match="sampler_priority"):
        SamplingParams(sampler_priority=["nope"])
    with pytest.raises(ValueError, match="sampler_order"):
        SamplingParams(sampler_priority=[1], sampler_order=[2])


def test_temperature_last_moves_temperature_after_xtc() -> None:
    names = SamplingParams(temperature_last=True).sampler_names
    assert names[-1] == "temperature" and names[-2] == "xtc"


class _CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_resolved_token_ids_survive_replace() -> None:
    params = SamplingParams(bad_words=["hi"], dry_multiplier=0.8, custom_token_bans=["z", 5])
    params.resolve_token_ids(_CharTokenizer())
    assert [ord("h"), ord("i")] in params._bad_words_ids
    assert params._dry_breaker_ids == sorted(ord(c) for c in '\n:"*')
    assert params._custom_ban_ids == [5, ord("z")]
    child = dataclasses.replace(params, seed=3)
    assert child._bad_words_ids == params._bad_words_ids
    assert child._custom_ban_ids == params._custom_ban_ids


def test_custom_token_bans_parse_comma_separated_ids() -> None:
    assert SamplingParams(custom_token_bans="1, 2,3")._custom_ban_ids == [1, 2, 3]
