"""Serving benchmark: send a fixed, seeded mix of concurrent streaming requests to a running paphos
(or any OpenAI-compatible) server and print requests/s, output tokens/s, TTFT and TPOT percentiles.

    paphos run &            # in another shell
    python benchmarks/serve.py --num-requests 64 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import openai

_WORDS = (
    "the model serves many requests with a paged cache and continuous batching while each client "
    "streams its tokens as soon as they are sampled and the scheduler keeps the batch full"
).split()


@dataclass(frozen=True)
class Job:
    prompt: str
    max_tokens: int
    chat: bool


@dataclass(frozen=True)
class Result:
    ttft: float  # seconds to the first content chunk
    latency: float  # seconds to the last chunk
    num_output_tokens: int

    @property
    def tpot(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.num_output_tokens - 1)


def make_jobs(
    num_requests: int, seed: int, prompt_words: list[int], output_tokens: list[int]
) -> list[Job]:
    """A fixed mix (same seed, same jobs): prompt and output lengths drawn from the given choices,
    completions and chat alternating."""
    rng = random.Random(seed)
    jobs = []
    for i in range(num_requests):
        num_words = rng.choice(prompt_words)
        prompt = " ".join(rng.choice(_WORDS) for _ in range(num_words))
        jobs.append(Job(prompt, max_tokens=rng.choice(output_tokens), chat=i % 2 == 1))
    return jobs


async def run_job(client: openai.AsyncOpenAI, model: str, job: Job) -> Result:
    start = time.perf_counter()
    first: float | None = None
    usage_tokens: int | None = None
    chunks = 0
    common = {
        "model": model,
        "max_tokens": job.max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": {"ignore_eos": True},
    }
    if job.chat:
        messages = [{"role": "user", "content": job.prompt}]
        stream = await client.chat.completions.create(messages=messages, **common)
    else:
        stream = await client.completions.create(prompt=job.prompt, **common)
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        piece = chunk.choices[0].delta.content if job.chat else chunk.choices[0].text
        if piece:
            chunks += 1
            first = first if first is not None else time.perf_counter() - start
    latency = time.perf_counter() - start
    tokens = usage_tokens if usage_tokens is not None else chunks
    return Result(first if first is not None else latency, latency, tokens)


async def run_all(args: argparse.Namespace) -> tuple[list[Result], float]:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    jobs = make_jobs(args.num_requests, args.seed, args.prompt_words, args.output_tokens)
    limit = asyncio.Semaphore(args.concurrency)

    async def bounded(job: Job) -> Result:
        async with limit:
            return await run_job(client, model, job)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(job) for job in jobs))
    elapsed = time.perf_counter() - start
    await client.close()
    return list(results), elapsed


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    mean = statistics.fmean(ordered) * 1000
    return f"mean {mean:8.1f}  p50 {at(0.5):8.1f}  p90 {at(0.9):8.1f}  p99 {at(0.99):8.1f} ms"


def report(results: list[Result], elapsed: float) -> None:
    num_tokens = sum(r.num_output_tokens for r in results)
    print(f"requests:          {len(results)} in {elapsed:.2f} s")
    print(f"requests/s:        {len(results) / elapsed:.2f}")
    print(f"output tokens/s:   {num_tokens / elapsed:.1f}  ({num_tokens} tokens)")
    print(f"TTFT:              {percentiles([r.ttft for r in results])}")
    tpots = [t for r in results if (t := r.tpot) is not None]
    print(f"TPOT:              {percentiles(tpots)}")
    print(f"e2e latency:       {percentiles([r.latency for r in results])}")


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive integers")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:2242/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt-words",
        type=_int_list,
        default=[8, 32, 128],
        help="comma-separated prompt lengths (words) to draw from",
    )
    parser.add_argument(
        "--output-tokens",
        type=_int_list,
        default=[16, 64, 128],
        help="comma-separated max_tokens values to draw from",
    )
    args = parser.parse_args()
    if args.num_requests < 1 or args.concurrency < 1:
        parser.error("--num-requests and --concurrency must be >= 1")
    results, elapsed = asyncio.run(run_all(args))
    report(results, elapsed)


if __name__ == "__main__":
    main()
