"""tool_choice='auto' and --reasoning-parser end to end over HTTP with the official client, on a
scripted engine that "generates" a recorded output token by token: the streamed tool_calls deltas
(name first, then argument fragments), reasoning_content deltas and finish_reason 'tool_calls'
agree with the whole response."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fake_engine import FakeEngine
from server_utils import RunningServer, serve_engine

RECORDED = (
    "<think>\nThe user wants the weather.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


class ScriptedEngine(FakeEngine):
    """Every completion is `script`, one token per step, then EOS-like stop."""

    script = RECORDED

    def _advance(self, seq: Any, out: Any) -> None:
        ids = self.tokenizer.encode(self.script, add_special_tokens=False)
        out.token_ids.append(ids[len(out.token_ids)])
        out.text = self.tokenizer.decode(out.token_ids)
        if len(out.token_ids) == len(ids):
            out.finish_reason = "stop"


@pytest.fixture(scope="module")
def server(tiny_tokenizer: Any) -> Iterator[RunningServer]:
    yield from serve_engine(
        ScriptedEngine(tiny_tokenizer, max_model_len=512),
        tool_call_parser="hermes",
        enable_auto_tool_choice=True,
        reasoning_parser="deepseek_r1",
    )


def _client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="x", max_retries=0)


def test_auto_tool_call_whole_and_streamed(server: RunningServer) -> None:
    client = _client(server)
    kwargs: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": TOOLS,
        "max_tokens": 200,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.reasoning_content == "The user wants the weather."
    assert whole.message.content is None
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    reasoning, content, name, args, finish = "", "", None, "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.function.name:
                assert name is None and not args
                name = d.function.name
            args += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning.strip() == "The user wants the weather."
    assert content.strip() == ""
    assert name == "get_weather" and json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_without_tools_the_text_is_content(server: RunningServer) -> None:
    reply = _client(server).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=200
    )
    message = reply.choices[0].message
    assert message.tool_calls is None and "<tool_call>" in message.content
    assert reply.choices[0].finish_reason == "stop"


def test_auto_needs_the_server_flag(tiny_tokenizer: Any) -> None:
    for running in serve_engine(ScriptedEngine(tiny_tokenizer, max_model_len=512)):
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            _client(running).chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], tools=TOOLS
            )
