"""GPTQ (AutoGPTQ v1 and gptqmodel v2 checkpoints): int4/int8 weights packed in int32, group-wise
scales and zeros, `g_idx` for act-order (desc_act). CPU/GPU reference path: each call dequantizes
tiles of output columns and multiplies them with torch.

Layout (in = input features, out = output features, pack = 32 // bits):
  qweight [in / pack, out] int32: q[i, o] = (qweight[i // pack, o] >> (bits * (i % pack))) & mask
  qzeros  [groups, out / pack] int32: z[g, o] likewise along o; v1 stores zero - 1 (so + 1 here)
  scales  [groups, out]: W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])
  g_idx   [in] int32: the group of each input feature (i // group_size without act-order)
Invariant: row-parallel shards cut qweight and g_idx along the input; scales/zeros follow their
groups, except with act-order, where a rank's inputs may belong to any group and they stay whole.
A fused layer (qkv, gate_up) keeps one g_idx: its parts share their input, and GPTQ's act-order
(the order of that input's Hessian diagonal) orders them alike.
"""

from __future__ import annotations

import torch
from torch import nn

from paphos.ops import dequant_gemm
from paphos.ops.dequant_gemm import GroupWeights, from_columns_packed
from paphos.quant.base import register_weight_buffers, set_weight_attrs

SUPPORTED_BITS = (4, 8)
TILE_COLUMNS = 1024  # output columns dequantized per step of `apply`


class GPTQLinearMethod:
    # a MoE layer builds one layer per routed expert with this method (layers.moe_experts)
    runs_experts = True

    def __init__(
        self, bits: int, group_size: int, desc_act: bool = False, zero_offset: int = 1
    ) -> None:
        """zero_offset: 1 for AutoGPTQ's v1 checkpoints (zeros stored minus one), 0 for v2."""
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits={bits} is not supported: expected one of {SUPPORTED_BITS}")
        self.bits, self.group_size, self.desc_act = bits, group_size, desc_act
        self.pack = 32 // bits
        self.zero_offset = zero_offset

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
        if in_pp % self.pack or out_pp % self.pack or input_size % group:
            raise ValueError(
                f"GPTQ {self.bits}-bit layer of in={in_pp}, out={out_pp} (group {group}) is not "
                f"whole packs of {self.pack} / groups"
            )
        # a row-parallel shard takes its groups' scales and zeros; with act-order (or one group)
        # its inputs may belong to any group, so every rank holds them all
        sharded_groups = in_pp != input_size and not (self.desc_act or self.group_size == -1)
        if sharded_groups and in_pp % group:
            raise ValueError(f"GPTQ shard of {in_pp} inputs is not whole groups of {group}")
        groups = in_pp // group if sharded_groups else input_size // group
        group_dim = 0 if sharded_groups else None
        params = {
            # [in_pp / pack, out_pp]
            "qweight": (torch.empty(in_pp // self.pack, out_pp, dtype=torch.int32), 0, 1, 1),
            # [groups, out_pp / pack]
            "qzeros": (
                torch.empty(groups, out_pp // self.pack, dtype=torch.int32),
                group_dim,
                1,
                self.pack,
            ),
            "scales": (torch.empty(groups, out_pp, dtype=params_dtype), group_dim, 1, 1),
            "g_idx": (torch.empty(in_pp, dtype=torch.int32), 0, None, 1),  # [in_pp]
        }
        for name, (data, input_dim, output_dim, out_factor) in params.items():
            param = nn.Parameter(data, requires_grad=False)
            attrs = {"input_dim": input_dim, "output_dim": output_dim}
            if out_factor > 1:
                attrs |= {"packed_dim": 1, "packed_factor": out_factor}
            set_weight_attrs(param, attrs)
            layer.register_parameter(name, param)
        layer.gptq_sharded_groups = sharded_groups

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """g_idx as local group indices (rows of this rank's scales), int64 for indexing."""
        g_idx = layer.g_idx.data.long()
        if layer.gptq_sharded_groups:
            g_idx = g_idx - g_idx.min()
        layer.register_buffer("gptq_groups", g_idx, persistent=False)  # [in_pp]
        layer.group_gemm = None
        group = g_idx.numel() if self.group_size == -1 else self.group_size
        if layer.qweight.is_cuda and dequant_gemm.cuda_gemm_available(group):
            layer.group_gemm = self.group_weights(layer)  # (weights, input order) or None
            if layer.group_gemm is not None:  # the packed copy replaces the checkpoint's
                register_weight_buffers(layer, "gemm", layer.group_gemm[0].tensors())
                for name in ("qweight", "qzeros"):
                    getattr(layer, name).data = layer.scales.new_empty(0, dtype=torch.int32)

    def unpacked(self, layer: nn.Module, start: int, stop: int):
        """Columns [start, stop) unpacked: (q [in_pp, cols] int32, zeros [groups, cols] int32
        with the v1 offset added, scales [groups, cols] float32)."""
        bits, pack, mask = self.bits, self.pack, (1 << self.bits) - 1
        qweight = layer.qweight.data[:, start:stop]  # [in_pp / pack, cols]
        shifts = torch.arange(pack, dtype=torch.int32, device=qweight.device) * bits  # [pack]
        # [in_pp / pack, pack, cols] -> [in_pp, cols]
        q = ((qweight.unsqueeze(1) >> shifts.view(1, pack, 1)) & mask).reshape(-1, stop - start)
        assert start % pack == 0 and (stop - start) % pack == 0
        qzeros = layer.qzeros.data[:, start // pack : stop // pack]  # [groups, cols / pack]
        # [groups, cols / pack, pack] -> [groups, cols]
        zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, pack)) & mask).reshape(
            qzeros.shape[0], -1
        )
        return q, zeros + self.zero_offset, layer.scales.data[:, start:stop].float()

    def dequantize(self, layer: nn.Module, start: int, stop: int) -> torch.Tensor:
        """W.T columns [start, stop) in float32: [in_pp, stop - start]."""
        q, zeros, scales = self.unpacked(layer, start, stop)
        groups = layer.gptq_groups  # [in_pp]
        return scales[groups] * (q.float() - zeros[groups].float())  # [in_pp, cols]

    def group_weights(self, layer: nn.Module) -> tuple[GroupWeights, torch.Tensor] | None:
        """(the weight in the dequant GEMM's layout, the input permutation it expects: act-order
        sorts the inputs by group), or None where a row-parallel shard's act-order groups are
        not whole (the reference path then runs)."""
        groups = layer.gptq_groups  # [in_pp]
        in_pp = groups.numel()
        group = in_pp if self.group_size == -1 else self.group_size
        perm = torch.argsort(groups, stable=True)  # [in_pp]
        first = int(groups[perm[0]])
        local = torch.arange(in_pp, device=groups.device) // group + first
        if in_pp % group or not torch.equal(groups[perm], local):
            return None
        q, zeros, scales = self.unpacked(layer, 0, layer.scales.shape[1])
        used = slice(first, first + in_pp // group)
        return from_columns_packed(q[perm], scales[used], zeros[used], group, self.bits), perm

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if getattr(layer, "group_gemm", None) is not None:  # CUDA: the Triton kernel
            weights, perm = layer.group_gemm
            return dequant_gemm.linear(x, weights, bias, perm)  # [num_tokens, out_pp]
        out_pp = layer.scales.shape[1]
        x_fp32 = x.float()  # [num_tokens, in_pp]
        out = torch.empty(x.shape[0], out_pp, dtype=torch.float32, device=x.device)
        for start in range(0, out_pp, TILE_COLUMNS):
            stop = min(start + TILE_COLUMNS, out_pp)
            out[:, start:stop] = x_fp32 @ self.dequantize(layer, start, stop)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype)  # [num_tokens, out_pp]
