"""The Gated DeltaNet mixer (Qwen3.5 / Qwen3.6, Qwen3-Next): projections to q, k, v (through a
causal conv), the output gate z and the per-head b, a; the gated delta rule with per-request
state (beta = sigmoid(b), log decay g = -exp(A_log) * softplus(a + dt_bias)); a gated RMSNorm
with z per value head; out_proj.

Two checkpoint layouts: Qwen3.5's separate in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, and
Qwen3-Next's in_proj_qkvz / in_proj_ba, interleaved by key-head group ([q k v z] per group), so a
contiguous rank slice of them holds whole groups. State per request: the conv window over
[q | k | v] (model dtype) and the recurrent state [v_heads, k_head_dim, v_head_dim] (float32).
Tensor parallel: key heads (with their value heads) split over ranks; out_proj all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from paphos.attention import AttentionMetadata
from paphos.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from paphos.layers.norm import GatedRMSNorm
from paphos.layers.weight_utils import load_rank_parts
from paphos.ops.registry import pick
from paphos.parallel import ParallelInfo, divide
from paphos.quant import set_weight_attrs
from paphos.quant.base import LinearMethod


@dataclass(frozen=True)
class GatedDeltaNetSpec:
    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    eps: float
    layout: Literal["qwen3_5", "qwen3_next"] = "qwen3_5"
    chunk_size: int = 64


class GatedDeltaNet(nn.Module):
    def __init__(
        self, spec: GatedDeltaNetSpec, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> None:
        super().__init__()
        if spec.num_v_heads % spec.num_k_heads:
            raise ValueError(
                f"linear_num_value_heads={spec.num_v_heads} is not a multiple of "
                f"linear_num_key_heads={spec.num_k_heads}"
            )
        ws = parallel.world_size
        self.spec, self._rank, self._ws = spec, parallel.rank, ws
        self.num_k_heads = divide(spec.num_k_heads, ws, "linear attention key heads")
        self.num_v_heads = self.num_k_heads * (spec.num_v_heads // spec.num_k_heads)
        self.key_dim = self.num_k_heads * spec.head_k_dim  # this rank's
        self.value_dim = self.num_v_heads * spec.head_v_dim
        full_key, full_value = (
            spec.num_k_heads * spec.head_k_dim,
            spec.num_v_heads * spec.head_v_dim,
        )
        common = dict(linear_method=linear_method, parallel=parallel)
        hidden = spec.hidden_size
        if spec.layout == "qwen3_5":
            self.in_proj_qkv = MergedColumnParallelLinear(
                hidden, [full_key, full_key, full_value], False, **common
            )
            self.in_proj_z = ColumnParallelLinear(hidden, full_value, False, **common)
            self.in_proj_b = ColumnParallelLinear(hidden, spec.num_v_heads, False, **common)
            self.in_proj_a = ColumnParallelLinear(hidden, spec.num_v_heads, False, **common)
        else:
            self.in_proj_qkvz = ColumnParallelLinear(
                hidden, 2 * full_key + 2 * full_value, False, **common
            )
            self.in_proj_ba = ColumnParallelLinear(hidden, 2 * spec.num_v_heads, False, **common)
        self.conv_parts = [full_key, full_key, full_value]
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, spec.conv_kernel))  # [c, K]
        set_weight_attrs(self.conv_weight, {"weight_loader": self._load_conv})
        for name in ("dt_bias", "A_log"):
            param = nn.Parameter(torch.empty(self.num_v_heads))  # [local v heads]
            set_weight_attrs(param, {"weight_loader": self._load_per_head})
            setattr(self, name, param)
        self.norm = GatedRMSNorm(spec.head_v_dim, spec.head_v_dim, spec.eps, True, parallel)
        self.out_proj = RowParallelLinear(full_value, hidden, False, **common)
        device_type = self.conv_weight.device.type  # the kernels are picked once, here
        self._causal_conv1d = pick("causal_conv1d", device_type)
        self._gated_delta_rule = pick("gated_delta_rule", device_type)

    def _load_conv(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        loaded = loaded.reshape(loaded.shape[0], -1)  # checkpoint [conv_dim, 1, K]
        load_rank_parts(param, loaded, self.conv_parts, self._rank, self._ws, "DeltaNet conv1d")

    def _load_per_head(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        parts = [self.spec.num_v_heads]
        load_rank_parts(param, loaded, parts, self._rank, self._ws, "DeltaNet per-head")

    def state_shapes(self) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
        """Per slot: the conv window over [q | k | v] and the recurrent state."""
        spec = self.spec
        window = ((self.conv_dim, spec.conv_kernel - 1), self.conv_weight.dtype)
        return window, ((self.num_v_heads, spec.head_k_dim, spec.head_v_dim), torch.float32)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(qkv [T, conv_dim] in [q | k | v] order, z [T, value_dim], b, a [T, v_heads])."""
        if self.spec.layout == "qwen3_5":
            return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        num_tokens, spec = x.shape[0], self.spec
        per_group = spec.num_v_heads // spec.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(num_tokens, self.num_k_heads, -1)  # [T, groups, ...]
        dk, dv = spec.head_k_dim, per_group * spec.head_v_dim
        q, k, v, z = qkvz.split([dk, dk, dv, dv], dim=-1)
        b, a = self.in_proj_ba(x).view(num_tokens, self.num_k_heads, -1).split(per_group, dim=-1)
        qkv = torch.cat([t.reshape(num_tokens, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(num_tokens, -1), b.reshape(num_tokens, -1), a.reshape(num_tokens, -1)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        state_cache: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]; updates the rows' state slots."""
        conv_states, recurrent_states = state_cache
        md, spec = attn_metadata, self.spec
        assert md.state_indices is not None, "a Gated DeltaNet layer needs state_indices"
        has_initial = md.has_initial_state()  # [num_seqs]
        qkv, z, b, a = self._project(hidden_states)
        qkv = self._causal_conv1d(
            qkv, self.conv_weight, None, conv_states, md.query_start_loc, md.state_indices,
            has_initial, md.max_query_len, "silu",
        )  # fmt: skip
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        num_tokens = q.shape[0]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [T, Hv]
        out = self._gated_delta_rule(
            q.reshape(num_tokens, self.num_k_heads, spec.head_k_dim),
            k.reshape(num_tokens, self.num_k_heads, spec.head_k_dim),
            v.reshape(num_tokens, self.num_v_heads, spec.head_v_dim),
            g,
            b.float().sigmoid(),
            recurrent_states,
            md.query_start_loc,
            md.state_indices,
            has_initial,
            md.max_query_len,
            spec.chunk_size,
        )  # [num_tokens, v_heads, v_head_dim]
        out = self.norm(out.reshape(-1, spec.head_v_dim), z.reshape(-1, spec.head_v_dim))
        return self.out_proj(out.reshape(num_tokens, self.value_dim))
