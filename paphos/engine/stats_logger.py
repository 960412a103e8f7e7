"""The server's periodic stats line: throughput since the last line, queue sizes, KV cache use,
prefix cache hit rate and preemptions, from two `EngineStats` snapshots (plain data, no clock of
its own). Invariant: nothing is logged for an interval in which nothing ran."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class _Snapshot:
    time: float
    prompt_tokens: int
    generation_tokens: int
    prefix_queries: int
    prefix_hits: int
    preemptions: int


def _snapshot(stats: Any, time: float) -> _Snapshot:
    return _Snapshot(
        time,
        stats.num_prompt_tokens_total,
        stats.num_generation_tokens_total,
        stats.prefix_cache_queries,
        stats.prefix_cache_hits,
        getattr(stats, "num_preemptions", 0),
    )


class StatsLogger:
    """`line(stats, now)` returns the stats line once `interval_s` passed since the last one and
    something ran meanwhile (tokens went through, or requests are running or waiting), else None."""

    def __init__(self, interval_s: float, stats: Any, now: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"log_stats_interval={interval_s!r} is invalid: expected > 0 s")
        self.interval_s = interval_s
        self._last = _snapshot(stats, now)

    def line(self, stats: Any, now: float) -> str | None:
        last = self._last
        elapsed = now - last.time
        if elapsed < self.interval_s:
            return None
        current = _snapshot(stats, now)
        self._last = current
        prompt = current.prompt_tokens - last.prompt_tokens
        generation = current.generation_tokens - last.generation_tokens
        busy = stats.num_running or stats.num_waiting
        if not (prompt or generation or busy):
            return None
        queries = current.prefix_queries - last.prefix_queries
        hits = current.prefix_hits - last.prefix_hits
        hit_rate = f"{100 * hits / queries:.1f}%" if queries else "-"
        return (
            f"prompt {prompt / elapsed:.1f} tok/s, generation {generation / elapsed:.1f} tok/s; "
            f"running {stats.num_running}, waiting {stats.num_waiting}; "
            f"KV cache {100 * stats.kv_cache_usage:.1f}% used; prefix cache hit rate {hit_rate}; "
            f"preemptions {current.preemptions - last.preemptions}"
        )
