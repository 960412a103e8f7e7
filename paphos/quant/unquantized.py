"""Unquantized linear layers: one dense `weight` [output_per_partition, input_per_partition];
unquantized MoE experts: stacked dense `w13_weight` / `w2_weight`.

Invariant: the weight keeps the checkpoint layout (rows = output features); loading is a copy.
"""

from __future__ import annotations

import torch
from torch import nn

from paphos.ops import dense
from paphos.quant.base import set_weight_attrs


class UnquantizedLinearMethod:
    """Dense weights in `params_dtype`, applied with `F.linear`."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        output_size_per_partition = sum(output_partition_sizes)
        weight = nn.Parameter(
            # [output_size_per_partition, input_size_per_partition]
            torch.empty(output_size_per_partition, input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch_weight = getattr(layer, "batch_weight", None)
        return dense.linear(x, layer.weight, bias, batch_weight)  # [..., output_size_per_partition]

    def apply_silu_and_mul(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """silu_and_mul(apply(x)) for a [gate | up] layer: one kernel on CUDA (ops.dense)."""
        batch_weight = getattr(layer, "batch_weight", None)
        return dense.linear_silu_and_mul(x, layer.weight, bias, batch_weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Keep the copy of the weight that large CPU batches use, if any (ops.dense.batch_copy)."""
        copy = dense.batch_copy(layer.weight)
        if copy is not None:
            layer.register_buffer("batch_weight", copy, persistent=False)


class UnquantizedMoEMethod:
    """Dense stacked expert weights in `params_dtype`; the routed products by
    `ops.moe.fused_experts` (one product per active expert), the Triton kernel on CUDA."""

    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
    ) -> None:
        inter = intermediate_size_per_partition
        # [num_experts, 2 * inter, hidden]: gate rows, then up rows
        w13 = torch.empty(num_experts, 2 * inter, hidden_size, dtype=params_dtype)
        w2 = torch.empty(num_experts, hidden_size, inter, dtype=params_dtype)  # [E, hidden, inter]
        layer.register_parameter("w13_weight", nn.Parameter(w13, requires_grad=False))
        layer.register_parameter("w2_weight", nn.Parameter(w2, requires_grad=False))

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        experts = layer.fused_experts_op  # chosen once at construction (reference or Triton)
        return experts(
            x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, layer.activation,
            layer.w13_bias, layer.w2_bias if layer.adds_down_bias else None,
        )  # fmt: skip

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        return None
