"""HF architecture name -> model class: built-ins imported lazily, out-of-tree ones registered.

`ModelRegistry` is paphos's one documented piece of process-wide mutable state (as in vLLM); every
class is checked against the model contract before it is handed out. Plugins run in every process.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import ClassVar

from torch import nn

from paphos.config import ModelConfig

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "paphos.plugins"
_CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_FORWARD_PARAMS = ("input_ids", "positions", "kv_caches", "attn_metadata")
_INIT_PARAMS = ("config", "linear_method", "parallel")
# Any decoder transformers can build, with paphos's paged attention (--model-impl transformers).
TRANSFORMERS_FALLBACK = "paphos.models.transformers_impl:TransformersForCausalLM"
_NUM_CLOSEST = 3

_BUILTIN_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "paphos.models.llama:LlamaForCausalLM",
    # the configurable decoder's families (paphos.models.decoder)
    "Qwen2ForCausalLM": "paphos.models.qwen:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "paphos.models.qwen:Qwen3ForCausalLM",
    "MistralForCausalLM": "paphos.models.mistral:MistralForCausalLM",
    "GemmaForCausalLM": "paphos.models.gemma:GemmaForCausalLM",
    "Gemma2ForCausalLM": "paphos.models.gemma:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "paphos.models.gemma:Gemma3ForCausalLM",
    "Gemma4ForCausalLM": "paphos.models.gemma4:Gemma4ForCausalLM",
    "GraniteForCausalLM": "paphos.models.granite:GraniteForCausalLM",
    "Olmo2ForCausalLM": "paphos.models.olmo:Olmo2ForCausalLM",
    "Olmo3ForCausalLM": "paphos.models.olmo:Olmo3ForCausalLM",
    "StableLmForCausalLM": "paphos.models.stablelm:StableLmForCausalLM",
    "Starcoder2ForCausalLM": "paphos.models.stablelm:Starcoder2ForCausalLM",
    "Glm4ForCausalLM": "paphos.models.glm4:Glm4ForCausalLM",
    "SmolLM3ForCausalLM": "paphos.models.smollm3:SmolLM3ForCausalLM",
    "CohereForCausalLM": "paphos.models.cohere:CohereForCausalLM",
    "Cohere2ForCausalLM": "paphos.models.cohere:Cohere2ForCausalLM",
    "Exaone4ForCausalLM": "paphos.models.exaone4:Exaone4ForCausalLM",
    "Ministral3ForCausalLM": "paphos.models.mistral:Ministral3ForCausalLM",
    # mixtures of experts on the configurable decoder (paphos.layers.moe)
    "MixtralForCausalLM": "paphos.models.mixtral:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "paphos.models.qwen:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "paphos.models.qwen:Qwen3MoeForCausalLM",
    "OlmoeForCausalLM": "paphos.models.olmo:OlmoeForCausalLM",
    "GraniteMoeForCausalLM": "paphos.models.granite:GraniteMoeForCausalLM",
    "Glm4MoeForCausalLM": "paphos.models.glm4:Glm4MoeForCausalLM",
    "MiniMaxM2ForCausalLM": "paphos.models.minimax_m2:MiniMaxM2ForCausalLM",
    "GptOssForCausalLM": "paphos.models.gpt_oss:GptOssForCausalLM",
    "Llama4ForCausalLM": "paphos.models.llama4:Llama4ForCausalLM",
    "DeepseekV2ForCausalLM": "paphos.models.deepseek:DeepseekV2ForCausalLM",  # latent attention
    "DeepseekV3ForCausalLM": "paphos.models.deepseek:DeepseekV3ForCausalLM",
    # GPT-style and Phi families (one contiguous block)
    "GPT2LMHeadModel": "paphos.models.gpt2:GPT2LMHeadModel",
    "GPTBigCodeForCausalLM": "paphos.models.gpt2:GPTBigCodeForCausalLM",
    "GPTNeoXForCausalLM": "paphos.models.gpt_neox:GPTNeoXForCausalLM",
    "GPTJForCausalLM": "paphos.models.gptj:GPTJForCausalLM",
    "OPTForCausalLM": "paphos.models.opt:OPTForCausalLM",
    "FalconForCausalLM": "paphos.models.falcon:FalconForCausalLM",
    "PhiForCausalLM": "paphos.models.phi:PhiForCausalLM",
    "Phi3ForCausalLM": "paphos.models.phi:Phi3ForCausalLM",
    # hybrids: attention beside recurrent-state layers (paphos.models.hybrid)
    "Mamba2ForCausalLM": "paphos.models.mamba2:Mamba2ForCausalLM",
    "Qwen3_5ForCausalLM": "paphos.models.qwen3_next:Qwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM": "paphos.models.qwen3_next:Qwen3_5MoeForCausalLM",
    # their multimodal checkpoints: the language model only
    "Qwen3_5ForConditionalGeneration": "paphos.models.qwen3_next:Qwen3_5ForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "paphos.models.qwen3_next:Qwen3_5MoeForCausalLM",
    "Qwen3NextForCausalLM": "paphos.models.qwen3_next:Qwen3NextForCausalLM",
    "NemotronHForCausalLM": "paphos.models.nemotron_h:NemotronHForCausalLM",
    "GraniteMoeHybridForCausalLM": "paphos.models.granite_moe_hybrid:GraniteMoeHybridForCausalLM",
}


def _parameters(func: object) -> list[inspect.Parameter] | None:
    """The parameters of `func` without `self`, or None if it is not an inspectable callable."""
    if not callable(func):
        return None
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[1:] if params and params[0].name == "self" else params


def _init_problems(cls: type) -> list[str]:
    """`cls(config, linear_method, parallel)` must work, by position or by name."""
    kind = inspect.Parameter
    params = None if cls.__init__ is nn.Module.__init__ else _parameters(cls.__init__)
    if params is None:
        return ["__init__ does not accept (config, linear_method, parallel)"]
    if any(p.kind == kind.VAR_POSITIONAL for p in params):
        return []
    positional = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name for p in params if p.kind != kind.POSITIONAL_ONLY}
    by_name = set(_INIT_PARAMS) <= keywords or any(p.kind == kind.VAR_KEYWORD for p in params)
    if not by_name and len(positional) < len(_INIT_PARAMS):
        return ["__init__ does not accept (config, linear_method, parallel)"]
    covered = set(_INIT_PARAMS) | {p.name for p in positional[: len(_INIT_PARAMS)]}
    required = [
        p.name
        for p in params
        if p.default is kind.empty and p.kind != kind.VAR_KEYWORD and p.name not in covered
    ]
    return [f"__init__ requires unexpected parameter {name!r}" for name in required]


def contract_problems(cls: object) -> list[str]:
    """What keeps `cls` from being a paphos model (empty when it follows the contract)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return ["it is not a torch.nn.Module subclass"]
    problems: list[str] = []
    forward = getattr(cls, "forward", None)
    forward_params = None if forward is nn.Module.forward else _parameters(forward)
    if forward_params is None:
        problems.append("missing forward(input_ids, positions, kv_caches, attn_metadata)")
    if _parameters(getattr(cls, "compute_logits", None)) is None:
        problems.append("missing compute_logits(hidden_states, attn_metadata)")
    if _parameters(getattr(cls, "load_weights", None)) is None:
        problems.append("missing load_weights(weights)")
    if forward_params is not None:
        names = {p.name for p in forward_params}
        problems += [f"forward() lacks parameter {n!r}" for n in _FORWARD_PARAMS if n not in names]
    return problems + _init_problems(cls)


def _contract_error(arch: str, cls: object, problems: list[str]) -> ValueError:
    return ValueError(
        f"cannot register {arch!r}: {cls!r} does not follow the paphos model contract: "
        + "; ".join(problems)
    )


class ModelRegistry:
    """Architecture name -> model class (or its lazy "module:Class" path). Class-level, explicit."""

    _models: ClassVar[dict[str, type | str]] = dict(_BUILTIN_MODELS)
    _plugins_loaded: ClassVar[bool] = False

    @classmethod
    def register_model(cls, arch: str, cls_or_path: type | str) -> None:
        """Serve `arch` with a class (checked now) or a "module:Class" path (checked on resolve)."""
        if not isinstance(arch, str) or not arch:
            raise ValueError(f"arch={arch!r} is invalid: expected a non-empty architecture name")
        if isinstance(cls_or_path, str):
            if not _CLASS_PATH.match(cls_or_path):
                raise ValueError(
                    f"cannot register {arch!r}: {cls_or_path!r} is not of the form 'module:Class'"
                )
        else:
            problems = contract_problems(cls_or_path)
            if problems:
                raise _contract_error(arch, cls_or_path, problems)
        if arch in cls._models:
            logger.warning("architecture %s was registered already; %s replaces it", arch,
                           cls_or_path)  # fmt: skip
        cls._models[arch] = cls_or_path

    @classmethod
    def supported_architectures(cls) -> list[str]:
        return sorted(cls._models)

    @classmethod
    def builtin_architectures(cls) -> list[str]:
        """paphos's own architectures, in registry order (what the README's table lists)."""
        return list(_BUILTIN_MODELS)

    @classmethod
    def is_supported(cls, arch: str) -> bool:
        return arch in cls._models

    @classmethod
    def resolve(cls, arch: str) -> type:
        """The model class of `arch`, imported (and checked) on first use."""
        entry = cls._models.get(arch)
        if entry is None:
            raise cls.unsupported_error(arch)
        if isinstance(entry, str):
            entry = _import_class(arch, entry)
            problems = contract_problems(entry)
            if problems:
                raise _contract_error(arch, entry, problems)
            cls._models[arch] = entry
        return entry

    @classmethod
    def unsupported_error(cls, arch: str, fallback_possible: bool = True) -> ValueError:
        """The error for an architecture paphos has no class for: the closest supported names,
        and the transformers fallback (when transformers could build it)."""
        supported = cls.supported_architectures()
        closest = difflib.get_close_matches(arch, supported, n=_NUM_CLOSEST, cutoff=0.0)
        hint = (
            "; or run transformers' implementation with paphos's paged attention: "
            "--model-impl transformers"
            if fallback_possible
            else "; transformers has no such architecture either"
        )
        return ValueError(
            f"architecture {arch!r} is not supported; closest supported: {', '.join(closest)}"
            f"{hint}; to add it, see docs/adding_a_model.md, or register an out-of-tree class "
            f"with ModelRegistry.register_model (all supported: {', '.join(supported)})"
        )

    @classmethod
    def resolve_for(cls, model_config: ModelConfig) -> type:
        """The class that serves `model_config` under its `model_impl`: paphos's own, the
        transformers fallback, or (auto) paphos's where registered, else the fallback."""
        arch, impl = model_config.architecture, model_config.model_impl
        if impl == "paphos" or (impl == "auto" and arch in cls._models):
            return cls.resolve(arch)
        if impl not in ("auto", "transformers"):
            raise ValueError(f"model_impl={impl!r} is invalid: expected auto/paphos/transformers")
        if not _transformers_has(arch):
            raise cls.unsupported_error(arch, fallback_possible=False)
        if impl == "auto":
            logger.info("%s has no paphos implementation: running transformers' (the fallback)",
                        arch)  # fmt: skip
        fallback = _import_class(arch, TRANSFORMERS_FALLBACK)
        problems = contract_problems(fallback)
        if problems:
            raise _contract_error(arch, fallback, problems)
        return fallback

    @classmethod
    def load_plugins(cls, group: str = PLUGIN_GROUP) -> list[str]:
        """Run each entry point of `group` once per process; returns the names run now."""
        if cls._plugins_loaded:
            return []
        names = []
        for entry_point in entry_points(group=group):
            plugin: Callable[[], object] = entry_point.load()
            if not callable(plugin):
                raise ValueError(
                    f"plugin {entry_point.name!r} ({entry_point.value}) is not callable"
                )
            plugin()
            names.append(entry_point.name)
            logger.info("loaded paphos plugin %s (%s)", entry_point.name, entry_point.value)
        cls._plugins_loaded = True  # only once all ran: a failed start-up may retry
        return names


def _import_class(arch: str, path: str) -> type:
    module_name, class_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {path!r} for architecture {arch!r}: {e}") from e
    found = getattr(module, class_name, None)
    if found is None:
        raise ValueError(f"cannot import {path!r} for architecture {arch!r}: no {class_name}")
    return found


def _transformers_has(arch: str) -> bool:
    """Whether transformers (imported here: the registry itself stays light) defines `arch`."""
    import transformers

    try:
        return isinstance(getattr(transformers, arch, None), type)
    except (ImportError, AttributeError, RuntimeError):  # a model whose optional deps are missing
        return False


def load_plugins() -> list[str]:
    """Run the `paphos.plugins` entry points (idempotent per process); call at every start-up."""
    return ModelRegistry.load_plugins()
