"""Structured-output benchmark: decode step time of a batch where 32 requests follow a JSON schema
beside 32 free ones, against 64 free requests, in the same run (same engine, same lengths).

Every request decodes the same number of tokens (free ones ignore EOS; the schema's string field is
long enough that constrained ones never complete early), so the two batches differ only in the
grammar work: filling 32 bitmask rows on the host and applying them on the sampling device. That
work is also timed on its own (host time of the matchers and of the mask; on CPU the mask runs
synchronously, so its time is all there), which stays meaningful on a shared machine where step
times drift.

    python benchmarks/structured.py                     # SmolLM2 on CPU
    python benchmarks/structured.py --device cuda --model path/to/model --num-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from paphos import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "story": {"type": "string", "minLength": 2000, "maxLength": 4000},
    },
    "required": ["title", "story"],
    "additionalProperties": False,
}


def step_times(llm: LLM, params: list[SamplingParams], num_tokens: int) -> list[float]:
    """Seconds per engine step while every request decodes (the prefill steps are left out)."""
    engine = llm.engine
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", f"Write story number {i} as JSON:", p)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[3 : 3 + num_tokens - 6]  # skip prompt steps and the draining tail


def timed(owner: Any, name: str, spent: list[float]) -> None:
    """Wrap owner.name so that each call adds its seconds to spent[0] and one to spent[1]."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
            spent[1] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-constrained", type=int, default=32)
    parser.add_argument("--num-free", type=int, default=32)
    parser.add_argument("--num-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(model=args.model, device=args.device, max_model_len=512, num_scheduler_steps=1)
    n, total = args.num_tokens, args.num_constrained + args.num_free
    free = SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, max_tokens=n, structured_outputs={"json": SCHEMA})
    mixed = [constrained] * args.num_constrained + [free] * args.num_free
    step_times(llm, [constrained], 8)  # compile (cached after) and warm up
    sampling = llm.engine.executor.runner.step_sampling  # in-process runner (one rank)
    fill, mask = [0.0, 0], [0.0, 0]  # [seconds, calls]: matchers + bitmask, applying it
    timed(sampling, "_grammar_bitmask", fill)
    timed(sampling, "apply_bitmask", mask)
    rows: dict[str, list[float]] = {"free": [], "mixed": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both
        rows["free"] += step_times(llm, [free] * total, n)
        rows["mixed"] += step_times(llm, mixed, n)
    base = statistics.median(rows["free"])
    print(f"| batch ({total} requests, {n} tokens each) | median step ms | p90 step ms | vs free |")
    print("|---|---|---|---|")
    labels = {
        "free": f"{total} free",
        "mixed": f"{args.num_constrained} json_schema + {args.num_free} free",
    }
    for name, times in rows.items():
        median = statistics.median(times)
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(f"| {labels[name]} | {1e3 * median:.1f} | {1e3 * p90:.1f} | {median / base:.2f}x |")
    per_step = (fill[0] + mask[0]) / max(mask[1], 1)  # per step that applied a mask
    print(
        f"\ngrammar work (matchers + mask) per mixed step: {1e3 * per_step:.2f} ms "
        f"= {per_step / base:.3f} of a free step -> constrained step time "
        f"~{1 + per_step / base:.2f}x free"
    )


if __name__ == "__main__":
    main()
