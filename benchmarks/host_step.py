"""Host time per decode step at 64 and 256 streaming requests, on the CPU: where the engine's own
Python goes when the GPU would be waiting for it (overlapped steps on CUDA run at max(host, GPU)).

A tiny random Llama runs the steps on the CPU; its forward is timed apart (`execute`), so the
columns are the host parts the CUDA path runs too: `Scheduler.schedule`, the runner's preparation
(state update + inputs, `ModelRunner.host_stats`), and the engine's update + outputs (delta
outputs, as the server's streams ask); all per decode step (the last row's multi-step decodes,
num_scheduler_steps=8, run eight per engine step: compare it with the row above). No other
engine is installable here to compare with, so the table is this engine's breakdown;
notes/cuda.md compares it across changes.

    python benchmarks/host_step.py
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from latency import _timed  # noqa: E402 - benchmarks/ is this script's own folder


def tiny_llama_dir() -> Path:
    from tests.conftest import build_tiny_llama

    path = build_tiny_llama(Path(tempfile.mkdtemp(prefix="paphos_host_")))
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # long enough for the generations below
    (path / "config.json").write_text(json.dumps(config))
    return path


def measure(llm, batch: int, new_tokens: int) -> dict[str, float]:  # noqa: ANN001
    from paphos import SamplingParams
    from paphos.outputs import OutputKind

    engine, runner = llm.engine, llm.engine.executor.runner
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    stamp = time.monotonic_ns()
    for i in range(batch):
        prompt = {"prompt_token_ids": [10 + (i * 7 + j) % 200 for j in range(32)]}
        engine.add_request(f"h{stamp}-{i}", prompt, params, output_kind=OutputKind.DELTA)
    parts: dict[str, list[float]] = {"step": [], "schedule": [], "prepare": [], "execute": []}
    restore = [
        _timed(engine.scheduler, "schedule", parts["schedule"]),
        _timed(engine.executor, "execute_async", parts["execute"]),
    ]
    stats = runner.host_stats
    try:
        while engine.has_unfinished_requests():
            before = (stats.prepare_s, stats.num_forwards)
            start = time.perf_counter()
            engine.step()
            parts["step"].append(time.perf_counter() - start)
            parts["prepare"].append(stats.prepare_s - before[0])
            # per decode step: a multi-step decode runs several per engine step
            forwards = max(stats.num_forwards - before[1], 1)
            for key in parts:
                parts[key][-1] /= forwards
    finally:
        for undo in restore:
            undo()
    steady = slice(8, -8)  # decode steps only: past the prefill, before the last finish
    ms = {k: 1e3 * statistics.median(v[steady]) for k, v in parts.items()}
    ms["engine"] = ms["step"] - ms["schedule"] - ms["execute"]  # update + outputs
    return ms


def main() -> None:
    from paphos import LLM

    llm = LLM(
        model=str(tiny_llama_dir()),
        dtype="float32",
        skip_tokenizer_init=True,
        max_model_len=4096,
        max_num_seqs=256,
    )
    measure(llm, 8, 32)  # warm-up
    print(
        f"{'requests':>8} {'new tokens':>10} {'steps':>5} {'schedule ms':>11} {'prepare ms':>10} "
        f"{'engine ms':>9} {'host ms':>8} {'per request us':>14}"
    )
    scheduler = llm.engine.scheduler
    single = scheduler.config
    for batch, new_tokens, steps in ((64, 128, 1), (256, 128, 1), (64, 1024, 1), (64, 1024, 8)):
        scheduler.config = dataclasses.replace(single, num_scheduler_steps=steps)
        ms = measure(llm, batch, new_tokens)
        host = ms["schedule"] + ms["prepare"] + ms["engine"]
        print(
            f"{batch:8d} {new_tokens:10d} {steps:5d} {ms['schedule']:11.3f} {ms['prepare']:10.3f} "
            f"{ms['engine']:9.3f} {host:8.3f} {1e3 * host / batch:14.1f}"
        )
    scheduler.config = single
    llm.close()


if __name__ == "__main__":
    main()
