"""The recurrent-state pool of hybrid models and the scheduler's use of it: a request runs only
with a state slot, slots come back on finish, abort and preemption, prefix caching is off, and a
fake runner that keeps a "state" per slot (the tokens it consumed) sees every chunk continue
exactly the state its request left (no slot shared, none reused while held)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from paphos.config import CacheConfig, SchedulerConfig
from paphos.core.scheduler import Scheduler
from paphos.core.state_pool import StatePool
from paphos.core.step_data import RunnerOutput, SchedulerOutput
from paphos.request import RequestStatus
from tests.unit.test_scheduler import (
    VOCAB,
    FakeRunner,
    is_self_consistent,
    make_request,
    step,
)


def test_pool_hands_out_each_slot_once_and_takes_it_back() -> None:
    pool = StatePool(2)
    assert pool.allocate("a") == 0 and pool.allocate("b") == 1
    assert pool.allocate("c") is None and pool.num_free_slots == 0
    with pytest.raises(ValueError, match="already holds"):
        pool.allocate("a")
    pool.check_invariants()
    pool.free("a")
    pool.free("a")  # a second free is a no-op
    assert pool.allocate("c") == 0
    pool.free("b")
    pool.free("c")
    pool.check_invariants()
    assert pool.num_free_slots == 2
    with pytest.raises(ValueError, match="num_state_slots"):
        StatePool(0)


def test_pool_invariant_check_catches_a_lost_slot() -> None:
    pool = StatePool(3)
    pool.allocate("a")
    pool.free_slots.pop()  # slot 1 vanishes
    with pytest.raises(AssertionError, match="lost"):
        pool.check_invariants()


@dataclass
class StatefulFakeRunner(FakeRunner):
    """Also keeps, per state slot, the tokens the "recurrent state" has consumed: a chunk must
    find exactly its request's earlier tokens there (a fresh request: an empty state)."""

    slot_state: dict[int, list[int]] = field(default_factory=dict)
    slot_of: dict[str, int] = field(default_factory=dict)

    def apply(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_request_ids:
            self.slot_of.pop(req_id, None)
        super().apply(out)
        for new in out.new_requests:
            assert new.state_slot is not None, f"{new.request_id} scheduled without a state slot"
            assert new.state_slot not in self.slot_of.values(), "a held slot was handed out"
            assert new.num_computed_tokens == 0, "a hybrid request resumed from cached KV"
            self.slot_of[new.request_id] = new.state_slot

    def execute(self, out: SchedulerOutput, block_size: int) -> RunnerOutput:
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            copy, slot = self.requests[req_id], self.slot_of[req_id]
            start = copy.num_computed_tokens
            state = [] if start == 0 else self.slot_state[slot]  # fresh: zeros, not the old
            assert state == copy.tokens[:start], f"{req_id}: state does not carry its tokens"
            self.slot_state[slot] = copy.tokens[: start + num_tokens]
        return super().execute(out, block_size)


def hybrid_scheduler(num_slots: int, **overrides: object) -> Scheduler:
    sched = dict(max_num_seqs=8, max_num_batched_tokens=16, enable_chunked_prefill=True)
    sched.update({k: v for k, v in overrides.items() if k in sched})
    return Scheduler(
        SchedulerConfig(**sched),
        CacheConfig(block_size=4, enable_prefix_caching=True),
        num_blocks=int(overrides.get("num_blocks", 64)),
        max_model_len=32,
        num_state_slots=num_slots,
    )


def assert_whole(scheduler: Scheduler) -> None:
    assert scheduler.state_pool is not None
    scheduler.check_invariants()
    assert scheduler.state_pool.num_free_slots == scheduler.state_pool.num_slots
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_blocks


def test_admission_waits_for_a_state_slot_even_with_blocks_free() -> None:
    scheduler = hybrid_scheduler(num_slots=2)
    runner = StatefulFakeRunner()
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", [1, 2, 3], max_tokens=4, arrival=float(i)))
    out, _ = step(scheduler, runner)
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}  # blocks for all, slots for two
    assert [r.request_id for r in scheduler.waiting] == ["r2"]
    scheduler.finish_requests("r0", RequestStatus.FINISHED_ABORTED)  # its slot comes back
    out, _ = step(scheduler, runner)
    assert "r2" in out.num_scheduled_tokens
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert_whole(scheduler)


def test_prefix_caching_is_off_for_hybrid_models() -> None:
    scheduler = hybrid_scheduler(num_slots=4)
    runner = StatefulFakeRunner()
    prompt = list(range(1, 14))
    for i in range(2):  # the second shares the first's whole prompt: no hit all the same
        scheduler.add_request(make_request(f"r{i}", prompt, max_tokens=2, arrival=float(i)))
        while scheduler.has_unfinished_requests():
            step(scheduler, runner)
    assert not scheduler.kv_cache_manager.enable_caching
    assert scheduler.get_stats().prefix_cache_hits == 0
    assert_whole(scheduler)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_hybrid_workload_carries_state_and_returns_every_slot(seed: int) -> None:
    """Chunked prefill, preemption (tight blocks), aborts and few slots at once."""
    rng = random.Random(seed)
    scheduler = hybrid_scheduler(
        num_slots=rng.randint(3, 5),
        num_blocks=8,
        max_num_batched_tokens=rng.randint(5, 12),
    )
    runner = StatefulFakeRunner()
    requests = []
    for step_index in range(300):
        if len(requests) < 30 and rng.random() < 0.5:
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 14))]
            request = make_request(f"r{len(requests)}", prompt, max_tokens=rng.randint(1, 12))
            request.arrival_time = float(step_index)
            scheduler.add_request(request)
            requests.append(request)
        if requests and rng.random() < 0.05:
            victim = rng.choice(requests).request_id
            scheduler.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            scheduler.check_invariants()
        if scheduler.has_unfinished_requests():
            step(scheduler, runner)
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert_whole(scheduler)
    assert scheduler.get_stats().num_preemptions > 0
    assert all(is_self_consistent(r) for r in requests)
