"""Reasoning output (`--reasoning-parser`): the model's <think>...</think> part goes to
`reasoning_content`, the rest to `content`. `split` works on any prefix of an output (a tail that
could still become a tag is held back), so a stream is the same split run on more text.

deepseek_r1: everything up to </think> is reasoning (its template opens <think> in the prompt, so
the output may start inside it). qwen3: reasoning only when the output opens with <think> (or
closes a </think> the template opened); otherwise it is all content (thinking switched off).
"""

from __future__ import annotations

from dataclasses import dataclass

from paphos.serve.openai.tools.parsers import hold_back

THINK_START, THINK_END = "<think>", "</think>"


def split(parser: str, text: str, final: bool) -> tuple[str, str]:
    """(reasoning, content) of the output so far."""
    reasoning, content = _parts(parser, text, hold=not final)
    return (reasoning.strip("\n") if final else reasoning), content


def _parts(parser: str, text: str, hold: bool) -> tuple[str, str]:
    body = text.lstrip()
    if hold and body and THINK_START.startswith(body) and body != THINK_START:
        return "", ""  # could still become <think>
    opened = body.startswith(THINK_START)
    if opened:
        body = body[len(THINK_START) :]
    end = body.find(THINK_END)
    if end >= 0:
        return body[:end], body[end + len(THINK_END) :].lstrip()
    if parser == "qwen3" and not opened:
        return "", hold_back(text, THINK_END) if hold else text
    return (hold_back(body, THINK_END) if hold else body), ""


@dataclass
class ReasoningStreamer:
    """Streams one choice's output as (reasoning delta, content delta) pairs."""

    parser: str
    text: str = ""
    num_reasoning_chars: int = 0
    num_content_chars: int = 0

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        self.text += delta
        reasoning, content = _parts(self.parser, self.text, hold=not final)
        new_reasoning = reasoning[self.num_reasoning_chars :]
        new_content = content[self.num_content_chars :]
        self.num_reasoning_chars = max(self.num_reasoning_chars, len(reasoning))
        self.num_content_chars = max(self.num_content_chars, len(content))
        return new_reasoning, new_content
