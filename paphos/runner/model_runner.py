"""One rank's model runner: builds and loads the model, sizes and allocates the KV cache, runs.

It keeps a copy of every running request (tokens, blocks, sampling state), updated from each
`SchedulerOutput`, so that a step's message only carries what changed. On CUDA, pure-decode steps
replay a captured graph (unless enforce_eager); the host time from `execute` to the launch is
accumulated in `host_stats`. `execute_async` returns once the step is queued on the device (its
sampling and result copies: `runner/step_sampling.py`): the engine may schedule the next step
meanwhile, whose decode tokens the runner then takes from this step's device-side result. A
multi-step decode (`SchedulerOutput.num_steps` > 1) runs its decode steps back to back: between
them the inputs advance on the device (`InputBuffers.advance`), with no host round trip.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import torch

from paphos.attention import AttentionMetadata
from paphos.attention.layer import Attention
from paphos.config import EngineConfig, auto_device
from paphos.core.kv_cache_groups import KVCacheLayout, sliding_group_bound
from paphos.core.step_data import RunnerOutput, SchedulerOutput, StepHandle
from paphos.layers.moe import experts_format, moe_parameter_bytes
from paphos.layers.sampler import (
    RequestSamplingState,
)
from paphos.models.loader import load_model_weights
from paphos.models.registry import TRANSFORMERS_FALLBACK, ModelRegistry
from paphos.ops import dense
from paphos.ops.registry import describe_cpu_kernels
from paphos.parallel import ParallelInfo
from paphos.quant import create_linear_method
from paphos.runner.cpu_threads import ThreadGovernor, plan_threads
from paphos.runner.cuda_graph import MAX_SEQ_LEN_TO_CAPTURE, DecodeGraphs, batch_size_buckets
from paphos.runner.inputs import InputBuffers, RunnerRequestState, StepInputs, build_step_inputs
from paphos.runner.kv_cache import (
    FP8_CACHE_DTYPES,
    GiB,
    KVCacheSpec,
    allocate_kv_caches,
    describe_kv_cache_layout,
    kv_cache_budget,
    kv_cache_bytes,
    kv_cache_dtype,
    layout_with_blocks,
    plan_kv_cache_layout,
)
from paphos.runner.state_cache import (
    allocate_state_caches,
    cache_layout,
    interleave_caches,
    num_state_slots,
    state_cache_spec,
)
from paphos.runner.step_sampling import NextStep, StepSampling, is_plain_greedy
from paphos.sampling_params import SamplingParams
from paphos.structured.compiler import GrammarCompilerCache
from paphos.structured.matcher import GrammarState
from paphos.tokenizer import eos_token_ids, get_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights: parameters and weight buffers (packed blocks, fp32 copies),
    each storage counted once."""
    seen, total = set(), 0
    tensors = [t for _, t in model.named_parameters()]
    tensors += [t for name, t in model.named_buffers() if "weight" in name or "gguf_part" in name]
    for tensor in tensors:
        if tensor.is_mkldnn:  # an opaque prepacked copy: its own memory, no shareable storage
            total += tensor.numel() * tensor.element_size()
            continue
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def resolve_device(requested: str) -> torch.device:
    name = auto_device(requested)
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available: use device='cpu'")
    return torch.device(name)


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


def describe_weight_memory(model: torch.nn.Module) -> str:
    """Bytes of the parameters by dtype and of the batch copies kept for batched CPU products."""
    by_dtype: dict[str, int] = {}
    for param in model.parameters():
        name = str(param.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + param.numel() * param.element_size()
    copies = sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("batch_weight")
    )
    packed = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "gguf_part" in n)
    if packed:
        by_dtype["GGUF blocks"] = packed
    parts = ", ".join(
        f"{_size(size)} {name}" for name, size in sorted(by_dtype.items()) if size >= 2**20
    )
    if copies:
        parts += f", plus {_size(copies)} of batch copies (ops.dense.batch_copy)"
    return parts or "none"


def describe_model(
    config: EngineConfig, model_cls: type, dtype: torch.dtype, device: torch.device
) -> str:
    """The start-up line naming what runs: file, architecture, implementation (and its class
    where the name differs), dtype, quantization, device."""
    model = config.model
    fallback = model_cls.__module__ == TRANSFORMERS_FALLBACK.split(":")[0]
    impl = "transformers' implementation (fallback)" if fallback else "paphos's implementation"
    if model_cls.__name__ != model.architecture:
        impl += f" ({model_cls.__name__})"
    parts = [
        f"model {os.path.basename(model.model.rstrip(os.sep))}: {model.architecture}, {impl}",
        f"dtype {str(dtype).removeprefix('torch.')}",
        f"quantization {model.quant_method or 'none'}",
        f"device {device.type}",
    ]
    tp = config.parallel.tensor_parallel_size
    if tp > 1:
        parts.append(f"tensor parallel over {tp} ranks")
    return "; ".join(parts)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


@dataclass
class HostStats:
    """Host-side time per step, from `execute` entry to the launch of the model (or graph)."""

    num_steps: int = 0
    num_graph_steps: int = 0
    num_forwards: int = 0  # model runs: a multi-step decode runs several per step
    prepare_s: float = 0.0

    @property
    def mean_prepare_ms(self) -> float:
        return 1e3 * self.prepare_s / max(self.num_steps, 1)


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelInfo | None = None) -> None:
        self.config = config
        self.parallel = dataclasses.replace(
            parallel or ParallelInfo(), expert_parallel=config.parallel.enable_expert_parallel
        )
        self.device = resolve_device(config.runtime.device)
        self.dtype = resolve_dtype(config.model.dtype, config.model.hf_config, self.device)
        model_cls = ModelRegistry.resolve_for(config.model)
        if self.parallel.rank == 0:
            logger.info("%s", describe_model(config, model_cls, self.dtype, self.device))
        self.threads: ThreadGovernor | None = None
        if self.device.type == "cpu":
            runtime, p = config.runtime, self.parallel
            plan = plan_threads(runtime.num_threads, runtime.bind_cpu_threads, p.rank, p.world_size)
            self.threads = ThreadGovernor(plan)  # pins from the stepping thread, at its first step
            torch.set_num_threads(len(plan.cores))
            pinned = f"pinned to cores {list(plan.cores)}" if plan.bind else "not pinned"
            logger.info("%s; %d threads %s", describe_cpu_kernels(), len(plan.cores), pinned)
        self.block_size = config.cache.block_size
        self.model = self._load_model(model_cls)
        self.vocab_size = config.model.text_config.vocab_size
        # Hybrid models: the state layers' shapes and the pool's size (None: no state layers).
        self.state_spec = state_cache_spec(self.model)
        self.num_state_slots = None if self.state_spec is None else num_state_slots(config)
        self.cache_layout = cache_layout(self.model)
        self.kv_caches: list = []  # per cache-owning layer: KV tensor or state tuple
        self.requests: dict[str, RunnerRequestState] = {}
        self.buffers: InputBuffers | None = None
        self.graphs: DecodeGraphs | None = None
        self.host_stats = HostStats()
        self.step_sampling = StepSampling(self.model, self.vocab_size, self.device)
        self._grammars: GrammarCompilerCache | None = None  # built at the first constrained request

    def _load_model(self, model_cls: type) -> torch.nn.Module:
        linear_method = create_linear_method(
            self.config.model.quant_method, self.config.model.hf_config, self.device.type
        )
        if self.device.type == "cpu":
            dense.set_cpu_prepack(self.config.runtime.cpu_prepack_weights)
        start = time.perf_counter()
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_cls(self.config.model, linear_method, self.parallel)
        finally:
            torch.set_default_dtype(previous_dtype)
        seed = self.config.runtime.seed
        load_model_weights(model, self.config.model, seed, show_progress=self.parallel.rank == 0)
        sampler = getattr(model, "sampler", None)
        if sampler is not None:  # unseeded rows draw from the engine seed's generator: runs repeat
            sampler.generator = torch.Generator(self.device).manual_seed(seed)
        rank = f" on rank {self.parallel.rank}" if self.parallel.world_size > 1 else ""
        logger.info(
            "loaded %.2f GiB of weights%s in %.1f s (%s: %s)",
            weight_bytes(model) / 2**30,
            rank,
            time.perf_counter() - start,
            type(linear_method).__name__ if linear_method else "UnquantizedLinearMethod",
            describe_weight_memory(model),
        )
        scaled = [
            m for m in model.modules()
            if isinstance(m, Attention) and (m.k_scale, m.v_scale) != (1.0, 1.0)
        ]  # fmt: skip
        if scaled:
            fp8 = self.config.cache.kv_cache_dtype != "auto"
            logger.info(
                "KV cache scales from the checkpoint on %d attention layers (k %.3g-%.3g, "
                "v %.3g-%.3g): %s",
                len(scaled),
                min(m.k_scale for m in scaled),
                max(m.k_scale for m in scaled),
                min(m.v_scale for m in scaled),
                max(m.v_scale for m in scaled),
                "the fp8 cache uses them" if fp8 else "unused (--kv-cache-dtype fp8 uses them)",
            )
        moe_bytes = moe_parameter_bytes(model)
        if moe_bytes is not None:
            total, active = moe_bytes
            logger.info(
                "mixture of experts: %.1f MiB of parameters on rank %d, %.1f MiB of them read "
                "per token (the routed experts it chooses, all else); experts %s",
                total / 2**20,
                self.parallel.rank,
                active / 2**20,
                experts_format(model),
            )
        return model.eval()

    # ---- KV cache -------------------------------------------------------------------------------

    def attention_layers(self) -> list[torch.nn.Module]:
        """The model's attention layers; layer i uses kv_caches[i]."""
        return [m for m in self.model.modules() if type(m).__name__ == "Attention"]

    def kv_cache_spec(self) -> KVCacheSpec:
        """Every attention layer's cache (each describes its own, `cache_spec()`), in order; none
        for a pure state-space model (its blocks then only count tokens). A hybrid model's
        attention layers all stay in the full group (a sliding one keeps every block)."""
        layers = [m.cache_spec() for m in self.cache_layers()]
        dtype = kv_cache_dtype(self.config.cache.kv_cache_dtype, self.dtype)
        if dtype in FP8_CACHE_DTYPES.values() and self.device.type == "cuda":
            if any(layer.layout == "latent" for layer in layers):
                raise ValueError(
                    f"kv_cache_dtype={self.config.cache.kv_cache_dtype!r}: on CUDA fp8 caches "
                    "hold K/V layers only (the MLA kernels read the model's dtype); use "
                    "kv_cache_dtype='auto'"
                )
        spec = KVCacheSpec(block_size=self.block_size, dtype=dtype, layers=tuple(layers))
        return spec if self.state_spec is None else spec.without_windows()

    def cache_layers(self) -> list[torch.nn.Module]:
        """The layers that keep a KV cache (K/V or latent), in order: layer i uses kv_caches[i]."""
        return [m for m in self.model.modules() if hasattr(m, "cache_spec")]

    def state_cache_bytes(self) -> int:
        if self.state_spec is None or self.num_state_slots is None:
            return 0
        return (self.num_state_slots + 1) * self.state_spec.bytes_per_slot

    def determine_num_blocks(self) -> KVCacheLayout:
        """The KV cache groups and their block counts: num_blocks_override for the full group
        (and as many + 1, at most their bound, for sliding groups), or what fits the memory
        left on the device beside the state cache."""
        spec = self.kv_cache_spec()
        if self.parallel.rank == 0 and spec.num_layers:
            logger.info("%s", spec.describe())
        sched = self.config.scheduler
        bounds = {
            w: sliding_group_bound(
                w,
                self.block_size,
                sched.max_num_seqs,
                sched.max_num_batched_tokens,
                sched.num_scheduler_steps,
            )
            for w in spec.group_windows
            if w is not None
        }
        override = self.config.cache.num_blocks_override
        if spec.num_layers == 0:  # no KV bytes: enough blocks for every slot's longest sequence
            assert self.num_state_slots is not None
            model_len = self.config.model.max_model_len or self.config.model.model_max_len
            num_blocks = override or self.num_state_slots * -(-model_len // self.block_size)
            layout = KVCacheLayout.single(num_blocks)
        elif override is not None:  # the full group's count, exactly
            layout = layout_with_blocks(spec, override, bounds)
            budget = override * spec.bytes_per_block
        else:
            budget = kv_cache_budget(
                spec, self.config.cache, self.device, self._profile, self.state_cache_bytes()
            )
            layout = plan_kv_cache_layout(spec, budget, bounds)
        if spec.num_layers:
            logger.info("KV cache groups: %s", describe_kv_cache_layout(spec, layout, budget))
        if self.state_spec is not None:
            logger.info(
                "memory split on rank %d: state cache %d slots x %.3f MiB = %.3f GiB "
                "(%d state layers), KV cache %d blocks = %.3f GiB (%d attention layers)",
                self.parallel.rank,
                self.num_state_slots,
                self.state_spec.bytes_per_slot / 2**20,
                self.state_cache_bytes() / GiB,
                len(self.state_spec.layers),
                layout.num_blocks,
                kv_cache_bytes(spec, layout) / GiB,
                spec.num_layers,
            )
        return layout

    def _allocate_caches(
        self, spec: KVCacheSpec, num_blocks: int | KVCacheLayout, num_slots: int
    ) -> list:
        """The model's cache list: KV tensors and (hybrid models) state tuples, in layer order."""
        kv = allocate_kv_caches(spec, num_blocks, self.device) if spec.num_layers else []
        if self.state_spec is None:
            return kv
        states = allocate_state_caches(self.state_spec, num_slots, self.device)
        return interleave_caches(self.cache_layout, kv, states)

    def _profile(self) -> None:
        """One dummy step of max_num_batched_tokens, so the peak activation memory is measured."""
        num_tokens = min(
            self.config.scheduler.max_num_batched_tokens, self.config.model.model_max_len
        )
        spec = self.kv_cache_spec()
        num_blocks = -(-num_tokens // spec.block_size)
        caches = self._allocate_caches(spec, num_blocks, 1)
        sampling = RequestSamplingState(
            _profile_params(), [0] * num_tokens, [], None, self.vocab_size, self.device
        )
        state = RunnerRequestState(
            "__profile__", [0] * num_tokens, num_tokens, [list(range(num_blocks))], 0, sampling
        )
        slots = None
        if self.state_spec is not None:
            state.state_slot, slots = 0, 1
        with torch.inference_mode():
            inputs = build_step_inputs([state], [num_tokens], spec.block_size, self.device, slots)
            hidden = self.model(inputs.input_ids, inputs.positions, caches, inputs.attn_metadata)
            self.model.compute_logits(hidden, inputs.attn_metadata)
        del caches

    def initialize_kv_cache(self, layout: KVCacheLayout | int) -> None:
        """Allocate the cache (each layer bound to its group's tensors and tables) and the step
        buffers; on CUDA capture the decode graphs. An int: one group of that many blocks for
        every layer, sliding ones too (nothing freed: for callers that build block tables)."""
        spec = self.kv_cache_spec()
        if isinstance(layout, int):
            layout = KVCacheLayout.single(layout)
            spec = spec.without_windows()
        self.kv_caches = self._allocate_caches(spec, layout, self.num_state_slots or 0)
        for layer, group in zip(self.cache_layers(), spec.layer_groups(), strict=True):
            layer.kv_cache_group = group
        sched = self.config.scheduler
        buckets = batch_size_buckets(sched.max_num_seqs)
        max_model_len = self._max_model_len(layout)
        self.buffers = InputBuffers(
            max(sched.max_num_seqs, buckets[-1]),
            max(sched.max_num_batched_tokens, buckets[-1]),
            max_model_len,
            self.block_size,
            self.device,
            self.num_state_slots,
            tuple(g.sliding_window for g in layout.groups),
        )
        # a model class may opt out of graphs (the transformers fallback: HF code may sync)
        graphs_ok = getattr(self.model, "supports_cuda_graphs", True)
        if self.device.type == "cuda" and not self.config.runtime.enforce_eager and graphs_ok:
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

    def _max_model_len(self, layout: KVCacheLayout) -> int:
        """The longest sequence the engine can schedule: the model's (or the configured) length,
        capped by what the full-attention cache holds (the engine applies the same rule)."""
        requested = self.config.model.max_model_len or self.config.model.model_max_len
        capacity = layout.token_capacity(self.block_size)
        return max(1, requested if capacity is None else min(requested, capacity))

    # ---- steps ----------------------------------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Queue one step on the device; the handle's `result()` waits for it."""
        start = time.perf_counter()
        if self.threads is not None:
            self.threads.maybe_adjust()
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return StepHandle.done(RunnerOutput.empty())
        states = [self.requests[rid] for rid in scheduler_output.num_scheduled_tokens]
        num_scheduled = list(scheduler_output.num_scheduled_tokens.values())
        num_steps = scheduler_output.num_steps
        if num_steps > 1 and scheduler_output.total_num_scheduled_tokens != len(states):
            raise ValueError(f"a {num_steps}-step decode must compute one token per request")
        logits, argmax, inputs = self._run_model(states, num_scheduled, start, num_steps)
        if num_steps > 1 and len(inputs.sampling_request_ids) != len(states):
            raise ValueError(f"a {num_steps}-step decode must sample every request")
        next_step = self._next_decode_step(inputs) if num_steps > 1 else None
        finish = self.step_sampling.sample(
            self.requests, logits, argmax, inputs, num_steps, next_step
        )
        for state, n in zip(states, num_scheduled):
            state.num_computed_tokens += n if num_steps == 1 else num_steps
        return StepHandle(finish)

    def _next_decode_step(self, inputs: StepInputs) -> NextStep:
        """For a multi-step decode: the function that feeds one step's sampled ids [num_seqs]
        to the next decode step and runs it, returning its (logits, graph argmax or None)."""
        assert self.buffers is not None
        buffers, graphs, stats = self.buffers, self.graphs, self.host_stats
        metadata = inputs.attn_metadata

        def run(sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            nonlocal metadata
            stats.num_forwards += 1
            buffers.advance(inputs, sampled)
            if inputs.padded_to is not None and graphs is not None:
                return graphs.replay(inputs.padded_to)
            metadata = dataclasses.replace(metadata, max_seq_len=metadata.max_seq_len + 1)
            return self._forward(inputs, metadata), None

        return run

    def _run_model(
        self,
        states: list[RunnerRequestState],
        num_scheduled: list[int],
        start: float,
        num_steps: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None, StepInputs]:
        """Prepare the inputs and run the model: a graph replay for a pure-decode batch that fits
        a bucket (through all num_steps of a multi-step decode), eager otherwise. Returns logits
        [num_logits (or padded rows), vocab] and, from a graph, their argmax [padded rows]."""
        assert self.buffers is not None, "initialize_kv_cache was not called"
        graphs, bucket, limit = self.graphs, None, None
        if graphs is not None and len(num_scheduled) == sum(num_scheduled):
            bucket, limit = graphs.bucket_for(len(states)), graphs.max_seq_len - (num_steps - 1)
        last = self.step_sampling
        inputs = self.buffers.prepare(states, num_scheduled, bucket, limit, last.last_rows)
        if inputs.pending_copy is not None:  # tokens sampled by the step still on the device
            assert last.last_sampled is not None
            sources, targets = inputs.pending_copy
            inputs.input_ids.index_copy_(0, targets, last.last_sampled.index_select(0, sources))
        stats = self.host_stats
        stats.num_steps += 1
        stats.num_forwards += 1
        if graphs is not None and inputs.padded_to is not None:
            stats.num_graph_steps += 1
            stats.prepare_s += time.perf_counter() - start
            logits, argmax = graphs.replay(inputs.padded_to)  # [bucket, vocab], [bucket]
            return logits, argmax, inputs
        stats.prepare_s += time.perf_counter() - start
        return self._forward(inputs, inputs.attn_metadata), None, inputs

    def _forward(self, inputs: StepInputs, metadata: AttentionMetadata) -> torch.Tensor:
        """An eager model run over the inputs; returns logits [num_logits, vocab]."""
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
        return self.model.compute_logits(hidden, metadata)

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
                block_ids=[list(ids) for ids in new.block_ids],
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
                state_slot=new.state_slot,
            )
            if params.structured_outputs is not None:
                state.grammar = self._grammar_state(params)
            state.plain_greedy = is_plain_greedy(state.sampling) and state.grammar is None
            self.requests[new.request_id] = state
            self.buffers.add(state)
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            self.buffers.append(
                state, cached.new_token_ids, len(state.token_ids), cached.new_block_ids
            )
            for ids, new_ids in zip(state.block_ids, cached.new_block_ids):
                ids.extend(new_ids)
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
            state.num_computed_tokens = cached.num_computed_tokens

    def _grammar_state(self, params: SamplingParams) -> GrammarState:
        """A matcher for a constrained request: from the grammar the engine compiled, or (another
        process: grammars do not pickle) compiled here, through this runner's own cache."""
        spec = params.structured_outputs
        assert spec is not None
        compiled = params._grammar
        if compiled is None:
            if self._grammars is None:
                model_config = self.config.model
                tokenizer = get_tokenizer(model_config)
                stops = eos_token_ids(model_config, tokenizer)
                self._grammars = GrammarCompilerCache(tokenizer, self.vocab_size, stops)
            compiled = self._grammars.compile(spec)
        return GrammarState(compiled, spec.reasoning_end_token_id)

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.config.model.text_config, "eos_token_id", None)
        return eos[0] if isinstance(eos, list) and eos else eos

    def shutdown(self) -> None:
        if self.threads is not None:
            self.threads.release()
        self.requests.clear()
        self.graphs = None
        self.buffers = None
        self.kv_caches = []


def _profile_params():  # noqa: ANN202 - SamplingParams, imported lazily to keep the import light
    from paphos.sampling_params import SamplingParams

    return SamplingParams(temperature=0)
