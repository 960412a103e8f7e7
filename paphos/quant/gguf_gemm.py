"""GGUF parts for the dequant GEMM (CUDA): Q4_0/Q4_1/Q8_0 blocks repacked once at load into
ops.dequant_gemm's layout (the same bytes' worth: values, float scales and minimums), every
other part (float tensors, types the kernel does not read) dense rows on the device.

Invariant: `apply` equals gguf.reference_apply (the Triton kernel on CUDA; the same layout's
torch reference elsewhere, which is how the CPU tests run this path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from paphos.ops import dense, dequant_gemm
from paphos.ops.dequant_gemm import GroupWeights
from paphos.quant.base import register_weight_buffers

GEMM_TYPES = ("Q4_0", "Q4_1", "Q8_0")
Packed = list[tuple[int, int, GroupWeights | torch.Tensor]]  # (row_start, rows, weights)


def repack(
    layer: nn.Module, device: torch.device, dense_of: Callable[[object], torch.Tensor]
) -> Packed:
    """Each of the layer's parts on `device`; the CPU blocks are freed."""
    in_features = layer.gguf_shape[1]
    packed: Packed = []
    for part in layer.gguf_parts:
        data = getattr(layer, part.name)
        if part.ggml_type is not None and part.ggml_type.name in GEMM_TYPES:
            weights = dequant_gemm.from_gguf(data, part.ggml_type.name, in_features).to(device)
        else:
            weights = dense_of(part).to(device, layer.gguf_dtype)  # [rows, in]
        packed.append((part.row_start, part.rows, weights))
        tensors = weights.tensors() if isinstance(weights, GroupWeights) else {"dense": weights}
        register_weight_buffers(layer, part.name, tensors)
        setattr(layer, part.name, data.new_empty(0))
    return packed


def apply(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [num_tokens, in] -> [num_tokens, out] in x's dtype."""
    out = torch.empty(x.shape[0], layer.gguf_shape[0], dtype=x.dtype, device=x.device)
    for row_start, rows, weights in layer.gguf_group:
        y = out.narrow(1, row_start, rows)  # [num_tokens, rows]
        if isinstance(weights, GroupWeights):
            y.copy_(dequant_gemm.linear(x, weights, None))
        else:
            y.copy_(dense.linear(x, weights.to(x.dtype)))
    return out if bias is None else out + bias.to(x.dtype)


def embedding(layer: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` dequantized: [*ids.shape] -> [*ids.shape, in] in `dtype`. No boolean indexing
    (a host sync): each part's rows are gathered for clamped ids and kept where the id is
    inside the part, so the lookup can be captured in a CUDA graph."""
    flat = ids.reshape(-1)  # [num_ids]
    out = torch.zeros(flat.shape[0], layer.gguf_shape[1], dtype=dtype, device=ids.device)
    for row_start, rows, weights in layer.gguf_group:
        local = flat - row_start
        inside = ((local >= 0) & (local < rows)).unsqueeze(1)  # [num_ids, 1]
        picked = local.clamp(0, rows - 1)
        if isinstance(weights, GroupWeights):
            values = dequant_gemm.dequantize(_rows(weights, picked))  # [num_ids, in]
        else:
            values = weights.index_select(0, picked)
        out = torch.where(inside, values.to(dtype), out)
    return out.reshape(*ids.shape, -1)


def _rows(weights: GroupWeights, picked: torch.Tensor) -> GroupWeights:
    """Rows `picked` of a weight in the dequant GEMM's layout."""

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, picked)

    return GroupWeights(
        take(weights.q), take(weights.scale), weights.group, weights.bits,
        weights.zero_offset, take(weights.zero), take(weights.minimum),
    )  # fmt: skip
