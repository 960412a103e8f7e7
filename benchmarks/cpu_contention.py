"""Batch-1 decode on the CPU while another process keeps one of our cores busy: pinned threads
with the governor (paphos's default, runner/cpu_threads.py) beside unpinned threads, in one run.

A busy loop pinned to the first core of the plan starts after a quiet measurement; a step should
slow down in proportion to the cores lost (2 -> 1 core: ~2x), not collapse.
    python benchmarks/cpu_contention.py [--model M] [--load-format dummy] [--tokens 48]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def measure(bind: bool, args) -> tuple[float, list[float], list[int]]:
    from paphos import LLM, SamplingParams

    llm = LLM(
        model=args.model or None,
        load_format=args.load_format,
        bind_cpu_threads=bind,
        max_model_len=512,
        device="cpu",
        skip_tokenizer_init=True,
    )
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(100, 160))}]
    llm.generate(prompt, params, use_tqdm=False)  # warm-up (and the governor's first look)

    def ms_per_token() -> float:
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        return (time.perf_counter() - start) / args.tokens * 1e3

    quiet = ms_per_token()
    hog_core = min(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{hog_core}}})\nwhile 1: pass"]
    )
    try:
        time.sleep(0.5)
        loaded = [ms_per_token() for _ in range(args.repeats)]
    finally:
        hog.kill()
        hog.wait()
    governor = llm.engine.executor.runner.threads
    cores = list(governor.cores) if governor is not None else []
    llm.close()
    return quiet, loaded, cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"cores allowed: {sorted(os.sched_getaffinity(0))}; busy loop on the first")
    print(f"{'threads':22} {'quiet ms/tok':>12} {'busy core ms/tok (runs)':>32} {'x':>6}  cores")
    for bind, name in ((True, "pinned + governor"), (False, "unpinned")):
        quiet, loaded, cores = measure(bind, args)
        runs = " / ".join(f"{x:.1f}" for x in loaded)
        worst = max(loaded)
        print(f"{name:22} {quiet:12.1f} {runs:>32} {worst / quiet:5.1f}x  {cores}")


if __name__ == "__main__":
    main()
