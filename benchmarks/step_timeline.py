"""Where a throughput run's time goes, step by step (CUDA): the run of benchmarks/gpu.py's
throughput rows (random prompts of 128 tokens, 128 new, greedy, dummy weights), with every engine
step timed and sorted into prefill-carrying steps and pure decode steps (graph replays), and the
host's share of a decode step (schedule, runner prepare, the engine's wait + update).

    python benchmarks/step_timeline.py --shape 1b --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import SHAPES, llama_config  # noqa: E402
from latency import _timed, random_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument(
        "--num-scheduler-steps",
        type=int,
        default=1,
        help="decode steps per engine step (offline LLM's CUDA default is 8; 1: one per step)",
    )
    args = parser.parse_args()
    from paphos import LLM, SamplingParams
    from paphos.outputs import OutputKind

    workdir = Path(tempfile.mkdtemp(prefix="paphos_timeline_"))
    llama_config(args.shape).save_pretrained(workdir)
    extra = {}
    if args.max_num_batched_tokens:
        extra["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(
        model=str(workdir),
        load_format="dummy",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=2048,
        max_num_seqs=256,
        num_scheduler_steps=args.num_scheduler_steps,
        **extra,
    )
    engine, runner = llm.engine, llm.engine.executor.runner
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for rnd in range(2):  # the first round warms up
        for i, p in enumerate(random_prompts(args.batch, 128, 128256, rnd)):
            engine.add_request(
                f"{rnd}-{i}", {"prompt_token_ids": p}, params, output_kind=OutputKind.FINAL_ONLY
            )
        sched, launch = [], []
        undo = [
            _timed(engine.scheduler, "schedule", sched),
            _timed(engine.executor, "execute_async", launch),
        ]
        steps = []
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            graphs = runner.host_stats.num_graph_steps
            t = time.perf_counter()
            engine.step()
            steps.append((time.perf_counter() - t, runner.host_stats.num_graph_steps > graphs))
        total = time.perf_counter() - start
        for u in undo:
            u()
    decode = [s for s, g in steps if g]
    other = [s for s, g in steps if not g]
    ms = lambda v: 1e3 * statistics.median(v) if v else float("nan")  # noqa: E731
    print(
        f"{torch.cuda.get_device_name()}: {args.shape}, batch {args.batch}, "
        f"max_num_batched_tokens {engine.config.scheduler.max_num_batched_tokens}"
    )
    print(f"total {total:.3f} s, {args.batch * 128 / total:.0f} output tok/s, {len(steps)} steps")
    print(
        f"steps without a graph (prefill/mixed): {len(other)}, {sum(other):.3f} s, "
        f"median {ms(other):.2f} ms"
    )
    print(f"graph (decode) steps: {len(decode)}, {sum(decode):.3f} s, median {ms(decode):.2f} ms")
    print(
        f"median schedule {ms(sched):.3f} ms, execute_async (prepare + launch) {ms(launch):.3f} ms"
    )
    llm.close()


if __name__ == "__main__":
    main()
