"""Delta outputs for streams: the part of each completion its consumer has not seen yet.

While a request can still hit a stop string, the last `len(longest stop) - 1` characters are held
back, so streamed text never shows what the final output trims away. `next_piece` is the one rule,
used by the engine on its own sequences (OutputKind.DELTA) and by `DeltaTracker` on cumulative
outputs (any engine with the `Engine` API); `merge_delta` coalesces unread deltas of one stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from paphos.outputs import LogprobsDict, RequestOutput
from paphos.sampling_params import SamplingParams


def holdback_chars(params: SamplingParams) -> int:
    """Characters held back while a completion runs: a stop string's possible prefix."""
    if params.include_stop_str_in_output:
        return 0
    return max(max((len(s) for s in params.stop), default=0) - 1, 0)


@dataclass
class SentState:
    """How much of one completion a stream has handed out."""

    num_chars: int = 0
    num_tokens: int = 0
    done: bool = False


def next_piece(
    text: str,
    token_ids: list[int],
    logprobs: list[LogprobsDict] | None,
    done: bool,
    sent: SentState,
    holdback: int,
) -> tuple[str, list[int], list[LogprobsDict] | None] | None:
    """The unsent (text, token ids, logprobs) of a completion whose visible text, tokens and
    logprobs so far are given (read, not copied: only the new tails are); None when nothing is
    new. Updates `sent`."""
    if sent.done:
        return None
    visible = len(text) if done else len(text) - holdback
    if visible < sent.num_chars:  # held back, or shorter than what was sent: nothing new
        visible = sent.num_chars
    num_tokens = len(token_ids)
    if visible == sent.num_chars and num_tokens == sent.num_tokens and not done:
        return None
    new_text = text[sent.num_chars : visible]
    new_tokens = token_ids[sent.num_tokens :]
    new_logprobs = logprobs[sent.num_tokens :] if logprobs is not None else None
    sent.num_chars, sent.num_tokens, sent.done = visible, num_tokens, done
    return new_text, new_tokens, new_logprobs


@dataclass
class DeltaTracker:
    """Turns one request's cumulative outputs into deltas."""

    params: SamplingParams
    _sent: dict[int, SentState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._holdback = holdback_chars(self.params)

    def step(self, output: RequestOutput) -> RequestOutput | None:
        """The delta of `output` against what was handed out so far (None if nothing is new)."""
        holdback = self._holdback
        pieces = []
        for c in output.outputs:
            sent = self._sent.setdefault(c.index, SentState())
            done = c.finished() or output.finished
            piece = next_piece(c.text, c.token_ids, c.logprobs, done, sent, holdback)
            if piece is not None:
                text, token_ids, logprobs = piece
                pieces.append(
                    dataclasses.replace(c, text=text, token_ids=token_ids, logprobs=logprobs)
                )
        if not pieces and not output.finished:
            return None
        return dataclasses.replace(output, outputs=pieces)


def merge_delta(unread: RequestOutput, new: RequestOutput) -> RequestOutput:
    """One delta holding `unread` followed by `new` (both of the same request); takes over and
    extends unread's completion pieces, which the caller owns."""
    pieces = {c.index: c for c in unread.outputs}
    for piece in new.outputs:
        old = pieces.get(piece.index)
        if old is None:
            pieces[piece.index] = piece
            continue
        old.text += piece.text
        old.token_ids = [*old.token_ids, *piece.token_ids]
        if piece.logprobs is not None:
            old.logprobs = [*(old.logprobs or []), *piece.logprobs]
        old.cumulative_logprob = piece.cumulative_logprob
        old.finish_reason, old.stop_reason = piece.finish_reason, piece.stop_reason
    outputs = sorted(pieces.values(), key=lambda c: c.index)
    return dataclasses.replace(new, outputs=outputs)
