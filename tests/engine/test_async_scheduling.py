"""Overlapped steps (async scheduling) on the CPU: the engine schedules step k+1 before step k's
tokens reach the host and the runner takes them from its own result; outputs must equal the
one-step-at-a-time engine's, under preemption, chunked prefill, prefix caching, stop tokens, EOS,
aborts, and with requests whose samplers read their history (the runner reads the pending token
ahead from the previous step's host copy) or count their outputs (seeds, min_tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from paphos import LLM, SamplingParams
from tests.engine.test_invariance import _prompts, peaked_llama  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _llm(path: Path, **engine_kwargs) -> LLM:  # noqa: ANN003
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.02, device="cpu")
    kwargs.update(engine_kwargs)
    return LLM(model=str(path), **kwargs)


def _params() -> list[SamplingParams]:
    """Greedy with logprobs; different lengths; two requests end on a stop token."""
    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i, logprobs=1) for i in range(6)]
    params[3] = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[189])  # 9th token
    params[5] = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[190], logprobs=0)
    return params


def _generate_checked(llm: LLM, params: list[SamplingParams]) -> list:
    """The workload's outputs, after checking the scheduler's invariants and that every KV block
    came back."""
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.engine
    engine.scheduler.check_invariants()
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, "blocks leaked"
    return outs


def _run(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    result = []
    for out in _generate_checked(llm, params):
        c = out.outputs[0]
        logprobs = [round(next(iter(e.values())).logprob, 3) for e in c.logprobs or []]
        result.append((c.token_ids, c.finish_reason, c.stop_reason, logprobs))
    return result


@pytest.fixture(scope="module")
def one_at_a_time(peaked_llama) -> list[tuple]:  # noqa: F811
    return _run(_llm(peaked_llama, async_scheduling=False), _params())


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"num_blocks_override": 12, "enable_prefix_caching": False},
        {"max_num_batched_tokens": 8},
        {"enable_prefix_caching": True, "max_num_seqs": 2},
    ],
    ids=["plain", "preemption", "chunked-prefill", "prefix-cache-2-seqs"],
)
def test_overlapped_steps_equal_one_step_at_a_time(peaked_llama, one_at_a_time, settings):  # noqa: F811
    llm = _llm(peaked_llama, async_scheduling=True, **settings)
    assert _run(llm, _params()) == one_at_a_time
    assert llm.engine.num_overlapped_steps > 10


def test_the_workload_stops_on_a_stop_token_and_by_length(one_at_a_time):
    reasons = {(finish, stop) for _, finish, stop, _ in one_at_a_time}
    assert ("length", None) in reasons and any(f == "stop" for f, _ in reasons)


def test_requests_whose_samplers_read_their_history_keep_the_overlap(peaked_llama, one_at_a_time):  # noqa: F811
    params = _params()
    params[1] = SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.5, logprobs=1)
    params[2] = SamplingParams(
        temperature=0, max_tokens=20, dry_multiplier=2.0, dry_base=2.0, dry_sequence_breakers=[]
    )
    params[4] = SamplingParams(temperature=0, max_tokens=20, no_repeat_ngram_size=2)
    expected = _run(_llm(peaked_llama, async_scheduling=False), params)
    llm = _llm(peaked_llama, async_scheduling=True)
    assert _run(llm, params) == expected
    for i in (1, 2, 4):
        assert expected[i][0] != one_at_a_time[i][0][: len(expected[i][0])], i  # sampler bit
    assert llm.engine.num_overlapped_steps > 10  # the runner read the pending token ahead


def test_aborts_between_overlapped_steps_free_every_block(peaked_llama):  # noqa: F811
    engine = _llm(peaked_llama, async_scheduling=True).engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(_prompts()):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    for _ in range(4):
        engine.step()
    engine.abort_request(["r0", "r3"])
    finished = {o.request_id for _ in range(3) for o in engine.step() if o.finished}
    engine.abort_request([f"r{i}" for i in range(6)])
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert not finished & {"r0", "r3"}
    engine.scheduler.check_invariants()
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_prompt_logprobs_n_and_best_of_equal_one_step_at_a_time(peaked_llama):  # noqa: F811
    prompts = [{"prompt_token_ids": p} for p in _prompts()[:3]]
    params = [
        SamplingParams(temperature=0, max_tokens=10, prompt_logprobs=2),
        SamplingParams(temperature=0, max_tokens=8, n=2, logprobs=1),
        SamplingParams(temperature=0, max_tokens=8, n=1, best_of=3),
    ]

    def run(overlap: bool) -> list:
        llm = _llm(peaked_llama, async_scheduling=overlap, max_num_batched_tokens=16)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.get_stats().num_free_kv_blocks == llm.engine.get_stats().num_kv_blocks
        return [
            (
                [(c.token_ids, c.finish_reason) for c in o.outputs],
                [None if e is None else sorted(e) for e in o.prompt_logprobs or []],
            )
            for o in outs
        ]

    expected = run(False)
    assert len(expected[0][1]) == len(_prompts()[0]) and len(expected[1][0]) == 2
    assert run(True) == expected


def test_seeds_min_tokens_and_mirostat_keep_the_overlap_and_equal_one_step_at_a_time(
    peaked_llama,  # noqa: F811
):
    prompts = [{"prompt_token_ids": p} for p in _prompts()[:4]]
    params = [
        SamplingParams(temperature=1.5, top_k=20, seed=11, max_tokens=16),
        SamplingParams(temperature=1.0, min_p=0.05, seed=12, max_tokens=16, logprobs=1),
        SamplingParams(temperature=0, min_tokens=12, max_tokens=16, stop_token_ids=[40]),
        SamplingParams(temperature=1.0, mirostat_mode=2, mirostat_tau=3.0, seed=13, max_tokens=16),
    ]

    def run(overlap: bool) -> tuple[list, int]:
        llm = _llm(peaked_llama, async_scheduling=overlap)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.num_overlapped_steps

    expected, _ = run(False)
    actual, overlapped = run(True)
    assert actual == expected
    assert overlapped > 10
    assert len(expected[2]) >= 12 and 40 not in expected[2][:12]  # greedy alone stops at 3


def test_a_failed_launch_is_taken_back_and_the_engine_serves_on(peaked_llama):  # noqa: F811
    llm = _llm(peaked_llama, async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(_prompts()[:3]):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    for _ in range(3):
        engine.step()
    runner = engine.executor.runner
    launch = runner.execute_async

    def fail_once(scheduler_output):  # noqa: ANN001, ANN202
        runner.execute_async = launch
        raise RuntimeError("injected launch failure")

    runner.execute_async = fail_once
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.abort_request(["r0", "r1", "r2"])  # what AsyncEngine does after a failed step
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler._scheduled == {}  # noqa: SLF001 - no step left behind
    engine.scheduler.check_invariants()
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    prompt = {"prompt_token_ids": _prompts()[3]}
    again = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    fresh = _llm(peaked_llama, async_scheduling=False).generate(prompt, params, use_tqdm=False)
    assert again == fresh[0].outputs[0].token_ids
