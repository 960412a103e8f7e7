"""The KoboldAI API: every route with the official field names, version strings, the SSE stream
joining to the whole text at temperature 0 (real engine: the tiny Llama server), check/abort by
genkey, a disconnecting client aborting its generation, and Kobold-shaped errors (never a 500)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from fake_engine import FakeEngine
from server_utils import RunningServer, ServerProcess, serve_engine

# What SillyTavern sends for a Kobold generation (values as its defaults), plus paphos extras.
SILLYTAVERN_BODY: dict[str, Any] = {
    "prompt": "Once upon a time",
    "max_context_length": 200,
    "max_length": 12,
    "rep_pen": 1.1,
    "rep_pen_range": 64,
    "rep_pen_slope": 0.7,
    "temperature": 0.0,
    "tfs": 1.0,
    "top_a": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical": 1.0,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "sampler_seed": 7,
    "stop_sequence": ["\n\n\n"],
    "use_default_badwordsids": False,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "smoothing_factor": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]',
    "xtc_threshold": 0.1,
    "xtc_probability": 0.0,
    "banned_tokens": [],
    "quiet": True,  # UI settings: accepted, ignored
    "use_world_info": False,
    "singleline": False,
}


@pytest.fixture(scope="module")
def slow_server(tiny_tokenizer: Any) -> Iterator[RunningServer]:
    """A fake engine that takes 20 ms a token: long enough to abort and disconnect mid-way."""
    yield from serve_engine(FakeEngine(tiny_tokenizer, max_model_len=4096, step_delay=0.02))


def _sse_tokens(response: httpx2.Response) -> list[str]:
    tokens = []
    for block in response.text.split("\n\n"):
        if block.strip():
            event, data = block.split("\n", 1)
            assert event == "event: message" and data.startswith("data: ")
            tokens.append(json.loads(data[6:])["token"])
    return tokens


def test_generate_and_stream_agree_on_the_real_engine(tiny_server: ServerProcess) -> None:
    url = tiny_server.base_url
    whole = httpx2.post(url + "/api/v1/generate", json=SILLYTAVERN_BODY, timeout=60)
    assert whole.status_code == 200, whole.text
    text = whole.json()["results"][0]["text"]
    assert text
    streamed = httpx2.post(url + "/api/extra/generate/stream", json=SILLYTAVERN_BODY, timeout=60)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert "".join(_sse_tokens(streamed)) == text


def test_info_routes(tiny_server: ServerProcess) -> None:
    url = tiny_server.base_url
    get = lambda path: httpx2.get(url + path, timeout=10).json()  # noqa: E731
    assert get("/api/v1/info/version") == {"result": "1.2.4"}
    assert get("/api/extra/version") == {"result": "KoboldCpp", "version": "1.63"}
    assert get("/api/v1/model") == {"result": "paphos/tiny"}
    assert get("/api/v1/config/max_context_length") == {"value": 256}
    assert get("/api/extra/true_max_context_length") == {"value": 256}
    assert get("/api/v1/config/max_length")["value"] > 0
    count = httpx2.post(url + "/api/extra/tokencount", json={"prompt": "Hello world"}).json()
    assert count["value"] == len(count["ids"]) > 0


def test_grammar_field_is_enforced(tiny_server: ServerProcess) -> None:
    pytest.importorskip("xgrammar")
    body = {**SILLYTAVERN_BODY, "temperature": 1.0, "grammar": 'root ::= "yes" | "no"'}
    reply = httpx2.post(tiny_server.base_url + "/api/v1/generate", json=body, timeout=60)
    assert reply.json()["results"][0]["text"] in ("yes", "no")


def test_bad_input_gets_kobold_errors(tiny_server: ServerProcess) -> None:
    url = tiny_server.base_url + "/api/v1/generate"
    cases = [
        ({"max_length": 3}, 422, "prompt"),  # no prompt
        ({"prompt": "x", "temperature": "hot"}, 422, "temperature"),
        ({"prompt": "x", "top_p": 7}, 400, "top_p"),
        ({"prompt": "x", "max_length": 100000}, 400, "max_tokens"),
        ({"prompt": "x", "sampler_order": [99]}, 400, "sampler_priority"),
        ({"prompt": "x", "grammar": "root ::= nope"}, 400, "nope"),
    ]
    for body, status, words in cases:
        reply = httpx2.post(url, json=body, timeout=30)
        assert reply.status_code == status, (body, reply.text)
        detail = reply.json()["detail"]
        assert words in detail["msg"] and detail["type"] in ("bad_input", "validation_error")
    reply = httpx2.post(url, content=b"{not json", timeout=30)
    assert reply.status_code == 400 and "JSON" in reply.json()["detail"]["msg"]


def test_check_and_abort_by_genkey(slow_server: RunningServer) -> None:
    url = slow_server.base_url
    body = {"prompt": "Tell a story", "max_length": 2000, "genkey": "KCPP1234"}
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(
            httpx2.post(url + "/api/v1/generate", json=body, timeout=60).json()
        )
    )
    worker.start()
    partial = ""
    deadline = time.monotonic() + 20
    while not partial and time.monotonic() < deadline:
        time.sleep(0.05)
        check = httpx2.post(url + "/api/extra/generate/check", json={"genkey": "KCPP1234"})
        partial = check.json()["results"][0]["text"]
    assert partial
    assert httpx2.post(url + "/api/extra/abort", json={"genkey": "KCPP1234"}).json()["success"]
    worker.join(timeout=20)
    text = result["results"][0]["text"]
    assert text.startswith(partial) and len(text) < 2000  # stopped early, with what it had
    _wait_for_no_requests(slow_server)
    assert httpx2.post(url + "/api/extra/abort", json={"genkey": "gone"}).json()["success"] is False


def _wait_for_no_requests(server: RunningServer) -> None:
    deadline = time.monotonic() + 10
    while server.engine.seqs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.engine.seqs, "the engine still runs the aborted request"


def test_client_disconnect_aborts(slow_server: RunningServer) -> None:
    url = slow_server.base_url
    body = {"prompt": "Tell a story", "max_length": 2000}
    with httpx2.stream("POST", url + "/api/extra/generate/stream", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one token, then hang up
    _wait_for_no_requests(slow_server)
    with pytest.raises(httpx2.ReadTimeout):  # the whole-text route: give up after a moment
        httpx2.post(url + "/api/v1/generate", json=body, timeout=0.3)
    _wait_for_no_requests(slow_server)


def test_no_kobold_api_flag(tiny_tokenizer: Any) -> None:
    for running in serve_engine(FakeEngine(tiny_tokenizer), kobold_api=False):
        assert httpx2.get(running.base_url + "/api/v1/info/version").status_code == 404
