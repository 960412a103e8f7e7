"""Checkpoint reading: (HF name, tensor) pairs from safetensors, .bin or GGUF, and dummy weights.

Invariant: a model leaves `load_model_weights` with every parameter loaded, or it raises naming the
parameters the checkpoint did not provide.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from paphos.config import ModelConfig

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PT_INDEX = "pytorch_model.bin.index.json"
# .bin files that sit beside checkpoints but hold no weights.
_NON_WEIGHT_BINS = frozenset({"training_args.bin", "optimizer.bin", "scheduler.bin"})
_DUMMY_RANGE = 1e-3  # dummy weights ~ U(-1e-3, 1e-3): small enough that logits stay finite
_MAX_LISTED_NAMES = 20
PROGRESS_DELAY_S = 2.0  # the loading bar shows only for loads that take longer than this


def iterate_weights(model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every (HF name, CPU tensor) of the checkpoint, in the format `load_format` names."""
    load_format = resolve_load_format(model_config)
    if load_format == "gguf":
        assert model_config.gguf_file is not None
        # imported here: the gguf package is needed only for .gguf files (GPU hosts may lack it)
        from paphos.gguf_file import read_gguf_tensors

        keep_quantized = model_config.quant_method == "gguf"
        return read_gguf_tensors(model_config.gguf_file, keep_quantized=keep_quantized)
    if load_format == "safetensors":
        return _iterate_safetensors(_checkpoint_files(model_config.model, "*.safetensors"))
    return _iterate_pt(_checkpoint_files(model_config.model, "*.bin"))


def count_checkpoint_tensors(model_config: ModelConfig) -> int | None:
    """How many tensors `iterate_weights` yields (None for .bin files: only unpickling says)."""
    load_format = resolve_load_format(model_config)
    if load_format == "gguf":
        from paphos.gguf_file import ROPE_FREQS, read_gguf_metadata

        assert model_config.gguf_file is not None
        return sum(t.name != ROPE_FREQS for t in read_gguf_metadata(model_config.gguf_file).tensors)
    if load_format == "safetensors":
        total = 0
        for path in _checkpoint_files(model_config.model, "*.safetensors"):
            with safe_open(path, framework="pt", device="cpu") as f:  # reads the header only
                total += len(f.keys())
        return total
    return None


def resolve_load_format(model_config: ModelConfig) -> str:
    """The concrete format ("gguf", "safetensors", "pt") that `load_format` means for this model."""
    load_format, model = model_config.load_format, model_config.model
    if load_format == "dummy":
        raise ValueError("load_format='dummy' reads no checkpoint: use initialize_dummy_weights")
    if load_format == "gguf" or (load_format == "auto" and model_config.gguf_file):
        if not model_config.gguf_file:
            raise ValueError(f"load_format='gguf' but model {model!r} has no .gguf file")
        return "gguf"
    if load_format in ("safetensors", "pt"):
        return load_format
    if load_format != "auto":
        raise ValueError(
            f"load_format={load_format!r} is invalid: expected auto/safetensors/pt/gguf"
        )
    if _checkpoint_files(model, "*.safetensors", required=False):
        return "safetensors"
    if _checkpoint_files(model, "*.bin", required=False):
        return "pt"
    raise ValueError(f"{model!r} holds no weights (*.safetensors, *.bin or a .gguf file)")


def _checkpoint_files(model_dir: str, pattern: str, required: bool = True) -> list[str]:
    """Weight files of one format; an index file, when present, says which shards belong."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model {model_dir!r} is not a directory of checkpoint files")
    index_name = _SAFETENSORS_INDEX if pattern == "*.safetensors" else _PT_INDEX
    index_path = os.path.join(model_dir, index_name)
    if os.path.isfile(index_path):
        files = sorted({os.path.join(model_dir, f) for f in _read_weight_map(index_path).values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{index_path} names shards that do not exist: {missing}")
    else:
        files = sorted(glob.glob(os.path.join(model_dir, pattern)))
        files = [f for f in files if os.path.basename(f) not in _NON_WEIGHT_BINS]
    if required and not files:
        raise ValueError(f"{model_dir!r} holds no {pattern} weight files")
    return files


def _read_weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the weight map of {index_path}: {e}") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: weight_map={weight_map!r} is not a mapping")
    return weight_map


def _iterate_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:  # memory-mapped
            for name in f.keys():
                yield name, f.get_tensor(name)


def _iterate_pt(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises pickle/runtime errors of many kinds
            raise ValueError(f"cannot load weights from {path}: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor"
                )
            yield name, tensor
        del state


def load_model_weights(
    model: nn.Module, model_config: ModelConfig, seed: int = 0, show_progress: bool = False
) -> set[str]:
    """Fill every parameter from the checkpoint (or dummy values); return the names loaded.
    With `show_progress`, a bar over the checkpoint's tensors appears once loading has taken
    PROGRESS_DELAY_S (short loads print nothing)."""
    if model_config.load_format == "dummy":
        initialize_dummy_weights(model, seed)
        loaded = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    else:
        weights = iterate_weights(model_config)
        if show_progress:
            total = count_checkpoint_tensors(model_config)
            weights = tqdm(weights, total=total, desc="Loading weights", unit=" tensors",
                           delay=PROGRESS_DELAY_S)  # fmt: skip
        loaded = set(model.load_weights(weights))
        check_all_loaded(model, loaded)
    process_weights_after_loading(model)
    return loaded


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each layer (or its linear method) repack its weights once they are loaded."""
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
        elif hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    """Raise ValueError naming every parameter not loaded under any of its (tied) names."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    missing = sorted(
        names[0] for names in names_by_param.values() if not any(n in loaded for n in names)
    )
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED_NAMES])
        extra = len(missing) - _MAX_LISTED_NAMES
        more = f" (and {extra} more)" if extra > 0 else ""
        raise ValueError(f"the checkpoint did not provide {len(missing)} parameters: {shown}{more}")


def initialize_dummy_weights(model: nn.Module, seed: int) -> None:
    """Deterministic stand-in weights: norm scales 1, other floats ~ U(-1e-3, 1e-3).

    Values are drawn where each parameter lives, from one generator per device seeded with `seed`,
    in parameter order: a seed gives the same model on one device type (an 8B model fills in
    seconds on a GPU instead of minutes of CPU float32 draws). Integer parameters (packed quantized
    blocks) are left as created.
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            if _is_norm_scale(name, param):
                param.fill_(1.0)
                continue
            generator = generators.get(param.device)
            if generator is None:
                generator = torch.Generator(device=param.device).manual_seed(seed)
                generators[param.device] = generator
            param.uniform_(-_DUMMY_RANGE, _DUMMY_RANGE, generator=generator)


def _is_norm_scale(name: str, param: torch.Tensor) -> bool:
    parts = name.split(".")
    module_name = parts[-2] if len(parts) > 1 else ""
    return param.dim() == 1 and parts[-1] == "weight" and "norm" in module_name
