"""Each tool-call parser on recorded outputs of its model family: the whole output gives the
calls and the content around them; fed piece by piece (the way a stream arrives, down to one
character at a time) the deltas join to the same content, names come before their arguments, and
the joined argument fragments parse to the same arguments. Also the reasoning split."""

from __future__ import annotations

import json

import pytest

from paphos.serve.openai.reasoning import ReasoningStreamer
from paphos.serve.openai.reasoning import split as split_reasoning
from paphos.serve.openai.tools.calls import ToolCallStreamer, ToolPlan, parse_required, whole_calls
from paphos.serve.openai.tools.parsers import get_tool_parser

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
WEATHER = {"city": "Paris", "days": 3}
TIME = {"tz": "CET"}

# (parser, recorded output, expected content, expected calls)
RECORDED = [
    (
        "hermes",  # Hermes 2 Pro / Qwen2.5 / Qwen3
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 3}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}'
        "\n</tool_call>",
        "Let me check.\n",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("hermes", "No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    (
        "llama3_json",  # Llama 3.1/3.2/3.3 JSON tool calls
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
        '{"name": "get_time", "parameters": {"tz": "CET"}}',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("llama3_json", "The weather is {nice}.", "The weather is {nice}.", []),
    (
        "mistral",  # Mistral 7B v0.3 / Nemo (v3 tokenizer)
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}}]',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "mistral",  # Mistral Small 3.2 / Magistral (v11+ tokenizer)
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}',
        "Sure.",
        [("get_weather", WEATHER)],
    ),
    (
        "pythonic",  # Llama 3.2 / Llama 4 pythonic
        '[get_weather(city="Paris", days=3), get_time(tz="CET")]',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("pythonic", "[1, 2] are numbers.", "[1, 2] are numbers.", []),
    (
        "qwen3_coder",  # Qwen3-Coder XML calls
        "I will look it up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        "I will look it up.\n",
        [("get_weather", WEATHER)],
    ),
]


def _plan(parser: str) -> ToolPlan:
    return ToolPlan("auto", TOOLS, get_tool_parser(parser, TOOLS))


@pytest.mark.parametrize(("parser", "text", "content", "calls"), RECORDED)
def test_whole_output(parser: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = whole_calls(_plan(parser), text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == (
        calls
    )
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)


def _stream(plan: ToolPlan, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    streamer = ToolCallStreamer(plan)
    content, calls = "", []
    for i, piece in enumerate(pieces):
        delta, call_deltas = streamer.feed(piece, final=i == len(pieces) - 1)
        content += delta
        for d in call_deltas:
            if "id" in d:
                assert d["index"] == len(calls) and d["function"]["arguments"] == ""
                calls.append((d["function"]["name"], ""))
            else:
                name, args = calls[d["index"]]
                calls[d["index"]] = (name, args + d["function"]["arguments"])
    return content, calls


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
@pytest.mark.parametrize(("parser", "text", "content", "calls"), RECORDED)
def test_streamed_pieces_join_to_the_whole(
    parser: str, text: str, content: str | None, calls: list, size: int
) -> None:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    got_content, got_calls = _stream(_plan(parser), pieces)
    assert got_content.strip() == (content or "").strip()
    assert [(name, json.loads(args)) for name, args in got_calls] == calls


def test_partial_input_shows_no_markup() -> None:
    plan = _plan("hermes")
    streamer = ToolCallStreamer(plan)
    content, calls = streamer.feed("Checking <tool_", final=False)
    assert content == "Checking " and calls == []  # the tail may open a call: held back
    content, calls = streamer.feed('call>{"name": "get_weather", "argu', final=False)
    assert content == "" and calls[0]["function"]["name"] == "get_weather"


def test_required_output_is_a_list_of_calls() -> None:
    plan = ToolPlan("required", TOOLS, parse_required)
    text = '[{"name": "get_time", "parameters": {"tz": "CET"}}]'
    content, calls = whole_calls(plan, text)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == TIME
    assert _stream(plan, list(text))[1] == [("get_time", '{"tz": "CET"}')]


REASONING = [
    ("deepseek_r1", "<think>\nLet me add.\n</think>\n\nIt is 4.", "Let me add.", "It is 4."),
    ("deepseek_r1", "Let me add.\n</think>\n\nIt is 4.", "Let me add.", "It is 4."),  # opened
    ("deepseek_r1", "<think>still thinking", "still thinking", ""),
    ("qwen3", "<think>\nHmm.\n</think>\n\nIt is 4.", "Hmm.", "It is 4."),
    ("qwen3", "It is 4.", "", "It is 4."),  # thinking off
]


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), REASONING)
def test_reasoning_split_whole_and_streamed(
    parser: str, text: str, reasoning: str, content: str
) -> None:
    assert split_reasoning(parser, text, final=True) == (reasoning, content)
    streamer = ReasoningStreamer(parser)
    got_r = got_c = ""
    for i, ch in enumerate(text):
        r, c = streamer.feed(ch, final=i == len(text) - 1)
        got_r, got_c = got_r + r, got_c + c
    assert got_r.strip("\n") == reasoning and got_c == content


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    plan = ToolPlan("auto", TOOLS, get_tool_parser("hermes", TOOLS), max_calls=1)
    text = RECORDED[0][1]
    _, calls = whole_calls(plan, text)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert [name for name, _ in _stream(plan, list(text))[1]] == ["get_weather"]
