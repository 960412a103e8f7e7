"""Helpers to run a real server on a free loopback port: in a thread of this process (uvicorn over
any engine object) or as a `python -m paphos.serve.cli run` subprocess; both always stop cleanly."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    engine: Any  # the synchronous engine behind the server
    async_engine: Any

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"


class ServerThread:
    """uvicorn serving `app` in a daemon thread; `stop()` ends it (and the app's engine thread)."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_engine(engine: Any, **server_kwargs: Any) -> Iterator[RunningServer]:
    from paphos.engine.async_engine import AsyncEngine
    from paphos.serve.app import ServerConfig, build_app

    port = free_port()
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, ServerConfig(port=port, **server_kwargs))
    thread = ServerThread(app, port)
    thread.start()
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", engine, async_engine)
    finally:
        thread.stop()


class ServerProcess:
    """`python -m paphos.serve.cli run ARGS` on a free port; `stop()` ends it (kill if stuck)."""

    def __init__(self, args: list[str], log_path: str, startup_timeout: float = 180.0) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "paphos.serve.cli", "run", *args, "--port", str(self.port)]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited at start-up:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
