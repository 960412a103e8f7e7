"""Tool-call parsers (`--tool-call-parser`): each finds the calls a model family writes in its text.

A parser maps the text so far to `ParsedText` (the content to show, the calls found) and works on
any prefix of an output, so streaming is the same parse run again on more text: content is held
back while it could still turn out to be the start of a call, and a call's arguments are raw text
of the model's output (each parse extends the last) until the call is complete.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paphos.serve.openai.tools.json_scan import loads_or_none, member, skip_space, value_end


@dataclass
class ParsedCall:
    name: str | None  # None until the name is complete
    arguments: str  # JSON text of the arguments so far (whole when `complete`)
    complete: bool = False


@dataclass
class ParsedText:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


ToolParser = Callable[[str, bool], ParsedText]  # (text so far, is it the whole output)


def hold_back(text: str, *markers: str) -> str:
    """`text` without a tail that could be the start of one of `markers` (more text may finish
    it)."""
    cut = len(text)
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                cut = min(cut, len(text) - size)
                break
    return text[:cut]


def _object_call(text: str, start: int, arg_keys: tuple[str, ...]) -> ParsedCall | None:
    """A call written as a JSON object {"name": ..., "arguments"|"parameters": {...}} at `start`."""
    start = skip_space(text, start)
    if start >= len(text) or text[start] != "{":
        return None
    name = None
    found = member(text, start, "name")
    if found is not None and found[1] is not None:
        value = loads_or_none(text[found[0] : found[1]])
        name = value if isinstance(value, str) else None
    end = value_end(text, start)
    for key in arg_keys:
        found = member(text, start, key)
        if found is not None:
            args_start, args_end = found
            raw = text[args_start:args_end] if args_end is not None else text[args_start:]
            return ParsedCall(name, raw, complete=args_end is not None and name is not None)
    return ParsedCall(name, "{}" if end is not None else "", complete=end is not None)


_ARG_KEYS = ("arguments", "parameters")


def parse_hermes(text: str, final: bool) -> ParsedText:
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one tag per call (Hermes, Qwen2.5,
    Qwen3)."""
    start_tag, end_tag = "<tool_call>", "</tool_call>"
    first = text.find(start_tag)
    if first < 0:
        return ParsedText(text if final else hold_back(text, start_tag))
    calls = []
    pos = first
    while pos >= 0:
        body = pos + len(start_tag)
        call = _object_call(text, body, _ARG_KEYS)
        if call is not None:
            calls.append(call)
        end = text.find(end_tag, body)
        if end < 0:
            break
        pos = text.find(start_tag, end)
    return ParsedText(text[:first], calls)


def object_sequence(text: str, pos: int, separators: str) -> list[ParsedCall]:
    """Consecutive call objects from `pos`, separated by any of `separators` (and spaces)."""
    calls = []
    while True:
        pos = skip_space(text, pos)
        call = _object_call(text, pos, _ARG_KEYS)
        if call is None:
            return calls
        calls.append(call)
        end = value_end(text, pos)
        if end is None:
            return calls
        pos = skip_space(text, end)
        if pos < len(text) and text[pos] in separators:
            pos += 1


def parse_llama3_json(text: str, final: bool) -> ParsedText:
    """Llama 3.1-3.3: the whole output is {"name": ..., "parameters": {...}} (calls separated by
    ';'), optionally after <|python_tag|>."""
    tag = "<|python_tag|>"
    body = skip_space(text, 0)
    if text.startswith(tag, body):
        body = skip_space(text, body + len(tag))
    elif not final and tag.startswith(text[body:]):
        return ParsedText("")  # could still become the tag
    if body >= len(text):
        return ParsedText("" if not final else text)
    if text[body] != "{":
        return ParsedText(text)
    calls = object_sequence(text, body, ";")
    if final and not any(c.complete for c in calls):
        return ParsedText(text)  # it was text that began with a brace
    return ParsedText("", calls)


def parse_mistral(text: str, final: bool) -> ParsedText:
    """[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (v3 tokenizers) or
    [TOOL_CALLS]name[ARGS]{...} (v11+), possibly repeated."""
    marker = "[TOOL_CALLS]"
    first = text.find(marker)
    if first < 0:
        return ParsedText(text if final else hold_back(text, marker))
    calls: list[ParsedCall] = []
    pos = skip_space(text, first + len(marker))
    if pos < len(text) and text[pos] == "[":
        calls = object_sequence(text, pos + 1, ",")
        return ParsedText(text[:first], calls)
    while pos < len(text):
        args_tag = text.find("[ARGS]", pos)
        if args_tag < 0:
            break
        name = text[pos:args_tag].strip()
        args_start = skip_space(text, args_tag + len("[ARGS]"))
        args_end = value_end(text, args_start)
        raw = text[args_start:args_end] if args_end is not None else text[args_start:]
        calls.append(ParsedCall(name, raw, complete=args_end is not None))
        if args_end is None:
            break
        pos = skip_space(text, args_end)
        if text.startswith(marker, pos):
            pos = skip_space(text, pos + len(marker))
    return ParsedText(text[:first], calls)


def parse_pythonic(text: str, final: bool) -> ParsedText:
    """[get_weather(city="Paris"), other(n=1)]: a Python list of calls with literal keyword
    arguments (Llama 3.2/4 pythonic templates). Calls appear once the list is complete."""
    body = text.strip()
    for tag in ("<|python_start|>", "<|python_end|>"):
        body = body.replace(tag, "")
    body = body.strip()
    if not body.startswith("["):
        if not final and "<|python_start|>".startswith(text.strip()):
            return ParsedText("")
        return ParsedText(text)
    calls = _python_calls(body)
    if calls is None:
        return ParsedText(text if final else "")
    return ParsedText("", calls)


def _python_calls(body: str) -> list[ParsedCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not all(isinstance(e, ast.Call) for e in tree.elts):
        return None
    calls = []
    for call in tree.elts:
        assert isinstance(call, ast.Call)
        if not isinstance(call.func, (ast.Name, ast.Attribute)) or call.args:
            return None
        name = call.func.id if isinstance(call.func, ast.Name) else ast.unparse(call.func)
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        except ValueError:
            return None
        calls.append(ParsedCall(name, json.dumps(args, ensure_ascii=False), complete=True))
    return calls


_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def make_qwen3_coder(tools: list[dict[str, Any]]) -> ToolParser:
    """Qwen3-Coder's XML calls: <tool_call><function=name><parameter=p>value</parameter>...
    </function></tool_call>; values are converted by the tool's parameter types."""
    types = {
        t["function"]["name"]: {
            k: (v or {}).get("type")
            for k, v in ((t["function"].get("parameters") or {}).get("properties") or {}).items()
        }
        for t in tools
        if isinstance(t.get("function"), dict) and "name" in t["function"]
    }

    def parse(text: str, final: bool) -> ParsedText:
        starts = [i for i in (text.find("<tool_call>"), text.find("<function=")) if i >= 0]
        if not starts:
            return ParsedText(text if final else hold_back(text, "<tool_call>", "<function="))
        first = min(starts)
        calls = []
        for match in _FUNCTION.finditer(text, first):
            name = match.group(1).strip()
            end = text.find("</function>", match.end())
            block = text[match.end() : end if end >= 0 else len(text)]
            if end < 0:
                calls.append(ParsedCall(name, ""))
                continue
            args = {
                key.strip(): _typed(value, types.get(name, {}).get(key.strip()))
                for key, value in _PARAMETER.findall(block)
            }
            calls.append(ParsedCall(name, json.dumps(args, ensure_ascii=False), complete=True))
        return ParsedText(text[:first], calls)

    return parse


def _typed(value: str, kind: str | None) -> Any:
    value = value.strip("\n")
    if kind in (None, "string"):
        return value
    parsed = loads_or_none(value)
    return value if parsed is None else parsed


_FIXED: dict[str, ToolParser] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
    "pythonic": parse_pythonic,
}
TOOL_PARSERS = (*_FIXED, "qwen3_coder")


def get_tool_parser(name: str, tools: list[dict[str, Any]]) -> ToolParser:
    if name == "qwen3_coder":
        return make_qwen3_coder(tools)
    if name not in _FIXED:
        raise ValueError(f"tool_call_parser={name!r} is invalid: expected one of {TOOL_PARSERS}")
    return _FIXED[name]
