"""One rank's model runner: builds and loads the model, sizes and allocates the KV cache, runs.

It keeps a copy of every running request (tokens, blocks, sampling state), updated from each
`SchedulerOutput`, so that a step's message only carries what changed. On CUDA, pure-decode steps
replay a captured graph (unless enforce_eager); every step makes one asynchronous device-to-host
copy (sampled tokens), and the host time from `execute` to the launch is accumulated in
`host_stats`. `execute_async` returns once the step is queued on the device: the engine may
schedule the next step meanwhile, whose decode tokens the runner then takes from this step's
device-side result (the host learns them one step later).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from paphos.config import EngineConfig
from paphos.core.step_data import RunnerOutput, SchedulerOutput, StepHandle, TokenLogprobs
from paphos.layers.sampler import (
    LogprobsTensors,
    RequestSamplingState,
    SamplingMetadata,
    compute_prompt_logprobs,
)
from paphos.layers.sampling.batch import to_device
from paphos.models.loader import load_model_weights
from paphos.models.registry import ModelRegistry
from paphos.ops.argmax import argmax_rows
from paphos.parallel import ParallelInfo
from paphos.runner.cuda_graph import MAX_SEQ_LEN_TO_CAPTURE, DecodeGraphs, batch_size_buckets
from paphos.runner.inputs import InputBuffers, RunnerRequestState, StepInputs, build_step_inputs
from paphos.runner.kv_cache import KVCacheSpec, allocate_kv_caches, num_blocks_for_device

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(requested)


def resolve_dtype(requested: str, hf_config: object, device: torch.device) -> torch.dtype:
    """'auto': the checkpoint's dtype, except float16 on CPU (slow there) becomes bfloat16."""
    if requested != "auto":
        return _DTYPES[requested]
    found = getattr(hf_config, "dtype", None)  # transformers 5 name (torch_dtype is deprecated)
    if isinstance(found, str):
        found = _DTYPES.get(found)
    if found not in (torch.float32, torch.bfloat16, torch.float16):
        found = torch.bfloat16
    if found == torch.float16 and device.type == "cpu":
        found = torch.bfloat16
    return found


@dataclass
class HostStats:
    """Host-side time per step, from `execute` entry to the launch of the model (or graph)."""

    num_steps: int = 0
    num_graph_steps: int = 0
    prepare_s: float = 0.0

    @property
    def mean_prepare_ms(self) -> float:
        return 1e3 * self.prepare_s / max(self.num_steps, 1)


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelInfo | None = None) -> None:
        self.config = config
        self.parallel = parallel or ParallelInfo()
        self.device = resolve_device(config.runtime.device)
        self.dtype = resolve_dtype(config.model.dtype, config.model.hf_config, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.runtime.num_threads or os.cpu_count() or 1)
        self.block_size = config.cache.block_size
        self.model = self._load_model()
        self.vocab_size = config.model.hf_config.vocab_size
        self.kv_caches: list[torch.Tensor] = []
        self.requests: dict[str, RunnerRequestState] = {}
        self.buffers: InputBuffers | None = None
        self.graphs: DecodeGraphs | None = None
        self.host_stats = HostStats()
        # The last step's sampled ids on the device and each sampling request's row in them.
        self._last_sampled: torch.Tensor | None = None
        self._last_sampled_rows: dict[str, int] = {}
        # The last step's (request id -> row, sampled ids on the host once copied, copy event).
        self._last_host: tuple[dict[str, int], torch.Tensor, torch.cuda.Event | None] | None = None

    def _load_model(self) -> torch.nn.Module:
        model_cls = ModelRegistry.resolve(self.config.model.architecture)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_cls(self.config.model, None, self.parallel)
        finally:
            torch.set_default_dtype(previous_dtype)
        load_model_weights(model, self.config.model, self.config.runtime.seed)
        return model.eval()

    # ---- KV cache -------------------------------------------------------------------------------

    def kv_cache_spec(self) -> KVCacheSpec:
        attn_layers = [m for m in self.model.modules() if type(m).__name__ == "Attention"]
        first = attn_layers[0]
        return KVCacheSpec(
            num_layers=len(attn_layers),
            block_size=self.block_size,
            num_kv_heads=first.num_kv_heads,
            head_size=first.head_size,
            dtype=self.dtype,
        )

    def determine_num_blocks(self) -> int:
        if self.config.cache.num_blocks_override is not None:
            return self.config.cache.num_blocks_override
        return num_blocks_for_device(
            self.kv_cache_spec(), self.config.cache, self.device, self._profile
        )

    def _profile(self) -> None:
        """One dummy step of max_num_batched_tokens, so the peak activation memory is measured."""
        num_tokens = min(
            self.config.scheduler.max_num_batched_tokens, self.config.model.model_max_len
        )
        spec = self.kv_cache_spec()
        num_blocks = -(-num_tokens // spec.block_size)
        caches = allocate_kv_caches(spec, num_blocks, self.device)
        sampling = RequestSamplingState(
            _profile_params(), [0] * num_tokens, [], None, self.vocab_size, self.device
        )
        state = RunnerRequestState(
            "__profile__", [0] * num_tokens, num_tokens, list(range(num_blocks)), 0, sampling
        )
        with torch.inference_mode():
            inputs = build_step_inputs([state], [num_tokens], spec.block_size, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, caches, inputs.attn_metadata)
            self.model.compute_logits(hidden, inputs.attn_metadata)
        del caches

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache and the step buffers; on CUDA capture the decode graphs."""
        self.kv_caches = allocate_kv_caches(self.kv_cache_spec(), num_blocks, self.device)
        sched = self.config.scheduler
        buckets = batch_size_buckets(sched.max_num_seqs)
        max_model_len = self._max_model_len(num_blocks)
        self.buffers = InputBuffers(
            max(sched.max_num_seqs, buckets[-1]),
            max(sched.max_num_batched_tokens, buckets[-1]),
            max_model_len,
            self.block_size,
            self.device,
        )
        if self.device.type == "cuda" and not self.config.runtime.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.buffers,
                buckets,
                min(max_model_len, MAX_SEQ_LEN_TO_CAPTURE),
                self.vocab_size,
            )
            with torch.inference_mode():
                self.graphs.capture()

    def _max_model_len(self, num_blocks: int) -> int:
        """The longest sequence the engine can schedule: the model's (or the configured) length,
        capped by what the cache holds (the engine applies the same rule)."""
        requested = self.config.model.max_model_len or self.config.model.model_max_len
        return max(1, min(requested, num_blocks * self.block_size))

    # ---- steps ----------------------------------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Queue one step on the device; the handle's `result()` waits for it."""
        start = time.perf_counter()
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return StepHandle.done(RunnerOutput.empty())
        states = [self.requests[rid] for rid in scheduler_output.num_scheduled_tokens]
        num_scheduled = list(scheduler_output.num_scheduled_tokens.values())
        logits, argmax, inputs = self._run_model(states, num_scheduled, start)
        finish = self._sample(logits, argmax, inputs)
        for state, n in zip(states, num_scheduled):
            state.num_computed_tokens += n
        return StepHandle(finish)

    def _run_model(
        self, states: list[RunnerRequestState], num_scheduled: list[int], start: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, StepInputs]:
        """Prepare the inputs and run the model: a graph replay for a pure-decode batch that fits
        a bucket, eager otherwise. Returns logits [num_logits (or padded rows), vocab] and, from a
        graph, their argmax [padded rows]."""
        assert self.buffers is not None, "initialize_kv_cache was not called"
        graphs, bucket, limit = self.graphs, None, None
        if graphs is not None and len(num_scheduled) == sum(num_scheduled):
            bucket, limit = graphs.bucket_for(len(states)), graphs.max_seq_len
        inputs = self.buffers.prepare(states, num_scheduled, bucket, limit, self._last_sampled_rows)
        if inputs.pending_copy is not None:  # tokens sampled by the step still on the device
            assert self._last_sampled is not None
            sources, targets = inputs.pending_copy
            inputs.input_ids.index_copy_(0, targets, self._last_sampled.index_select(0, sources))
        md = inputs.attn_metadata
        stats = self.host_stats
        stats.num_steps += 1
        if graphs is not None and inputs.padded_to is not None:
            stats.num_graph_steps += 1
            stats.prepare_s += time.perf_counter() - start
            logits, argmax = graphs.replay(inputs.padded_to)  # [bucket, vocab], [bucket]
            return logits, argmax, inputs
        stats.prepare_s += time.perf_counter() - start
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, md)
        return self.model.compute_logits(hidden, md), None, inputs  # [num_logits, vocab]

    def _update_states(self, out: SchedulerOutput) -> None:
        assert self.buffers is not None, "initialize_kv_cache was not called"
        for rid in out.finished_request_ids:
            gone = self.requests.pop(rid, None)
            if gone is not None:
                self.buffers.remove(gone)
        for new in out.new_requests:
            params = new.sampling_params
            if new.request_id in self.requests:  # resent without a forget: drop the old copy
                self.buffers.remove(self.requests[new.request_id])
            state = RunnerRequestState(
                request_id=new.request_id,
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                sampling=RequestSamplingState(
                    params,
                    new.prompt_token_ids,
                    new.output_token_ids,
                    self._eos_token_id(),
                    self.vocab_size,
                    self.device,
                ),
                wants_prompt_logprobs=params.prompt_logprobs is not None,
            )
            state.plain_greedy = _is_plain_greedy(state.sampling)
            self.requests[new.request_id] = state
            self.buffers.add(state)
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            self.buffers.append(
                state, cached.new_token_ids, len(state.token_ids), cached.new_block_ids
            )
            state.num_pending -= len(cached.new_token_ids)
            if state.num_pending < 0:
                raise ValueError(
                    f"request {cached.request_id!r} got tokens its runner never sampled"
                )
            new_tokens = cached.new_token_ids
            state.token_ids.extend(new_tokens)
            seen = min(len(new_tokens), state.num_seen_ahead)  # already in the sampler history
            state.num_seen_ahead -= seen
            state.sampling.output_token_ids.extend(new_tokens[seen:])
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.config.model.hf_config, "eos_token_id", None)
        return eos[0] if isinstance(eos, list) and eos else eos

    def _sample(
        self, logits: torch.Tensor, argmax: torch.Tensor | None, inputs: StepInputs
    ) -> Callable[[], RunnerOutput]:
        """Sample on the device and start copying the results to the host (no wait). Returns the
        function that waits for the copies and builds the step's RunnerOutput."""
        ids = inputs.sampling_request_ids
        top: torch.Tensor | None = None
        logprob_tensors: LogprobsTensors | None = None
        wanted: list[int | None] = []
        if ids:
            sampling = [self.requests[rid] for rid in ids]
            behind = [
                st
                for st in sampling
                if st.num_pending > st.num_seen_ahead and st.sampling.needs_history
            ]
            if behind:
                self._read_previous_tokens(behind)
            plain = True
            for state in sampling:  # one pass: this runs for every request every step
                # outputs before this step's that only the device has
                state.sampling.num_unseen = state.num_pending - state.num_seen_ahead
                state.num_pending += 1
                plain = plain and state.plain_greedy
            rows = logits[: len(ids)]  # [num_sampled, vocab]
            if plain:  # argmax: no sampler metadata, no logprobs
                top = argmax[: len(ids)] if argmax is not None else argmax_rows(rows)  # [n]
            else:
                states = [s.sampling for s in sampling]
                metadata = SamplingMetadata.build(states, self.vocab_size, self.device)
                result = self.model.sample(rows, metadata)
                top, logprob_tensors = result.sampled_token_ids, result.logprobs  # [n]
                wanted = [s.params.logprobs for s in states]
            self._last_sampled = top
            self._last_sampled_rows = dict(zip(ids, range(len(ids))))
        prompt = self._prompt_logprob_tensors(logits, inputs)
        to_copy = [top, logprob_tensors, *(tensors for _, tensors, _ in prompt)]
        copies, copied = _to_host(to_copy)
        if ids:
            self._last_host = (self._last_sampled_rows, copies[0], copied)

        def finish() -> RunnerOutput:
            if copied is not None:
                copied.synchronize()
            host_top, host_logprobs, *host_prompt = copies
            sampled = dict(zip(ids, host_top.tolist())) if host_top is not None else {}
            logprobs: dict[str, TokenLogprobs] = {}
            if host_logprobs is not None:
                logprobs = _split_logprobs(host_logprobs, ids, wanted)
            prompt_logprobs = {
                rid: list(_rows_to_token_logprobs(tensors, [num_top] * len(tensors.ranks)))
                for (rid, _, num_top), tensors in zip(prompt, host_prompt)
            }
            return RunnerOutput(sampled, logprobs, prompt_logprobs)

        return finish

    def _read_previous_tokens(self, states: list[RunnerRequestState]) -> None:
        """Append the previous step's token, which the scheduler has not handed back yet, to the
        sampler history of requests whose samplers read token values. Waits for that step's
        copy to the host only: this step's forward is already queued behind it."""
        assert self._last_host is not None, "a pending token without a previous step"
        rows, host_top, copied = self._last_host
        if copied is not None:
            copied.synchronize()
        values = host_top.tolist()
        for state in states:
            row = rows.get(state.request_id)
            if row is None or state.num_pending - state.num_seen_ahead != 1:
                raise ValueError(
                    f"request {state.request_id!r} has {state.num_pending} pending tokens; only "
                    "the previous step's can be read ahead"
                )
            state.sampling.output_token_ids.append(values[row])
            state.num_seen_ahead += 1

    def _prompt_logprob_tensors(
        self, logits: torch.Tensor, inputs: StepInputs
    ) -> list[tuple[str, LogprobsTensors, int]]:
        out = []
        for rid, first_row, targets in inputs.prompt_logprob_rows:
            num_top = self.requests[rid].sampling.params.prompt_logprobs or 0
            rows = logits[first_row : first_row + len(targets)]
            target_ids = to_device(targets, logits.device, torch.long)  # [len(targets)]
            out.append((rid, compute_prompt_logprobs(rows, target_ids, num_top), num_top))
        return out

    def shutdown(self) -> None:
        self.requests.clear()
        self.graphs = None
        self.buffers = None
        self.kv_caches = []


def _profile_params():  # noqa: ANN202 - SamplingParams, imported lazily to keep the import light
    from paphos.sampling_params import SamplingParams

    return SamplingParams(temperature=0)


def _is_plain_greedy(state: RequestSamplingState) -> bool:
    """Greedy with nothing that could move the argmax and no logprobs: the sampled token is the
    argmax of the raw logits, so the shared Sampler (and its per-step metadata) can be skipped.
    Decided once per request (min_tokens requests always take the Sampler, which bans stops)."""
    p = state.params
    return (
        state.is_greedy
        and not state.samplers
        and not state.custom_bans
        and not state.bad_words
        and not p.logit_bias
        and p.allowed_token_ids is None
        and p.logprobs is None
        and (p.min_tokens == 0 or not state.min_tokens_bans)
    )


def _split_logprobs(
    tensors: LogprobsTensors, request_ids: list[str], wanted: list[int | None]
) -> dict[str, TokenLogprobs]:
    rows = _rows_to_token_logprobs(tensors, [w or 0 for w in wanted])
    return {rid: row for rid, want, row in zip(request_ids, wanted, rows) if want is not None}


def _to_host(
    items: list[torch.Tensor | LogprobsTensors | None],
) -> tuple[list[Any], torch.cuda.Event | None]:
    """Start non-blocking copies of device tensors into pinned host memory; returns the host
    copies (same structure) and an event recorded after them (None: nothing was on a GPU)."""
    on_device = any(_device_of(item) == "cuda" for item in items)
    if not on_device:
        return list(items), None

    def copy(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # [*t.shape]
        return host.copy_(t, non_blocking=True)

    copies: list[Any] = []
    for item in items:
        if isinstance(item, LogprobsTensors):
            copies.append(
                LogprobsTensors(copy(item.token_ids), copy(item.logprobs), copy(item.ranks))
            )
        else:
            copies.append(None if item is None else copy(item))
    event = torch.cuda.Event()
    event.record()
    return copies, event


def _device_of(item: torch.Tensor | LogprobsTensors | None) -> str | None:
    if item is None:
        return None
    tensor = item if isinstance(item, torch.Tensor) else item.token_ids
    return tensor.device.type


def _rows_to_token_logprobs(tensors: LogprobsTensors, num_top: list[int]):  # noqa: ANN202
    ids, values = tensors.token_ids.tolist(), tensors.logprobs.tolist()
    ranks = tensors.ranks.tolist()
    for i, n in enumerate(num_top):
        k = n + 1
        yield TokenLogprobs(tuple(ids[i][:k]), tuple(values[i][:k]), tuple(ranks[i][:k]))
