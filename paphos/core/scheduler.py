"""Continuous batching: each step gives every scheduled request up to its remaining tokens within
one token budget, then applies the runner's sampled tokens and the stop rules.

Invariant: every unfinished request is either running (holds KV blocks, known to the runner) or
waiting (holds none); the runner's copy of a request always equals ours once it applies a
`SchedulerOutput`. No prefill/decode modes: `num_computed_tokens` just catches up to `num_tokens`.
`schedule()` advances `num_computed_tokens` and counts each token a step will sample as pending
until `update()` delivers it, so the next step can be scheduled while this one still runs
(overlapped steps: at most one in flight); a result for a request finished meanwhile is dropped.
With `num_scheduler_steps` > 1 a step in which every request decodes runs that many decode steps
in the runner (multi-step): each request computes and samples that many tokens, and tokens past
one that ends the request are dropped.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from paphos.config import CacheConfig, SchedulerConfig
from paphos.core.kv_cache_groups import KVCacheLayout, sliding_group_bound
from paphos.core.kv_cache_manager import GroupBlockIds, KVCacheManager
from paphos.core.state_pool import StatePool
from paphos.core.step_data import (
    CachedRequestData,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
    TokenLogprobs,
)
from paphos.core.stopping import check_stop, length_reached
from paphos.request import Request, RequestStatus


@dataclass(slots=True)
class RequestUpdate:
    """What one step did to one request: tokens appended, their logprobs, and whether it ended."""

    request: Request
    new_token_ids: list[int]
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finished: bool = False


class _Scheduled(NamedTuple):
    """One request in a scheduled step: where its tokens began, how many it computes and how
    many it samples (0 or 1; num_steps in a multi-step decode)."""

    request: Request
    start: int
    num_tokens: int
    num_samples: int


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by requests
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there
    num_preemptions: int  # since start


@dataclass
class _StepPlan:
    """What `schedule()` decided so far in this step (batch order = insertion order)."""

    token_budget: int
    # (request, tokens it computes, blocks allocated for them per group), in batch order
    entries: list[tuple[Request, int, GroupBlockIds]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    num_preempted: int = 0

    def add(self, request: Request, num_tokens: int, new_block_ids: GroupBlockIds) -> None:
        self.entries.append((request, num_tokens, new_block_ids))
        self.token_budget -= num_tokens


class Scheduler:
    """Decides each step which requests run and how many tokens each computes.

    Engine loop: `add_request`, then per step `schedule()` -> runner -> `update()`; aborts and
    stop-string finishes go through `finish_requests`. A request that cannot get KV blocks
    preempts the latest-arriving running request (recompute later, outputs kept). `num_blocks`
    is a block count (one full-attention group) or a `KVCacheLayout` (sliding-window groups).

    Hybrid models (`num_state_slots` given): each running request also holds one recurrent-state
    slot; a waiting request is admitted only when a slot and its blocks are both free. Prefix
    caching is off for them (a cached KV prefix has no recurrent state to resume from).
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int | KVCacheLayout,
        max_model_len: int,
        num_state_slots: int | None = None,
    ) -> None:
        if not isinstance(num_blocks, KVCacheLayout):
            if not isinstance(num_blocks, int) or num_blocks < 1:
                raise ValueError(f"num_blocks={num_blocks!r} is invalid: expected an int >= 1")
            num_blocks = KVCacheLayout.single(num_blocks)
        _validate(scheduler_config, cache_config, num_blocks, max_model_len)
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.state_pool = None if num_state_slots is None else StatePool(num_state_slots)
        self.kv_cache_manager = KVCacheManager(
            num_blocks,
            cache_config.block_size,
            cache_config.enable_prefix_caching and self.state_pool is None,
        )
        self.requests: dict[str, Request] = {}  # unfinished requests only
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # ordered by (arrival_time, add order)
        self._arrival_keys: dict[str, tuple[float, int]] = {}
        self._arrival_counter = itertools.count()
        # request_id -> how many of its tokens the runner holds (present iff the runner holds it).
        self._num_runner_tokens: dict[str, int] = {}
        self._forget_ids: set[str] = set()  # runner must drop these at the next step
        self._num_prompt_logprobs_sent: dict[str, int] = {}  # survives preemption
        self.num_preemptions = 0
        self._step_ids = itertools.count()
        self._scheduled: dict[int, list[_Scheduled]] = {}  # step_id -> its requests, until update

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        req_id = request.request_id
        if req_id in self.requests:
            raise ValueError(f"request_id={req_id!r} is invalid: already scheduled")
        if not request.prompt_token_ids:
            raise ValueError(f"request {req_id!r}: prompt_token_ids=[] is invalid: expected tokens")
        if request.num_tokens > self.max_model_len:
            raise ValueError(
                f"request {req_id!r}: {request.num_tokens} tokens is invalid: "
                f"expected at most max_model_len={self.max_model_len}"
            )
        if request.is_finished or request.num_computed_tokens != 0:
            raise ValueError(
                f"request {req_id!r}: status={request.status} is invalid: expected a new request"
            )
        request.status = RequestStatus.WAITING
        self.requests[req_id] = request
        self._arrival_keys[req_id] = (request.arrival_time, next(self._arrival_counter))
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests (abort, stop string); unknown or already finished ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"status={status!r} is invalid: expected a FINISHED_* status")
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for req_id in ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def get_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Running requests first (arrival order), then waiting ones (FIFO) while budget lasts."""
        plan = _StepPlan(token_budget=self.config.max_num_batched_tokens)
        if self.kv_cache_manager.sliding_groups:  # out-of-window blocks back before allocating
            for request in self.running:
                self.kv_cache_manager.remove_skipped_blocks(request)
        self._schedule_running(plan)
        if plan.num_preempted == 0:  # blocks are short: admitting more would only thrash
            self._schedule_waiting(plan)
        for request in plan.admitted:
            self._insert_running(request)
        num_steps = self._num_decode_steps(plan)
        if num_steps > 1 and not self._allocate_ahead(plan, num_steps):
            num_steps = 1
        return self._build_output(plan, next(self._step_ids), num_steps)

    def update(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput
    ) -> list[RequestUpdate]:
        """Apply a step's results: append sampled tokens, check stops. Requests that finished
        (or were aborted) since the step was scheduled are skipped."""
        entries = self._scheduled.pop(scheduler_output.step_id, None)
        if entries is None:
            raise ValueError(f"step {scheduler_output.step_id} was not scheduled or was updated")
        updates = []
        for entry in entries:
            if entry.request.is_finished:
                continue
            update = self._update_request(entry, runner_output)
            if update is not None:
                updates.append(update)
        return updates

    def discard(self, scheduler_output: SchedulerOutput) -> None:
        """Take back a scheduled step that never ran (its launch failed): its requests' computed
        and pending tokens return to where they were and blocks stay allocated. Whether the
        runner applied the step's message is unknown, so callers then abort those requests (as
        AsyncEngine does after a failed step)."""
        for entry in reversed(self._scheduled.pop(scheduler_output.step_id, [])):
            request = entry.request
            if request.is_finished or request.num_computed_tokens != entry.start + entry.num_tokens:
                continue  # finished, or preempted since: nothing of this step is left on it
            request.num_computed_tokens = entry.start
            request.num_pending_tokens -= entry.num_samples

    def _update_request(
        self, entry: _Scheduled, runner_output: RunnerOutput
    ) -> RequestUpdate | None:
        request = entry.request
        req_id = request.request_id
        prompt_logprobs = None
        if runner_output.prompt_logprobs:
            prompt_logprobs = self._fresh_prompt_logprobs(
                req_id, entry.start, runner_output.prompt_logprobs.get(req_id)
            )
        token_ids = runner_output.sampled_token_ids.get(req_id)
        if token_ids is not None and len(token_ids) != entry.num_samples:
            raise ValueError(
                f"{len(token_ids)} sampled tokens for request {req_id!r} is invalid: the step "
                f"computed {entry.num_tokens} of its tokens and samples {entry.num_samples}"
            )
        new_token_ids: list[int] = []
        if entry.num_samples:
            if token_ids is None:
                raise ValueError(f"the runner sampled no token for request {req_id!r}")
            request.num_pending_tokens -= entry.num_samples
            for token_id in token_ids:  # up to the first one that ends the request
                new_token_ids.append(token_id)
                if self._append_token(request, token_id):
                    break
        elif prompt_logprobs is None:
            return None  # a prompt chunk with nothing to report
        return RequestUpdate(
            request=request,
            new_token_ids=new_token_ids,
            logprobs=runner_output.logprobs.get(req_id) if runner_output.logprobs else None,
            prompt_logprobs=prompt_logprobs,
            finished=request.is_finished,
        )

    def _fresh_prompt_logprobs(
        self, req_id: str, start: int, entries: list[TokenLogprobs | None] | None
    ) -> list[TokenLogprobs | None] | None:
        """Drop prompt logprobs already reported: a preempted request recomputes its prompt, and
        the runner reports the positions of each computed chunk again (entries align to `start`)."""
        if entries is None:
            return None
        num_sent = self._num_prompt_logprobs_sent.get(req_id, 0)
        fresh = entries[max(0, num_sent - start) :]
        self._num_prompt_logprobs_sent[req_id] = max(num_sent, start + len(entries))
        return fresh or None

    # ---- schedule() steps ----------------------------------------------------------------------

    def _schedule_running(self, plan: _StepPlan) -> None:
        index = 0
        while index < len(self.running) and plan.token_budget > 0:
            request = self.running[index]
            num_new_tokens = self._num_tokens_to_schedule(request, plan.token_budget)
            if num_new_tokens == 0:
                index += 1
                continue
            new_block_ids = self._allocate_or_preempt(request, num_new_tokens, plan)
            if new_block_ids is None:  # the request preempted itself: nothing after it is left
                break
            plan.add(request, num_new_tokens, new_block_ids)
            index += 1

    def _allocate_or_preempt(
        self, request: Request, num_new_tokens: int, plan: _StepPlan
    ) -> GroupBlockIds | None:
        """Blocks for the request, preempting the latest arrivals (possibly itself) until they fit.
        Victims come from the end of `running`, which this step has not scheduled yet."""
        while True:
            new_block_ids = self.kv_cache_manager.allocate_slots(request, num_new_tokens)
            if new_block_ids is not None:
                return new_block_ids
            victim = self.running.pop()
            self._preempt(victim)
            plan.num_preempted += 1
            if victim is request:
                return None

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        kv = self.kv_cache_manager
        while self.waiting and plan.token_budget > 0:
            if len(self.running) + len(plan.admitted) >= self.config.max_num_seqs:
                return
            request = self.waiting[0]
            if request.num_pending_tokens:
                return  # preempted while a step that samples it runs: its token comes first
            if self.state_pool is not None and self.state_pool.num_free_slots == 0:
                return  # every recurrent-state slot is held
            computed_blocks, num_cached_tokens = kv.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_cached_tokens
            if num_new_tokens > plan.token_budget and not self.config.enable_chunked_prefill:
                return  # FIFO: the head waits for a step with room for all of it
            num_new_tokens = min(num_new_tokens, plan.token_budget)
            new_block_ids = kv.allocate_slots(request, num_new_tokens, computed_blocks)
            if new_block_ids is None:
                return
            if self.state_pool is not None:
                self.state_pool.allocate(request.request_id)
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached_tokens
            request.num_computed_tokens = num_cached_tokens
            request.status = RequestStatus.RUNNING
            plan.admitted.append(request)
            plan.add(request, num_new_tokens, new_block_ids)

    def _num_tokens_to_schedule(self, request: Request, token_budget: int) -> int:
        pending = request.num_pending_tokens
        if pending and length_reached(request, self.max_model_len, pending):
            return 0  # its pending token ends it (length): computing after it would be waste
        remaining = request.num_tokens + pending - request.num_computed_tokens
        if remaining > token_budget and not self.config.enable_chunked_prefill:
            return 0
        return min(remaining, token_budget)

    def _num_decode_steps(self, plan: _StepPlan) -> int:
        """How many decode steps the runner runs for this plan: num_scheduler_steps when every
        planned request decodes one token, samples on the device alone and is past min_tokens,
        and nobody was admitted or preempted; fewer near max_model_len (positions must stay
        below it) or when no request has that many tokens left to sample; else 1."""
        num_steps = self.config.num_scheduler_steps
        if num_steps == 1 or plan.admitted or plan.num_preempted or not plan.entries:
            return 1
        most_left = 0
        for request, num_tokens, _ in plan.entries:
            pending = request.num_pending_tokens
            start = request.num_computed_tokens
            if num_tokens != 1 or start + 1 != request.num_tokens + pending:
                return 1  # a prompt chunk
            params = request.sampling_params
            num_outputs = request.num_output_tokens + pending
            if not params.samples_on_device_alone or num_outputs < params.min_tokens:
                return 1
            num_steps = min(num_steps, self.max_model_len - start)
            max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
            most_left = max(most_left, max_tokens - num_outputs)
        return max(1, min(num_steps, most_left))

    def _allocate_ahead(self, plan: _StepPlan, num_steps: int) -> bool:
        """Slots for num_steps tokens of every planned request (each holds blocks for one): for
        all of them, or (False) for none when the free blocks do not cover all."""
        kv = self.kv_cache_manager
        needed = sum(kv.num_new_blocks(request, num_steps) for request, _, _ in plan.entries)
        if not kv.has_free_blocks(needed):
            return False
        for index, (request, num_tokens, new_block_ids) in enumerate(plan.entries):
            more = kv.allocate_slots(request, num_steps)
            assert more is not None, "counted free blocks did not suffice"
            if more:
                merged = tuple(a + b for a, b in zip(new_block_ids, more)) or more
                plan.entries[index] = (request, num_tokens, merged)
        return True

    def _build_output(self, plan: _StepPlan, step_id: int, num_steps: int = 1) -> SchedulerOutput:
        """The runner's message for the plan; then count the step's tokens as computed and the
        tokens it samples as pending (one pass: this runs for every request every step). With
        num_steps > 1 (a multi-step decode) each request computes and samples num_steps tokens."""
        new_requests, cached_requests, entries = [], [], []
        num_scheduled_tokens: dict[str, int] = {}
        runner_tokens = self._num_runner_tokens
        for request, num_tokens, new_block_ids in plan.entries:
            req_id = request.request_id
            num_scheduled_tokens[req_id] = num_tokens
            start = request.num_computed_tokens
            num_known = runner_tokens.get(req_id)
            if num_known is None:
                new_requests.append(self._new_request_data(request))
            else:
                outputs = request.output_token_ids
                known_outputs = num_known - len(request.prompt_token_ids)  # >= 0: prompt sent
                fresh = tuple(outputs[known_outputs:]) if known_outputs < len(outputs) else ()
                cached_requests.append(CachedRequestData(req_id, fresh, new_block_ids, start))
            num_tokens_known = request.num_tokens
            runner_tokens[req_id] = num_tokens_known
            if num_steps > 1:  # every request decodes: it computes and samples num_steps tokens
                request.num_computed_tokens = start + num_steps
                request.num_pending_tokens += num_steps
                entries.append(_Scheduled(request, start, num_steps, num_steps))
                continue
            request.num_computed_tokens = end = start + num_tokens
            samples = int(end == num_tokens_known + request.num_pending_tokens)
            request.num_pending_tokens += samples
            entries.append(_Scheduled(request, start, num_tokens, samples))
        self._scheduled[step_id] = entries
        forget_ids, self._forget_ids = frozenset(self._forget_ids), set()
        return SchedulerOutput(
            new_requests=tuple(new_requests),
            cached_requests=tuple(cached_requests),
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=sum(num_scheduled_tokens.values()),
            finished_request_ids=forget_ids,
            step_id=step_id,
            num_steps=num_steps,
        )

    def _new_request_data(self, request: Request) -> NewRequestData:
        req_id = request.request_id
        return NewRequestData(
            request_id=request.request_id,
            prompt_token_ids=tuple(request.prompt_token_ids),
            output_token_ids=tuple(request.output_token_ids),
            sampling_params=request.sampling_params,
            block_ids=tuple(map(tuple, self.kv_cache_manager.get_block_ids(request.request_id))),
            num_computed_tokens=request.num_computed_tokens,
            state_slot=None if self.state_pool is None else self.state_pool.get_slot(req_id),
        )

    # ---- state changes -------------------------------------------------------------------------

    def _insert_running(self, request: Request) -> None:
        keys = [self._arrival_keys[r.request_id] for r in self.running]
        position = bisect.bisect(keys, self._arrival_keys[request.request_id])
        self.running.insert(position, request)

    def _preempt(self, request: Request) -> None:
        """Recompute later: free blocks and state, keep outputs, go to the front of the waiting
        queue."""
        self._free_caches(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._forget_runner_copy(request.request_id)
        self.waiting.appendleft(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._free_caches(request)
        self._forget_runner_copy(request.request_id)
        del self.requests[request.request_id]
        del self._arrival_keys[request.request_id]
        self._num_prompt_logprobs_sent.pop(request.request_id, None)

    def _free_caches(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        if self.state_pool is not None:
            self.state_pool.free(request.request_id)

    def _forget_runner_copy(self, request_id: str) -> None:
        if self._num_runner_tokens.pop(request_id, None) is not None:
            self._forget_ids.add(request_id)

    def _append_token(self, request: Request, token_id: int) -> bool:
        """A pending token arrives; it may end the request (also one preempted meanwhile).
        Returns whether it did."""
        request.output_token_ids.append(token_id)
        status = check_stop(request, self.max_model_len)
        if status is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status)
        return True

    def check_invariants(self) -> None:
        """Assert the KV manager (and state pool) are consistent and request bookkeeping matches
        them."""
        kv = self.kv_cache_manager
        kv.check_invariants()
        running_ids = [r.request_id for r in self.running]
        waiting_ids = [r.request_id for r in self.waiting]
        assert len(set(running_ids)) == len(running_ids), "a request is twice in running"
        assert not set(running_ids) & set(waiting_ids), "a request is running and waiting"
        assert set(running_ids) | set(waiting_ids) == set(self.requests), "a request is lost"
        assert len(self.running) <= self.config.max_num_seqs, "more running than max_num_seqs"
        keys = [self._arrival_keys[i] for i in running_ids]
        assert keys == sorted(keys), "running is out of arrival order"
        assert set(kv.req_to_blocks) == set(running_ids), "block tables disagree with running"
        if self.state_pool is not None:
            self.state_pool.check_invariants()
            held = set(self.state_pool.req_to_slot)
            assert held == set(running_ids), "state slots disagree with running"
        assert set(self._num_runner_tokens) == set(running_ids), "runner view out of sync"
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, f"{request.request_id}: not RUNNING"
            num_scheduled = request.num_tokens + request.num_pending_tokens
            assert request.num_computed_tokens <= num_scheduled
            assert request.num_tokens <= self.max_model_len
            num_slots = len(kv.get_block_ids(request.request_id)[0]) * kv.block_size
            assert num_slots >= request.num_computed_tokens, f"{request.request_id}: too few blocks"
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert request.num_computed_tokens == 0, f"{request.request_id}: waiting but computed"


def _validate(
    scheduler_config: SchedulerConfig,
    cache_config: CacheConfig,
    layout: KVCacheLayout,
    max_model_len: int,
) -> None:
    if scheduler_config.max_num_batched_tokens < 1:
        raise ValueError(
            f"max_num_batched_tokens={scheduler_config.max_num_batched_tokens!r} is invalid: "
            "expected >= 1 (EngineConfig.from_kwargs resolves 0 to the device's default)"
        )
    if max_model_len < 1:
        raise ValueError(f"max_model_len={max_model_len!r} is invalid: expected >= 1")
    # A single request must always fit alone, or preemption could never let it finish.
    block_size = cache_config.block_size
    capacity = layout.token_capacity(block_size)
    if capacity is not None and max_model_len > capacity:
        raise ValueError(
            f"max_model_len={max_model_len!r} is invalid: expected <= the KV cache capacity "
            f"({layout.num_blocks} blocks x {block_size} = {capacity} tokens)"
        )
    for group in layout.groups:
        if group.sliding_window is None:
            continue
        one_request = min(  # its window and a step's tokens, at most its whole length (+ null)
            sliding_group_bound(
                group.sliding_window,
                block_size,
                1,
                scheduler_config.max_num_batched_tokens,
                scheduler_config.num_scheduler_steps,
            ),
            -(-max_model_len // block_size) + 1,
        )
        if group.num_blocks < one_request:
            raise ValueError(
                f"the KV cache group of window {group.sliding_window} has {group.num_blocks} "
                f"blocks: expected >= {one_request} (one request's window plus a step's tokens)"
            )
    if not scheduler_config.enable_chunked_prefill:
        if scheduler_config.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={scheduler_config.max_num_batched_tokens!r} is invalid: "
                f"expected >= max_model_len ({max_model_len}) when chunked prefill is off"
            )
