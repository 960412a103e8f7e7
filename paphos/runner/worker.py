"""The process of one tensor-parallel rank > 0: join the group, build a `ModelRunner`, run commands.

Invariant: a worker never outlives its engine. It exits on a "shutdown" command, on EOF of its pipe,
when its parent process is gone (a watchdog thread), or right after reporting its first error.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from paphos.config import EngineConfig
from paphos.models.registry import ModelRegistry, load_plugins
from paphos.parallel import destroy_distributed, init_distributed

# Commands (engine -> worker): (name, payload). Only "execute" is sent without waiting for a reply:
# the collectives inside the forward pass keep the ranks in step.
DETERMINE_NUM_BLOCKS = "determine_num_blocks"
INITIALIZE_KV_CACHE = "initialize_kv_cache"
EXECUTE = "execute"
SHUTDOWN = "shutdown"
COMMANDS = (DETERMINE_NUM_BLOCKS, INITIALIZE_KV_CACHE, EXECUTE, SHUTDOWN)
# Replies (worker -> engine): (status, value); "prepared" and "ready" are start-up milestones.
OK, ERROR, PREPARED, READY = "ok", "error", "prepared", "ready"

_PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a spawned rank needs; pickled once at start-up."""

    rank: int
    world_size: int
    backend: str
    init_method: str  # "tcp://127.0.0.1:PORT": rank 0 (the engine process) hosts the store
    config: EngineConfig
    # The engine's class for config.model.architecture as "module:Class", so a model registered in
    # the engine process by code (not by a plugin) resolves here too.
    model_class_path: str
    parent_pid: int


def model_class_path(cls: type) -> str:
    """ "module:Class" of a model class, importable from another process (else a ValueError)."""
    module, name = cls.__module__, cls.__qualname__
    if module == "__main__" or "." in name or "<" in name:
        raise ValueError(
            f"model class {module}.{name} cannot be imported by a tensor-parallel worker: "
            "define it at the top level of an importable module (or register it from a plugin)"
        )
    return f"{module}:{name}"


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned rank (the target of `multiprocessing.Process`)."""
    # Ctrl-C reaches the whole process group; the engine decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _start_parent_watchdog(spec.parent_pid)
    try:
        _prepare(spec)
        conn.send((PREPARED, None))
        runner = _build_runner(spec)
        conn.send((READY, None))
    except BaseException:  # noqa: BLE001 - every start-up failure is reported, then we exit
        _report_and_exit(conn, f"rank {spec.rank} failed at start-up:\n{traceback.format_exc()}")
        return
    try:
        serve_commands(runner, conn, spec.rank)
    finally:
        runner.shutdown()
        destroy_distributed()
        conn.close()


def _prepare(spec: WorkerSpec) -> None:
    """What can fail before the process group exists: plugins and the model class import."""
    load_plugins()
    arch = spec.config.model.architecture
    try:
        current = model_class_path(ModelRegistry.resolve_for(spec.config.model))
    except ValueError:
        current = None  # not registered here, or not importable: the engine's class decides
    if current != spec.model_class_path:
        ModelRegistry.register_model(arch, spec.model_class_path)
        ModelRegistry.resolve(arch)


def _build_runner(spec: WorkerSpec) -> Any:
    from paphos.runner.model_runner import ModelRunner

    parallel = init_distributed(spec.rank, spec.world_size, spec.backend, spec.init_method)
    return ModelRunner(spec.config, parallel)


def serve_commands(runner: Any, conn: Connection, rank: int) -> None:
    """Run commands from `conn` until "shutdown" or EOF; report the first error, then stop."""
    while True:
        try:
            name, payload = conn.recv()
        except (EOFError, OSError):
            return  # the engine is gone
        if name == SHUTDOWN:
            return
        try:
            result = _run_command(runner, name, payload)
        except BaseException:  # noqa: BLE001 - reported to the engine, which raises it there
            _report(conn, f"rank {rank} failed in {name!r}:\n{traceback.format_exc()}")
            return
        if name != EXECUTE:
            conn.send((OK, result))


def _run_command(runner: Any, name: str, payload: Any) -> Any:
    if name == EXECUTE:
        runner.execute(payload)  # rank 0's RunnerOutput is the one used; ours is identical
        return None
    if name == DETERMINE_NUM_BLOCKS:
        return runner.determine_num_blocks()
    if name == INITIALIZE_KV_CACHE:
        runner.initialize_kv_cache(payload)
        return None
    raise ValueError(f"unknown worker command {name!r}: expected one of {COMMANDS}")


def _report(conn: Connection, message: str) -> None:
    try:
        conn.send((ERROR, message))
    except (OSError, ValueError):
        pass  # the engine is gone; nobody is left to tell


def _report_and_exit(conn: Connection, message: str) -> None:
    _report(conn, message)
    conn.close()
    destroy_distributed()


def _start_parent_watchdog(parent_pid: int) -> None:
    """Exit at once if the engine process dies (even by SIGKILL, when no pipe EOF may come while
    this rank is blocked in a collective)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(_PARENT_POLL_S)

    threading.Thread(target=watch, name="paphos-parent-watchdog", daemon=True).start()
