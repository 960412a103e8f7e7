"""compressed-tensors checkpoints of a tiny model, written by the format's own tools:
llmcompressor's `oneshot` (RTN via QuantizationModifier, or GPTQ) where it is installed, else the
`compressed-tensors` package itself (its quantization config, qparams from `calculate_qparams`
over min/max, its compressors and config writer: the same code llmcompressor calls to save).
Beside each, the same model with the weights compressed-tensors dequantizes them to.

llmcompressor pins transformers to an older release than paphos tests with, so it is not in the
`test` extra; CI writes the checkpoints the second way.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

W4_G32 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
FP8_TOKEN = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "token",
    "dynamic": True,
}
FP8_CHANNEL = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}


def fp8_block(rows: int, cols: int) -> dict:
    weights = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": "block",
        "block_structure": [rows, cols],
    }
    acts = FP8_TOKEN | {"strategy": "group", "group_size": cols}
    return {"weights": weights, "input_activations": acts}


SCHEMES = {
    "w4a16-g32-sym": {"weights": W4_G32},
    "w4a16-g32-asym": {"weights": W4_G32 | {"symmetric": False}},
    "w4a16-channel-asym": {
        "weights": W4_G32 | {"strategy": "channel", "group_size": None, "symmetric": False}
    },
    "w8a16-g32": {"weights": W4_G32 | {"num_bits": 8}},
    "w8a8-int8": {"weights": FP8_CHANNEL | {"type": "int"}, "input_activations": INT8_TOKEN},
    "fp8-dynamic": {"weights": FP8_CHANNEL, "input_activations": FP8_TOKEN},
    "fp8-tensor": {"weights": FP8_CHANNEL | {"strategy": "tensor"}, "input_activations": FP8_TOKEN},
    "fp8-block-128": fp8_block(128, 128),
    "fp8-block-32": fp8_block(32, 32),
}


def has_llmcompressor() -> bool:
    return importlib.util.find_spec("llmcompressor") is not None


def write_compressed(
    source: Path, target: Path, dense: Path, scheme: str, gptq: bool = False
) -> str:
    """target: `source` quantized by `scheme`; dense: the dequantized weights as a plain float
    checkpoint. Returns the tool that wrote it ('llmcompressor' or 'compressed-tensors')."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    group = {"targets": ["Linear"], **SCHEMES[scheme]}
    if has_llmcompressor():
        tool = "llmcompressor"
        _oneshot(model, source, group, gptq)
    else:
        if gptq:
            raise ValueError("GPTQ needs llmcompressor; the RTN schemes need compressed-tensors")
        tool = "compressed-tensors"
        _round_to_nearest(model, group)
    dense_state = _dequantized_state(model)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(str(target))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    _write_dense(source, dense, dense_state)
    return tool


def _oneshot(model, source: Path, group: dict, gptq: bool) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! How are you?"] * 4
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})
    modifier = GPTQModifier if gptq else QuantizationModifier
    recipe = modifier(config_groups={"group_0": group}, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe, dataset=dataset, num_calibration_samples=8)


def _round_to_nearest(model, group: dict) -> None:
    """What llmcompressor's QuantizationModifier does without calibration data: the config
    applied by compressed-tensors, each weight's qparams from its min/max per scale block."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    config = QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        low, high = _block_min_max(module.weight.data, scheme.weights)
        scale, zero = calculate_qparams(low, high, scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        module.quantization_status = QuantizationStatus.FROZEN


def _block_min_max(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of weight [out, in] per scale: [1], [out, 1], [out, groups], [rb, cb]."""
    out_features, in_features = weight.shape
    strategy = str(args.strategy.value if hasattr(args.strategy, "value") else args.strategy)
    if strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    if strategy == "group":
        grouped = weight.reshape(out_features, -1, args.group_size)
        return grouped.amin(2), grouped.amax(2)
    rows, cols = args.block_structure
    padded = torch.nn.functional.pad(weight, (0, -in_features % cols, 0, -out_features % rows))
    blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    # padding counts as zeros, which calculate_qparams includes anyway
    return blocks.amin((1, 3)), blocks.amax((1, 3))


def _dequantized_state(model) -> dict[str, torch.Tensor]:
    """The model's state with each quantized weight as compressed-tensors dequantizes it."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        weight = fake_quantize(
            module.weight.data,
            module.weight_scale.data,
            getattr(module, "weight_zero_point", None),
            scheme.weights,
        )
        state[f"{name}.weight"] = weight.clone()
    for name, tensor in model.state_dict().items():
        if name.endswith(".weight") and name not in state:
            state.setdefault(name, tensor.clone())
    return {k: v for k, v in state.items() if k.endswith(".weight")}


def _write_dense(source: Path, dense: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    shutil.copytree(source, dense)
    for f in dense.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(dense / "model.safetensors"))
    config = json.loads((dense / "config.json").read_text())
    config.pop("quantization_config", None)
    (dense / "config.json").write_text(json.dumps(config))


def write_compressed_moe(hf: torch.nn.Module, path: Path, scheme: str) -> torch.nn.Module:
    """`hf` (a transformers MoE) as a pack-quantized checkpoint in llm-compressor's MoE layout
    (tests/quant/moe_checkpoints.py): attention projections and each routed expert's projections
    quantized by compressed-tensors' own qparams and compressor, router (`mlp.gate`) and lm_head
    ignored; `hf` gets the compressor's own decompressed weights (the twin)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from moe_checkpoints import write_per_expert_moe

    args = QuantizationArgs(**SCHEMES[scheme]["weights"])
    qscheme = QuantizationScheme(targets=["Linear"], weights=args)

    def compress(prefix: str, weight: torch.Tensor):
        low, high = _block_min_max(weight, args)
        scale, zero = calculate_qparams(low, high, args)
        local = {"weight": weight, "weight_scale": scale}
        if not args.symmetric:
            local["weight_zero_point"] = zero
        packed = PackedQuantizationCompressor.compress(local, qscheme)
        return packed, PackedQuantizationCompressor.decompress(dict(packed), qscheme)["weight"]

    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], **SCHEMES[scheme]}},
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    return write_per_expert_moe(hf, path, compress, config)
