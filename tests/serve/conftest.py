"""Serve-test fixtures: the tiny tokenizer, a fake engine, and a server over the fake engine on a
free loopback port, always stopped by the fixture's finalizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from server_utils import RunningServer, ServerProcess, serve_engine


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def fake_engine(tiny_tokenizer: Any) -> FakeEngine:
    return FakeEngine(tiny_tokenizer)


@pytest.fixture
def fake_server(fake_engine: FakeEngine) -> Iterator[RunningServer]:
    yield from serve_engine(fake_engine)


TINY_SERVER_ARGS = [
    *("--device", "cpu", "--dtype", "float32", "--kv-cache-space", "0.02"),
    *("--max-model-len", "256", "--max-num-seqs", "64"),
    *("--uvicorn-log-level", "warning", "--served-model-name", "tiny"),
    # overlapped steps, the CUDA default, so the server tests cover them (the SmolLM2 server
    # test runs the CPU default)
    "--async-scheduling",
]


@pytest.fixture(scope="session")
def tiny_server(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The real `paphos run` over the tiny random Llama, shared by the serve tests."""
    log = tmp_path_factory.mktemp("tiny_server") / "server.log"
    server = ServerProcess([str(tiny_llama_dir), *TINY_SERVER_ARGS], str(log))
    try:
        yield server
    finally:
        server.stop()
