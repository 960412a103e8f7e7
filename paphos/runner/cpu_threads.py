"""CPU compute threads: how many, on which cores, and moving off cores other processes keep busy.

At start-up each rank takes its share of the physical cores it may run on (one hyperthread per
core; ranks of a tensor-parallel group get disjoint slices) and pins one OpenMP thread to each, as
vLLM's CPU backend does: no thread migrates and a core's caches stay its thread's. Pinned threads
collapse when another process takes one of their cores (each OpenMP barrier waits for the thread
the scheduler gave away: 0.2 s steps seen becoming 5.5 s), so `ThreadGovernor.maybe_adjust`, called
every step, reads once a second how busy each core is with other processes' work (/proc/stat minus
our threads' own time) and runs on the free cores only: a step then slows in proportion to the
cores lost, and speeds up again when they come back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from paphos.kernels.cpu import threads as cpu_threads

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
BUSY_FRACTION = 0.3  # a core whose time went this much to other processes is taken
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal, in /proc/stat order


# The CPUs this process may run on, read when paphos is imported: before any pinning narrowed the
# calling thread's own mask (a second engine in the process plans from the same set).
PROCESS_CPUS = tuple(sorted(os.sched_getaffinity(0)))


def allowed_cpus() -> list[int]:
    return list(PROCESS_CPUS)


def physical_cores(cpus: Sequence[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> list[int]:
    """The first CPU of each core among `cpus` (hyperthread siblings dropped), in order."""
    seen: set[str] = set()
    cores = []
    for cpu in cpus:
        try:
            siblings = (sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
        except OSError:
            siblings = str(cpu)
        if siblings.strip() not in seen:
            seen.add(siblings.strip())
            cores.append(cpu)
    return cores


def rank_cores(cores: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s disjoint slice of `cores` (every rank gets at least one core)."""
    if len(cores) < world_size:
        return [cores[rank % len(cores)]]
    share = len(cores) // world_size
    return list(cores[rank * share : (rank + 1) * share])


def read_cpu_busy(proc_stat: Path = Path("/proc/stat")) -> dict[int, int]:
    """Busy clock ticks per CPU since boot (user, nice, system, irq, softirq, steal)."""
    busy = {}
    for line in proc_stat.read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            values = rest.split()
            busy[int(name[3:])] = sum(int(values[i]) for i in _BUSY_FIELDS if i < len(values))
    return busy


def read_thread_ticks(tid: int) -> int | None:
    """utime + stime of one of our threads, in clock ticks (None once it is gone)."""
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the whole line


@dataclass(frozen=True)
class ThreadPlan:
    cores: tuple[int, ...]  # this rank's cores, one thread each at most
    bind: bool


def plan_threads(
    num_threads: int | None, bind: bool, rank: int = 0, world_size: int = 1
) -> ThreadPlan:
    """This rank's cores: its slice of the physical cores it may run on, cut to num_threads
    (default: OMP_NUM_THREADS when set, else the whole slice)."""
    cores = rank_cores(physical_cores(allowed_cpus()), rank, world_size)
    requested = num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or len(cores)
    if requested > len(cores):
        # more threads than cores: the user asked for it; pinning would stack them, so don't
        return ThreadPlan(tuple(allowed_cpus())[:requested], bind=False)
    return ThreadPlan(tuple(cores[:requested]), bind)


class ThreadGovernor:
    """Applies a ThreadPlan and keeps the thread count to the cores other processes leave free."""

    def __init__(
        self,
        plan: ThreadPlan,
        clock: Callable[[], float] = time.monotonic,
        read_busy: Callable[[], dict[int, int]] = read_cpu_busy,
        read_ticks: Callable[[int], int | None] = read_thread_ticks,
    ) -> None:
        self.plan = plan
        self._clock, self._read_busy, self._read_ticks = clock, read_busy, read_ticks
        self.cores: list[int] = list(plan.cores)  # the cores in use now, thread t on cores[t]
        self._tids: list[int] | None = None
        self._last_check = clock()
        self._last_busy: dict[int, int] = {}
        self._last_ticks: dict[int, int] = {}
        self._pending: list[int] | None = None  # a change seen once, applied when seen twice
        self._applied = False
        self._threads_before = torch.get_num_threads()  # restored by release()
        self.num_changes = 0

    def release(self) -> None:
        """Unpin (every thread may run on the process's CPUs again) and restore the thread count
        found before the plan was applied: the engine is shutting down."""
        if not self._applied:
            return
        self._applied = False
        if self.plan.bind and self._tids is not None:
            cpu_threads.unbind(allowed_cpus(), len(self.cores))
        torch.set_num_threads(self._threads_before)

    def _apply(self, cores: list[int]) -> None:
        torch.set_num_threads(len(cores))
        self.cores = cores
        if self.plan.bind:
            self._tids = cpu_threads.bind(cores)
            if self._tids is None:
                logger.warning("CPU threads: pinning to cores %s failed; threads float", cores)
        self._baseline()

    def _baseline(self) -> None:
        try:
            self._last_busy = self._read_busy()
        except OSError:
            self._last_busy = {}
        tids = self._tids or []
        self._last_ticks = {t: self._read_ticks(t) or 0 for t in tids}
        self._last_check = self._clock()

    def others_busy(self) -> dict[int, float] | None:
        """Per core of the plan, the fraction of the last interval other processes used it
        (None where it cannot be told: no pinning, or /proc unreadable)."""
        if not self._tids or not self._last_busy:
            return None
        elapsed = self._clock() - self._last_check
        busy = self._read_busy()
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        ours = {}
        for cpu, tid in zip(self.cores, self._tids):
            ticks = self._read_ticks(tid)
            ours[cpu] = 0 if ticks is None else ticks - self._last_ticks.get(tid, ticks)
        fractions = {}
        for cpu in self.plan.cores:
            delta = busy.get(cpu, 0) - self._last_busy.get(cpu, 0) - ours.get(cpu, 0)
            fractions[cpu] = max(0.0, delta / hz / max(elapsed, 1e-6))
        return fractions

    def maybe_adjust(self) -> None:
        """Called by the thread that runs the steps (OpenMP pools are per calling thread, so the
        pinning is done from it): at the first call apply the plan; then once per
        CHECK_INTERVAL_S run on the cores others leave free (at least the least busy one); a
        change must be seen twice in a row before it is made."""
        if not self._applied:
            self._applied = True
            self._apply(self.cores)
            return
        if not self.plan.bind or self._clock() - self._last_check < CHECK_INTERVAL_S:
            return
        fractions = self.others_busy()
        if fractions is None:
            return
        free = [cpu for cpu in self.plan.cores if fractions[cpu] < BUSY_FRACTION]
        wanted = free or [min(self.plan.cores, key=lambda cpu: fractions[cpu])]
        if wanted == self.cores:
            self._pending = None
        elif wanted == self._pending:
            logger.info(
                "CPU threads: other processes keep %s busy; %d threads on %s",
                [c for c in self.plan.cores if c not in wanted],
                len(wanted),
                wanted,
            )
            self._pending = None
            self.num_changes += 1
            self._apply(wanted)
            return
        else:
            self._pending = wanted
        self._baseline()
