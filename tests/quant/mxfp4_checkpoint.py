"""gpt-oss MXFP4 checkpoints written here from the format's description (the layout of the
released gpt-oss safetensors): each layer's experts as `mlp.experts.{gate_up,down}_proj_blocks`
[E, out, in / 32, 16] uint8 (two FP4 e2m1 values a byte, the lower input index in the low nibble)
and `_scales` [E, out, in / 32] uint8 (E8M0: 2^(s - 127)), gate and up rows interleaved as in
the bf16 tensors; `quantization_config: {quant_method: mxfp4, modules_to_not_convert}`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

FP4_VALUES = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]  # fmt: skip (gpt-oss-20b's list)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (blocks [..., out, in / 32, 16] uint8, scales [..., out, in / 32]
    uint8): per block of 32 inputs the smallest power of two that brings its largest magnitude
    within 6, then each value to its nearest FP4 value."""
    blocks = weight.float().unflatten(-1, (-1, 32))  # [..., out, G, 32]
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # [..., out, G, 1]
    scaled = blocks / torch.exp2(exponent)
    lut = torch.tensor(FP4_VALUES)  # [16]
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)  # [..., G, 32]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., out, G, 16]
    return packed, (exponent.squeeze(-1) + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' own dequantizer (integrations/mxfp4.py) in float32: [E, out, in / 32, 16]
    blocks -> [E, in, out] (its stacked experts' layout)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def write_mxfp4_gpt_oss(hf: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Replace `hf`'s saved checkpoint at `path` by an MXFP4 one (its experts quantized), and
    load the dequantized experts back into `hf`: the twin the checkpoint means."""
    state = {n: t.detach().contiguous() for n, t in hf.state_dict().items()}
    for name in [n for n in state if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        rows = state.pop(name).transpose(1, 2)  # [E, out, in]
        blocks, scales = quantize_mxfp4(rows)
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            hf.get_parameter(name).copy_(dequantize_mxfp4(blocks, scales))
    for old in path.glob("*.safetensors*"):
        old.unlink()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": NOT_CONVERTED,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return hf
