"""AsyncEngine over a fake engine: streams of deltas, cumulative mode, abort on consumer exit,
failing requests and failing steps never stop the engine from serving the next request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fake_engine import FakeEngine

from paphos.engine.async_engine import AsyncEngine, RequestFailedError
from paphos.engine.deltas import DeltaTracker
from paphos.outputs import CompletionOutput, OutputKind, RequestOutput
from paphos.sampling_params import SamplingParams


def run_with_engine(engine: FakeEngine, body: Any) -> Any:
    async def main() -> Any:
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            return await body(async_engine)
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    return asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_deltas_join_to_the_cumulative_output(fake_engine: FakeEngine) -> None:
    params = SamplingParams(max_tokens=12, n=2, temperature=0)

    async def body(engine: AsyncEngine) -> tuple[list[RequestOutput], list[RequestOutput]]:
        deltas = [o async for o in engine.generate("Hello world", params, "a")]
        whole = [o async for o in engine.generate("Hello world", params, "b", delta=False)]
        return deltas, whole

    deltas, whole = run_with_engine(fake_engine, body)
    final = whole[-1]
    assert final.finished and deltas[-1].finished
    for completion in final.outputs:
        pieces = [c for d in deltas for c in d.outputs if c.index == completion.index]
        assert "".join(p.text for p in pieces) == completion.text
        assert [t for p in pieces for t in p.token_ids] == completion.token_ids
        assert len(completion.token_ids) == 12
        assert pieces[-1].finish_reason == "length"


def test_consumer_that_stops_early_aborts_and_frees_blocks(fake_engine: FakeEngine) -> None:
    fake_engine.step_delay = 0.01
    params = SamplingParams(max_tokens=100)

    async def body(engine: AsyncEngine) -> int:
        async for _ in engine.generate("Hello", params, "early"):
            break  # the generator is closed here: the request must be aborted
        for _ in range(100):
            if not fake_engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return engine.num_streams

    assert run_with_engine(fake_engine, body) == 0
    assert fake_engine.num_free_blocks == fake_engine.num_kv_blocks


def test_cancelled_consumer_task_aborts_its_request(fake_engine: FakeEngine) -> None:
    fake_engine.step_delay = 0.01

    async def consume(engine: AsyncEngine) -> None:
        async for _ in engine.generate("Hello", SamplingParams(max_tokens=100), "c"):
            pass

    async def body(engine: AsyncEngine) -> None:
        task = asyncio.ensure_future(consume(engine))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            if fake_engine.num_free_blocks == fake_engine.num_kv_blocks:
                return
            await asyncio.sleep(0.01)

    run_with_engine(fake_engine, body)
    assert fake_engine.num_free_blocks == fake_engine.num_kv_blocks
    assert not fake_engine.has_unfinished_requests()


def test_invalid_request_raises_and_the_engine_keeps_serving(fake_engine: FakeEngine) -> None:
    async def body(engine: AsyncEngine) -> list[RequestOutput]:
        with pytest.raises(ValueError, match="prompt"):
            await engine.add_request("bad", {"prompt_token_ids": []}, SamplingParams())
        assert engine.num_streams == 0
        return [o async for o in engine.generate("Hello", SamplingParams(max_tokens=3), "ok")]

    outputs = run_with_engine(fake_engine, body)
    assert outputs[-1].finished


def test_failing_step_fails_running_requests_then_serves_new_ones(
    fake_engine: FakeEngine,
) -> None:
    async def body(engine: AsyncEngine) -> list[RequestOutput]:
        fake_engine.fail_next_step = True
        with pytest.raises(RequestFailedError, match="injected"):
            async for _ in engine.generate("Hello", SamplingParams(max_tokens=5), "doomed"):
                pass
        assert engine.is_running
        return [o async for o in engine.generate("Hello", SamplingParams(max_tokens=3), "next")]

    outputs = run_with_engine(fake_engine, body)
    assert outputs[-1].finished
    assert fake_engine.num_free_blocks == fake_engine.num_kv_blocks


def test_many_concurrent_generations_all_complete(fake_engine: FakeEngine) -> None:
    async def one(engine: AsyncEngine, i: int) -> str:
        params = SamplingParams(max_tokens=5, seed=i)
        return "".join(
            [c.text async for o in engine.generate(f"Hi {i}", params, f"r{i}") for c in o.outputs]
        )

    async def body(engine: AsyncEngine) -> list[str]:
        return await asyncio.gather(*(one(engine, i) for i in range(16)))

    texts = run_with_engine(fake_engine, body)
    assert len(texts) == 16 and all(texts)


def test_delta_tracker_holds_back_a_possible_stop_string_prefix() -> None:
    tracker = DeltaTracker(SamplingParams(stop=["STOP"]))

    def output(text: str, finished: bool) -> RequestOutput:
        reason = "stop" if finished else None
        completion = CompletionOutput(0, text, list(range(len(text))), finish_reason=reason)
        return RequestOutput("r", None, [1], [completion], finished)

    first = tracker.step(output("Hello ST", False))
    assert first is not None and first.outputs[0].text == "Hello"  # " ST" may start "STOP"
    last = tracker.step(output("Hello wor", True))
    assert last is not None and last.outputs[0].text == " wor"
    assert last.outputs[0].token_ids == [8]


def test_a_slow_reader_gets_its_unread_deltas_merged_into_one() -> None:
    from paphos.engine.async_engine import RequestStream

    def delta(text: str, tokens: list[int], finished: bool) -> RequestOutput:
        reason = "length" if finished else None
        pieces = [CompletionOutput(0, text, tokens, finish_reason=reason)]
        pieces.append(CompletionOutput(1, text.upper(), tokens, finish_reason=reason))
        return RequestOutput("r", None, [1], pieces, finished)

    async def read() -> RequestOutput:
        stream = RequestStream("r", SamplingParams(n=2), OutputKind.DELTA)
        stream.put(delta("ab", [1, 2], False))
        stream.put(delta("c", [3], False))
        stream.put(delta("d", [4], True))
        return await stream.wait()

    merged = asyncio.run(read())
    assert merged.finished
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in merged.outputs] == [
        (0, "abcd", [1, 2, 3, 4], "length"),
        (1, "ABCD", [1, 2, 3, 4], "length"),
    ]


def test_metrics_time_a_final_only_request_from_the_engine_token_times() -> None:
    """A non-streamed request reads one output at the end; its time to first token and per
    output token still come out right, from the engine's own timestamps."""
    from fake_engine import FakeStats

    from paphos.outputs import RequestMetrics
    from paphos.serve.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: FakeStats(0, 0, 0.0, 0, 0, 0, 0, 1, 1), "m")
    times = RequestMetrics(arrival_time=100.0, first_token_time=100.5, last_token_time=102.5)
    final = RequestOutput(
        "r",
        None,
        [1],
        [CompletionOutput(0, "abcde", [1, 2, 3, 4, 5], finish_reason="length")],
        True,
        metrics=times,
    )

    async def one_output():  # noqa: ANN202
        yield final

    async def drain() -> None:
        async for _ in metrics.track(one_output(), arrival=100.0):
            pass

    asyncio.run(drain())
    ttft = metrics.registry.get_sample_value(
        "paphos:time_to_first_token_seconds_sum", {"model_name": "m"}
    )
    tpot = metrics.registry.get_sample_value(
        "paphos:time_per_output_token_seconds_sum", {"model_name": "m"}
    )
    assert ttft == pytest.approx(0.5) and tpot == pytest.approx(0.5)  # (102.5 - 100.5) / 4
