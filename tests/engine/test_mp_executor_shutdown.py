"""The multiprocess executor leaves no worker behind: on close, on an exception, when a worker fails
(at start-up, mid-step or killed: a WorkerError, never a hang), and when the engine process is
killed or interrupted. After every test no child of this process is left (the autouse fixture)."""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch

from paphos import LLM, SamplingParams
from paphos.engine.mp_executor import WorkerError
from paphos.models.llama import LlamaForCausalLM
from paphos.models.registry import ModelRegistry
from paphos.parallel import ParallelInfo

HANG_LIMIT_S = 90  # a hang kills the test run (with tracebacks) instead of stalling CI
ENGINE_KWARGS = dict(
    tensor_parallel_size=2,
    device="cpu",
    dtype="float32",
    kv_cache_space=0.002,
    skip_tokenizer_init=True,
)
PROMPT = {"prompt_token_ids": [5, 6, 7, 8, 9]}
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


class FailOnRank1AtStepTwo(LlamaForCausalLM):
    """The tiny Llama, except that rank 1 raises in its second forward pass."""

    def __init__(self, config, linear_method=None, parallel=None, prefix="") -> None:
        super().__init__(config, linear_method, parallel, prefix)
        self.rank = (parallel or ParallelInfo()).rank
        self.num_calls = 0

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        self.num_calls += 1
        if self.rank == 1 and self.num_calls == 2:
            raise RuntimeError("injected failure on rank 1")
        return super().forward(input_ids, positions, kv_caches, attn_metadata)


class FailOnRank1AtStartUp(LlamaForCausalLM):
    def __init__(self, config, linear_method=None, parallel=None, prefix="") -> None:
        if (parallel or ParallelInfo()).rank == 1:
            raise RuntimeError("injected start-up failure on rank 1")
        super().__init__(config, linear_method, parallel, prefix)


def _model_dir_for(cls: type, tiny_llama_dir: Path, tmp_path: Path) -> str:
    """The tiny Llama's checkpoint under a config.json naming `cls` as its architecture."""
    ModelRegistry.register_model(cls.__name__, cls)
    target = tmp_path / cls.__name__
    shutil.copytree(tiny_llama_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = [cls.__name__]
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def _workers(llm: LLM) -> list[psutil.Process]:
    return [psutil.Process(w.process.pid) for w in llm.engine.executor.workers]


def _children() -> list[psutil.Process]:
    return [
        c
        for c in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(c.cmdline())
    ]


@contextmanager
def _no_hang():
    faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = {c.pid for c in _children()}  # e.g. a server another test file is still stopping
    with _no_hang():
        yield
    left = [c for c in _children() if c.pid not in before]
    for child in left:
        child.kill()
    assert not left, f"processes left behind: {left}"


def test_close_stops_every_worker_and_is_idempotent(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **ENGINE_KWARGS)
    workers = _workers(llm)
    assert len(workers) == 1 and workers[0].is_running()
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.close()
    llm.close()
    assert not any(w.is_running() for w in workers)
    assert not torch.distributed.is_initialized()
    with pytest.raises(WorkerError, match="shut down"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False)


def test_an_exception_in_the_with_block_still_stops_the_workers(tiny_llama_dir):
    with pytest.raises(KeyError), LLM(str(tiny_llama_dir), **ENGINE_KWARGS) as llm:
        workers = _workers(llm)
        raise KeyError("user code failed")
    assert not any(w.is_running() for w in workers)


def test_a_worker_failing_mid_step_raises_worker_error_with_its_traceback(tiny_llama_dir, tmp_path):
    model = _model_dir_for(FailOnRank1AtStepTwo, tiny_llama_dir, tmp_path)
    with LLM(model, **ENGINE_KWARGS) as llm:
        with pytest.raises(WorkerError, match="injected failure on rank 1"):
            llm.generate(PROMPT, GREEDY, use_tqdm=False)
        with pytest.raises(WorkerError, match="failed earlier"):
            llm.generate(PROMPT, GREEDY, use_tqdm=False)


def test_a_worker_failing_at_start_up_raises_worker_error(tiny_llama_dir, tmp_path):
    model = _model_dir_for(FailOnRank1AtStartUp, tiny_llama_dir, tmp_path)
    with pytest.raises(WorkerError, match="rank 1 failed at start-up(.|\n)*injected start-up"):
        LLM(model, **ENGINE_KWARGS)
    assert not torch.distributed.is_initialized()


def test_a_killed_worker_raises_worker_error_at_the_next_step(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), **ENGINE_KWARGS) as llm:
        llm.generate(PROMPT, GREEDY, use_tqdm=False)
        (worker,) = _workers(llm)
        worker.kill()
        worker.wait(timeout=10)
        with pytest.raises(WorkerError, match="rank 1"):
            llm.generate(PROMPT, GREEDY, use_tqdm=False)


# The engine process handles Ctrl-C as one started from a terminal does, even where pytest itself
# runs with SIGINT ignored (a background job of a non-interactive shell: its children inherit that)
ENGINE_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from paphos import LLM
llm = LLM(sys.argv[1], **{kwargs!r})
print(*(w.process.pid for w in llm.engine.executor.workers), flush=True)
time.sleep(600)
"""


@contextmanager
def _engine_process(model_dir: Path):
    """A separate engine process with TP=2; yields (process, worker pids); kills all at the end."""
    script = ENGINE_SCRIPT.format(kwargs=ENGINE_KWARGS)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(model_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    pids: list[int] = []
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids, "the engine process printed no worker pids"
        yield proc, pids
    finally:
        for pid in [proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _is_running(p)]
        time.sleep(0.1)
    return alive


def test_workers_exit_when_the_engine_process_is_killed(tiny_llama_dir):
    with _engine_process(tiny_llama_dir) as (proc, pids):
        assert all(_is_running(p) for p in pids)
        proc.kill()
        assert not _wait_gone(pids, 10), "workers outlived their SIGKILLed engine"


def test_ctrl_c_stops_the_engine_process_and_its_workers(tiny_llama_dir):
    with _engine_process(tiny_llama_dir) as (proc, pids):
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        assert proc.wait(timeout=30) != 0
        assert not _wait_gone(pids, 10), "workers outlived their interrupted engine"
