"""Plain data exchanged each step: Scheduler -> runner (`SchedulerOutput`) and back
(`RunnerOutput`).

The runner keeps its own copy of each running request (token ids, block ids, sampling state) so that
a step only carries what changed: new requests in full, and for the others the tokens sampled since
they were last scheduled plus any newly allocated blocks. A request the runner must forget
(finished, aborted, preempted) is named in `finished_request_ids`; a preempted request comes back
later as a new request. These messages are cheap to pickle and identical on every tensor-parallel
rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from paphos.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has not seen (or forgot after preemption)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    # Outputs already generated (non-empty only when resuming after preemption).
    output_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    # The request's block table in each KV cache group (one group unless the model has
    # sliding-window layers); in a sliding group leading entries may be the null block.
    block_ids: tuple[tuple[int, ...], ...]
    num_computed_tokens: int  # prefix-cache hits make this > 0 at first schedule
    # Hybrid models: the request's recurrent-state slot (index into every state layer's cache).
    state_slot: int | None = None


class CachedRequestData(NamedTuple):
    """A request the runner already holds (a NamedTuple: one per running request per step, and
    cheaper to build than a frozen dataclass)."""

    request_id: str
    # Tokens the scheduler learned since it last told the runner (the sampled token of the last
    # step). With an overlapped step in flight, the token that step samples is not known yet: the
    # runner reads it from its own device-side result and gets it here one step later.
    new_token_ids: tuple[int, ...]
    # Blocks appended to the request's table in each group; () when no group got one. (Blocks a
    # sliding group freed are not sent: the runner nulls the same entries by the same rule.)
    new_block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    # request_id -> tokens computed this step, for every scheduled request. Iteration order is the
    # batch order: the runner lays out the flat token batch in this order.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the runner must drop before running this step.
    finished_request_ids: frozenset[str] = field(default_factory=frozenset)
    # Numbers the scheduler's steps, so `Scheduler.update` finds what it scheduled in this one.
    step_id: int = 0
    # Decode steps the runner runs back to back for this message (multi-step scheduling): > 1
    # only when every scheduled request decodes one token; each then samples num_steps tokens,
    # the runner feeding each sampled token to the next step itself. Slots are allocated for all.
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs at one sampled position: the sampled token, then the top-N (ids and values)."""

    token_ids: tuple[int, ...]  # [1 + N]: sampled token first
    logprobs: tuple[float, ...]  # [1 + N]
    ranks: tuple[int, ...]  # [1 + N]: 1 = most likely


@dataclass(frozen=True)
class RunnerOutput:
    # request_id -> the tokens sampled this step: one (num_steps of a multi-step decode), only for
    # requests whose computation reached their last token (one in the middle of its prompt
    # samples nothing).
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request_id -> logprobs of prompt positions computed this step (position i: token i given
    # tokens < i; None for the first prompt token).
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> RunnerOutput:
        return cls(sampled_token_ids={})


class StepHandle:
    """A step the runner has launched: `result()` waits for its device work (the first call only)
    and returns its `RunnerOutput`. Lets the engine schedule the next step meanwhile."""

    def __init__(self, finish: Callable[[], RunnerOutput]) -> None:
        self._finish: Callable[[], RunnerOutput] | None = finish
        self._output: RunnerOutput | None = None

    @classmethod
    def done(cls, output: RunnerOutput) -> StepHandle:
        handle = cls(lambda: output)
        handle.result()
        return handle

    def result(self) -> RunnerOutput:
        if self._output is None:
            assert self._finish is not None
            self._output, self._finish = self._finish(), None
        return self._output
