"""MoE checkpoints with per-expert quantized tensors, as llm-compressor, AutoGPTQ and AutoAWQ
write MoE models (Qwen3-30B-A3B, Mixtral): `mlp.experts.{e}.{gate,up,down}_proj.<tensors>`,
attention projections quantized alike, router and lm_head dense. The format's own quantizer
is given; the dequantized weights go back into the transformers model (the checkpoint's twin)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_awq import awq_quantize
from test_gptq import gptq_quantize

# (module prefix, weight [out, in]) -> (the format's tensors by suffix, dequantized [out, in])
Quantize = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def write_per_expert_moe(
    hf: torch.nn.Module, path: Path, quantize: Quantize, quantization_config: dict
) -> torch.nn.Module:
    """Replace `hf`'s checkpoint at `path` (a transformers MoE with stacked [E, out, in] experts:
    gate_up_proj [E, 2I, H], down_proj [E, H, I]) by the quantized one; returns `hf` holding the
    dequantized weights."""
    state: dict[str, torch.Tensor] = {}

    def add(prefix: str, weight: torch.Tensor) -> torch.Tensor:
        tensors, dequantized = quantize(prefix, weight.float().contiguous())
        state.update({f"{prefix}.{k}": v.contiguous() for k, v in tensors.items()})
        return dequantized

    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            tensor = tensor.detach()
            if name.endswith("_proj.weight") and ".self_attn." in name:
                hf.get_parameter(name).copy_(add(name.removesuffix(".weight"), tensor))
            elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                prefix, dense = name.rsplit(".", 1)[0], hf.get_parameter(name)
                for e in range(tensor.shape[0]):
                    if name.endswith(".down_proj"):
                        dense[e] = add(f"{prefix}.{e}.down_proj", tensor[e])
                        continue
                    gate, up = tensor[e].chunk(2)
                    gate = add(f"{prefix}.{e}.gate_proj", gate)
                    dense[e] = torch.cat([gate, add(f"{prefix}.{e}.up_proj", up)])
            else:
                state[name] = tensor.contiguous()
    for old in path.glob("*.safetensors*"):
        old.unlink()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return hf


def _gptq(prefix: str, weight: torch.Tensor):
    # act-order: layers of one input (q/k/v; an expert's gate/up) share its permutation, as
    # GPTQ's Hessian of that input orders them alike (a fused layer keeps one g_idx)
    for other, first in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
        prefix = prefix.replace(other, first)
    return gptq_quantize(weight, 4, 32, True, True, zlib.crc32(prefix.encode()))


QUANTIZERS = {
    "gptq": (_gptq, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                     "sym": False, "checkpoint_format": "gptq"}),
    "awq": (lambda prefix, weight: awq_quantize(weight, 32),
            {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
             "version": "gemm"}),
}  # fmt: skip
