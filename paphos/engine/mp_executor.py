"""Tensor parallelism over local processes: rank 0 runs in the engine process, ranks 1..N-1 are
spawned workers (`paphos.runner.worker`) fed one pickled `SchedulerOutput` per step over a pipe.

A pipe beats `broadcast_object_list` over a gloo group here: about 0.5 ms against 2-3 ms per step
(1.5-8 KB messages, 2-core CPU), and it also carries the workers' error reports back.
Invariant: every worker this executor started is gone once `shutdown()` returns (it also runs at
interpreter exit); a worker's failure surfaces here as a `WorkerError`, never as a hang.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import os
import pickle
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from paphos.config import EngineConfig
from paphos.core.kv_cache_groups import KVCacheLayout
from paphos.core.step_data import RunnerOutput, SchedulerOutput, StepHandle
from paphos.models.registry import ModelRegistry
from paphos.parallel import ParallelInfo, destroy_distributed, init_distributed
from paphos.runner import worker
from paphos.runner.model_runner import ModelRunner, resolve_device

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # model loading of a large checkpoint; liveness is checked meanwhile
COMMAND_TIMEOUT_S = 600.0  # determine_num_blocks profiles one full step on every rank
_ERROR_GRACE_S = 1.0  # how long a failed step waits for a worker's own report of the cause
_JOIN_TIMEOUT_S = 5.0


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed, died, or stopped answering."""


@dataclasses.dataclass
class _Worker:
    rank: int
    process: BaseProcess
    conn: Connection


class MultiprocExecutor:
    """One rank per process; torch.distributed over gloo (CPU) or NCCL (CUDA)."""

    # Every rank samples from its own copy of the logits; a runner reading pending tokens from its
    # device would need the ranks' samples to agree bit for bit, so steps run one at a time here.
    overlaps_steps = False
    num_state_slots: int | None = None

    def __init__(self, config: EngineConfig, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        if config.runtime.async_scheduling:
            raise ValueError(
                "async_scheduling=True needs one rank: tensor-parallel steps run one at a time"
            )
        self.world_size = config.parallel.world_size
        self.workers: list[_Worker] = []
        self.runner: ModelRunner | None = None
        self._joined_group = False
        self._failure: str | None = None
        self._closed = False
        atexit.register(self.shutdown)
        try:
            self._start(_rank_config(config, self.world_size), startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up -------------------------------------------------------------------------------

    def _start(self, config: EngineConfig, timeout_s: float) -> None:
        backend = _backend(config, self.world_size)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        path = worker.model_class_path(ModelRegistry.resolve_for(config.model))
        context = multiprocessing.get_context("spawn")
        for rank in range(1, self.world_size):
            spec = worker.WorkerSpec(
                rank, self.world_size, backend, init_method, config, path, os.getpid()
            )
            parent_conn, child_conn = context.Pipe()
            process = context.Process(
                target=worker.worker_main,
                args=(spec, child_conn),
                name=f"paphos-tp-rank-{rank}",
                daemon=True,
            )
            process.start()
            child_conn.close()  # so that the worker's death reads as EOF here
            self.workers.append(_Worker(rank, process, parent_conn))
        deadline = time.monotonic() + timeout_s
        self._await_all(worker.PREPARED, deadline)
        parallel = self._join_group(backend, init_method, deadline)
        self.runner = ModelRunner(config, parallel)
        self.num_state_slots = self.runner.num_state_slots  # the same on every rank
        self._await_all(worker.READY, deadline)
        logger.info("tensor parallel: %d ranks over %s", self.world_size, backend)

    def _join_group(self, backend: str, init_method: str, deadline: float) -> ParallelInfo:
        """Rank 0 joins in a helper thread, so a worker dying before it joins raises here."""
        if self.world_size == 1:
            return ParallelInfo()
        result: dict[str, Any] = {}

        def join() -> None:
            try:
                result["parallel"] = init_distributed(0, self.world_size, backend, init_method)
            except BaseException as e:  # noqa: BLE001 - re-raised in the engine thread below
                result["error"] = e

        thread = threading.Thread(target=join, name="paphos-tp-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.1)
            for w in self.workers:
                self._check_alive(w, deadline)
        if "error" in result:
            raise result["error"]
        self._joined_group = True
        return result["parallel"]

    # ---- the Executor protocol ------------------------------------------------------------------

    def determine_num_blocks(self) -> KVCacheLayout:
        """The fewest blocks any rank can hold, per KV cache group (each rank holds its own kv
        heads of every block)."""
        self._send(worker.DETERMINE_NUM_BLOCKS, None)
        own = self._run_locally(lambda runner: runner.determine_num_blocks())
        replies = self._await_all(worker.OK, time.monotonic() + COMMAND_TIMEOUT_S)
        for reply in replies:
            own = own.min_with(reply)
        return own

    def initialize_kv_cache(self, num_blocks: KVCacheLayout) -> None:
        self._send(worker.INITIALIZE_KV_CACHE, num_blocks)
        self._run_locally(lambda runner: runner.initialize_kv_cache(num_blocks))
        self._await_all(worker.OK, time.monotonic() + COMMAND_TIMEOUT_S)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Send the step to every worker (no reply awaited: the forward's collectives keep the
        ranks in step) and return rank 0's output, identical to every rank's."""
        self._raise_if_unusable()
        self._raise_reported_errors()
        self._send(worker.EXECUTE, scheduler_output)
        return self._run_locally(lambda runner: runner.execute(scheduler_output))

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return StepHandle.done(self.execute(scheduler_output))

    def shutdown(self) -> None:
        """Stop every worker (politely, then by force), leave the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        for w in self.workers:
            _send_quietly(w.conn, (worker.SHUTDOWN, None))
        # After a failure, a worker may be blocked in a collective that will never complete.
        deadline = time.monotonic() + (0.5 if self._failure else _JOIN_TIMEOUT_S)
        for w in self.workers:
            _stop_process(w.process, deadline)
            w.conn.close()
        if self.runner is not None:
            self.runner.shutdown()
        if self._joined_group:
            destroy_distributed()
            self._joined_group = False

    # ---- messages and failures ------------------------------------------------------------------

    def _send(self, name: str, payload: Any) -> None:
        """Pickle once, write the same bytes to every worker's pipe."""
        self._raise_if_unusable()
        data = pickle.dumps((name, payload), protocol=pickle.HIGHEST_PROTOCOL)
        for w in self.workers:
            try:
                w.conn.send_bytes(data)
            except OSError as e:
                self._fail(self._worker_report(w) or f"rank {w.rank}: pipe closed ({e})")

    def _run_locally(self, work: Any) -> Any:
        """`work(rank 0's runner)`; if it fails, the worker's own report (often the cause) wins."""
        self._raise_if_unusable()
        try:
            return work(self.runner)
        except Exception as e:
            report = self._first_worker_report(_ERROR_GRACE_S) if self.workers else None
            self._failure = report or f"rank 0 failed: {e!r}"
            if report is not None:
                raise WorkerError(report) from e
            raise

    def _await_all(self, status: str, deadline: float) -> list[Any]:
        """One reply of `status` from every worker, in rank order."""
        return [self._await_reply(w, status, deadline) for w in self.workers]

    def _await_reply(self, w: _Worker, status: str, deadline: float) -> Any:
        while True:
            self._check_alive(w, deadline)
            if w.conn.poll(0.1):
                try:
                    got, value = w.conn.recv()
                except (EOFError, OSError):
                    self._fail(f"rank {w.rank} closed its pipe (exit code {_exit_code(w)})")
                if got == worker.ERROR:
                    self._fail(value)
                if got != status:
                    self._fail(f"rank {w.rank} answered {got!r}, expected {status!r}")
                return value

    def _check_alive(self, w: _Worker, deadline: float) -> None:
        if not w.process.is_alive() and not w.conn.poll():
            self._fail(f"rank {w.rank} (pid {w.process.pid}) died with exit code {_exit_code(w)}")
        if time.monotonic() > deadline:
            self._fail(f"rank {w.rank} (pid {w.process.pid}) did not answer in time")

    def _raise_reported_errors(self) -> None:
        """Between steps: a worker that failed after its last collective has told us by now."""
        for w in self.workers:
            report = self._worker_report(w)
            if report is not None:
                self._fail(report)
            if not w.process.is_alive():
                self._fail(f"rank {w.rank} (pid {w.process.pid}) exited ({_exit_code(w)})")

    def _first_worker_report(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            for w in self.workers:
                report = self._worker_report(w)
                if report is not None:
                    return report
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    @staticmethod
    def _worker_report(w: _Worker) -> str | None:
        """A worker's error message if one is waiting in its pipe (non-blocking)."""
        try:
            if not w.conn.poll():
                return None
            got, value = w.conn.recv()
        except (EOFError, OSError):
            return f"rank {w.rank} (pid {w.process.pid}) exited ({_exit_code(w)})"
        return value if got == worker.ERROR else None

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise WorkerError("the tensor-parallel executor was shut down")
        if self._failure is not None:
            raise WorkerError(f"the tensor-parallel executor failed earlier: {self._failure}")

    def _fail(self, message: str) -> None:
        self._failure = message
        raise WorkerError(message)


def _rank_config(config: EngineConfig, world_size: int) -> EngineConfig:
    """On CPU, ranks share the cores: unless told, each gets its share of torch threads."""
    on_cpu = resolve_device(config.runtime.device).type == "cpu"
    if config.runtime.num_threads is not None or not on_cpu:
        return config
    threads = max(1, (os.cpu_count() or 1) // world_size)
    return dataclasses.replace(
        config, runtime=dataclasses.replace(config.runtime, num_threads=threads)
    )


def _backend(config: EngineConfig, world_size: int) -> str:
    if resolve_device(config.runtime.device).type == "cpu":
        return "gloo"
    import torch

    if torch.cuda.device_count() < world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size} needs {world_size} CUDA devices; "
            f"{torch.cuda.device_count()} are visible"
        )
    return "nccl"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send_quietly(conn: Connection, message: tuple[str, Any]) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):
        pass  # already gone


def _stop_process(process: BaseProcess, deadline: float) -> None:
    """Join until `deadline`, then SIGTERM, then SIGKILL."""
    process.join(timeout=max(0.0, deadline - time.monotonic()))
    if process.is_alive():
        logger.warning("rank process %s did not exit; terminating it", process.pid)
        process.terminate()
        process.join(timeout=_JOIN_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join(timeout=_JOIN_TIMEOUT_S)


def _exit_code(w: _Worker) -> int | None:
    return w.process.exitcode
