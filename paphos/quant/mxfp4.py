"""MXFP4 weights (OCP microscaling FP4, as gpt-oss checkpoints store their routed experts):
FP4 e2m1 values packed two per byte, 32 values per block sharing one E8M0 scale 2^(s - 127).

Layout (out = output features of the rank, in = its input features, G = in / 32):
  blocks [out, G, 16] uint8: input 32 g + 2 b is the LOW nibble of blocks[o, g, b], input
         32 g + 2 b + 1 the high nibble; a nibble indexes FP4_VALUES (sign bit 3)
  scales [out, G] uint8:     W[o, 32 g + j] = FP4_VALUES[nibble] * 2^(scales[o, g] - 127)
(transformers' integrations/mxfp4.py `_convert_moe_packed_tensors` reads the same layout.)
Invariant: `apply` == x @ dequantize(layer).T; each call dequantizes tiles of rows, so a product
reads only this layer's blocks and no dense copy is kept. Shards cut rows, or whole blocks of
inputs (row-parallel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paphos.quant.base import set_weight_attrs
from paphos.quant.unquantized import UnquantizedLinearMethod

BLOCK = 32  # values per scale
FP4_VALUES = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
SCALE_BIAS = 127
TILE_BYTES = 4 << 20  # fp32 bytes of one dequantized tile of rows


def byte_values(device: torch.device | str = "cpu") -> torch.Tensor:
    """[256, 2] float32: the two FP4 values of each byte, low nibble first."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)  # [16]
    codes = torch.arange(256, device=device)  # [256]
    return torch.stack((lut[codes & 0x0F], lut[codes >> 4]), dim=-1)  # [256, 2]


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, pairs: torch.Tensor | None = None
) -> torch.Tensor:
    """blocks [rows, G, 16] uint8, scales [rows, G] uint8 -> float32 [rows, G * 32]. `pairs`:
    byte_values() on the blocks' device (one lookup per byte: ~3x fewer passes than a lookup per
    nibble, measured)."""
    pairs = byte_values(blocks.device) if pairs is None else pairs
    rows, groups, _ = blocks.shape
    values = F.embedding(blocks.reshape(rows, -1).long(), pairs)  # [rows, G * 16, 2]
    values = values.view(rows, groups, 2 * blocks.shape[2])  # [rows, G, 32]
    scale = torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1)  # [rows, G, 1]
    return (values * scale).flatten(-2)  # [rows, G * 32]


class MXFP4LinearMethod:
    """A linear layer whose weight is MXFP4 blocks (`blocks`, `scales`); reference product."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        in_pp, out_pp = input_size_per_partition, sum(output_partition_sizes)
        if in_pp % BLOCK:
            raise ValueError(
                f"MXFP4 layer shard of {in_pp} inputs is not whole blocks of {BLOCK}; use a "
                "tensor-parallel size that keeps them whole"
            )
        groups = in_pp // BLOCK
        params = {
            "blocks": torch.empty(out_pp, groups, BLOCK // 2, dtype=torch.uint8),  # [out, G, 16]
            "scales": torch.empty(out_pp, groups, dtype=torch.uint8),  # [out, G]
        }
        for name, data in params.items():
            param = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(param, {"input_dim": 1, "output_dim": 0})
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.mxfp4_pairs = byte_values(layer.blocks.device)  # [256, 2]: 2 KiB, shared lookup

    def dequantize_rows(self, layer: nn.Module, start: int, stop: int) -> torch.Tensor:
        """W rows [start, stop) in float32: [rows, in]."""
        blocks, scales = layer.blocks.data[start:stop], layer.scales.data[start:stop]
        return dequantize_mxfp4(blocks, scales, getattr(layer, "mxfp4_pairs", None))

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [num_tokens, in] -> [num_tokens, out] in x's dtype (fp32 products)."""
        out_pp, groups = layer.scales.shape
        tile_rows = max(16, TILE_BYTES // (4 * groups * BLOCK))
        x_fp32 = x.float()  # [num_tokens, in]
        out = torch.empty(x.shape[0], out_pp, dtype=torch.float32, device=x.device)
        for start in range(0, out_pp, tile_rows):
            stop = min(start + tile_rows, out_pp)
            out[:, start:stop] = x_fp32 @ self.dequantize_rows(layer, start, stop).T
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype)  # [num_tokens, out]


class MXFP4ExpertsLinearMethod(UnquantizedLinearMethod):
    """A `quant_method: mxfp4` checkpoint (gpt-oss): routed experts in MXFP4, every other linear
    (attention, router, LM head: its `modules_to_not_convert`) dense. Dense layers therefore take
    every dense fast path; FusedMoE asks `expert_linear_method` for its experts' format."""

    def expert_linear_method(self) -> MXFP4LinearMethod:
        return MXFP4LinearMethod()
