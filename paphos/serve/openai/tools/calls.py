"""The request side of tool calling: check `tools`/`tool_choice`, decide how calls are found
(`ToolPlan`), and turn output text into OpenAI `tool_calls`, whole or as streamed deltas.

auto: the model's text is parsed by the server's --tool-call-parser; required: the output is a JSON
array of {"name", "parameters"} calls, enforced by a JSON schema over the listed functions; named:
the output is that function's arguments, enforced by its parameters' schema. none: no tools reach
the template and nothing is parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from paphos.sampling_params import StructuredOutputsParams
from paphos.serve.openai.errors import OpenAIError
from paphos.serve.openai.tools.json_scan import skip_space
from paphos.serve.openai.tools.parsers import (
    ParsedCall,
    ParsedText,
    ToolParser,
    get_tool_parser,
    object_sequence,
)

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolPlan:
    mode: str  # "auto", "required" or a function name's "named"
    tools: list[dict[str, Any]]  # handed to the chat template
    parse: ToolParser
    constraint: StructuredOutputsParams | None = None
    max_calls: int | None = None  # 1 with parallel_tool_calls=false


def plan_tools(
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    parser_name: str | None,
    auto_enabled: bool,
) -> ToolPlan | None:
    """How this request calls tools (None: it does not). OpenAIError 400 on bad input."""
    checked = [_check_tool(i, tool) for i, tool in enumerate(tools or [])]
    choice = tool_choice if tool_choice is not None else ("auto" if checked else "none")
    if choice == "none":
        return None
    if not checked:
        raise OpenAIError(400, f"tool_choice={choice!r} needs tools", param="tool_choice")
    names = [t["function"]["name"] for t in checked]
    if choice == "auto":
        if not (auto_enabled and parser_name):
            raise OpenAIError(
                400,
                "tool_choice='auto' needs the server started with --enable-auto-tool-choice and "
                "--tool-call-parser",
                param="tool_choice",
            )
        max_calls = 1 if parallel_tool_calls is False else None
        return ToolPlan("auto", checked, get_tool_parser(parser_name, checked), None, max_calls)
    if choice == "required":
        schema = _required_schema(checked, parallel_tool_calls is not False)
        return ToolPlan("required", checked, parse_required, StructuredOutputsParams(json=schema))
    name = _named_choice(choice)
    if name not in names:
        raise OpenAIError(
            400, f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice"
        )
    params = checked[names.index(name)]["function"].get("parameters") or ANY_OBJECT
    return ToolPlan("named", checked, _parse_named(name), StructuredOutputsParams(json=params))


def _check_tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise OpenAIError(400, f"{where} is invalid: expected {{'type': 'function', ...}}", where)
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise OpenAIError(400, f"{where}.function.name is required", where)
    params = function.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise OpenAIError(400, f"{where}.function.parameters is invalid: expected a schema", where)
    return {"type": "function", "function": function}


def _named_choice(choice: Any) -> str:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if isinstance(name, str):
            return name
    raise OpenAIError(
        400,
        f"tool_choice={choice!r} is invalid: expected 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def _required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"enum": [t["function"]["name"]]},
                "parameters": t["function"].get("parameters") or ANY_OBJECT,
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required(text: str, final: bool) -> ParsedText:
    """The output of tool_choice='required': [{"name": ..., "parameters": {...}}, ...]."""
    pos = skip_space(text, 0)
    if pos >= len(text) or text[pos] != "[":
        return ParsedText("")
    return ParsedText("", object_sequence(text, pos + 1, ","))


def _parse_named(name: str) -> ToolParser:
    def parse(text: str, final: bool) -> ParsedText:
        return ParsedText("", [ParsedCall(name, text, complete=final)])

    return parse


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def whole_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) of a finished output."""
    parsed = plan.parse(text, True)
    calls = [
        {
            "id": tool_call_id(),
            "type": "function",
            "function": {"name": c.name, "arguments": _normalized(c.arguments)},
        }
        for c in parsed.calls[: plan.max_calls]
        if c.complete and c.name
    ]
    content = parsed.content if parsed.content.strip() or not calls else None
    return content, calls


def _normalized(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except (json.JSONDecodeError, ValueError):
        return arguments


@dataclass
class _SentCall:
    id: str
    num_argument_chars: int = 0


@dataclass
class ToolCallStreamer:
    """Streams one choice: feeds text deltas through the plan's parser and returns what is new,
    as a content delta and OpenAI tool_calls deltas (name first, then argument fragments)."""

    plan: ToolPlan
    text: str = ""
    num_content_chars: int = 0
    sent: list[_SentCall] = field(default_factory=list)

    @property
    def has_calls(self) -> bool:
        return bool(self.sent)

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        self.text += delta
        parsed = self.plan.parse(self.text, final)
        content = parsed.content[self.num_content_chars :]
        self.num_content_chars = max(self.num_content_chars, len(parsed.content))
        if final and self.sent and not content.strip():
            content = ""
        deltas = []
        for index, call in enumerate(parsed.calls[: self.plan.max_calls]):
            if call.name is None:
                break
            if index == len(self.sent):
                self.sent.append(_SentCall(tool_call_id()))
                deltas.append(
                    {
                        "index": index,
                        "id": self.sent[index].id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                )
            sent = self.sent[index]
            fragment = call.arguments[sent.num_argument_chars :]
            if fragment:
                sent.num_argument_chars = len(call.arguments)
                deltas.append({"index": index, "function": {"arguments": fragment}})
        return content, deltas
