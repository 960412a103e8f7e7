"""AsyncEngine: runs the synchronous `Engine.step()` loop in one background thread and hands each
request its outputs as an async stream. Invariant: only the engine thread touches the `Engine`; the
event loop talks to it through a command queue, so add/abort never race with a step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from paphos.engine.deltas import merge_delta
from paphos.engine.stats_logger import StatsLogger
from paphos.outputs import OutputKind, RequestOutput
from paphos.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served any more."""


class RequestFailedError(RuntimeError):
    """The engine raised while a request was running; the request was finished with this error."""


class RequestStream:
    """Outputs of one request, as the engine thread publishes them.

    Only the event loop thread touches a stream. Outputs are coalesced: a slow consumer never sees
    an unbounded backlog, but one output with everything unread (a delta stream merges its unread
    deltas; a cumulative one keeps the latest).
    """

    def __init__(
        self, request_id: str, params: SamplingParams, kind: OutputKind = OutputKind.DELTA
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.delta = kind is OutputKind.DELTA
        self.latest: RequestOutput | None = None  # unread
        self.error: BaseException | None = None
        self.finished = False
        self._event = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        if self.delta and self.latest is not None:
            output = merge_delta(self.latest, output)
        self.latest = output
        self.finished = output.finished
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finished = True
        self._event.set()

    async def wait(self) -> RequestOutput:
        """What arrived since the last wait (a delta, or the latest cumulative output); raises the
        request's error."""
        await self._event.wait()
        self._event.clear()
        if self.error is not None:
            raise self.error
        output, self.latest = self.latest, None
        assert output is not None
        return output


class AsyncEngine:
    """Async front of a synchronous engine (anything with the `Engine` API of docs/contracts.md)."""

    def __init__(
        self,
        engine: Any,
        grammar_compile_timeout_s: float = 30.0,
        log_stats_interval_s: float | None = None,
    ) -> None:
        """`log_stats_interval_s`: log a stats line that often while requests run (None: never)."""
        self.engine = engine
        # Grammars compile here, off the engine thread; a compile past the limit is refused (its
        # thread finishes in the background and fills the cache).
        self.grammar_compile_timeout_s = grammar_compile_timeout_s
        self._compile_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self.stats: Any = engine.get_stats()
        self._stats_logger = (
            None
            if log_stats_interval_s is None
            else StatsLogger(log_stats_interval_s, self.stats, time.monotonic())
        )

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call it inside the event loop that consumes the streams."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="paphos-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread (outstanding requests fail) and shut the engine down."""
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ---- public API (event loop) -----------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | dict[str, Any],
        params: SamplingParams,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.DELTA,
    ) -> RequestStream:
        """Hand the request to the engine; raises ValueError (bad input) before any output. The
        stream yields what `output_kind` asks of the engine: deltas (new text/tokens since the
        last output), cumulative outputs, or one output when finished (FINAL_ONLY: a consumer that
        only wants the whole result costs the engine no per-step outputs)."""
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if params.structured_outputs is not None and params._grammar is None:
            await self._compile_grammar(params)
        loop = asyncio.get_running_loop()
        added: asyncio.Future[None] = loop.create_future()
        stream = RequestStream(request_id, params, output_kind)
        self._streams[request_id] = stream
        arrival = time.monotonic() if arrival_time is None else arrival_time

        def add() -> None:
            try:
                self.engine.add_request(
                    request_id, prompt, params, arrival_time=arrival, output_kind=output_kind
                )
            except Exception as e:  # noqa: BLE001 - handed to the caller, not swallowed
                self._reply(added, error=e)
                return
            self._reply(added, request_id=request_id)

        self._submit(add)
        try:
            await added
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def _compile_grammar(self, params: SamplingParams) -> None:
        compile_grammar = getattr(self.engine, "compile_grammar", None)
        if compile_grammar is None:
            return  # an engine without structured output
        if self._compile_pool is None:
            self._compile_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="paphos-grammar"
            )
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._compile_pool, compile_grammar, params)
        try:
            await asyncio.wait_for(job, self.grammar_compile_timeout_s)
        except asyncio.TimeoutError as e:
            raise ValueError(
                f"structured_outputs={params.structured_outputs.describe()} is invalid: "
                f"compiling it took longer than {self.grammar_compile_timeout_s} s"
            ) from e

    async def generate(
        self,
        prompt: str | dict[str, Any],
        params: SamplingParams,
        request_id: str,
        *,
        delta: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Add the request and yield its outputs: deltas (new text/tokens since the last yield) by
        default, cumulative ones with `delta=False`. Stopping the iteration early aborts it."""
        kind = OutputKind.DELTA if delta else OutputKind.CUMULATIVE
        stream = await self.add_request(request_id, prompt, params, output_kind=kind)
        async for output in self.iterate(stream):
            yield output

    async def iterate(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """Yield a stream's outputs; a consumer that stops before the end aborts the request."""
        try:
            while True:
                output = await stream.wait()
                yield output
                if output.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks are freed by the engine thread); safe to call twice."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.finished = True
        self._submit(lambda: self.engine.abort_request([request_id]))

    # ---- engine thread ---------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _reply(self, future: asyncio.Future, error: BaseException | None = None, **ok: Any) -> None:
        """Resolve an event-loop future from the engine thread; a request added for a caller that is
        already gone is aborted at once so it holds no blocks."""

        def resolve() -> None:
            if future.done():
                if error is None and "request_id" in ok:
                    self._submit(lambda: self.engine.abort_request([ok["request_id"]]))
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(None)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(resolve)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands()
                if not self.engine.has_unfinished_requests():
                    self.stats = self.engine.get_stats()
                    self._log_stats()
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                self._step()
                self._log_stats()
        except BaseException as e:  # the loop itself broke (not a step): every stream must know
            logger.exception("engine thread died")
            self._dead = e
            self._publish_failure(EngineDeadError(f"engine thread died: {e!r}"), None)

    def _log_stats(self) -> None:
        if self._stats_logger is not None:
            line = self._stats_logger.line(self.stats, time.monotonic())
            if line is not None:
                logger.info("%s", line)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failing step fails its requests, not the server
            logger.exception("engine step failed; aborting the running requests")
            self._publish_failure(RequestFailedError(f"engine step failed: {e!r}"), abort=True)
            return
        self.stats = self.engine.get_stats()
        if outputs:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _publish_failure(self, error: BaseException, abort: bool | None) -> None:
        """Fail every live stream (from the engine thread); with `abort`, free their requests."""
        assert self._loop is not None

        def fail_all() -> None:
            ids = list(self._streams)
            for request_id in ids:
                self._streams.pop(request_id).fail(error)
            if abort and ids:
                self._submit(lambda: self.engine.abort_request(ids))

        self._loop.call_soon_threadsafe(fail_all)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted by its consumer meanwhile
                continue
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine thread died: {self._dead!r}")
        if self._thread is None:
            raise EngineDeadError("AsyncEngine.start() was not called")
