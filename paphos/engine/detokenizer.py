"""Incremental detokenization and stop strings, per sequence.

Text grows by decoding only a short window of recent tokens (prefix_offset..): the window's text
minus the text of its already-emitted part is the new text. A trailing U+FFFD (a multi-byte
character cut in half) is held back until the next token completes it. While a sequence runs, the
last (longest stop string - 1) characters are held back too, so that streamed text never shows the
beginning of a stop string that is later cut off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    text: str = ""
    _token_ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def __post_init__(self) -> None:
        # Start the window a few tokens into the prompt so the first output token decodes in context
        # (sentencepiece-style tokenizers drop a leading space when a token is decoded alone).
        context = self.prompt_token_ids[-6:]
        self._token_ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens appended so far (`append` takes none past a stop string's)."""
        return len(self._token_ids) - self._num_context

    def append(self, token_ids: list[int]) -> str | None:
        """Add new output tokens up to the one that completes a stop string, if any; returns
        that stop string."""
        stop_found = None
        for token_id in token_ids:
            previous_len = len(self.text)
            self._token_ids.append(token_id)
            self.text += self._decode_new()
            stop_found = self._find_stop(previous_len)
            if stop_found is not None:
                break
        return stop_found

    def visible_text(self, finished: bool) -> str:
        if finished or self._max_stop_len <= 1:
            return self.text
        return self.text[: max(0, len(self.text) - (self._max_stop_len - 1))]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def _decode_new(self) -> str:
        prefix = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._token_ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full[len(prefix) :]

    def _find_stop(self, previous_len: int) -> str | None:
        if not self.stop:
            return None
        search_from = max(0, previous_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[: index + len(stop) if self.include_stop_str_in_output else index]
        return stop
