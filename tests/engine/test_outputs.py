"""What `LLM.generate` hands back: text that equals decoding the tokens, stop strings (cut or
kept), stop token ids, max_tokens/min_tokens, n and best_of, logprobs, metrics, and clear errors
for bad input that leave the engine serving."""

from __future__ import annotations

import pytest

from paphos import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_space=0.02, seed=0)


def _greedy(llm: LLM, prompt: str, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0]


def test_text_equals_decoding_the_output_tokens(llm):
    out = _greedy(llm, "Hello world").outputs[0]
    assert len(out.token_ids) == 24 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_the_text_or_keeps_it_when_asked(llm):
    full = _greedy(llm, "Hello world").outputs[0].text
    stop = full[5:8]
    assert stop and stop not in full[:5]
    cut = _greedy(llm, "Hello world", stop=[stop]).outputs[0]
    assert cut.text == full[: full.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = _greedy(llm, "Hello world", stop=[stop], include_stop_str_in_output=True).outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_id_ends_the_sequence_and_min_tokens_delays_it(llm):
    tokens = _greedy(llm, "Hello world").outputs[0].token_ids
    stop_id = tokens[3]
    first = tokens.index(stop_id)
    out = _greedy(llm, "Hello world", stop_token_ids=[stop_id]).outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    later = _greedy(llm, "Hello world", stop_token_ids=[stop_id], min_tokens=first + 2).outputs[0]
    assert len(later.token_ids) >= first + 2


def test_n_and_best_of_return_distinct_ranked_samples(llm):
    params = SamplingParams(temperature=1.0, n=3, max_tokens=12, seed=7, ignore_eos=True)
    outs = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) == 3
    best = SamplingParams(temperature=1.0, n=2, best_of=4, max_tokens=12, seed=7, ignore_eos=True)
    ranked = llm.generate("Once upon a time", best, use_tqdm=False)[0].outputs
    assert len(ranked) == 2 and all(o.logprobs is None for o in ranked)


def test_logprobs_and_metrics_are_reported(llm):
    out = _greedy(llm, "Hello world", logprobs=3)
    completion = out.outputs[0]
    assert len(completion.logprobs) == 24
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        assert token_id in position and len(position) >= 3
        assert position[token_id].rank == 1  # greedy picks the most likely token
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.last_token_time <= m.finished_time


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", SamplingParams(), "empty"),
        ({"prompt_token_ids": [10**9]}, SamplingParams(), "token ids"),
        ("hi", SamplingParams(max_tokens=10**6), "max_tokens"),
        ({"nonsense": 1}, SamplingParams(), "prompt must be"),
    ],
)
def test_bad_input_raises_and_the_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert _greedy(llm, "Hello world").outputs[0].finish_reason == "length"


def _stream(llm: LLM, params: SamplingParams, kind, request_id: str) -> list:
    """Every output Engine.step() hands back for one request added with this OutputKind."""
    engine = llm.engine
    engine.add_request(request_id, "Once upon a time", params, output_kind=kind)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"n": 2, "logprobs": 2},
        {"stop": ["e", "th"]},
        {"stop": ["e"], "include_stop_str_in_output": True},
        {"n": 2, "best_of": 3},
    ],
)
def test_engine_deltas_equal_deltas_of_its_cumulative_outputs(llm, extra):
    from paphos.engine.deltas import DeltaTracker
    from paphos.outputs import OutputKind

    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, **extra)
    cumulative = _stream(llm, params, OutputKind.CUMULATIVE, f"cum-{extra}")
    deltas = _stream(llm, params, OutputKind.DELTA, f"delta-{extra}")
    tracker = DeltaTracker(params)
    expected = [d for o in cumulative if (d := tracker.step(o)) is not None]
    assert len(deltas) == len(expected) and deltas[-1].finished
    for got, want in zip(deltas, expected):
        assert got.outputs == want.outputs  # text, token ids, logprobs, reasons, indices
        assert got.finished == want.finished
    final = cumulative[-1].outputs
    for completion in final:  # the deltas join to the whole output
        pieces = [c for d in deltas for c in d.outputs if c.index == completion.index]
        assert "".join(p.text for p in pieces) == completion.text
        assert [t for p in pieces for t in p.token_ids] == completion.token_ids


def test_final_only_requests_get_one_output_equal_to_the_last_cumulative_one(llm):
    from paphos.outputs import OutputKind

    params = SamplingParams(temperature=1.0, seed=5, max_tokens=12, n=2, ignore_eos=True)
    cumulative = _stream(llm, params, OutputKind.CUMULATIVE, "whole-cum")
    final = _stream(llm, params, OutputKind.FINAL_ONLY, "whole-final")
    assert len(cumulative) > 1 and len(final) == 1 and final[0].finished
    assert final[0].outputs == cumulative[-1].outputs
