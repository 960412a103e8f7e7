"""Structured output and tool calling through the real server with the default SmolLM2, at
temperature 1 over several seeds (under overlapped steps): json_schema outputs always parse and
validate, streamed too; regex and choice outputs always match; constrained and free requests share
batches; required and named tool choices always give a parseable call with the required
arguments, streamed and not; a tool-result history renders; bad constraints are 400s naming the
problem and the server keeps serving. One server for the module (start-ups cost seconds)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from server_utils import ServerProcess

from paphos.config import default_model_path

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "pets": {
            "type": "array",
            "items": {"type": "string", "maxLength": 8},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "zip": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "colour", "pets", "address"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
SEEDS = range(4)
ASK = [{"role": "user", "content": "Describe a person called Ann as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        default_model_path()
    except ValueError as e:
        pytest.skip(f"the default model is not installed: {e}")
    log: Path = tmp_path_factory.mktemp("structured") / "server.log"
    args = [
        *("--kv-cache-space", "0.1", "--max-model-len", "1024", "--async-scheduling"),
        *("--tool-call-parser", "hermes", "--enable-auto-tool-choice"),
        *("--uvicorn-log-level", "warning"),
    ]
    process = ServerProcess(args, str(log), startup_timeout=240)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)


def _parallel(fn, items):  # noqa: ANN001, ANN202
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, items))


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}


def test_json_schema_outputs_validate_beside_free_requests(client: openai.OpenAI) -> None:
    def constrained(seed: int) -> str:
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=ASK,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            response_format=_schema_format(SCHEMA),
        )
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content

    def free(seed: int) -> str:
        reply = client.completions.create(
            model="SmolLM2-135M-Instruct", prompt="Once upon", max_tokens=24, seed=seed
        )
        return reply.choices[0].text

    jobs = [("c", s) for s in SEEDS] + [("f", s) for s in SEEDS]
    outs = _parallel(lambda job: (constrained if job[0] == "c" else free)(job[1]), jobs)
    for text in outs[: len(SEEDS)]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert all(isinstance(t, str) for t in outs[len(SEEDS) :])


def test_json_schema_streamed(client: openai.OpenAI) -> None:
    for seed in SEEDS[:2]:
        chunks = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=ASK,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            response_format=_schema_format(SCHEMA),
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_choice_json_object_and_legacy_fields(client: openai.OpenAI) -> None:
    regex = r"(ab|cd)[0-9]{2,4}-[A-Z]{2}"
    choices = ["Paris", "London", "New York"]
    extras = {
        "regex": {"structured_outputs": {"regex": regex}},
        "choice": {"guided_choice": choices},
        "legacy_json": {"guided_json": SCHEMA},
    }

    def complete(job: tuple[str, int]) -> tuple[str, str]:
        kind, seed = job
        reply = client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt="The capital of France is",
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            extra_body=extras[kind],
        )
        return kind, reply.choices[0].text

    for kind, text in _parallel(complete, [(k, s) for k in extras for s in SEEDS]):
        if kind == "regex":
            assert re.fullmatch(regex, text), text
        elif kind == "choice":
            assert text in choices
        else:
            jsonschema.validate(json.loads(text), SCHEMA)
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=ASK,
        temperature=1.0,
        seed=0,
        max_tokens=300,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def _call_args(call) -> dict:  # noqa: ANN001
    return json.loads(call.function.arguments)


def test_required_and_named_tool_choices(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    def ask(job: tuple[object, int]) -> list:
        choice, seed = job
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice=choice,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        return reply.choices[0].message.tool_calls

    named = {"type": "function", "function": {"name": "get_weather"}}
    jobs = [("required", s) for s in SEEDS] + [(named, s) for s in SEEDS]
    for (choice, _), calls in zip(jobs, _parallel(ask, jobs)):
        assert calls
        for call in calls:
            assert call.function.name in ("get_weather", "get_time")
            args = _call_args(call)
            params = (WEATHER_TOOL if call.function.name == "get_weather" else TIME_TOOL)[
                "function"
            ]["parameters"]
            jsonschema.validate(args, params)
        if choice == named:
            assert [c.function.name for c in calls] == ["get_weather"]


def test_required_tool_choice_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Weather in Rome?"}],
            tools=[WEATHER_TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=3,
            max_tokens=200,
            stream=True,
        )
    )
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(d.index, {"name": None, "args": ""})
            if d.function.name:
                assert entry["name"] is None and entry["args"] == ""  # the name comes first
                entry["name"] = d.function.name
            entry["args"] += d.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["args"]), WEATHER_TOOL["function"]["parameters"])


def test_history_with_tool_results_renders(client: openai.OpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_tokens=8,
    )
    assert reply.choices[0].message.content is not None
    assert reply.usage.prompt_tokens > 20


BAD = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
        "Unsupported type",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "array", "uniqueItems": True}},
            }
        },
        "uniqueItems",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a(b"}}, "parenthesis"),
    ({"structured_outputs": {"grammar": "root ::= nope"}}, "nope"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
    ({"structured_outputs": {"jsonschema": {}}}, "unknown field"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "conflicting"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "xgrammar"),
    (
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "not among the tools",
    ),
    ({"tool_choice": "required"}, "needs tools"),
]


@pytest.mark.parametrize(("body", "words"), BAD)
def test_bad_constraints_are_400s(client: openai.OpenAI, body: dict, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=4, extra_body=body
        )
    assert words in e.value.response.json()["error"]["message"]


def test_server_keeps_serving_after_bad_input(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=ASK,
        max_tokens=4,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert reply.choices[0].message.content in ("yes", "no")
