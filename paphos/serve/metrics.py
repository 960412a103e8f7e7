"""Prometheus metrics of the server: engine gauges/counters read from the engine's latest stats at
scrape time, and per-request latency histograms (TTFT, TPOT, end-to-end) observed as streams finish.
Each server owns its own registry, so several apps in one process never share series."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from paphos.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineStatsCollector(Collector):
    """Exports the engine's stats snapshot (`get_stats()` fields of docs/contracts.md)."""

    def __init__(self, get_stats: Callable[[], Any], model_name: str) -> None:
        self._get_stats = get_stats
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._get_stats()
        labels = ["model_name"]
        value = [self._model_name]

        def gauge(name: str, doc: str, number: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"paphos:{name}", doc, labels=labels)
            family.add_metric(value, float(number))
            return family

        def counter(name: str, doc: str, number: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"paphos:{name}", doc, labels=labels)
            family.add_metric(value, float(number))
            return family

        queries = stats.prefix_cache_queries
        hits = stats.prefix_cache_hits
        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge(
            "kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", stats.kv_cache_usage
        )
        yield gauge("num_kv_blocks", "KV cache blocks in total.", stats.num_kv_blocks)
        yield gauge("num_free_kv_blocks", "KV cache blocks free.", stats.num_free_kv_blocks)
        yield counter("prompt_tokens", "Prompt tokens processed.", stats.num_prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", stats.num_generation_tokens_total)
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield gauge(
            "prefix_cache_hit_rate",
            "Prefix cache hits / queries since start.",
            hits / max(queries, 1),
        )


class ServerMetrics:
    """Owns the registry; `track()` wraps a request's delta stream and records its latencies."""

    def __init__(self, get_stats: Callable[[], Any], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(get_stats, model_name))
        labels = ["model_name"]
        self._model_name = model_name
        self.ttft = Histogram(
            "paphos:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "paphos:time_per_output_token_seconds",
            "Mean time per output token after the first.",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "paphos:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "paphos:request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(
        self, stream: AsyncIterator[RequestOutput], arrival: float | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Pass a request's output stream through (deltas, or one final output), timing its first
        token and its end from `arrival` (a `time.monotonic()` value; default: now). Token times
        come from the engine's own metrics where the outputs carry them (the same clock), so a
        request that only reads its final output still reports its real time to first token."""
        start = time.monotonic() if arrival is None else arrival
        first: float | None = None
        last: float | None = None
        num_tokens = 0
        async for output in stream:
            new = sum(len(c.token_ids) for c in output.outputs)
            engine_times = output.metrics
            if new and first is None:
                first = time.monotonic()
                if engine_times is not None and engine_times.first_token_time is not None:
                    first = engine_times.first_token_time
                self.ttft.labels(self._model_name).observe(first - start)
            if engine_times is not None:
                last = engine_times.last_token_time
            num_tokens += new
            for completion in output.outputs:
                if completion.finish_reason is not None:
                    self.finished.labels(self._model_name, completion.finish_reason).inc()
            yield output
        end = time.monotonic()
        self.e2e.labels(self._model_name).observe(end - start)
        if first is not None and num_tokens > 1:
            last = end if last is None else last
            self.tpot.labels(self._model_name).observe((last - first) / (num_tokens - 1))
