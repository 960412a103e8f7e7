"""The Mamba2 mixer (Mamba2, NemotronH, Granite 4 hybrids): in_proj -> [z | x B C | dt], a causal
conv over x B C, the SSD scan with per-request state, a gated RMSNorm with z, out_proj.

State per request: the conv window [conv_dim, K - 1] (model dtype) and the SSM state [heads,
head_dim, state_size] (float32), in the slot `attn_metadata.state_indices` names. Tensor
parallel: heads and groups split over ranks (n_groups must divide by the world size), so each
rank keeps its own heads' state; out_proj all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paphos.attention import AttentionMetadata
from paphos.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from paphos.layers.norm import GatedRMSNorm
from paphos.layers.weight_utils import load_rank_parts
from paphos.ops.registry import pick
from paphos.parallel import ParallelInfo, divide
from paphos.quant import set_weight_attrs
from paphos.quant.base import LinearMethod


@dataclass(frozen=True)
class Mamba2Spec:
    hidden_size: int
    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int
    chunk_size: int
    eps: float
    use_conv_bias: bool = True
    use_bias: bool = False
    dt_limit: tuple[float, float] = (0.0, float("inf"))

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim


class Mamba2Mixer(nn.Module):
    def __init__(
        self, spec: Mamba2Spec, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> None:
        super().__init__()
        ws, rank = parallel.world_size, parallel.rank
        self.spec, self.parallel = spec, parallel
        inter, gn = spec.intermediate_size, spec.n_groups * spec.state_size
        self.num_heads = divide(spec.num_heads, ws, "Mamba2 heads")
        self.num_groups = divide(spec.n_groups, ws, "Mamba2 n_groups")
        self.inner = self.num_heads * spec.head_dim  # this rank's intermediate size
        self.group_dim = self.num_groups * spec.state_size
        common = dict(linear_method=linear_method, parallel=parallel)
        self.in_proj = MergedColumnParallelLinear(
            spec.hidden_size, [inter, inter, gn, gn, spec.num_heads], spec.use_bias, **common
        )  # [z | x | B | C | dt]
        self.conv_parts = [inter, gn, gn]
        self.conv_dim = self.inner + 2 * self.group_dim
        conv = nn.Parameter(torch.empty(self.conv_dim, spec.conv_kernel))  # [conv_dim, K]
        self.conv_weight = conv
        set_weight_attrs(conv, {"weight_loader": self._load_conv})
        self.conv_bias = None
        if spec.use_conv_bias:
            self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))  # [conv_dim]
            set_weight_attrs(self.conv_bias, {"weight_loader": self._load_conv})
        for name in ("dt_bias", "A_log", "D"):
            param = nn.Parameter(torch.empty(self.num_heads))  # [local heads]
            set_weight_attrs(param, {"weight_loader": self._load_per_head})
            setattr(self, name, param)
        group_size = inter // spec.n_groups
        self.norm = GatedRMSNorm(self.inner, group_size, spec.eps, False, parallel, sharded=True)
        self.out_proj = RowParallelLinear(inter, spec.hidden_size, spec.use_bias, **common)
        self._rank, self._ws = rank, ws
        device_type = self.conv_weight.device.type  # the kernels are picked once, here
        self._causal_conv1d, self._ssd = (
            pick("causal_conv1d", device_type),
            pick("ssd", device_type),
        )

    def _load_conv(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        # checkpoint conv1d.weight is [conv_dim, 1, K]; its bias [conv_dim]
        loaded = loaded.reshape(loaded.shape[0], -1).squeeze(-1)
        load_rank_parts(param, loaded, self.conv_parts, self._rank, self._ws, "Mamba2 conv1d")

    def _load_per_head(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        load_rank_parts(param, loaded, [self.spec.num_heads], self._rank, self._ws, "Mamba2 head")

    def state_shapes(self) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
        """Per slot: the conv window and the SSM state."""
        spec = self.spec
        window = ((self.conv_dim, spec.conv_kernel - 1), self.conv_weight.dtype)
        return window, ((self.num_heads, spec.head_dim, spec.state_size), torch.float32)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        state_cache: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]; updates the rows' state slots
        (positions are unused: the order of tokens is the state's)."""
        conv_states, ssm_states = state_cache
        md = attn_metadata
        assert md.state_indices is not None, "a Mamba2 layer needs state_indices"
        has_initial = md.has_initial_state()  # [num_seqs]
        projected = self.in_proj(hidden_states)  # [num_tokens, local in_proj size]
        z, xbc, dt = projected.split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        xbc = self._causal_conv1d(
            xbc, self.conv_weight, self.conv_bias, conv_states, md.query_start_loc,
            md.state_indices, has_initial, md.max_query_len, "silu",
        )  # fmt: skip
        x, B, C = xbc.split([self.inner, self.group_dim, self.group_dim], dim=-1)
        num_tokens, spec = x.shape[0], self.spec
        y = self._ssd(
            x.reshape(num_tokens, self.num_heads, spec.head_dim),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(num_tokens, self.num_groups, spec.state_size),
            C.reshape(num_tokens, self.num_groups, spec.state_size),
            self.D,
            self.dt_bias,
            ssm_states,
            md.query_start_loc,
            md.state_indices,
            has_initial,
            md.max_query_len,
            spec.chunk_size,
            spec.dt_limit,
        )  # [num_tokens, local heads, head_dim]
        y = self.norm(y.reshape(num_tokens, self.inner), z)
        return self.out_proj(y)
