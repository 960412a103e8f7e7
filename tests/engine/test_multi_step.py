"""Multi-step decode (num_scheduler_steps > 1) on the CPU: while every running request decodes,
the runner runs several decode steps per scheduling step and feeds each sampled token to the next
step itself. Outputs must equal single steps' - greedy and seeded sampling, stop tokens, EOS,
max_tokens inside a run, stop strings inside a run, with and without overlapped steps, under
preemption and chunked prefill - and requests whose samplers need the host keep single steps."""

from __future__ import annotations

import pytest

from paphos import LLM, SamplingParams
from tests.engine.test_async_scheduling import _generate_checked, _llm
from tests.engine.test_invariance import peaked_llama  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _params() -> list[SamplingParams]:
    """Greedy of odd lengths (runs end inside a multi-step run), a stop token, seeded sampling
    with top-k/top-p/min-p, min_tokens, and EOS allowed."""
    return [
        SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=1.2, min_p=0.05, seed=5, max_tokens=22, min_tokens=9),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=11, max_tokens=17),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[189]),  # its 9th token
        SamplingParams(temperature=0, max_tokens=25),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[190]),  # its 6th token
    ]


def _run(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    outs = _generate_checked(llm, params)
    return [
        (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs
    ]


def _extra_forwards(llm: LLM) -> int:
    """Model runs beyond one per step: the later steps of multi-step decodes."""
    stats = llm.engine.executor.runner.host_stats
    return stats.num_forwards - stats.num_steps


@pytest.fixture(scope="module")
def single_steps(peaked_llama) -> list[tuple]:  # noqa: F811
    return _run(_llm(peaked_llama, async_scheduling=False), _params())


@pytest.mark.parametrize("num_steps", [3, 8])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"num_blocks_override": 12, "enable_prefix_caching": False},
        {"max_num_batched_tokens": 8},
    ],
    ids=["plain", "preemption", "chunked-prefill"],
)
def test_multi_step_decodes_equal_single_steps(
    peaked_llama,  # noqa: F811
    single_steps,
    num_steps,
    overlap,
    settings,
):
    llm = _llm(peaked_llama, async_scheduling=overlap, num_scheduler_steps=num_steps, **settings)
    assert _run(llm, _params()) == single_steps
    assert _extra_forwards(llm) >= 10  # the decode steps did run several at a time


def test_the_workload_stops_on_tokens_and_by_length(single_steps):
    reasons = {finish for _, finish, _ in single_steps}
    assert reasons == {"stop", "length"}
    assert any(stop == 189 for _, _, stop in single_steps)


def test_requests_whose_samplers_need_the_host_run_single_steps(peaked_llama, single_steps):  # noqa: F811
    params = _params()
    params[4] = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.5)
    params[0] = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    expected = _run(_llm(peaked_llama, async_scheduling=False), params)
    llm = _llm(peaked_llama, num_scheduler_steps=4)
    assert _run(llm, params) == expected
    assert expected[4][0] != single_steps[4][0][: len(expected[4][0])]  # the penalty bit
    # single steps while those two run (8 tokens), several per step once they are done
    stats = llm.engine.executor.runner.host_stats
    assert stats.num_steps >= 8 + 1 and stats.num_forwards >= stats.num_steps + 5


def test_stop_strings_inside_a_multi_step_decode_end_the_text_and_the_tokens():
    llm = LLM(dtype="float32", kv_cache_space=0.25, device="cpu", num_scheduler_steps=8)
    chat = [[{"role": "user", "content": "Count from one to ten in words."}]]
    free = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    text = free[0].outputs[0].text
    stop = text.split()[3]  # a word a few tokens in: the stop lands inside a run of 8
    single = LLM(dtype="float32", kv_cache_space=0.25, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    expected = single.chat(chat, params, use_tqdm=False)[0].outputs[0]
    got = llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
        expected.text,
        expected.token_ids,
        "stop",
        stop,
    )
    assert len(got.token_ids) < len(free[0].outputs[0].token_ids)
