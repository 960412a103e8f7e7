"""The transformers fallback: any decoder `*ForCausalLM` transformers builds (no remote code) runs
on paphos's scheduler, paged KV cache and sampler, with paphos's `Attention` registered as a
transformers attention implementation.

Invariant: each attention module of the HF model is one paphos `Attention` with its own KV-cache
slot (in the order the modules run); the step's caches and metadata reach it as a forward kwarg,
never as module state.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AttentionInterface

from paphos.attention import Attention, AttentionMetadata
from paphos.config import ModelConfig
from paphos.layers.linear import ColumnParallelLinear, RowParallelLinear
from paphos.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from paphos.layers.weight_utils import default_weight_loader
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "paphos"
STEP_KWARG = "paphos_step"  # the forward kwarg that carries a step's caches to the attention calls
LAYER_INDEX_ATTR = "paphos_layer_index"  # set on each HF attention module: its KV-cache slot
_PROBE_TOKENS = 3
# attention kwargs that change the result: HF's name -> paphos Attention's argument
_FEATURE_KWARGS = {"sliding_window": "sliding_window", "softcap": "logits_soft_cap"}
_OTHER_KWARGS = ("position_bias", "s_aux", "sinks")  # never applied by paged attention
_ATTENTION_TAKES = frozenset(inspect.signature(Attention.__init__).parameters)


@dataclass(frozen=True)
class PagedStep:
    """What one forward's attention calls need: layer i uses layers[i] and kv_caches[i]."""

    layers: nn.ModuleList
    kv_caches: list[torch.Tensor]
    attn_metadata: AttentionMetadata


@dataclass(frozen=True)
class AttentionCall:
    """One attention module as the probe saw it (heads per rank)."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    features: tuple[tuple[str, float], ...] = ()  # (Attention argument, value): window, soft-cap

    def build(self) -> Attention:
        return Attention(
            self.num_heads, self.head_size, self.scale, self.num_kv_heads, **dict(self.features)
        )


@dataclass
class _Probe:
    """Stands in for a `PagedStep` during one forward at build time: numbers the attention
    modules in the order they run and records their shapes, or the reason they cannot run."""

    arch: str
    calls: list[AttentionCall] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)

    def record(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        name = type(module).__name__
        if id(module) in self.seen:
            raise ValueError(
                f"{self.arch}: attention module {name} runs twice in one forward (shared "
                "attention layers), which the transformers fallback cannot give one KV cache"
            )
        passed = {
            k: kwargs[k] for k in (*_FEATURE_KWARGS, *_OTHER_KWARGS) if kwargs.get(k) is not None
        }
        unsupported = [k for k in passed if _FEATURE_KWARGS.get(k) not in _ATTENTION_TAKES]
        features = tuple((_FEATURE_KWARGS[k], v) for k, v in passed.items() if k not in unsupported)
        if attention_mask is not None or unsupported:
            what = ", ".join(unsupported) or "a custom attention mask (e.g. alibi)"
            raise ValueError(
                f"{self.arch}: {name} needs {what}, which paphos's paged attention does not "
                "apply: the transformers fallback cannot run this architecture"
            )
        _, num_heads, _, head_size = query.shape  # [1, num_heads, num_tokens, head_size]
        setattr(module, LAYER_INDEX_ATTR, len(self.calls))
        self.seen.add(id(module))
        scale = head_size**-0.5 if scaling is None else float(scaling)
        self.calls.append(AttentionCall(num_heads, key.shape[1], head_size, scale, features))
        return query.new_zeros(query.shape[0], query.shape[2], num_heads, head_size)


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, heads, tokens, head_size], key/value
    [1, kv_heads, tokens, head_size] -> ([1, tokens, heads, head_size], no weights)."""
    step = kwargs.pop(STEP_KWARG, None)
    if isinstance(step, _Probe):
        return step.record(module, query, key, attention_mask, scaling, kwargs), None
    if not isinstance(step, PagedStep):
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} runs only inside a paphos step "
            f"(the model was called without {STEP_KWARG}=)"
        )
    index = getattr(module, LAYER_INDEX_ATTR)
    layer = step.layers[index]
    num_tokens = query.shape[2]
    q = query[0].transpose(0, 1).reshape(num_tokens, -1)  # [num_tokens, heads * head_size]
    k = key[0].transpose(0, 1).reshape(num_tokens, -1)  # [num_tokens, kv_heads * head_size]
    v = value[0].transpose(0, 1).reshape(num_tokens, -1)  # [num_tokens, kv_heads * head_size]
    out = layer(q, k, v, step.kv_caches[index], step.attn_metadata)  # [tokens, heads * head]
    return out.view(1, num_tokens, layer.num_heads, layer.head_size), None


class _TokensLinear:
    """Mixin: HF calls linears on [batch, seq, in]; paphos's take [num_tokens, in]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x.reshape(-1, x.shape[-1]))  # type: ignore[misc]
        return out.view(*x.shape[:-1], out.shape[-1])  # [..., out_features (per rank)]


class _ColumnLinear(_TokensLinear, ColumnParallelLinear):
    pass


class _RowLinear(_TokensLinear, RowParallelLinear):
    pass


def shard_by_tp_plan(
    model: nn.Module, linear_method: LinearMethod | None, parallel: ParallelInfo
) -> int:
    """Replace the linears that the HF base model's `base_model_tp_plan` names "colwise" or
    "rowwise" by paphos's column/row-parallel ones; returns how many were replaced."""
    arch = type(model).__name__
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    if not plan:
        raise ValueError(
            f"{arch} has no base_model_tp_plan: the transformers fallback runs it only at "
            "tensor_parallel_size=1"
        )
    text = model.config.get_text_config()
    num_heads = getattr(text, "num_attention_heads", 0)
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    if num_heads % parallel.world_size or num_kv_heads % parallel.world_size:
        raise ValueError(
            f"{arch}: {num_heads} heads / {num_kv_heads} kv heads do not split over "
            f"{parallel.world_size} ranks; the transformers fallback does not replicate kv heads"
        )
    prefix = model.base_model_prefix
    styles = {f"{prefix}.{pattern}": style for pattern, style in plan.items()}
    replaced = 0
    for name, module in list(model.named_modules()):
        style = next((s for p, s in styles.items() if fnmatch.fnmatchcase(name, p)), None)
        if style is None:
            continue
        if style not in ("colwise", "rowwise") or not isinstance(module, nn.Linear):
            raise ValueError(
                f"{arch}: {name} is {style!r} in its tp plan ({type(module).__name__}); the "
                "transformers fallback shards only nn.Linear colwise/rowwise"
            )
        cls = _ColumnLinear if style == "colwise" else _RowLinear
        new = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            linear_method=linear_method,
            parallel=parallel,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced += 1
    return replaced


class TransformersForCausalLM(nn.Module):
    """transformers' `ForCausalLM` of `config.architecture` on the paphos model contract."""

    # Decode runs eager on CUDA: transformers' code may read values on the host or size tensors
    # by them (MoE routing's nonzero), which a captured graph cannot replay.
    supports_cuda_graphs = False

    def __init__(
        self,
        config: ModelConfig,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelInfo()
        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
        arch = config.architecture
        if linear_method is not None:
            raise ValueError(
                f"{arch}: quantized checkpoints ({type(linear_method).__name__}) are not run by "
                "the transformers fallback (its linears are transformers' own)"
            )
        hf_class = getattr(transformers, arch, None)
        if not isinstance(hf_class, type):
            raise ValueError(f"transformers {transformers.__version__} has no class {arch!r}")
        hf_config = copy.deepcopy(config.hf_config)  # transformers writes its choices into it
        try:
            self.model = hf_class._from_config(
                hf_config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.get_default_dtype()
            ).eval()
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"transformers cannot build {arch} with attention implementation "
                f"{ATTN_IMPLEMENTATION!r} (it does not dispatch through transformers' attention "
                f"interface): the transformers fallback cannot run it ({e})"
            ) from e
        if parallel.world_size > 1 and not shard_by_tp_plan(self.model, linear_method, parallel):
            logger.warning("%s: its tp plan matched no linear; every rank holds all weights", arch)
        self.takes_logits_to_keep = (
            "logits_to_keep" in inspect.signature(hf_class.forward).parameters
        )
        calls = self._probe(arch)
        self.attn_layers = nn.ModuleList(call.build() for call in calls)
        self.parallel = parallel
        self.sampler = Sampler()

    def _probe(self, arch: str) -> list[AttentionCall]:
        """One small forward that numbers the attention modules and reads their shapes."""
        probe = _Probe(arch)
        device = next(self.model.parameters()).device
        input_ids = torch.zeros(1, _PROBE_TOKENS, dtype=torch.long, device=device)
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, position_ids=_positions(input_ids[0]),
                           use_cache=False, **{STEP_KWARG: probe})  # fmt: skip
        except ValueError:
            raise  # the probe's own reasons
        except RuntimeError as e:
            if STEP_KWARG not in str(e):
                raise
            raise ValueError(
                f"{arch}'s layers do not pass their keyword arguments on to the attention "
                "function, so paged attention cannot get the step's KV caches: the transformers "
                "fallback cannot run it"
            ) from e
        except Exception as e:  # noqa: BLE001 - e.g. alibi models that need a mask tensor
            raise ValueError(
                f"{arch} did not run with paphos's attention (no mask, no cache): the "
                f"transformers fallback cannot run it ({type(e).__name__}: {e})"
            ) from e
        if not probe.calls:
            raise ValueError(
                f"{arch} never called transformers' attention interface (its attention is "
                "hard-coded): the transformers fallback cannot run it"
            )
        num_layers = getattr(self.model.config.get_text_config(), "num_hidden_layers", None)
        if num_layers is not None and len(probe.calls) < num_layers:
            raise ValueError(
                f"{arch}: {len(probe.calls)} of its {num_layers} layers attend; the others "
                "(state-space, convolution or linear-attention layers) need a per-request state "
                "cache, which the transformers fallback does not keep"
            )
        shapes = {(c.num_kv_heads, c.head_size) for c in probe.calls}
        if len(shapes) > 1:
            raise ValueError(
                f"{arch}: attention layers differ in (kv heads, head size) {sorted(shapes)}, "
                "which the KV cache does not hold yet"
            )
        return probe.calls

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns the logits of `attn_metadata.logits_indices` [num_logits, vocab] (float32):
        the HF head may scale or soft-cap them, so the HF model computes them here."""
        step = PagedStep(self.attn_layers, kv_caches, attn_metadata)
        keep = {"logits_to_keep": attn_metadata.logits_indices} if self.takes_logits_to_keep else {}
        out = self.model(
            input_ids=input_ids[None],  # [1, num_tokens]: one flat "sequence" of every request
            position_ids=positions[None],
            use_cache=False,
            **keep,
            **{STEP_KWARG: step},
        )
        logits = out.logits[0]  # [num_logits (or num_tokens), vocab_size]
        if not keep:
            logits = logits.index_select(0, attn_metadata.logits_indices)
        return logits.float()  # [num_logits, vocab_size]

    def compute_logits(
        self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        return hidden_states  # forward computed them (see forward)

    def sample(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata) -> SamplerOutput:
        return self.sampler(logits, sampling_metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names that are the HF model's own load through each parameter's
        weight_loader (sharded at TP > 1); a checkpoint in a layout transformers converts when
        loading (per-expert MoE weights stacked, renamed modules) goes through that conversion."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(self.model.named_buffers())  # persistent buffers live in checkpoints too
        prefix = self.model.base_model_prefix
        state = {}  # HF name -> tensor (still memory-mapped)
        for name, tensor in weights:
            target = name if name in params else f"{prefix}.{name}"
            state[target if target in params else name] = tensor
        foreign = [n for n in state if n not in params and not _is_buffer_name(n)]
        if foreign:
            return self._load_converted(state, foreign)
        loaded: set[str] = set()
        for name, tensor in state.items():
            param = params.get(name)
            if param is None:
                continue  # a buffer of old checkpoints
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(f"model.{name}")
        return loaded

    def _load_converted(self, state: dict[str, torch.Tensor], foreign: list[str]) -> set[str]:
        arch = type(self.model).__name__
        if self.parallel.world_size > 1:
            raise ValueError(
                f"{arch}: checkpoint names such as {foreign[0]!r} need transformers' conversion "
                "when loading, which the fallback applies only at tensor_parallel_size=1"
            )
        # transformers' own loader (internal API: version-dependent, hence imported here)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        anchor = next(self.model.parameters())
        config = LoadStateDictConfig(
            weight_mapping=get_model_conversion_mapping(self.model), dtype=anchor.dtype
        )
        with torch.no_grad():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        self.model.to(device=anchor.device, dtype=anchor.dtype)
        problems = sorted(info.unexpected_keys) + sorted(getattr(info, "mismatched_keys", []))
        if problems:
            raise ValueError(
                f"{arch}: transformers' conversion left checkpoint weights unplaced: {problems[:5]}"
            )
        names = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        return {f"model.{n}" for n in names - set(info.missing_keys)}


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[0], device=input_ids.device)[None]  # [1, num_tokens]


def _is_buffer_name(name: str) -> bool:
    """Names old checkpoints carry for buffers (rotary tables, causal masks)."""
    return name.endswith((".inv_freq", ".masked_bias", ".attn.bias", "attention.bias"))
