"""`paphos chat`, `paphos complete` and `paphos bench` against the real server over the tiny Llama:
stdin piped in, replies streamed to stdout equal the server's own (non-streamed) answers, the chat
history is sent whole with every turn, and an unreachable server is a one-line error."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import openai
import pytest
from server_utils import ServerProcess, free_port

from paphos.serve import client_commands

MODEL = "tiny"


def _cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "paphos.serve.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="none", max_retries=0)


def test_chat_streams_replies_that_equal_the_servers_answers(tiny_server, client) -> None:
    url = tiny_server.base_url + "/v1"
    flags = ("--url", url, "--max-tokens", "6", "--temperature", "0", "--system-prompt", "Be brief")
    done = _cli("chat", *flags, stdin="Hello\nHow are you?\n")
    assert done.returncode == 0, done.stderr
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
    )
    replies = done.stdout.split("\n")
    assert replies[0] == first.choices[0].message.content
    assert len(replies) == 3 and replies[2] == ""  # two replies, each ending its line


def test_chat_keeps_the_history_and_sends_it_with_each_turn(tiny_server, monkeypatch) -> None:
    sent: list[list[dict]] = []
    original = client_commands.stream_events

    def recording(url, api_key, body):
        sent.append([dict(m) for m in body["messages"]])
        return original(url, api_key, body)

    monkeypatch.setattr(client_commands, "stream_events", recording)
    args = argparse.Namespace(
        url=tiny_server.base_url + "/v1",
        model=None,  # the server's first model
        api_key=None,
        max_tokens=4,
        temperature=0.0,
        system_prompt="sys",
    )
    out = io.StringIO()
    messages = client_commands.chat_session(args, io.StringIO("one\n\ntwo\n"), out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sent == [messages[:2], messages[:4]]  # the blank line sent nothing
    assert out.getvalue() == messages[2]["content"] + "\n" + messages[4]["content"] + "\n"


def test_complete_streams_each_prompts_completion(tiny_server, client) -> None:
    url = tiny_server.base_url + "/v1"
    done = _cli("complete", "--url", url, "--model", MODEL, "--max-tokens", "5",
                "--temperature", "0", stdin="The quick brown fox\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    want = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0
    )
    assert done.stdout == want.choices[0].text + "\n"


def test_unreachable_server_is_a_one_line_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    done = _cli("chat", "--url", url, stdin="hi\n")
    assert done.returncode == 1
    assert done.stderr.startswith("paphos chat: error: cannot reach ")
    assert "is `paphos run` serving there? (--url)" in done.stderr


def test_bench_runs_the_serve_benchmark_against_the_server(tiny_server) -> None:
    url = tiny_server.base_url + "/v1"
    done = _cli("bench", "serve", "--base-url", url, "--num-requests", "3", "--concurrency", "2",
                "--prompt-words", "4", "--output-tokens", "4")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stdout or "tokens/s" in done.stdout, done.stdout
    helped = _cli("bench", "latency", "--help")
    assert helped.returncode == 0 and "--batch-sizes" in helped.stdout
