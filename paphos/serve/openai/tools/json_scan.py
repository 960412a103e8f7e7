"""Finding JSON values in text that may stop anywhere (a stream): where a value ends, if it does.
Parsers use it to cut raw argument text out of model output without waiting for the whole output."""

from __future__ import annotations

import json
from typing import Any

_OPEN = {"{": "}", "[": "]"}


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def value_end(text: str, start: int) -> int | None:
    """The end (exclusive) of the JSON value starting at `start`, or None if it is not complete
    in `text`. Objects, arrays and strings are matched (escapes honoured); scalars end at the
    next delimiter, and only count as complete when one follows."""
    if start >= len(text):
        return None
    first = text[start]
    if first == '"':
        return _string_end(text, start)
    if first not in _OPEN:
        pos = start
        while pos < len(text) and text[pos] not in ",}] \t\r\n;":
            pos += 1
        return pos if pos < len(text) else None
    stack = [_OPEN[first]]
    pos = start + 1
    while pos < len(text):
        ch = text[pos]
        if ch == '"':
            end = _string_end(text, pos)
            if end is None:
                return None
            pos = end
            continue
        if ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return pos + 1
        pos += 1
    return None


def _string_end(text: str, start: int) -> int | None:
    pos = start + 1
    while pos < len(text):
        ch = text[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == '"':
            return pos + 1
        pos += 1
    return None


def loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def member(text: str, start: int, key: str) -> tuple[int, int | None] | None:
    """In the object whose '{' is at `start`, where the value of `key` starts and ends (end None:
    not complete yet); None when the key has not appeared (yet). Walks the object's members in
    order, so it works on a prefix of the object."""
    pos = skip_space(text, start + 1)
    while pos < len(text):
        if text[pos] != '"':
            return None
        key_end = _string_end(text, pos)
        if key_end is None:
            return None
        name = loads_or_none(text[pos:key_end])
        pos = skip_space(text, key_end)
        if pos >= len(text) or text[pos] != ":":
            return None
        pos = skip_space(text, pos + 1)
        if pos >= len(text):
            return None
        end = value_end(text, pos)
        if name == key:
            return pos, end
        if end is None:
            return None
        pos = skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(text, pos + 1)
        else:
            return None
    return None
