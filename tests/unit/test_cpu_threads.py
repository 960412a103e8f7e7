"""CPU compute threads (paphos.runner.cpu_threads): one thread per physical core of the rank's
slice, pinned; the governor moves the threads off cores that other processes keep busy and back
when those come free (a fake clock and fake /proc counters), and really pins the calling thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from paphos.kernels.cpu import threads as cpu_threads
from paphos.runner import cpu_threads as ct

HZ = os.sysconf("SC_CLK_TCK")


def test_physical_cores_drop_hyperthread_siblings(tmp_path: Path) -> None:
    for cpu, siblings in {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4"}.items():
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(siblings + "\n")
    assert ct.physical_cores([0, 1, 2, 3, 4], tmp_path) == [0, 1, 4]
    assert ct.physical_cores([2, 3], tmp_path) == [2, 3]


def test_tensor_parallel_ranks_get_disjoint_core_slices() -> None:
    cores = list(range(8))
    assert [ct.rank_cores(cores, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ct.rank_cores(cores, 2, 3) == [4, 5]
    assert ct.rank_cores([0], 1, 2) == [0]  # more ranks than cores: they share


def test_plan_takes_num_threads_then_omp_num_threads_then_all_cores(monkeypatch) -> None:
    monkeypatch.setattr(ct, "allowed_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(ct, "physical_cores", lambda cpus: list(cpus))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ct.plan_threads(None, True) == ct.ThreadPlan((0, 1, 2, 3), True)
    assert ct.plan_threads(2, True) == ct.ThreadPlan((0, 1), True)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert ct.plan_threads(None, True, rank=0, world_size=1).cores == (0, 1, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ct.plan_threads(None, True, rank=1, world_size=2).cores == (2,)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert ct.plan_threads(None, True, rank=1, world_size=2).cores == (2, 3)
    assert ct.plan_threads(6, True) == ct.ThreadPlan((0, 1, 2, 3), False)  # more than cores


class FakeProc:
    """Busy ticks per CPU and our threads' ticks, advanced by `run` (one second per call)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = {0: 0, 1: 0}
        self.ticks: dict[int, int] = {}

    def run(self, ours: dict[int, float], others: dict[int, float], tids: dict[int, int]):
        self.now += 1.0
        for cpu in self.busy:
            used = ours.get(cpu, 0.0) + others.get(cpu, 0.0)
            self.busy[cpu] += int(min(used, 1.0) * HZ)
            if cpu in ours:
                tid = tids[cpu]
                self.ticks[tid] = self.ticks.get(tid, 0) + int(ours[cpu] * HZ)


def test_governor_moves_off_a_core_another_process_keeps_busy_and_back(monkeypatch) -> None:
    proc = FakeProc()
    bound: list[list[int]] = []

    def fake_bind(cores):
        bound.append(list(cores))
        return [100 + c for c in cores]  # tid of the thread on core c

    monkeypatch.setattr(cpu_threads, "bind", fake_bind)
    threads_before = torch.get_num_threads()
    try:
        governor = ct.ThreadGovernor(
            ct.ThreadPlan((0, 1), True),
            clock=lambda: proc.now,
            read_busy=lambda: dict(proc.busy),
            read_ticks=lambda tid: proc.ticks.get(tid, 0),
        )
        governor.maybe_adjust()  # first call: the plan itself
        assert bound == [[0, 1]] and torch.get_num_threads() == 2
        tids = {0: 100, 1: 101}
        proc.run({0: 0.95, 1: 0.95}, {}, tids)  # we alone: nothing changes
        governor.maybe_adjust()
        assert governor.cores == [0, 1]
        for _ in range(2):  # a hog on core 0 takes half of it from our thread, twice
            proc.run({0: 0.5, 1: 0.95}, {0: 0.5}, tids)
            governor.maybe_adjust()
        assert governor.cores == [1] and bound[-1] == [1] and torch.get_num_threads() == 1
        tids = {1: 101}
        proc.run({1: 0.95}, {0: 1.0}, tids)  # still busy: stay
        governor.maybe_adjust()
        assert governor.cores == [1]
        for _ in range(2):  # the hog is gone
            proc.run({1: 0.95}, {}, tids)
            governor.maybe_adjust()
        assert governor.cores == [0, 1] and governor.num_changes == 2
        for _ in range(2):  # every core busy, core 1 the least
            proc.run({0: 0.3, 1: 0.3}, {0: 0.7, 1: 0.5}, {0: 100, 1: 101})
            governor.maybe_adjust()
        assert governor.cores == [1]  # at least one thread, on the least busy core
    finally:
        torch.set_num_threads(threads_before)


def test_unpinned_plan_never_binds(monkeypatch) -> None:
    monkeypatch.setattr(cpu_threads, "bind", lambda cores: pytest.fail("bound"))
    governor = ct.ThreadGovernor(ct.ThreadPlan((0,), False))
    threads_before = torch.get_num_threads()
    try:
        governor.maybe_adjust()
        governor.maybe_adjust()
    finally:
        torch.set_num_threads(threads_before)


def test_bind_pins_the_calling_thread_and_unbind_frees_it() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if cpu_threads.load_library() is None:
        pytest.skip("no C kernels here")
    try:
        tids = cpu_threads.bind([allowed[-1]])
        assert tids is not None and len(tids) == 1
        assert os.sched_getaffinity(0) == {allowed[-1]}
        assert ct.read_thread_ticks(tids[0]) is not None
    finally:
        assert cpu_threads.unbind(allowed, 1)
    assert sorted(os.sched_getaffinity(0)) == allowed
    assert set(ct.read_cpu_busy()) >= set(allowed)


def test_engine_shutdown_unpins_and_restores_the_thread_count(tiny_llama_dir) -> None:
    from paphos import LLM, SamplingParams

    if cpu_threads.load_library() is None:
        pytest.skip("no C kernels here")
    threads = torch.get_num_threads()
    llm = LLM(model=str(tiny_llama_dir), max_model_len=64, device="cpu", num_threads=1)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(os.sched_getaffinity(0)) == 1 and torch.get_num_threads() == 1
    llm.close()
    # unpinned to every CPU the process had (an engine another test left open may have pinned
    # this thread before: the process's set, not that mask, is what comes back)
    assert os.sched_getaffinity(0) == set(ct.PROCESS_CPUS)
    assert torch.get_num_threads() == threads
