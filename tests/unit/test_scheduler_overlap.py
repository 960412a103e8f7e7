"""The scheduler with overlapped steps (step k+1 scheduled before step k's tokens are known): the
fake runner below keeps the tokens it sampled itself until the scheduler hands them back, so a
wrong message, a lost or repeated token, or a leaked block shows up. Outputs must equal the
one-step-at-a-time run whatever the stops, preemptions and chunking."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from paphos.core.scheduler import Scheduler
from paphos.core.step_data import RunnerOutput, SchedulerOutput
from paphos.request import Request, RequestStatus
from tests.unit.test_scheduler import assert_all_blocks_free, fake_model, make_request
from tests.unit.test_scheduler import make_scheduler as _make_scheduler

EOS = 5


@dataclass
class OwnCopy:
    tokens: list[int]  # what the scheduler told us
    pending: list[int]  # what we sampled and the scheduler has not handed back yet
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class OverlapRunner:
    requests: dict[str, OwnCopy] = field(default_factory=dict)

    def apply(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_request_ids:
            del self.requests[req_id]
        for new in out.new_requests:
            assert new.request_id not in self.requests
            tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
            self.requests[new.request_id] = OwnCopy(
                tokens, [], list(new.block_ids[0]), new.num_computed_tokens
            )
        for cached in out.cached_requests:
            copy = self.requests[cached.request_id]
            assert copy.num_computed_tokens == cached.num_computed_tokens
            delivered = list(cached.new_token_ids)
            assert delivered == copy.pending[: len(delivered)], "scheduler handed back other tokens"
            copy.tokens += delivered
            del copy.pending[: len(delivered)]
            copy.block_ids.extend(cached.new_block_ids[0] if cached.new_block_ids else ())

    def execute(self, out: SchedulerOutput, block_size: int) -> RunnerOutput:
        """Computes the scheduled tokens; a multi-step decode (out.num_steps > 1) feeds each
        sampled token back as the next step's input, as the model runner does."""
        sampled: dict[str, list[int]] = {}
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            copy = self.requests[req_id]
            full = copy.tokens + copy.pending
            end = copy.num_computed_tokens + num_tokens
            assert end <= len(full), f"{req_id}: scheduled past the tokens it has"
            if len(copy.pending) > 0:  # it computes a token in flight: its last one only
                assert num_tokens == 1 and end == len(full), f"{req_id}: computes a lost token"
            if out.num_steps > 1:
                assert num_tokens == 1 and end == len(full), f"{req_id}: multi-step, not decode"
                end += out.num_steps - 1
            assert len(copy.block_ids) * block_size >= end, f"{req_id}: no slot for its tokens"
            copy.num_computed_tokens = end
            if end >= len(full):
                tokens = []
                for _ in range(out.num_steps if out.num_steps > 1 else 1):
                    tokens.append(fake_model(full + tokens))
                copy.pending.extend(tokens)
                sampled[req_id] = tokens
        return RunnerOutput(sampled_token_ids=sampled)


def run(scheduler: Scheduler, requests: list[Request], overlap: bool, abort_every: int = 0):
    runner = OverlapRunner()
    for request in requests:
        scheduler.add_request(request)
    block_size = scheduler.kv_cache_manager.block_size
    in_flight: tuple[SchedulerOutput, RunnerOutput] | None = None
    for step in range(2000):
        if not scheduler.has_unfinished_requests() and in_flight is None:
            break
        if abort_every and step % abort_every == abort_every - 1 and scheduler.running:
            scheduler.finish_requests(
                scheduler.running[-1].request_id, RequestStatus.FINISHED_ABORTED
            )
        out = scheduler.schedule()
        runner.apply(out)
        result = runner.execute(out, block_size)
        scheduler.check_invariants()
        if in_flight is not None:
            scheduler.update(*in_flight)
            in_flight = None
        if overlap and not out.is_empty:
            in_flight = (out, result)
        else:
            scheduler.update(out, result)
        scheduler.check_invariants()
    assert not scheduler.has_unfinished_requests() and in_flight is None
    assert_all_blocks_free(scheduler)


def workload(seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [
        make_request(
            f"r{i}",
            [rng.randrange(6, 64) for _ in range(rng.randrange(1, 30))],
            eos=EOS,
            arrival=float(i),
            max_tokens=rng.randrange(1, 20),
        )
        for i in range(12)
    ]


def outcomes(requests: list[Request]) -> list[tuple[list[int], RequestStatus]]:
    return [(r.output_token_ids, r.status) for r in requests]


def make_scheduler(**kwargs) -> Scheduler:  # noqa: ANN003
    kwargs.setdefault("max_model_len", 48)
    return _make_scheduler(**kwargs)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"num_blocks": 14, "prefix_caching": False},  # preemption
        {"num_blocks": 14},
        {"max_num_batched_tokens": 7},  # chunked prefill
        {"chunked": False, "max_num_batched_tokens": 48, "max_num_seqs": 3},
    ],
    ids=["plain", "preempt", "preempt-cached", "chunks", "no-chunking"],
)
def test_overlapped_steps_give_the_outputs_of_one_step_at_a_time(seed, settings) -> None:
    expected = workload(seed)
    run(make_scheduler(**settings), expected, overlap=False)
    actual = workload(seed)
    run(make_scheduler(**settings), actual, overlap=True)
    assert outcomes(actual) == outcomes(expected)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_steps", [2, 5])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize(
    "settings",
    [{}, {"num_blocks": 14, "prefix_caching": False}, {"max_num_batched_tokens": 7}],
    ids=["plain", "preempt", "chunks"],
)
def test_multi_step_decodes_give_the_outputs_of_one_step_at_a_time(
    seed, num_steps, overlap, settings
) -> None:
    expected = workload(seed)
    run(make_scheduler(**settings), expected, overlap=False)
    actual = workload(seed)
    scheduler = make_scheduler(num_scheduler_steps=num_steps, **settings)
    counted = _count_multi_steps(scheduler)
    run(scheduler, actual, overlap=overlap)
    assert outcomes(actual) == outcomes(expected)
    assert counted and max(counted) > 1  # multi-step runs did happen


def _count_multi_steps(scheduler: Scheduler) -> list[int]:
    """The num_steps of every message the scheduler builds from now on."""
    seen: list[int] = []
    schedule = scheduler.schedule

    def counting() -> SchedulerOutput:
        out = schedule()
        seen.append(out.num_steps)
        return out

    scheduler.schedule = counting  # type: ignore[method-assign]
    return seen


def test_a_multi_step_decode_runs_only_when_every_request_decodes() -> None:
    scheduler = make_scheduler(num_scheduler_steps=4)
    scheduler.add_request(make_request("a", [7, 8, 9], max_tokens=20))
    first = scheduler.schedule()  # the prompt: one step
    assert first.num_steps == 1
    scheduler.update(first, RunnerOutput({"a": [11]}))
    second = scheduler.schedule()  # decoding alone: four steps, slots for all four
    assert second.num_steps == 4 and scheduler.requests["a"].num_computed_tokens == 3 + 4
    assert len(scheduler.kv_cache_manager.get_block_ids("a")[0]) * 4 >= 3 + 4
    scheduler.add_request(make_request("b", [7, 8]))
    third = scheduler.schedule()  # b's prompt joins: one step
    assert third.num_steps == 1 and set(third.num_scheduled_tokens) == {"a", "b"}
    scheduler.update(second, RunnerOutput({"a": [1, 2, 3, 4]}))
    assert scheduler.requests["a"].output_token_ids == [11, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="sampled tokens"):
        scheduler.update(third, RunnerOutput({"a": [1, 2], "b": [3]}))


def test_a_multi_step_decode_drops_the_tokens_after_a_stop_and_is_not_run_for_penalties() -> None:
    scheduler = make_scheduler(num_scheduler_steps=4)
    stopping = make_request("a", [7, 8], eos=EOS, max_tokens=20)
    scheduler.add_request(stopping)
    scheduler.update(scheduler.schedule(), RunnerOutput({"a": [11]}))
    run_of_four = scheduler.schedule()
    assert run_of_four.num_steps == 4
    (update,) = scheduler.update(run_of_four, RunnerOutput({"a": [12, EOS, 13, 14]}))
    assert update.new_token_ids == [12, EOS] and update.finished
    assert stopping.output_token_ids == [11, 12, EOS]
    assert_all_blocks_free(scheduler)
    penalized = make_request("p", [7, 8], max_tokens=20, repetition_penalty=1.2)
    scheduler.add_request(penalized)
    scheduler.update(scheduler.schedule(), RunnerOutput({"p": [11]}))
    assert scheduler.schedule().num_steps == 1  # its sampler reads the tokens on the host


def test_a_multi_step_decode_is_as_long_as_the_most_tokens_left() -> None:
    scheduler = make_scheduler(num_scheduler_steps=8)
    scheduler.add_request(make_request("a", [7, 8], max_tokens=3))
    scheduler.add_request(make_request("b", [7, 9], max_tokens=4))
    scheduler.update(scheduler.schedule(), RunnerOutput({"a": [11], "b": [12]}))
    out = scheduler.schedule()
    assert out.num_steps == 3  # b has three tokens left; a stops after two of them
    updates = scheduler.update(out, RunnerOutput({"a": [1, 2, 3], "b": [4, 5, 6]}))
    assert [u.new_token_ids for u in updates] == [[1, 2], [4, 5, 6]]
    assert all(u.finished for u in updates)
    assert_all_blocks_free(scheduler)


def test_the_workloads_stop_on_eos_and_preempt() -> None:
    stops = preemptions = 0
    for seed in range(6):
        requests, scheduler = workload(seed), make_scheduler(num_blocks=14)
        run(scheduler, requests, overlap=True)
        stops += sum(r.status == RequestStatus.FINISHED_STOPPED for r in requests)
        preemptions += scheduler.num_preemptions
    assert stops >= 3 and preemptions >= 6  # the comparisons above cover both


def test_a_request_whose_pending_token_ends_it_is_not_scheduled_again() -> None:
    scheduler = make_scheduler()
    request = make_request("a", [7, 8], max_tokens=1)
    scheduler.add_request(request)
    first = scheduler.schedule()
    assert request.num_pending_tokens == 1
    second = scheduler.schedule()  # step 1's token is not known yet: it is the last one
    assert second.is_empty
    scheduler.update(first, RunnerOutput({"a": [9]}))
    scheduler.update(second, RunnerOutput.empty())
    assert request.status == RequestStatus.FINISHED_LENGTH and request.output_token_ids == [9]
    assert_all_blocks_free(scheduler)


def test_results_for_a_request_aborted_in_flight_are_dropped() -> None:
    scheduler = make_scheduler()
    request = make_request("a", [7, 8], max_tokens=5)
    scheduler.add_request(request)
    first = scheduler.schedule()
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update(first, RunnerOutput({"a": [9]})) == []
    assert request.output_token_ids == []
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("seed", range(4))
def test_overlapped_soak_with_aborts_keeps_invariants_and_frees_every_block(seed) -> None:
    run(make_scheduler(num_blocks=12), workload(100 + seed), overlap=True, abort_every=5)


def test_updating_a_step_twice_is_refused() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [7, 8]))
    out = scheduler.schedule()
    scheduler.update(out, RunnerOutput({"a": [9]}))
    with pytest.raises(ValueError, match="step"):
        scheduler.update(out, RunnerOutput({"a": [9]}))


def test_a_discarded_step_returns_its_tokens_to_be_scheduled_again() -> None:
    scheduler = make_scheduler()
    request = make_request("a", [7, 8, 9], max_tokens=4)
    scheduler.add_request(request)
    first = scheduler.schedule()
    assert request.num_computed_tokens == 3 and request.num_pending_tokens == 1
    scheduler.discard(first)
    assert request.num_computed_tokens == 0 and request.num_pending_tokens == 0
    again = scheduler.schedule()
    assert again.num_scheduled_tokens == {"a": 3}
    with pytest.raises(ValueError, match="step"):
        scheduler.update(first, RunnerOutput({"a": [1]}))  # discarded: gone
    scheduler.update(again, RunnerOutput({"a": [1]}))
    assert request.output_token_ids == [1]
