"""Normalization layers; with a residual each fuses the add that precedes it (returns the new
residual too): RMSNorm (Llama), RMSNorm with a zero-centred scale (Gemma: x * (1 + w)) and
LayerNorm (optionally without bias: Cohere, StableLM, Starcoder2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paphos.layers.weight_utils import copy_checked
from paphos.ops.registry import pick
from paphos.ops.rms_norm import rms_norm
from paphos.parallel import SINGLE_PROCESS, ParallelInfo, all_reduce
from paphos.quant import set_weight_attrs


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [hidden_size]
        self.eps = eps
        device_type = self.weight.device.type
        self._rms_norm = pick("rms_norm", device_type)
        self._fused_add_rms_norm = pick("fused_add_rms_norm", device_type)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps)
        return self._fused_add_rms_norm(x, residual, self.weight, self.eps)


class OffsetRMSNorm(nn.Module):
    """RMSNorm whose checkpoint weight w is stored zero-centred: the scale is 1 + w, applied in
    float32 before rounding (Gemma's order: (x * (1 + w)).to(dtype))."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))  # [hidden_size]
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)  # [num_tokens, hidden]
        out = (normed * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, x)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (weight, and bias unless `bias=False`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [hidden_size]
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None  # [hidden_size]
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), bias, self.eps)
        out = out.to(x.dtype)  # [num_tokens, hidden]
        return out if residual is None else (out, x)


class ProjectionRMSNorm(nn.Module):
    """RMSNorm over a whole q (or k) projection whose heads are split over ranks (OLMo 2): the
    mean of squares is all-reduced. `replicas` ranks hold each kv head when there are fewer kv
    heads than ranks; they count it once. The weight holds this rank's heads' slice."""

    def __init__(
        self,
        total_heads: int,
        local_heads: int,
        head_dim: int,
        eps: float,
        parallel: ParallelInfo = SINGLE_PROCESS,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        self.full_size, self.eps = total_heads * head_dim, eps
        self.parallel, self.replicas = parallel, replicas
        self.weight = nn.Parameter(torch.ones(local_heads * head_dim))  # [local_heads * head_dim]
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        source = self.parallel.rank // self.replicas
        copy_checked(param.data, loaded.narrow(0, source * size, size), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, local_heads * head_dim] -> the same shape."""
        if self.parallel.world_size == 1:
            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        squares = all_reduce(xf.pow(2).sum(-1, keepdim=True), self.parallel)  # [num_tokens, 1]
        variance = squares / (self.replicas * self.full_size)
        return (xf * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class HeadwiseLayerNorm(nn.Module):
    """LayerNorm (no bias) over each head with that head's own weight (StableLM's and Cohere's
    q/k norms): weight [local_heads, head_dim], this rank's heads (`replicas` ranks share each
    kv head when there are fewer kv heads than ranks). Loads a [total_heads, head_dim] tensor,
    or one head's [head_dim] weight with its head index as the shard id."""

    def __init__(
        self,
        local_heads: int,
        head_dim: int,
        eps: float,
        parallel: ParallelInfo = SINGLE_PROCESS,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.first_head = parallel.rank // replicas * local_heads  # this rank's first head
        self.weight = nn.Parameter(torch.ones(local_heads, head_dim))  # [local_heads, head_dim]
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None
    ) -> None:
        local = param.shape[0]
        what = type(self).__name__
        if shard_id is None:
            copy_checked(param.data, loaded.narrow(0, self.first_head, local), what)
        elif self.first_head <= shard_id < self.first_head + local:
            copy_checked(param.data[shard_id - self.first_head], loaded, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, local_heads * head_dim] -> the same shape."""
        heads = x.float().view(x.shape[0], -1, self.head_dim)  # [num_tokens, heads, head_dim]
        normed = F.layer_norm(heads, (self.head_dim,), None, None, self.eps)
        return (normed * self.weight.float()).to(x.dtype).view(x.shape)


class GatedRMSNorm(nn.Module):
    """RMSNorm gated by silu(z), in float32, over groups of `group_size` features (a group is a
    head or a Mamba2 group, so it never spans ranks). `norm_before_gate`: norm(x) * w * silu(z)
    (Gated DeltaNet); else norm(x * silu(z)) * w (Mamba2). `sharded`: the weight is split over
    ranks with the features (Mamba2's [intermediate]); else it is one group's, shared."""

    def __init__(
        self,
        size: int,
        group_size: int,
        eps: float,
        norm_before_gate: bool,
        parallel: ParallelInfo = SINGLE_PROCESS,
        sharded: bool = False,
    ) -> None:
        super().__init__()
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate
        self.parallel, self.sharded = parallel, sharded
        self.weight = nn.Parameter(torch.ones(size))  # [size]: this rank's features, or a group's
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if self.sharded:
            size = param.shape[0]
            loaded = loaded.narrow(0, self.parallel.rank * size, size)
        copy_checked(param.data, loaded, type(self).__name__)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: [num_tokens, features] -> the same shape, in x's dtype."""
        shape, dtype = x.shape, x.dtype
        xf, gate = x.float(), F.silu(z.float())
        if not self.norm_before_gate:
            xf = xf * gate
        groups = xf.view(*shape[:-1], -1, self.group_size)  # [num_tokens, groups, group_size]
        normed = F.rms_norm(groups, (self.group_size,), None, self.eps).view(shape)
        if self.weight.shape[0] == self.group_size:  # one group's weight, shared
            normed = (normed.view(groups.shape) * self.weight.float()).view(shape)
        else:
            normed = normed * self.weight.float()
        if self.norm_before_gate:
            normed = normed * gate
        return normed.to(dtype)
