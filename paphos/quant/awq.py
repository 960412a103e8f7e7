"""AWQ checkpoints (AutoAWQ's GEMM layout): 4-bit weights packed along the OUTPUT in int32 with
AWQ's column interleave, group-wise scales and zeros. Reference path: each call dequantizes tiles
of output columns and multiplies them with torch (CPU or GPU).

Layout (in = input features, out = output features, 8 columns per int32):
  qweight [in, out / 8] int32: column 8c + j of row i sits at bits 4 * INTERLEAVE[j] of
          qweight[i, c] (AutoAWQ packs columns in the order 0, 2, 4, 6, 1, 3, 5, 7)
  qzeros  [in / group, out / 8] int32, packed the same way; scales [in / group, out]
  W[o, i] = scales[i // group, o] * (q[i, o] - zero[i // group, o])   (no zero offset)
Invariant: shards cut rows (inputs, with their groups) or packed columns (outputs) whole.
"""

from __future__ import annotations

import torch
from torch import nn

from paphos.ops import dequant_gemm
from paphos.ops.dequant_gemm import GroupWeights, from_columns_packed
from paphos.quant.base import register_weight_buffers, set_weight_attrs

BITS, PACK = 4, 8
# bit position (in nibbles) of column j of a pack: the inverse of AutoAWQ's packing order
INTERLEAVE = (0, 4, 1, 5, 2, 6, 3, 7)
TILE_COLUMNS = 1024  # output columns dequantized per step of `apply`


class AWQLinearMethod:
    # a MoE layer builds one layer per routed expert with this method (layers.moe_experts)
    runs_experts = True

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

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
        group = input_size if self.group_size == -1 else self.group_size
        if out_pp % PACK or in_pp % group:
            raise ValueError(
                f"AWQ layer shard of in={in_pp}, out={out_pp} is not whole groups of {group} "
                f"and packs of {PACK} columns"
            )
        params = {
            "qweight": (torch.empty(in_pp, out_pp // PACK, dtype=torch.int32), PACK),
            "qzeros": (torch.empty(in_pp // group, out_pp // PACK, dtype=torch.int32), PACK),
            "scales": (torch.empty(in_pp // group, out_pp, dtype=params_dtype), 1),
        }
        for name, (data, factor) in params.items():
            param = nn.Parameter(data, requires_grad=False)
            attrs = {"input_dim": 0, "output_dim": 1}
            if factor > 1:
                attrs |= {"packed_dim": 1, "packed_factor": factor}
            set_weight_attrs(param, attrs)
            layer.register_parameter(name, param)
        layer.awq_group = group

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """On CUDA: repacked once for the Triton dequant GEMM (the packed copy replaces the
        checkpoint's)."""
        layer.group_gemm = None
        if layer.qweight.is_cuda and dequant_gemm.cuda_gemm_available(layer.awq_group):
            layer.group_gemm = self.group_weights(layer)
            register_weight_buffers(layer, "gemm", layer.group_gemm.tensors())
            for name in ("qweight", "qzeros"):
                getattr(layer, name).data = layer.scales.new_empty(0, dtype=torch.int32)

    def dequantize(self, layer: nn.Module, start: int, stop: int) -> torch.Tensor:
        """W.T columns [start, stop) (multiples of 8) in float32: [in_pp, stop - start]."""
        assert start % PACK == 0 and (stop - start) % PACK == 0
        shifts = torch.tensor(INTERLEAVE, dtype=torch.int32, device=layer.qweight.device) * BITS
        q = _unpack(layer.qweight.data[:, start // PACK : stop // PACK], shifts)  # [in_pp, cols]
        zeros = _unpack(layer.qzeros.data[:, start // PACK : stop // PACK], shifts)  # [g, cols]
        scales = layer.scales.data[:, start:stop].float()  # [groups, cols]
        groups = torch.arange(q.shape[0], device=q.device) // layer.awq_group  # [in_pp]
        return scales[groups] * (q - zeros[groups]).float()  # [in_pp, cols]

    def group_weights(self, layer: nn.Module) -> GroupWeights:
        """The weight in the dequant GEMM's layout (paphos.ops.dequant_gemm)."""
        shifts = torch.tensor(INTERLEAVE, dtype=torch.int32, device=layer.qweight.device) * BITS
        q = _unpack(layer.qweight.data, shifts)  # [in_pp, out_pp]
        zeros = _unpack(layer.qzeros.data, shifts)  # [groups, out_pp]
        return from_columns_packed(q, layer.scales.data.float(), zeros, layer.awq_group, BITS)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if getattr(layer, "group_gemm", None) is not None:  # CUDA: the Triton kernel
            return dequant_gemm.linear(x, layer.group_gemm, bias)  # [num_tokens, out_pp]
        out_pp = layer.scales.shape[1]
        x_fp32 = x.float()  # [num_tokens, in_pp]
        out = torch.empty(x.shape[0], out_pp, dtype=torch.float32, device=x.device)
        for start in range(0, out_pp, TILE_COLUMNS):
            stop = min(start + TILE_COLUMNS, out_pp)
            out[:, start:stop] = x_fp32 @ self.dequantize(layer, start, stop)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype)  # [num_tokens, out_pp]


def _unpack(packed: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """[rows, packs] int32 -> [rows, packs * 8] values, column j of each pack from its nibble."""
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, PACK)) & 0xF  # [rows, packs, 8]
    return values.reshape(packed.shape[0], -1)
