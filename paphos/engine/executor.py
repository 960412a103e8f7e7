"""Executors run the model runner(s): in this process (one rank) or over several processes (TP).

An executor takes plain-data `SchedulerOutput`s and returns `RunnerOutput`s; the engine never
touches tensors.
"""

from __future__ import annotations

from typing import Protocol

from paphos.config import EngineConfig
from paphos.core.kv_cache_groups import KVCacheLayout
from paphos.core.step_data import RunnerOutput, SchedulerOutput, StepHandle


class Executor(Protocol):
    # Whether `execute_async` returns before the step's device work is done, so that the engine
    # can overlap scheduling the next step with it (config.runtime.async_scheduling resolved).
    overlaps_steps: bool
    # Hybrid models: the size of the recurrent-state pool (every rank's); None without state layers.
    num_state_slots: int | None

    def determine_num_blocks(self) -> KVCacheLayout: ...

    def initialize_kv_cache(self, num_blocks: KVCacheLayout) -> None: ...

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    """World size 1: the runner lives in the engine's process."""

    def __init__(self, config: EngineConfig) -> None:
        from paphos.runner.model_runner import ModelRunner

        self.runner = ModelRunner(config)
        self.num_state_slots = self.runner.num_state_slots
        wanted = config.runtime.async_scheduling
        self.overlaps_steps = self.runner.device.type == "cuda" if wanted is None else wanted

    def determine_num_blocks(self) -> KVCacheLayout:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: KVCacheLayout) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(scheduler_output)

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.runner.execute_async(scheduler_output)

    def shutdown(self) -> None:
        self.runner.shutdown()


def make_executor(config: EngineConfig) -> Executor:
    backend = config.parallel.distributed_executor_backend
    if backend is None:
        backend = "uni" if config.parallel.world_size == 1 else "mp"
    if backend == "uni":
        if config.parallel.world_size != 1:
            raise ValueError(
                "distributed_executor_backend='uni' runs one rank: use 'mp' for TP > 1"
            )
        return UniprocExecutor(config)
    if backend == "mp":
        from paphos.engine.mp_executor import MultiprocExecutor

        return MultiprocExecutor(config)
    raise ValueError(f"distributed_executor_backend={backend!r} is not available in this build")
