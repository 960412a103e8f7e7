"""`paphos chat`, `paphos complete` (interactive clients of a running server, streaming to the
terminal) and `paphos bench {latency,throughput,serve}` (the scripts of benchmarks/).

The clients use only the standard library (urllib, one SSE stream per turn), so they start at once
and need neither the openai package nor torch. Invariant: a chat keeps every turn, the assistant's
included, and sends the whole history with each new message.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:2242/v1"
BENCHMARKS = {
    "latency": "latency.py",
    "throughput": "throughput.py",
    "serve": "serve.py",
}


class ClientError(RuntimeError):
    """The server could not be reached or answered with an error."""


def add_commands(commands: Any) -> None:
    """Add the chat, complete and bench subcommands to the `paphos` parser's subparsers."""
    for name, handler, what in (
        ("chat", run_chat, "Chat with a running server (history kept, replies streamed)."),
        ("complete", run_complete, "Complete prompts with a running server (streamed)."),
    ):
        description = what + " One line per turn; Ctrl-D (end of input) ends."
        sub = commands.add_parser(name, help=what, description=description)
        sub.add_argument(
            "--url",
            default=DEFAULT_URL,
            help=f"The server's API base URL. (default: {DEFAULT_URL})",
        )
        sub.add_argument(
            "--model", default=None, help="Model name (default: the server's first model)."
        )
        sub.add_argument(
            "--api-key",
            default=os.environ.get("OPENAI_API_KEY"),
            help="API key (default: $OPENAI_API_KEY).",
        )
        sub.add_argument(
            "--max-tokens",
            type=int,
            default=None,
            help="Most tokens per reply (default: the server's).",
        )
        sub.add_argument(
            "--temperature",
            type=float,
            default=None,
            help="Sampling temperature (default: the server's).",
        )
        if name == "chat":
            sub.add_argument(
                "--system-prompt",
                default=None,
                help="A system message that opens the conversation.",
            )
        sub.set_defaults(handler=handler)
    bench = commands.add_parser(
        "bench",
        help="Run a benchmark of benchmarks/ (latency, throughput, serve).",
        description="Run benchmarks/{latency,throughput,serve}.py with the arguments that follow; "
        "`paphos bench latency --help` shows the script's own flags. Needs a source checkout.",
    )
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="Arguments for the script.")
    bench.set_defaults(handler=run_bench)


# ---- HTTP ------------------------------------------------------------------------------------


def _request(url: str, api_key: str | None, body: dict[str, Any] | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as e:
        raise ClientError(f"{url}: HTTP {e.code}: {_error_message(e.read())}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ClientError(
            f"cannot reach {url} ({getattr(e, 'reason', e)}): is `paphos run` serving there? "
            "(--url)"
        ) from e


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]


def first_model(url: str, api_key: str | None) -> str:
    with _request(url.rstrip("/") + "/models", api_key) as response:
        models = json.load(response).get("data") or []
    if not models:
        raise ClientError(f"{url}/models lists no model")
    return str(models[0]["id"])


def stream_events(url: str, api_key: str | None, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The JSON chunks of one server-sent-event stream, up to `data: [DONE]`."""
    with _request(url, api_key, {**body, "stream": True}) as response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ClientError(str(chunk["error"].get("message", chunk["error"])))
            yield chunk


# ---- chat and complete -----------------------------------------------------------------------


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    return {k: v for k, v in body.items() if v is not None}


def _lines(stdin: TextIO, prompt: str) -> Iterator[str]:
    """Input lines; on a terminal with a prompt and line editing (readline keeps the history)."""
    if stdin.isatty():
        try:
            import readline  # noqa: F401 - arrow keys and history for input()
        except ImportError:
            pass
        while True:
            try:
                yield input(prompt)
            except EOFError:
                print(file=sys.stdout)
                return
    else:
        for line in stdin:
            yield line.rstrip("\n")


def chat_session(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> list[dict[str, str]]:
    """Read messages, stream each reply to `out`; returns the whole conversation."""
    base = args.url.rstrip("/")
    model = args.model or first_model(base, args.api_key)
    messages: list[dict[str, str]] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    for line in _lines(stdin, "> "):
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        body = {"model": model, "messages": messages, **_sampling(args)}
        reply = []
        for chunk in stream_events(base + "/chat/completions", args.api_key, body):
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                reply.append(piece)
                out.write(piece)
                out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages


def complete_session(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> list[str]:
    """Read prompts, stream each completion to `out` after its prompt; returns the completions."""
    base = args.url.rstrip("/")
    model = args.model or first_model(base, args.api_key)
    completions = []
    for line in _lines(stdin, "prompt> "):
        if not line.strip():
            continue
        body = {"model": model, "prompt": line, **_sampling(args)}
        pieces = []
        for chunk in stream_events(base + "/completions", args.api_key, body):
            for choice in chunk.get("choices", []):
                pieces.append(choice.get("text") or "")
                out.write(pieces[-1])
                out.flush()
        out.write("\n")
        completions.append("".join(pieces))
    return completions


def _run_client(session: Any, args: argparse.Namespace) -> int:
    try:
        session(args, sys.stdin, sys.stdout)
    except ClientError as e:
        print(f"paphos {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    return _run_client(chat_session, args)


def run_complete(args: argparse.Namespace) -> int:
    return _run_client(complete_session, args)


# ---- bench -----------------------------------------------------------------------------------


def benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout this paphos runs from."""
    import paphos

    return Path(paphos.__file__).resolve().parent.parent / "benchmarks"


def run_bench(args: argparse.Namespace) -> int:
    script = benchmarks_dir() / BENCHMARKS[args.benchmark]
    if not script.is_file():
        print(
            f"paphos bench: error: {script} not found: the benchmarks ship with the source "
            "checkout (git clone), not with the installed package",
            file=sys.stderr,
        )
        return 2
    argv, path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))  # the scripts import their neighbours
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
    return 0
