"""What the engine tracks above the scheduler: a user request (the parent) and its n sampled
sequences.

A request with n > 1 (or best_of > n) runs as independent child requests in the scheduler; the
parent gathers their text, logprobs and finish reasons into one `RequestOutput`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from paphos.core.step_data import TokenLogprobs
from paphos.engine.deltas import SentState, holdback_chars, next_piece
from paphos.engine.detokenizer import IncrementalDetokenizer
from paphos.outputs import (
    CompletionOutput,
    Logprob,
    LogprobsDict,
    OutputKind,
    RequestMetrics,
    RequestOutput,
)
from paphos.sampling_params import SamplingParams


@dataclass
class Sequence:
    index: int
    request_id: str  # the child's id in the scheduler
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent: SentState = field(default_factory=SentState)  # what a DELTA stream has handed out

    def completion(self, tokenizer: object | None, with_logprobs: bool) -> CompletionOutput:
        """The whole completion so far (copies of the token and logprob lists)."""
        logprobs = list(self.logprobs) if self.logprobs is not None else None
        return self._output(self.visible_text(), list(self.token_ids), logprobs, with_logprobs)

    def delta(self, with_logprobs: bool, done: bool, holdback: int) -> CompletionOutput | None:
        """What is new since the last delta (None: nothing); copies only the new tails."""
        piece = next_piece(
            self.visible_text(), self.token_ids, self.logprobs, done, self.sent, holdback
        )
        return None if piece is None else self._output(*piece, with_logprobs)

    def visible_text(self) -> str:
        """The text so far, less a possible stop string's prefix while running."""
        if self.detokenizer is None:
            return ""
        return self.detokenizer.visible_text(self.finish_reason is not None)

    def _output(
        self,
        text: str,
        token_ids: list[int],
        logprobs: list[LogprobsDict] | None,
        with_logprobs: bool,
    ) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob if with_logprobs else None,
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[LogprobsDict | None] | None = None
    num_cached_tokens: int = 0
    output_kind: OutputKind = OutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self._holdback = holdback_chars(self.params)  # for deltas: a stop string's prefix

    @property
    def finished(self) -> bool:
        if len(self.sequences) == 1:  # the common case, checked for every request every step
            return self.sequences[0].finish_reason is not None
        return all(s.finish_reason is not None for s in self.sequences)

    def next_output(self, tokenizer: object | None) -> RequestOutput | None:
        """What `Engine.step()` hands back for this request after a step touched it (None:
        nothing). best_of picks its n winners only at the end, so it emits once, finished."""
        finished = self.finished
        kind = self.output_kind
        if kind is OutputKind.FINAL_ONLY or len(self.sequences) != self.params.n:
            return self.to_output(tokenizer) if finished else None
        if kind is OutputKind.CUMULATIVE:
            return self.to_output(tokenizer)
        wants_logprobs = self.params.logprobs is not None
        pieces = []
        for seq in self.sequences:
            done = finished or seq.finish_reason is not None
            piece = seq.delta(wants_logprobs, done, self._holdback)
            if piece is not None:
                pieces.append(piece)
        if not pieces and not finished:
            return None
        return self._request_output(pieces, finished)

    def to_output(self, tokenizer: object | None) -> RequestOutput:
        """The whole output so far."""
        wants_logprobs = self.params.logprobs is not None
        completions = [s.completion(tokenizer, wants_logprobs) for s in self.sequences]
        if len(self.sequences) > self.params.n:
            # best_of: keep the n sequences of highest cumulative logprob
            ranked = sorted(self.sequences, key=lambda s: s.cumulative_logprob, reverse=True)
            completions = [s.completion(tokenizer, wants_logprobs) for s in ranked[: self.params.n]]
            for new_index, c in enumerate(completions):
                c.index = new_index
                if not wants_logprobs:
                    c.logprobs, c.cumulative_logprob = None, None
        return self._request_output(completions, self.finished)

    def _request_output(self, completions: list[CompletionOutput], finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=self.prompt_logprobs,
            metrics=RequestMetrics(**vars(self.metrics)),  # a snapshot (copy.copy: 5x slower)
            num_cached_tokens=self.num_cached_tokens,
        )


def child_params(params: SamplingParams, index: int, num_children: int) -> SamplingParams:
    """Each child samples on its own: a seeded request gives child i the seed + i. best_of ranks by
    cumulative logprob, so its children always compute the sampled token's logprob."""
    if num_children == 1:
        return params
    changes: dict[str, object] = {"n": 1, "best_of": None}
    if params.seed is not None:
        changes["seed"] = params.seed + index
    if num_children > params.n and params.logprobs is None:
        changes["logprobs"] = 0
    return dataclasses.replace(params, **changes)


def to_logprobs_dict(entry: TokenLogprobs, tokenizer: object | None) -> LogprobsDict:
    out: LogprobsDict = {}
    for token_id, value, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
        if token_id in out:
            continue  # the sampled token may also be among the top-N
        text = tokenizer.decode([token_id]) if tokenizer is not None else None
        out[token_id] = Logprob(logprob=value, rank=rank, decoded_token=text)
    return out


def now() -> float:
    return time.monotonic()
