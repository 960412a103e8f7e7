"""Scheduler driven by a fake runner (no model, no torch): budgets, chunked prefill, preemption,
aborts, stop reasons, the runner-visible message stream, and a randomized soak with invariants.

The fake runner rebuilds its state from the `SchedulerOutput`s alone and samples with a
deterministic fake model (next token = f(all previous tokens)), so any message the scheduler gets
wrong shows up as a token mismatch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from paphos.config import CacheConfig, SchedulerConfig
from paphos.core.kv_cache_groups import KVCacheGroup, KVCacheLayout, sliding_group_bound
from paphos.core.scheduler import RequestUpdate, Scheduler
from paphos.core.step_data import RunnerOutput, SchedulerOutput, TokenLogprobs
from paphos.request import Request, RequestStatus
from paphos.sampling_params import SamplingParams

VOCAB = 64


def fake_model(tokens: list[int]) -> int:
    """Deterministic next token of a sequence; depends on every token and its position."""
    acc = 17
    for position, token in enumerate(tokens):
        acc = (acc * 31 + token * (position + 3)) % 1_000_003
    return acc % VOCAB


def make_scheduler(
    *,
    num_blocks: int | KVCacheLayout = 64,
    block_size: int = 4,
    max_model_len: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    chunked: bool = True,
    prefix_caching: bool = True,
    num_scheduler_steps: int = 1,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=chunked,
            num_scheduler_steps=num_scheduler_steps,
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
        num_blocks=num_blocks,
        max_model_len=max_model_len,
    )


def make_request(
    req_id: str, prompt: list[int], eos: int | None = None, arrival: float = 0.0, **params: object
) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(req_id, list(prompt), SamplingParams(**params), eos, arrival)  # type: ignore[arg-type]


@dataclass
class RunnerCopy:
    tokens: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    wants_prompt_logprobs: bool


@dataclass
class FakeRunner:
    """Holds what a model runner would hold, built only from the scheduler's messages."""

    requests: dict[str, RunnerCopy] = field(default_factory=dict)
    # request_id -> scripted tokens to sample instead of the fake model (consumed in order).
    scripts: dict[str, list[int]] = field(default_factory=dict)

    def apply(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_request_ids:
            assert req_id in self.requests, f"told to forget {req_id} it never held"
            del self.requests[req_id]
        for new in out.new_requests:
            assert new.request_id not in self.requests, f"{new.request_id} sent twice as new"
            self.requests[new.request_id] = RunnerCopy(
                list(new.prompt_token_ids) + list(new.output_token_ids),
                list(new.block_ids[0]),
                new.num_computed_tokens,
                new.sampling_params.prompt_logprobs is not None,
            )
        for cached in out.cached_requests:
            copy = self.requests[cached.request_id]
            assert copy.num_computed_tokens == cached.num_computed_tokens
            copy.tokens.extend(cached.new_token_ids)
            copy.block_ids.extend(cached.new_block_ids[0] if cached.new_block_ids else ())
        scheduled = [n.request_id for n in out.new_requests]
        scheduled += [c.request_id for c in out.cached_requests]
        assert set(scheduled) == set(out.num_scheduled_tokens)
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())

    def execute(self, out: SchedulerOutput, block_size: int) -> RunnerOutput:
        sampled: dict[str, list[int]] = {}
        prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            copy = self.requests[req_id]
            start, end = copy.num_computed_tokens, copy.num_computed_tokens + num_tokens
            assert num_tokens >= 1 and end <= len(copy.tokens), f"{req_id}: over-scheduled"
            assert len(copy.block_ids) * block_size >= end, f"{req_id}: no slot for its tokens"
            copy.num_computed_tokens = end
            if copy.wants_prompt_logprobs:
                prompt_logprobs[req_id] = [_position_logprob(p) for p in range(start, end)]
            if end == len(copy.tokens):
                script = self.scripts.get(req_id)
                sampled[req_id] = [script.pop(0) if script else fake_model(copy.tokens)]
        return RunnerOutput(sampled_token_ids=sampled, prompt_logprobs=prompt_logprobs)


def _position_logprob(position: int) -> TokenLogprobs:
    # Marks which position an entry was computed for, so tests can spot repeats.
    return TokenLogprobs(token_ids=(position,), logprobs=(-float(position),), ranks=(1,))


def assert_runner_in_sync(scheduler: Scheduler, runner: FakeRunner, out: SchedulerOutput) -> None:
    """The runner's copy (built from messages alone) equals the scheduler's view of each request
    (whose computed tokens already include the step just scheduled)."""
    assert set(runner.requests) == {r.request_id for r in scheduler.running}
    for request in scheduler.running:
        copy = runner.requests[request.request_id]
        assert copy.tokens == request.all_token_ids, request.request_id
        assert copy.block_ids == scheduler.kv_cache_manager.get_block_ids(request.request_id)[0]
        scheduled = out.num_scheduled_tokens.get(request.request_id, 0)
        assert copy.num_computed_tokens + scheduled == request.num_computed_tokens


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    """One engine step with every cross-check: budget, seqs, runner sync, invariants."""
    out = scheduler.schedule()
    assert out.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
    assert len(out.num_scheduled_tokens) <= scheduler.config.max_num_seqs
    runner.apply(out)
    assert_runner_in_sync(scheduler, runner, out)
    scheduler.check_invariants()
    assert_sliding_tables_window_sized(scheduler, out)
    runner_output = runner.execute(out, scheduler.kv_cache_manager.block_size)
    updates = scheduler.update(out, runner_output)
    scheduler.check_invariants()
    return out, updates


def run_until_done(
    scheduler: Scheduler, runner: FakeRunner, max_steps: int = 500
) -> list[SchedulerOutput]:
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        outputs.append(step(scheduler, runner)[0])
    assert not scheduler.has_unfinished_requests(), "requests did not finish"
    assert_all_blocks_free(scheduler)
    return outputs


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    scheduler.check_invariants()
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    assert all(pool.num_free_blocks == pool.num_usable_blocks for pool in kv.pools)
    assert kv.usage == 0.0


def assert_sliding_tables_window_sized(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """A request holds, in a sliding group, only the blocks its window sees from the step's
    first query on, plus those of the step's tokens."""
    kv = scheduler.kv_cache_manager
    for request in scheduler.running:
        ids = kv.get_block_ids(request.request_id)
        num_tokens = out.num_scheduled_tokens.get(request.request_id, 0)
        for group in kv.sliding_groups:
            live = [b for b in ids[group] if b != 0]
            bound = -(-(kv.windows[group] - 1 + num_tokens) // kv.block_size) + 1
            assert len(live) <= bound, f"{request.request_id}: {len(live)} > {bound} blocks"


def is_self_consistent(request: Request) -> bool:
    """Every output token is what the fake model gives for the tokens before it."""
    tokens = list(request.prompt_token_ids)
    for token in request.output_token_ids:
        if token != fake_model(tokens):
            return False
        tokens.append(token)
    return True


# ---- budgets and batching ----------------------------------------------------------------------


def test_token_budget_is_respected_and_fully_used() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10)
    runner = FakeRunner()
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", [i + 1] * 7, max_tokens=3))
    first, _ = step(scheduler, runner)
    # FIFO with chunking: r0 gets 7, r1 the remaining 3; r2 and r3 wait.
    assert first.num_scheduled_tokens == {"r0": 7, "r1": 3}
    outputs = run_until_done(scheduler, runner)
    assert all(o.total_num_scheduled_tokens <= 10 for o in outputs)


def test_max_num_seqs_limits_the_running_set() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeRunner()
    requests = [make_request(f"r{i}", [i + 1, i + 2], max_tokens=4) for i in range(5)]
    for request in requests:
        scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        out, _ = step(scheduler, runner)
        assert len(out.num_scheduled_tokens) <= 2
        assert scheduler.get_stats().num_running <= 2
    assert_all_blocks_free(scheduler)
    assert all(len(r.output_token_ids) == 4 and is_self_consistent(r) for r in requests)


def test_running_requests_come_first_in_batch_order() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner()
    scheduler.add_request(make_request("old", [1, 2, 3]))
    step(scheduler, runner)
    scheduler.add_request(make_request("new", [4, 5, 6]))
    out, _ = step(scheduler, runner)
    assert list(out.num_scheduled_tokens) == ["old", "new"]
    assert out.num_scheduled_tokens == {"old": 1, "new": 3}
    assert [c.request_id for c in out.cached_requests] == ["old"]
    assert [n.request_id for n in out.new_requests] == ["new"]


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_the_end() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner()
    request = make_request("long", list(range(25)), max_tokens=2)
    scheduler.add_request(request)
    chunks = []
    for _ in range(3):
        out, updates = step(scheduler, runner)
        chunks.append(out.num_scheduled_tokens["long"])
        assert updates == [] and request.output_token_ids == []
    out, updates = step(scheduler, runner)
    assert chunks + [out.num_scheduled_tokens["long"]] == [8, 8, 8, 1]
    assert [u.new_token_ids for u in updates] == [[fake_model(list(range(25)))]]
    run_until_done(scheduler, runner)
    assert request.status == RequestStatus.FINISHED_LENGTH and is_self_consistent(request)


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits_whole() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16, max_model_len=16, chunked=False)
    runner = FakeRunner()
    scheduler.add_request(make_request("a", [1] * 4, max_tokens=5, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add_request(make_request("big", [2] * 16, max_tokens=1))
    scheduler.add_request(make_request("small", [3] * 2, max_tokens=1))
    schedules = [o.num_scheduled_tokens for o in run_until_done(scheduler, runner)]
    big_steps = [s for s in schedules if "big" in s]
    # "big" (16 tokens) never fits beside a's decode token; "small" stays behind it (FIFO).
    assert big_steps == [{"big": 16}]
    first_big = schedules.index(big_steps[0])
    assert all("a" not in s for s in schedules[first_big:])
    assert all("small" not in s for s in schedules[:first_big])


# ---- preemption --------------------------------------------------------------------------------


def run_batch(scheduler: Scheduler, prompts: list[list[int]]) -> list[Request]:
    requests = [
        make_request(f"r{i}", p, max_tokens=10, arrival=float(i)) for i, p in enumerate(prompts)
    ]
    for request in requests:
        scheduler.add_request(request)
    run_until_done(scheduler, FakeRunner())
    return requests


PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7], [9] * 5, [4, 4, 2, 2, 1, 1, 3, 3]]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_tiny_block_budget_gives_the_same_outputs(prefix_caching: bool) -> None:
    roomy = make_scheduler(num_blocks=64, max_model_len=32, prefix_caching=prefix_caching)
    reference = run_batch(roomy, PROMPTS)
    assert roomy.get_stats().num_preemptions == 0
    tight = make_scheduler(num_blocks=8, max_model_len=32, prefix_caching=prefix_caching)
    requests = run_batch(tight, PROMPTS)
    assert tight.get_stats().num_preemptions > 0
    assert [r.output_token_ids for r in requests] == [r.output_token_ids for r in reference]
    assert all(len(r.output_token_ids) == 10 and is_self_consistent(r) for r in requests)


def test_preempted_request_returns_as_new_request_with_its_outputs() -> None:
    # 3 blocks of 4: two requests of 4 prompt tokens each need a third block to decode.
    scheduler = make_scheduler(num_blocks=3, max_model_len=12, prefix_caching=False)
    runner = FakeRunner()
    first = make_request("first", [1, 2, 3, 4], arrival=0.0, max_tokens=6)
    second = make_request("second", [5, 6, 7, 8], arrival=1.0, max_tokens=6)
    scheduler.add_request(first)
    scheduler.add_request(second)
    step(scheduler, runner)  # both prefill and sample: 2 full blocks held, 1 free
    out, _ = step(scheduler, runner)  # first takes the last block; second finds none
    assert second.status == RequestStatus.PREEMPTED and second.num_computed_tokens == 0
    assert scheduler.waiting[0] is second and len(second.output_token_ids) == 1  # outputs kept
    assert scheduler.get_stats().num_preemptions == 1
    assert list(out.num_scheduled_tokens) == ["first"]
    assert out.finished_request_ids == {"second"}  # the runner forgets it before this step
    outputs_at_preemption = tuple(second.output_token_ids)
    resumed = [new for o in run_until_done(scheduler, runner) for new in o.new_requests]
    assert [n.request_id for n in resumed] == ["second"]
    assert resumed[0].output_token_ids == outputs_at_preemption
    assert resumed[0].prompt_token_ids == (5, 6, 7, 8)
    assert is_self_consistent(first) and is_self_consistent(second)
    assert_all_blocks_free(scheduler)


def test_a_request_preempts_itself_when_it_is_the_latest_arrival() -> None:
    scheduler = make_scheduler(num_blocks=3, max_model_len=12, prefix_caching=False)
    runner = FakeRunner()
    scheduler.add_request(make_request("early", [1] * 4, arrival=0.0, max_tokens=8))
    scheduler.add_request(make_request("late", [2] * 4, arrival=1.0, max_tokens=8))
    step(scheduler, runner)
    out, _ = step(scheduler, runner)
    assert list(out.num_scheduled_tokens) == ["early"]
    assert scheduler.get_request("late").status == RequestStatus.PREEMPTED  # type: ignore[union-attr]
    run_until_done(scheduler, runner)


def test_prompt_logprobs_are_not_repeated_after_preemption() -> None:
    scheduler = make_scheduler(num_blocks=4, max_model_len=16, max_num_batched_tokens=3)
    runner = FakeRunner()
    hog = make_request("hog", [1] * 8, arrival=0.0, max_tokens=8, ignore_eos=True)
    probe = make_request("probe", [2] * 6, arrival=1.0, max_tokens=2, prompt_logprobs=1)
    scheduler.add_request(hog)
    scheduler.add_request(probe)
    positions: list[int] = []
    while scheduler.has_unfinished_requests():
        _, updates = step(scheduler, runner)
        for update in updates:
            if update.request is probe and update.prompt_logprobs:
                positions += [e.token_ids[0] for e in update.prompt_logprobs if e is not None]
    assert probe.num_preemptions > 0
    assert positions == sorted(set(positions))  # each position reported once, in order
    assert_all_blocks_free(scheduler)


def test_readmitted_request_keeps_its_arrival_place_in_running() -> None:
    scheduler = make_scheduler(num_blocks=3, max_model_len=12, prefix_caching=False)
    runner = FakeRunner()
    scheduler.add_request(make_request("a", [1] * 4, arrival=0.0, max_tokens=5))
    scheduler.add_request(make_request("b", [2] * 4, arrival=1.0, max_tokens=2))
    scheduler.add_request(make_request("c", [3], arrival=2.0, max_tokens=8))
    seen_orders = []
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
        seen_orders.append([r.request_id for r in scheduler.running])
    assert scheduler.num_preemptions > 0
    for order in seen_orders:
        assert order == sorted(order)  # ids sort like arrivals here
    assert_all_blocks_free(scheduler)


# ---- the runner-visible stream and prefix caching ---------------------------------------------


def test_prefix_cache_hit_is_sent_as_computed_tokens_and_counted() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner()
    shared = list(range(1, 13))  # three full blocks
    scheduler.add_request(make_request("a", shared + [40], max_tokens=2))
    run_until_done(scheduler, runner)
    late = make_request("b", shared + [50, 51], max_tokens=2)
    scheduler.add_request(late)
    out, _ = step(scheduler, runner)
    (new,) = out.new_requests
    assert new.num_computed_tokens == 12 and late.num_cached_tokens == 12
    assert out.num_scheduled_tokens == {"b": 2}
    run_until_done(scheduler, runner)
    stats = scheduler.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (13 + 14, 12)
    assert is_self_consistent(late)


def test_cached_request_data_carries_tokens_since_the_runner_last_saw_it() -> None:
    # Budget 4: "a" decodes every step, but "b" is left out on some steps and must get the
    # tokens it missed when it is scheduled again (step() checks the runner copy each step).
    scheduler = make_scheduler(max_num_batched_tokens=4)
    runner = FakeRunner()
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=6))
    scheduler.add_request(make_request("b", [4, 5, 6, 7, 8, 9], max_tokens=3))
    outputs = run_until_done(scheduler, runner)
    assert any(len(c.new_token_ids) == 0 for o in outputs for c in o.cached_requests)
    assert all(len(c.new_token_ids) <= 1 for o in outputs for c in o.cached_requests)


# ---- aborts and stop reasons -------------------------------------------------------------------


def test_abort_of_waiting_and_running_requests_frees_everything() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    runner = FakeRunner()
    running = make_request("run", [1, 2, 3, 4, 5], max_tokens=10)
    waiting = make_request("wait", [6, 7], max_tokens=10)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    step(scheduler, runner)
    assert running.status == RequestStatus.RUNNING and waiting.status == RequestStatus.WAITING
    scheduler.finish_requests(["wait", "run", "unknown"], RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests("run", RequestStatus.FINISHED_ABORTED)  # already gone: ignored
    assert running.status == waiting.status == RequestStatus.FINISHED_ABORTED
    assert not scheduler.has_unfinished_requests() and scheduler.get_request("run") is None
    assert_all_blocks_free(scheduler)
    out, _ = step(scheduler, runner)
    assert out.finished_request_ids == {"run"} and out.is_empty  # "wait" never reached the runner


def test_abort_between_schedule_and_update_is_ignored_by_update() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner()
    scheduler.add_request(make_request("a", [1, 2, 3]))
    out = scheduler.schedule()
    runner.apply(out)
    runner_output = runner.execute(out, 4)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.update(out, runner_output) == []
    assert_all_blocks_free(scheduler)


def test_finish_requests_rejects_a_non_finished_status() -> None:
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="RUNNING"):
        scheduler.finish_requests(["a"], RequestStatus.RUNNING)


def drive_scripted(request: Request, script: list[int], max_model_len: int = 64) -> Request:
    scheduler = make_scheduler(max_model_len=max_model_len)
    runner = FakeRunner(scripts={request.request_id: list(script)})
    scheduler.add_request(request)
    run_until_done(scheduler, runner)
    return request


def test_eos_stops_with_no_stop_reason() -> None:
    request = drive_scripted(make_request("a", [1], eos=9), [3, 9, 4])
    assert request.output_token_ids == [3, 9]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason is None


def test_ignore_eos_keeps_going_until_max_tokens() -> None:
    request = drive_scripted(make_request("a", [1], eos=9, ignore_eos=True, max_tokens=3), [9] * 3)
    assert request.output_token_ids == [9, 9, 9]
    assert request.status == RequestStatus.FINISHED_LENGTH


def test_stop_token_stops_with_its_id_as_stop_reason() -> None:
    request = drive_scripted(make_request("a", [1], stop_token_ids=[7, 8]), [3, 8, 4])
    assert request.output_token_ids == [3, 8]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == 8


def test_eos_and_stop_tokens_do_not_stop_before_min_tokens() -> None:
    params = {"eos": 9, "stop_token_ids": [7], "min_tokens": 3}
    request = drive_scripted(make_request("a", [1], **params), [9, 7, 9, 5])
    assert request.output_token_ids == [9, 7, 9]  # the 3rd output may stop it
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason is None


def test_max_tokens_finishes_with_length() -> None:
    request = drive_scripted(make_request("a", [1, 2], max_tokens=4), [])
    assert len(request.output_token_ids) == 4 and request.status == RequestStatus.FINISHED_LENGTH
    assert request.status.finish_reason == "length"


def test_max_model_len_finishes_with_length() -> None:
    request = drive_scripted(make_request("a", [1] * 10, max_tokens=None), [], max_model_len=16)
    assert request.num_tokens == 16 and request.status == RequestStatus.FINISHED_LENGTH


def test_update_rejects_a_token_sampled_in_the_middle_of_a_prompt() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=2)
    scheduler.add_request(make_request("a", [1, 2, 3, 4]))
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="'a'"):
        scheduler.update(out, RunnerOutput(sampled_token_ids={"a": [5]}))


# ---- validation and stats ----------------------------------------------------------------------


def test_bad_requests_raise_value_error_naming_the_value() -> None:
    scheduler = make_scheduler(max_model_len=16)
    scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="'a'"):
        scheduler.add_request(make_request("a", [2]))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        scheduler.add_request(make_request("empty", []))
    with pytest.raises(ValueError, match="max_model_len=16"):
        scheduler.add_request(make_request("long", [1] * 17))


def test_bad_scheduler_setups_raise_value_error() -> None:
    with pytest.raises(ValueError, match="max_model_len=65"):
        make_scheduler(num_blocks=16, block_size=4, max_model_len=65)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
        make_scheduler(max_num_batched_tokens=8, max_model_len=16, chunked=False)
    with pytest.raises(ValueError, match="num_blocks=0"):
        make_scheduler(num_blocks=0, max_model_len=0)


def test_stats_report_running_waiting_usage() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=1)
    runner = FakeRunner()
    scheduler.add_request(make_request("a", [1] * 8))
    scheduler.add_request(make_request("b", [2] * 8))
    step(scheduler, runner)
    stats = scheduler.get_stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    # 8 prompt tokens of "a" in blocks of 4; its sampled 9th token gets a slot next step.
    assert stats.kv_cache_usage == 2 / 16


# ---- randomized soak ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_workload_keeps_invariants_and_consistent_outputs(seed: int, window) -> None:
    """With window=5 a sliding group (sized by its bound) beside the full one frees blocks."""
    rng = random.Random(seed)
    chunked = seed % 2 == 0
    num_blocks = rng.randint(8, 10)
    max_num_seqs = rng.randint(3, 6)
    max_num_batched_tokens = rng.randint(6, 20) if chunked else 32
    layout = KVCacheLayout.single(num_blocks)
    if window is not None:
        bound = sliding_group_bound(window, 4, max_num_seqs, max_num_batched_tokens)
        layout = KVCacheLayout((KVCacheGroup(None, num_blocks), KVCacheGroup(window, bound)))
    scheduler = make_scheduler(
        num_blocks=layout,
        max_model_len=32,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        chunked=chunked,
        prefix_caching=seed != 1,
    )
    runner = FakeRunner()
    prefixes = [[rng.randrange(VOCAB) for _ in range(8)] for _ in range(3)]
    requests: list[Request] = []
    for step_index in range(400):
        if len(requests) < 40 and rng.random() < 0.6:
            prompt = rng.choice(prefixes)[: rng.randint(0, 8)]
            prompt += [rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))]
            params = {"max_tokens": rng.randint(1, 16), "min_tokens": rng.choice([0, 0, 1])}
            request = make_request(f"r{len(requests)}", prompt, eos=rng.choice([None, 3]), **params)
            request.arrival_time = float(step_index)
            scheduler.add_request(request)
            requests.append(request)
        if requests and rng.random() < 0.05:
            victim = rng.choice(requests).request_id
            scheduler.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            scheduler.check_invariants()
        if scheduler.has_unfinished_requests():
            step(scheduler, runner)
    run_until_done(scheduler, runner)
    assert len(requests) >= 20 and all(r.is_finished for r in requests)
    for request in requests:
        assert is_self_consistent(request), request.request_id
        if request.status == RequestStatus.FINISHED_LENGTH:
            assert request.num_output_tokens == request.sampling_params.max_tokens
        if request.status == RequestStatus.FINISHED_STOPPED:
            assert request.output_token_ids[-1] == 3
    assert scheduler.get_stats().num_preemptions > 0 or seed == 1


def test_eos_as_the_last_allowed_token_reports_stop_not_length() -> None:
    request = drive_scripted(make_request("a", [1], eos=9, max_tokens=2), [4, 9])
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_updates_carry_logprobs_and_finished_flag() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [1, 2], max_tokens=1))
    out = scheduler.schedule()
    entry = TokenLogprobs(token_ids=(5,), logprobs=(-0.5,), ranks=(1,))
    (update,) = scheduler.update(out, RunnerOutput({"a": [5]}, logprobs={"a": entry}))
    assert update.new_token_ids == [5] and update.logprobs == entry and update.finished
    assert update.request.status == RequestStatus.FINISHED_LENGTH
    assert_all_blocks_free(scheduler)
