"""Routed experts in a quantized format: one gate_up and one down linear layer per expert, built
with the format's own linear method (GPTQ, AWQ, compressed-tensors, GGUF, MXFP4, ...), so the
format's loader, shard cutting and dequantizer serve experts as they serve dense layers.

Invariant: a step runs each active expert's two products once over the rows routed to it
(ops.moe.routed_sum), so a decode step reads only the packed weights of the experts it chose.
On CUDA the experts are dequantized once after loading into FusedMoE's dense stacked layout and
run through the fused Triton kernel (no quantized fused MoE kernel yet; the per-expert loop syncs
with the host, which CUDA graphs cannot capture).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from paphos.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from paphos.ops.moe import routed_sum
from paphos.parallel import SINGLE_PROCESS, ParallelInfo
from paphos.quant import (
    LinearMethod,
    MoEMethod,
    UnquantizedMoEMethod,
    expert_linear_method,
    quantizes_activations,
)

logger = logging.getLogger(__name__)


def moe_method_for(linear_method: LinearMethod | None, device_type: str) -> MoEMethod:
    """The expert-weight method of a FusedMoE layer in a model whose layers use `linear_method`:
    dense stacked experts, or one quantized layer pair per expert (dequantized at load on CUDA)."""
    method = expert_linear_method(linear_method)
    if method is None:
        return UnquantizedMoEMethod()
    dequantize = device_type == "cuda"
    if dequantize and quantizes_activations(method):
        raise ValueError(
            f"{type(method).__name__} experts with quantized activations do not run on CUDA "
            "(experts there are dequantized at load, which would drop the activation "
            "quantization); use a weight-only checkpoint or run on CPU"
        )
    return PerExpertMoEMethod(method, dequantize_at_load=dequantize)


class ExpertProjections(nn.Module):
    """One routed expert: `gate_up_proj` ([gate | up], this rank's slice of each) and
    `down_proj` (its partial sum left unreduced: FusedMoE reduces once)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        linear_method: LinearMethod,
        parallel: ParallelInfo,
        params_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        inter = intermediate_size
        common = dict(linear_method=linear_method, parallel=parallel, params_dtype=params_dtype)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [inter, inter], **common)
        self.down_proj = RowParallelLinear(inter, hidden_size, reduce_results=False, **common)


class PerExpertMoEMethod:
    """FusedMoE's experts as `layer.experts[str(global expert id)]` (ExpertProjections), in the
    format of `expert_method`. `dequantize_at_load`: after loading, the dense stacked
    `w13_weight`/`w2_weight` replace them (UnquantizedMoEMethod's layout and kernels)."""

    def __init__(self, expert_method: LinearMethod, dequantize_at_load: bool = False) -> None:
        self.expert_method = expert_method
        self.dequantize_at_load = dequantize_at_load
        self.dense = UnquantizedMoEMethod()

    @property
    def format_name(self) -> str:
        return type(self.expert_method).__name__.removesuffix("LinearMethod")

    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
    ) -> None:
        # tensor parallel: every expert's intermediate dim sliced as the layers slice it;
        # expert parallel: whole experts
        parallel = SINGLE_PROCESS if layer.parallel.expert_parallel else layer.parallel
        inter = intermediate_size_per_partition * parallel.world_size  # the full size
        method = self.expert_method
        layer.experts = nn.ModuleDict(
            {
                str(layer.first_expert + local): ExpertProjections(
                    hidden_size, inter, method, parallel, params_dtype
                )
                for local in range(num_experts)
            }
        )

    def expert_param(self, part: str, expert: int, name: str) -> tuple[str, object]:
        """(parameter name under the FusedMoE layer, shard id) of checkpoint tensor `name`
        (`qweight`, `weight_packed`, `blocks`, ...) of one expert's part."""
        if part == "down":
            return f"experts.{expert}.down_proj.{name}", None
        shard = {"gate": 0, "up": 1, "gate_up": None}[part]
        return f"experts.{expert}.gate_up_proj.{name}", shard

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if "experts" not in layer._modules:  # dequantized at load
            return self.dense.apply(layer, x, topk_weights, topk_ids)
        experts = [
            layer.experts[str(layer.first_expert + i)] for i in range(layer.num_local_experts)
        ]

        def expert_mlp(local: int, rows: torch.Tensor) -> torch.Tensor:
            expert = experts[local]
            h = expert.gate_up_proj(rows)  # [n, 2 * inter per rank]
            if layer.w13_bias is not None:
                h = h + layer.w13_bias[local]
            y = expert.down_proj(layer.activation(h))  # [n, hidden] (partial)
            if layer.w2_bias is not None and layer.adds_down_bias:
                y = y + layer.w2_bias[local]
            return y

        num_local = layer.num_local_experts
        return routed_sum(x, topk_weights, topk_ids, num_local, layer.hidden_size, expert_mlp)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """With `dequantize_at_load`: each expert's layers finish loading (their method's own
        step), then their products of the identity (= the dequantized weight, each format's
        apply being dequantize-then-matmul) fill the dense stacked weights and the quantized
        experts are dropped. The loader visits a module before its children: dropped here, they
        are never visited."""
        if not self.dequantize_at_load or "experts" not in layer._modules:
            return
        w13, w2 = [], []
        for expert in layer.experts.values():
            for linear in (expert.gate_up_proj, expert.down_proj):
                linear.linear_method.process_weights_after_loading(linear)
            w13.append(_dense_weight(expert.gate_up_proj))  # [2 * inter, hidden]
            w2.append(_dense_weight(expert.down_proj))  # [hidden, inter]
        del layer.experts
        layer.w13_weight = nn.Parameter(torch.stack(w13), requires_grad=False)  # [E, 2I, H]
        layer.w2_weight = nn.Parameter(torch.stack(w2), requires_grad=False)  # [E, H, I]
        logger.info(
            "mixture of experts: %d %s experts dequantized at load (%s, %.1f MiB; no fused "
            "quantized MoE kernel on this device)",
            layer.num_local_experts,
            self.format_name,
            layer.w13_weight.device.type,
            layer.expert_bytes() / 2**20,
        )


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """[out, in] in the layer's dtype: its product of the identity, 1024 inputs at a time."""
    device = next(t.device for t in [*linear.parameters(), *linear.buffers()] if t.numel())
    num_inputs = getattr(linear, "input_size_per_partition", linear.input_size)
    columns = []
    for start in range(0, num_inputs, 1024):
        rows = min(1024, num_inputs - start)
        eye = torch.zeros(rows, num_inputs, dtype=linear.params_dtype, device=device)
        eye[:, start : start + rows] = torch.eye(rows, dtype=eye.dtype, device=device)
        columns.append(linear.linear_method.apply(linear, eye))  # [rows, out] = W.T rows
    return torch.cat(columns).T.contiguous()  # [out, in]
