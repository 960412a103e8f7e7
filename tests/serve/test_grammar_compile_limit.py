"""AsyncEngine compiles grammars in a worker thread under a time limit: a compile past the limit
is a ValueError naming it (the server's 400) and the engine thread never waits for a compile."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from fake_engine import FakeEngine

from paphos.engine.async_engine import AsyncEngine
from paphos.sampling_params import SamplingParams


class SlowCompileEngine(FakeEngine):
    compile_s = 0.5

    def compile_grammar(self, params: SamplingParams) -> None:
        self.compile_thread = threading.current_thread().name
        time.sleep(self.compile_s)
        params._grammar = "compiled"


def test_slow_compiles_are_refused_off_the_engine_thread(tiny_tokenizer: Any) -> None:
    engine = SlowCompileEngine(tiny_tokenizer)

    async def run() -> None:
        async_engine = AsyncEngine(engine, grammar_compile_timeout_s=0.1)
        async_engine.start()
        try:
            params = SamplingParams(max_tokens=2, structured_outputs={"regex": "a+"})
            with pytest.raises(ValueError, match="longer than 0.1 s"):
                await async_engine.add_request("slow", "Hello", params)
            engine.compile_s = 0.0
            fast = SamplingParams(max_tokens=2, structured_outputs={"regex": "b+"})
            stream = await async_engine.add_request("fast", "Hello", fast)
            outputs = [o async for o in async_engine.iterate(stream)]
            assert outputs[-1].finished and fast._grammar == "compiled"
        finally:
            async_engine.shutdown()

    asyncio.run(run())
    assert engine.compile_thread.startswith("paphos-grammar")
