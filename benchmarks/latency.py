"""Decode latency of paphos: wall time of pure-decode steps, host time per step, and the GPU time
of one decode graph replay, at a few batch sizes (random prompts, greedy, EOS ignored).

    python benchmarks/latency.py --model DIR --load-format dummy --dtype bfloat16 --batch-sizes 1,64

Host time per step = `Scheduler.schedule` + the runner's preparation (from `execute` entry to the
graph/model launch); the engine's own update/output work is reported beside it. The GPU time of a
step: replays of the captured graph of that batch size over the last step's inputs (CUDA events).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size - 10, (num, length), generator=gen).tolist()  # [num, len]


def measure_decode(llm: Any, batch_size: int, prompt_len: int, new_tokens: int) -> dict:
    """Run batch_size requests to completion through `Engine.step`, timing every step (per
    decode step: an engine step of a multi-step decode counts as its number of decode steps)."""
    from paphos import SamplingParams
    from paphos.outputs import OutputKind

    engine = llm.engine
    runner = engine.executor.runner
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(random_prompts(batch_size, prompt_len, engine.vocab_size, batch_size)):
        # delta outputs, as the server's streams ask for them
        engine.add_request(
            f"lat-{batch_size}-{i}", {"prompt_token_ids": p}, params, output_kind=OutputKind.DELTA
        )
    schedule_s: list[float] = []
    execute_s: list[float] = []
    restore = [
        _timed(engine.scheduler, "schedule", schedule_s),
        _timed(engine.executor, "execute_async", execute_s),
    ]
    decode = {"step": [], "prepare": [], "schedule": [], "execute": []}
    torch.cuda.synchronize()
    try:
        while engine.has_unfinished_requests():
            # no synchronize per step: with overlapped steps the step period is the wall time
            # between calls (the device is never drained in between)
            stats = runner.host_stats
            before = (stats.num_graph_steps, stats.prepare_s, stats.num_forwards)
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if stats.num_graph_steps > before[0]:
                # per decode step: a multi-step decode runs several per engine step
                forwards = stats.num_forwards - before[2]
                decode["step"].append(elapsed / forwards)
                decode["prepare"].append((stats.prepare_s - before[1]) / forwards)
                decode["schedule"].append(schedule_s[-1] / forwards)
                decode["execute"].append(execute_s[-1] / forwards)
    finally:
        for undo in restore:
            undo()
    ms = {k: 1e3 * statistics.median(v) if v else float("nan") for k, v in decode.items()}
    return {
        "batch_size": batch_size,
        "decode_step_ms": ms["step"],
        "decode_steps": len(decode["step"]),
        "replay_ms": replay_ms(runner, batch_size),
        "schedule_ms": ms["schedule"],
        "prepare_ms": ms["prepare"],  # runner: state update + inputs, up to the graph launch
        "execute_ms": ms["execute"],  # runner: prepare + launch of the step and its D2H copy
        # waiting for the device (this step's, or the previous one's when overlapped) + update
        # + outputs
        "engine_rest_ms": ms["step"] - ms["schedule"] - ms["execute"],
        "overlapped": bool(engine.executor.overlaps_steps),
    }


def _timed(owner: Any, name: str, sink: list[float]):  # noqa: ANN202 - the undo callable
    """Wrap owner.name to append each call's wall seconds to sink; returns the undo."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sink.append(time.perf_counter() - start)
        return out

    setattr(owner, name, timed)
    return lambda: setattr(owner, name, original)


def replay_ms(runner: Any, batch_size: int, repeats: int = 20) -> float:
    """GPU time of one decode graph replay of this batch size (over the last step's inputs)."""
    graphs = runner.graphs
    if graphs is None or graphs.bucket_for(batch_size) is None:
        return float("nan")
    bucket = graphs.bucket_for(batch_size)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs.replay(bucket)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--num-scheduler-steps", type=int, default=1, help="1: single steps, as the server runs"
    )
    args = parser.parse_args()
    from paphos import LLM

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        max_num_seqs=max(sizes),
        enforce_eager=args.enforce_eager,
        num_scheduler_steps=args.num_scheduler_steps,
    )
    measure_decode(llm, 1, 16, 4)  # warm-up
    print(
        f"{'batch':>5} {'step ms':>8} {'replay ms':>9} {'schedule ms':>11} {'prepare ms':>10} "
        f"{'execute ms':>10} {'engine rest ms':>14}"
    )
    for bs in sizes:
        r = measure_decode(llm, bs, args.prompt_len, args.new_tokens)
        print(
            f"{bs:5d} {r['decode_step_ms']:8.3f} {r['replay_ms']:9.3f} "
            f"{r['schedule_ms']:11.3f} {r['prepare_ms']:10.3f} {r['execute_ms']:10.3f} "
            f"{r['engine_rest_ms']:14.3f}"
        )
    llm.close()


if __name__ == "__main__":
    main()
