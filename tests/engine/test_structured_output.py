"""Structured output in the engine, on the tiny random Llama (its tokens are noise, so only the
grammar makes the outputs valid): every output of a bounded grammar completes and follows it, with
overlapped steps, multi-step decodes asked for, n > 1, chunked prefill, preemption and prefix
caching, in batches that mix constrained and free requests; the sampled tokens always satisfy the
matcher (EOS only once the grammar is complete)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from paphos import LLM, SamplingParams

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["fox", "dog"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "inner": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["kind", "count", "ok", "tags", "inner"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{2,4}-[0-9]{1,2}"
CHOICES = ["quick brown", "lazy dog", "12345"]


def _llm(path: Path, **engine_kwargs) -> LLM:  # noqa: ANN003
    kwargs = dict(dtype="float32", kv_cache_space=0.02, device="cpu", max_model_len=256)
    kwargs.update(engine_kwargs)
    return LLM(model=str(path), **kwargs)


def _workload(n: int = 1) -> list[SamplingParams]:
    out = []
    for seed in range(3):
        out += [
            SamplingParams(seed=seed, max_tokens=90, n=n, structured_outputs={"json": SCHEMA}),
            SamplingParams(seed=seed, max_tokens=20, structured_outputs={"regex": REGEX}),
            SamplingParams(seed=seed, max_tokens=20, n=n, structured_outputs={"choice": CHOICES}),
            SamplingParams(seed=seed, max_tokens=16),  # free, beside the constrained ones
        ]
    return out


def _check(llm: LLM, params: list[SamplingParams]) -> None:
    # two prompts of 2+ full blocks each, so that repeats hit the prefix cache
    texts = ["The quick brown fox jumps over the lazy dog. " * 2, "Hello world! How are you? " * 2]
    prompts = [texts[i % 2] for i in range(len(params))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs, params):
        spec = p.structured_outputs
        assert len(out.outputs) == p.n
        for c in out.outputs:
            if spec is None:
                continue
            assert c.finish_reason == "stop", (spec.kind, c.text)
            if spec.kind == "json":
                jsonschema.validate(json.loads(c.text), SCHEMA)
            elif spec.kind == "regex":
                assert re.fullmatch(REGEX, c.text), c.text
            else:
                assert c.text in CHOICES
    llm.engine.scheduler.check_invariants()
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, "blocks leaked"


@pytest.fixture(scope="module")
def overlapped(tiny_llama_dir: Path) -> LLM:
    # overlapped steps and multi-step decodes asked for: constrained requests take single steps
    return _llm(tiny_llama_dir, async_scheduling=True, num_scheduler_steps=4)


def test_constrained_and_free_requests_in_one_batch_overlapped(overlapped: LLM) -> None:
    _check(overlapped, _workload())


def test_n_greater_than_one(overlapped: LLM) -> None:
    _check(overlapped, _workload(n=3)[:4])


def test_chunked_prefill_preemption_and_prefix_caching(tiny_llama_dir: Path) -> None:
    llm = _llm(
        tiny_llama_dir,
        max_num_batched_tokens=8,  # prompts arrive in chunks
        num_blocks_override=11,  # 176 slots for 12 requests of up to ~150 tokens: preemptions
        enable_prefix_caching=True,
        async_scheduling=True,
        max_model_len=176,
    )
    _check(llm, _workload())
    assert llm.engine.get_stats().num_preemptions > 0
    _check(llm, _workload())  # again: the prompts now hit the prefix cache
    assert llm.engine.get_stats().prefix_cache_hits > 0


def test_a_bad_constraint_is_a_value_error_naming_it(overlapped: LLM) -> None:
    bad = [
        ({"json": {"type": "foo"}}, "Unsupported type"),
        ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"regex": "a(b"}, "parenthesis"),
        ({"grammar": "root ::= foo"}, "foo"),
    ]
    for spec, words in bad:
        with pytest.raises(ValueError, match=re.escape(words)):
            overlapped.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured_outputs={"jsonschema": {}})
    assert not overlapped.engine.parents  # nothing left behind
    out = overlapped.generate("x", SamplingParams(max_tokens=4, structured_outputs={"regex": "ab"}))
    assert out[0].outputs[0].text == "ab"


SAMPLERS = [
    {"temperature": 5.0},
    {"temperature": 0.0},
    {"top_k": 3, "top_p": 0.5, "min_p": 0.1},
    {"typical_p": 0.5, "tfs": 0.5, "top_a": 0.2},
    {"xtc_threshold": 0.01, "xtc_probability": 1.0},
    {"dynatemp_min": 0.5, "dynatemp_max": 4.0, "smoothing_factor": 0.3},
    {"repetition_penalty": 1.5, "presence_penalty": 1.0, "frequency_penalty": 1.0},
    {"dry_multiplier": 1.0, "no_repeat_ngram_size": 2},
    {"mirostat_mode": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.5},
    {"nsigma": 1.0, "skew": 1.0, "eta_cutoff": 3.0, "epsilon_cutoff": 3.0},
    {"logit_bias": {40: 100.0, 41: 100.0}, "logprobs": 2},  # a huge bias on tokens the mask bans
]


def test_every_sampler_applies_on_top_of_the_mask(overlapped: LLM) -> None:
    params = [
        SamplingParams(seed=seed, max_tokens=20, structured_outputs={"regex": REGEX}, **sampler)
        for sampler in SAMPLERS
        for seed in range(2)
    ]
    _check(overlapped, params)
