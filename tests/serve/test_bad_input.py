"""Bad input never crashes or hangs the real server: each case gets its 4xx with an OpenAI-style
error body naming the problem, and the server answers a good request right after."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from server_utils import ServerProcess

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = "fox " * 400  # far more than max_model_len=256 tokens

CASES: list[tuple[str, str, Any, int, str | None, str]] = [
    # (id, path, json body, status, param, text the message must contain)
    (
        "max_tokens_zero",
        COMPLETIONS,
        {"prompt": "x", "max_tokens": 0},
        400,
        "max_tokens",
        "max_tokens",
    ),
    ("max_tokens_negative", CHAT, {"messages": USER, "max_tokens": -3}, 400, "max_tokens", "-3"),
    (
        "max_tokens_too_large",
        COMPLETIONS,
        {"prompt": "x", "max_tokens": 10**6},
        400,
        "max_tokens",
        "max_model_len",
    ),
    (
        "max_completion_tokens_zero",
        CHAT,
        {"messages": USER, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
        "max_completion_tokens",
    ),
    ("prompt_too_long", COMPLETIONS, {"prompt": LONG_PROMPT}, 400, "prompt", "max_model_len"),
    (
        "messages_too_long",
        CHAT,
        {"messages": [{"role": "user", "content": LONG_PROMPT}]},
        400,
        "messages",
        "max_model_len",
    ),
    (
        "temperature_negative",
        COMPLETIONS,
        {"prompt": "x", "temperature": -0.5},
        400,
        "temperature",
        "temperature",
    ),
    (
        "temperature_wrong_type",
        CHAT,
        {"messages": USER, "temperature": "hot"},
        400,
        "temperature",
        "temperature",
    ),
    ("top_p_zero", COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("top_p_above_one", CHAT, {"messages": USER, "top_p": 1.5}, 400, "top_p", "top_p"),
    ("n_zero", COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n", "n=0"),
    ("n_wrong_type", CHAT, {"messages": USER, "n": "two"}, 400, "n", "n"),
    ("empty_messages", CHAT, {"messages": []}, 400, "messages", "messages"),
    ("missing_messages", CHAT, {"model": "tiny"}, 400, "messages", "messages"),
    ("missing_prompt", COMPLETIONS, {"max_tokens": 3}, 400, "prompt", "prompt"),
    ("empty_prompt_list", COMPLETIONS, {"prompt": []}, 400, "prompt", "prompt"),
    ("empty_prompt_text", COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty"),
    ("token_id_out_of_vocab", COMPLETIONS, {"prompt": [1, 10**7]}, 400, "prompt", "token"),
    (
        "unknown_role",
        CHAT,
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
        "wizard",
    ),
    (
        "unknown_field",
        COMPLETIONS,
        {"prompt": "x", "frobnicate": 1},
        400,
        "frobnicate",
        "frobnicate",
    ),
    (
        "unknown_stream_option",
        CHAT,
        {"messages": USER, "stream_options": {"bogus": True}},
        400,
        "stream_options.bogus",
        "bogus",
    ),
    ("unknown_model", COMPLETIONS, {"prompt": "x", "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("unknown_model_chat", CHAT, {"messages": USER, "model": "gpt-9"}, 404, "model", "gpt-9"),
    (
        "logprobs_too_many",
        COMPLETIONS,
        {"prompt": "x", "logprobs": 1000},
        400,
        "logprobs",
        "logprobs",
    ),
    ("body_not_an_object", COMPLETIONS, [1, 2, 3], 400, None, "invalid"),
    ("stop_wrong_type", COMPLETIONS, {"prompt": "x", "stop": 5}, 400, "stop", "stop"),
    ("tokenize_both", "/v1/tokenize", {"prompt": "x", "messages": USER}, 400, "prompt", "one of"),
    ("detokenize_bad_id", "/v1/detokenize", {"tokens": [-1]}, 400, "tokens", "-1"),
]


def assert_openai_error(
    response: httpx2.Response, status: int, param: str | None, text: str
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text.lower() in error["message"].lower(), error
    assert error["param"] == param, error


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "text"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(
    tiny_server: ServerProcess, path: str, body: Any, status: int, param: str | None, text: str
) -> None:
    response = httpx2.post(tiny_server.base_url + path, json=body, timeout=30)
    assert_openai_error(response, status, param, text)
    good = httpx2.post(
        tiny_server.base_url + COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2}, timeout=30
    )
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b'{"prompt": "x",}', b"\xff\xfe"],
    ids=["broken", "empty", "trailing_comma", "bytes"],
)
def test_malformed_json_gets_400(tiny_server: ServerProcess, raw: bytes) -> None:
    response = httpx2.post(
        tiny_server.base_url + COMPLETIONS,
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_wrong_method_get_openai_errors(tiny_server: ServerProcess) -> None:
    missing = httpx2.get(tiny_server.base_url + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx2.get(tiny_server.base_url + COMPLETIONS)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_streaming_request_with_bad_input_fails_before_the_stream(
    tiny_server: ServerProcess,
) -> None:
    body = {"prompt": "x", "stream": True, "temperature": -1}
    response = httpx2.post(tiny_server.base_url + COMPLETIONS, json=body)
    assert_openai_error(response, 400, "temperature", "temperature")
