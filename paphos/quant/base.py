"""The `LinearMethod` protocol: how a linear layer's weights are laid out, created and applied.

Invariant: a method creates every parameter on the layer and tags each with `input_dim` and
`output_dim` (the tensor dimension that follows the layer's input/output features, or None if none
does), so the layer's weight loader can cut each parameter's shard without knowing the format. A
parameter that stores several output features per element (GPTQ's qzeros) also has `packed_dim`
and `packed_factor`; one that stores its data its own way (GGUF blocks) has `store_slice` and
`logical_shape` (see layers/weight_utils.py).

A method may also have `apply_silu_and_mul(layer, x, bias)`: silu_and_mul(apply(layer, x, bias))
for a [gate | up] layer, in one kernel (UnquantizedLinearMethod's, on CUDA);
`MergedColumnParallelLinear.forward_silu_and_mul` uses it where it exists.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class LinearMethod(Protocol):
    """Strategy for one weight format (unquantized, int8, fp8, GPTQ, GGUF, ...)."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        """Register this rank's parameters on `layer`, each tagged with `input_dim`/`output_dim`."""
        ...

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [num_tokens, input_size_per_partition] -> [num_tokens, output_size_per_partition]."""
        ...

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack loaded weights into the layout `apply` uses (called once, after loading)."""
        ...


@runtime_checkable
class MoEMethod(Protocol):
    """Strategy for the stacked expert weights of a `FusedMoE` layer (paphos.layers.moe).

    `create_weights` registers `w13_weight` [num_experts, 2 * inter, hidden] ([gate | up] rows)
    and `w2_weight` [num_experts, hidden, inter] (this rank's experts and intermediate slice) in
    its own layout; `apply` computes the routed sum (ids of -1 contribute nothing)."""

    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
    ) -> None: ...

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden] (this rank's partial sum)."""
        ...

    def process_weights_after_loading(self, layer: nn.Module) -> None: ...


def set_weight_attrs(param: nn.Parameter, attrs: dict[str, Any]) -> None:
    """Attach loader metadata (`input_dim`, `output_dim`, `weight_loader`, ...) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise ValueError(f"parameter already has attribute {key!r}; refusing to overwrite it")
        setattr(param, key, value)


def register_weight_buffers(
    layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]
) -> None:
    """Keep a method's repacked tensors as (non-persistent) buffers named `{prefix}_weight_*`,
    so the runner's weight-memory count sees them (a storage shared with a parameter counts
    once)."""
    for name, tensor in tensors.items():
        layer.register_buffer(f"{prefix}_weight_{name}", tensor, persistent=False)
