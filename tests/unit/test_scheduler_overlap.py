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
                tokens, [], list(new.block_ids), new.num_computed_tokens
            )
        for cached in out.cached_requests:
            copy = self.requests[cached.request_id]
            assert copy.num_computed_tokens == cached.num_computed_tokens
            delivered = list(cached.new_token_ids)
            assert delivered == copy.pending[: len(delivered)], "scheduler handed back other tokens"
            copy.tokens += delivered
            del copy.pending[: len(delivered)]
            copy.block_ids.extend(cached.new_block_ids)

    def execute(self, out: SchedulerOutput, block_size: int) -> RunnerOutput:
        sampled = {}
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            copy = self.requests[req_id]
            assert len(copy.pending) <= 1, f"{req_id}: more than one token in flight"
            full = copy.tokens + copy.pending
            end = copy.num_computed_tokens + num_tokens
            assert end <= len(full), f"{req_id}: scheduled past the tokens it has"
            assert len(copy.block_ids) * block_size >= end, f"{req_id}: no slot for its tokens"
            copy.num_computed_tokens = end
            if end == len(full):
                token = fake_model(full)
                copy.pending.append(token)
                sampled[req_id] = token
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
    scheduler.update(first, RunnerOutput({"a": 9}))
    scheduler.update(second, RunnerOutput.empty())
    assert request.status == RequestStatus.FINISHED_LENGTH and request.output_token_ids == [9]
    assert_all_blocks_free(scheduler)


def test_results_for_a_request_aborted_in_flight_are_dropped() -> None:
    scheduler = make_scheduler()
    request = make_request("a", [7, 8], max_tokens=5)
    scheduler.add_request(request)
    first = scheduler.schedule()
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update(first, RunnerOutput({"a": 9})) == []
    assert request.output_token_ids == []
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("seed", range(4))
def test_overlapped_soak_with_aborts_keeps_invariants_and_frees_every_block(seed) -> None:
    run(make_scheduler(num_blocks=12), workload(100 + seed), overlap=True, abort_every=5)


def test_updating_a_step_twice_is_refused() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [7, 8]))
    out = scheduler.schedule()
    scheduler.update(out, RunnerOutput({"a": 9}))
    with pytest.raises(ValueError, match="step"):
        scheduler.update(out, RunnerOutput({"a": 9}))


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
        scheduler.update(first, RunnerOutput({"a": 1}))  # discarded: gone
    scheduler.update(again, RunnerOutput({"a": 1}))
    assert request.output_token_ids == [1]
