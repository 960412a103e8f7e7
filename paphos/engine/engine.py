"""The engine: add requests, step, read outputs. One step = schedule, execute, update.

With overlapped steps (async scheduling, CUDA by default) a call to `step()` schedules and launches
step k, then waits for step k-1 and returns its outputs: the host's work for one step runs while
the device computes the other (the runner reads ahead the one token the host lacks where a sampler
needs its value). Bad input raises ValueError from `add_request` and leaves nothing behind; other
requests keep going. The effective max_model_len (the model's, capped by what the KV cache holds)
is decided here once and passed to the scheduler; the config is never changed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from paphos.config import EngineConfig
from paphos.core.kv_cache_groups import KVCacheLayout
from paphos.core.scheduler import Scheduler
from paphos.core.step_data import SchedulerOutput, StepHandle
from paphos.engine.detokenizer import IncrementalDetokenizer
from paphos.engine.executor import make_executor
from paphos.engine.sequences import (
    ParentRequest,
    Sequence,
    child_params,
    now,
    to_logprobs_dict,
)
from paphos.models.registry import load_plugins
from paphos.outputs import OutputKind, RequestMetrics, RequestOutput
from paphos.request import Request, RequestStatus
from paphos.sampling_params import SamplingParams
from paphos.structured.compiler import GrammarCompilerCache
from paphos.tokenizer import eos_token_ids, get_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | dict[str, Any]


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        load_plugins()
        self.config = config
        self.model_config = config.model
        self.tokenizer = None if config.model.skip_tokenizer_init else get_tokenizer(config.model)
        eos_ids = eos_token_ids(config.model, self.tokenizer)
        self.eos_token_id = eos_ids[0] if eos_ids else None
        self.extra_stop_token_ids = eos_ids[1:]
        self.vocab_size = config.model.text_config.vocab_size
        self.executor = make_executor(config)
        self.kv_cache_layout = self.executor.determine_num_blocks()
        self.num_kv_blocks = self.kv_cache_layout.num_blocks  # the full group's, if any
        self.max_model_len = self._effective_max_model_len(self.kv_cache_layout)
        self.executor.initialize_kv_cache(self.kv_cache_layout)
        num_state_slots = self.executor.num_state_slots
        self.scheduler = Scheduler(
            config.scheduler,
            config.cache,
            self.kv_cache_layout,
            self.max_model_len,
            num_state_slots,
        )
        if num_state_slots is not None and config.cache.enable_prefix_caching:
            logger.info(
                "prefix caching is off for this hybrid model: a cached KV prefix carries no "
                "recurrent state to resume from (%d state slots)",
                num_state_slots,
            )
        self.parents: dict[str, ParentRequest] = {}
        self.child_to_parent: dict[str, tuple[ParentRequest, Sequence]] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self._grammars: GrammarCompilerCache | None = None  # built at the first constraint
        self._grammars_lock = threading.Lock()
        self.num_overlapped_steps = 0  # steps launched while the one before them still ran
        num_cache_tokens = self.num_kv_blocks * config.cache.block_size
        fp8 = "" if config.cache.kv_cache_dtype == "auto" else f", {config.cache.kv_cache_dtype}"
        num_fit = num_cache_tokens // self.max_model_len
        if not self.kv_cache_layout.has_full_group:  # every layer slides: window-sized caches
            num_fit = config.scheduler.max_num_seqs
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens%s); max_model_len %d; "
            "%d sequences of max_model_len fit at once",
            self.num_kv_blocks,
            config.cache.block_size,
            num_cache_tokens,
            fp8,
            self.max_model_len,
            num_fit,
        )

    def _effective_max_model_len(self, layout: KVCacheLayout) -> int:
        """The configured (or the model's) length, capped by the full-attention layers' cache
        (with every layer sliding, any length fits)."""
        requested = self.model_config.max_model_len
        model_len = self.model_config.model_max_len
        capacity = layout.token_capacity(self.config.cache.block_size)
        if capacity is None:
            capacity = requested or model_len
        if requested is not None and requested > capacity:
            raise ValueError(
                f"max_model_len={requested} does not fit the KV cache, which holds {capacity} "
                f"tokens ({layout.num_blocks} blocks): raise kv_cache_space/gpu_memory_utilization "
                "or lower max_model_len"
            )
        limit = min(requested or model_len, capacity)
        if limit < self.config.cache.block_size:
            raise ValueError(
                f"the KV cache holds only {capacity} tokens: not even one sequence fits; "
                "raise kv_cache_space/gpu_memory_utilization"
            )
        if not self.config.scheduler.enable_chunked_prefill:
            limit = min(limit, self.config.scheduler.max_num_batched_tokens)
        return limit

    # ---- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> None:
        """Queue a request. `output_kind`: what `step()` returns for it (paphos.outputs.OutputKind:
        the whole output so far, only what is new (streams), or one output when finished
        (offline generation: intermediate outputs cost host time and nobody reads them))."""
        params = params or SamplingParams()
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._tokenize_prompt(prompt)
        params = self._resolve_params(params, len(token_ids))
        if params.structured_outputs is not None and params._grammar is None:
            self.compile_grammar(params)  # offline path; servers compile before (off the loop)
        num_children = params.best_of or params.n
        metrics = RequestMetrics(arrival_time=arrival_time if arrival_time is not None else now())
        parent = ParentRequest(
            request_id, text, token_ids, params, [], metrics, output_kind=output_kind
        )
        for index in range(num_children):
            child_id = request_id if num_children == 1 else f"{request_id}#{index}"
            sub_params = child_params(params, index, num_children)
            seq = Sequence(index, child_id, self._detokenizer(token_ids, sub_params))
            seq.logprobs = [] if sub_params.logprobs is not None else None
            parent.sequences.append(seq)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.parents[request_id] = parent
        for seq in parent.sequences:
            self.child_to_parent[seq.request_id] = (parent, seq)
            sub_params = child_params(params, seq.index, num_children)
            self.scheduler.add_request(
                Request(
                    seq.request_id,
                    list(token_ids),
                    sub_params,
                    self.eos_token_id,
                    metrics.arrival_time,
                )
            )
        self.num_prompt_tokens_total += len(token_ids) * num_children

    def _tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, token_ids = prompt, None
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, token_ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, token_ids = prompt["prompt"], None
        else:
            raise ValueError(
                "prompt must be a string, {'prompt': str} or {'prompt_token_ids': [...]}"
            )
        if token_ids is None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass prompt_token_ids instead")
            token_ids = self.tokenizer.encode(text)  # with BOS etc., as the server does
        if not token_ids:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len} "
                "(prompt + at least one output token must fit)"
            )
        return text, token_ids

    def _resolve_params(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        room = self.max_model_len - num_prompt_tokens
        changes: dict[str, Any] = {}
        if params.max_tokens is None:
            changes["max_tokens"] = room
        elif params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} is too large: the prompt has {num_prompt_tokens} "
                f"tokens and max_model_len is {self.max_model_len} (at most {room})"
            )
        extra_stops = [t for t in self.extra_stop_token_ids if t not in params.stop_token_ids]
        if extra_stops and not params.ignore_eos:
            changes["stop_token_ids"] = list(params.stop_token_ids) + extra_stops
        if changes:
            params = dataclasses.replace(params, **changes)
        params.resolve_token_ids(self.tokenizer)
        params.verify_token_ids(self.vocab_size)
        return params

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile `params.structured_outputs` (cached) and attach it to `params`; ValueError
        naming the problem if it cannot be. Thread-safe: AsyncEngine runs it in a worker thread
        so that a slow compile never stalls the step loop."""
        spec = params.structured_outputs
        if spec is None or params._grammar is not None:
            return
        if self.tokenizer is None:
            raise ValueError("structured_outputs is invalid: it needs a tokenizer")
        with self._grammars_lock:
            if self._grammars is None:
                stops = [
                    t for t in (self.eos_token_id, *self.extra_stop_token_ids) if t is not None
                ]
                self._grammars = GrammarCompilerCache(self.tokenizer, self.vocab_size, stops)
        params._grammar = self._grammars.compile(spec)

    def _detokenizer(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
            list(params.stop),
            params.include_stop_str_in_output,
        )

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            parent = self.parents.pop(request_id, None)
            if parent is None:
                continue
            children = [s.request_id for s in parent.sequences]
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
            for child in children:
                self.child_to_parent.pop(child, None)

    def has_unfinished_requests(self) -> bool:
        return (
            bool(self.parents)
            or self.scheduler.has_unfinished_requests()
            or self._in_flight is not None
        )

    # ---- steps ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the requests it (or, overlapped, the step before
        it) changed."""
        touched: dict[str, ParentRequest] = {}
        overlap = self.executor.overlaps_steps
        if self._in_flight is not None and not overlap:  # overlap was just switched off
            self._finish_step(*self._in_flight, touched)
            self._in_flight = None
        scheduler_output = self.scheduler.schedule()
        try:
            handle = self.executor.execute_async(scheduler_output)
        except BaseException:
            self.scheduler.discard(scheduler_output)
            raise
        if self._in_flight is not None:
            self.num_overlapped_steps += 1
            self._finish_step(*self._in_flight, touched)
            self._in_flight = None
        if overlap and not scheduler_output.is_empty:
            self._in_flight = (scheduler_output, handle)
        else:
            self._finish_step(scheduler_output, handle, touched)
        outputs = (parent.next_output(self.tokenizer) for parent in touched.values())
        return [output for output in outputs if output is not None]

    def _finish_step(
        self,
        scheduler_output: SchedulerOutput,
        handle: StepHandle,
        touched: dict[str, ParentRequest],
    ) -> None:
        """Wait for a launched step and apply its results to the scheduler and the parents."""
        updates = self.scheduler.update(scheduler_output, handle.result())
        step_time = now()
        for update in updates:
            entry = self.child_to_parent.get(update.request.request_id)
            if entry is None:
                continue
            parent, seq = entry
            self._apply_update(parent, seq, update, step_time)
            touched[parent.request_id] = parent

    def _apply_update(
        self, parent: ParentRequest, seq: Sequence, update: Any, step_time: float
    ) -> None:
        request = update.request
        metrics = parent.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = step_time
            parent.num_cached_tokens = request.num_cached_tokens
        if update.prompt_logprobs and parent.prompt_logprobs is not None and seq.index == 0:
            parent.prompt_logprobs.extend(
                to_logprobs_dict(e, self.tokenizer) if e is not None else None
                for e in update.prompt_logprobs
            )
        if update.new_token_ids:
            self._append_tokens(seq, update, step_time, metrics)
        if update.finished and seq.finish_reason is None:
            seq.finish_reason = request.status.finish_reason
            seq.stop_reason = request.stop_reason
        if parent.finished:
            metrics.finished_time = step_time
            self._forget(parent)

    def _append_tokens(
        self, seq: Sequence, update: Any, step_time: float, metrics: RequestMetrics
    ) -> None:
        new_ids = list(update.new_token_ids)  # several from a multi-step decode
        stop = None
        if seq.detokenizer is not None:
            before = seq.detokenizer.num_output_tokens
            stop = seq.detokenizer.append(new_ids)
            if stop is not None:  # tokens after the one completing the stop string are dropped
                del new_ids[seq.detokenizer.num_output_tokens - before :]
        seq.token_ids.extend(new_ids)
        self.num_generation_tokens_total += len(new_ids)
        if metrics.first_token_time is None:
            metrics.first_token_time = step_time
        metrics.last_token_time = step_time
        if update.logprobs is not None:
            seq.cumulative_logprob += update.logprobs.logprobs[0]
            if seq.logprobs is not None:
                seq.logprobs.append(to_logprobs_dict(update.logprobs, self.tokenizer))
        if stop is not None and seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = "stop", stop
            self.scheduler.finish_requests([seq.request_id], RequestStatus.FINISHED_STOPPED)

    def _forget(self, parent: ParentRequest) -> None:
        self.parents.pop(parent.request_id, None)
        for seq in parent.sequences:
            self.child_to_parent.pop(seq.request_id, None)

    # ---- introspection --------------------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        s = self.scheduler.get_stats()
        free_blocks = round((1.0 - s.kv_cache_usage) * self.num_kv_blocks)
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generation_tokens_total=self.num_generation_tokens_total,
            num_kv_blocks=self.num_kv_blocks,
            num_free_kv_blocks=free_blocks,
            num_preemptions=s.num_preemptions,
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
