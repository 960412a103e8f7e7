"""A request as the scheduler tracks it: its tokens, how many have been computed, and its status.

Invariant: `num_computed_tokens <= num_tokens + num_pending_tokens`; a request samples its next
token in the step where `num_computed_tokens` (advanced when a step is scheduled) reaches that sum.
There is no prefill/decode mode: a prompt is simply many tokens not yet computed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from paphos.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"  # EOS, stop token or stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        # identity tests, not set membership: enum hashing costs more, and this runs for every
        # request every step
        return self is _STOPPED or self is _LENGTH or self is _ABORTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_STOPPED = RequestStatus.FINISHED_STOPPED
_LENGTH = RequestStatus.FINISHED_LENGTH
_ABORTED = RequestStatus.FINISHED_ABORTED
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Computed after the prompt; grows by one token per decode step.
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # Tokens of the prompt found in the prefix cache when first scheduled (for metrics).
    num_cached_tokens: int = 0
    # What the stop check found (a token id; stop strings are matched by the detokenizer).
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Tokens a scheduled step will sample but the scheduler has not been told yet (an overlapped
    # step in flight): they count as tokens to compute, and a request with one cannot be admitted.
    num_pending_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
