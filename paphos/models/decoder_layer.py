"""The configurable decoder's layer: attention, MLP and norms built from one `LayerSpec`
(paphos.models.decoder_spec). Layers pass (hidden, residual) on, as Llama's do: the residual
stream is their sum (a layer with a per-layer input or a scalar returns the whole stream and no
residual). A layer sharing another's KV cache has a query projection only and attends through
that layer's `Attention`. A plain pre-norm RMSNorm / gated-SiLU / full-rope layer also hands its
weights to the fused CPU decode (`fused_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paphos.attention import Attention, AttentionMetadata
from paphos.layers import cpu_decode
from paphos.layers.activation import activation, gated_activation
from paphos.layers.cpu_decode import DecoderLayerWeights
from paphos.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from paphos.layers.moe import FusedMoE
from paphos.layers.norm import (
    HeadwiseLayerNorm,
    LayerNorm,
    OffsetRMSNorm,
    ProjectionRMSNorm,
    RMSNorm,
)
from paphos.layers.rotary import RotaryEmbedding
from paphos.layers.weight_utils import copy_checked, narrow_checked
from paphos.models.decoder_mla import LatentDecoderAttention
from paphos.models.decoder_spec import LayerSpec, NormSpec
from paphos.parallel import ParallelInfo
from paphos.quant import set_weight_attrs
from paphos.quant.base import LinearMethod

Norm = RMSNorm | OffsetRMSNorm | LayerNorm


def make_norm(spec: NormSpec, size: int) -> Norm:
    if spec.kind == "rms":
        return RMSNorm(size, spec.eps)
    if spec.kind == "rms_offset":
        return OffsetRMSNorm(size, spec.eps)
    return LayerNorm(size, spec.eps, bias=spec.bias)


class DecoderMLP(nn.Module):
    def __init__(self, spec: LayerSpec, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, inter, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        common = dict(linear_method=linear_method, parallel=parallel)
        self.gated, self.is_silu = spec.gated, spec.hidden_act in ("silu", "swish")
        if spec.gated:
            self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias, **common)
            self.act = gated_activation(spec.hidden_act)
        else:
            self.up_proj = ColumnParallelLinear(hidden, inter, bias, **common)
            self.act = activation(spec.hidden_act)
        self.down_proj = RowParallelLinear(inter, hidden, bias, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.act(self.up_proj(x)))
        if self.is_silu:  # the product and SiLU-and-mul in one kernel where the method can
            return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x))
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderAttention(nn.Module):
    def __init__(
        self,
        spec: LayerSpec,
        rotary_emb: RotaryEmbedding | None,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ):
        super().__init__()
        head_dim = spec.head_dim
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, head_dim, spec.num_heads, spec.num_kv_heads, spec.qkv_bias,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            spec.num_heads * head_dim, spec.hidden_size, spec.o_bias,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        num_heads, num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.shares_kv = spec.kv_source is not None
        if self.shares_kv:  # the query alone: keys and values come from the source layer
            del self.qkv_proj
            self.q_proj = ColumnParallelLinear(
                spec.hidden_size, spec.num_heads * head_dim, spec.qkv_bias,
                linear_method=linear_method, parallel=parallel,
            )  # fmt: skip
        self.v_norm_eps = spec.norm.eps if spec.v_norm else None
        self.q_size, self.kv_size, self.head_dim = (
            num_heads * head_dim,
            num_kv_heads * head_dim,
            head_dim,
        )
        self.qk_norm = spec.qk_norm
        norm = spec.qk_norm_spec or spec.norm
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = make_norm(norm, head_dim), make_norm(norm, head_dim)
        elif spec.qk_norm == "headwise":
            replicas = self.qkv_proj.num_kv_head_replicas
            self.q_norm = HeadwiseLayerNorm(num_heads, head_dim, norm.eps, parallel)
            self.k_norm = HeadwiseLayerNorm(num_kv_heads, head_dim, norm.eps, parallel, replicas)
        elif spec.qk_norm == "projection":  # over all heads: a reduction across ranks under TP
            q_norm = ProjectionRMSNorm(spec.num_heads, num_heads, head_dim, norm.eps, parallel)
            self.q_norm = q_norm
            self.k_norm = ProjectionRMSNorm(
                spec.num_kv_heads, num_kv_heads, head_dim, norm.eps, parallel,
                replicas=self.qkv_proj.num_kv_head_replicas,
            )  # fmt: skip
        if self.shares_kv and spec.qk_norm is not None:
            del self.k_norm  # keys are normed in the source layer
        self.rotary_emb = rotary_emb  # shared by the layers with the same rope (no weights)
        self.attn_gate = None
        if spec.output_gate:
            self.attn_gate = ColumnParallelLinear(
                spec.hidden_size, spec.num_heads * head_dim, spec.qkv_bias,
                linear_method=linear_method, parallel=parallel,
            )  # fmt: skip
        self.position_query_scale = spec.position_query_scale
        self.position_query_offset = spec.position_query_offset
        self.clip_qkv = spec.clip_qkv
        self.norm_eps = norm.eps
        # A KV-sharing layer gets its source layer's Attention (share_kv_of), and its cache.
        self.attn = None if self.shares_kv else Attention(
            num_heads, head_dim, spec.attention_scale, num_kv_heads, rotary_emb=rotary_emb,
            sliding_window=spec.sliding_window, logits_soft_cap=spec.soft_cap,
            use_sinks=spec.sinks, chunk_size=spec.chunk_size,
        )  # fmt: skip
        self.sinks = None
        if spec.sinks:  # this rank's heads' sink logits
            self.sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False)
            self.parallel = parallel
            set_weight_attrs(self.sinks, {"weight_loader": self._load_sinks})

    def _l2_norm(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) per head, in float32: [num_tokens, heads * head_dim]."""
        heads = x.reshape(-1, self.head_dim).float()  # [num_tokens * heads, head_dim]
        return F.rms_norm(heads, (self.head_dim,), eps=self.norm_eps).to(x.dtype).view(x.shape)

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        what = "attention sinks"
        full = size * self.parallel.world_size
        part = narrow_checked(loaded, 0, self.parallel.rank * size, size, full, what)
        copy_checked(param.data, part, what)

    def share_kv_of(self, source: DecoderAttention) -> None:
        """Attend through the source layer's Attention (one module: one KV cache, one group)."""
        assert self.shares_kv and source.attn is not None
        attn = source.attn
        if (attn.num_heads, attn.head_size) != (self.q_size // self.head_dim, self.head_dim):
            raise ValueError(
                f"a KV-sharing layer of {self.q_size // self.head_dim} heads of {self.head_dim} "
                f"cannot attend through a layer of {attn.num_heads} heads of {attn.head_size}"
            )
        self.attn = attn

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        k = v = None
        if self.shares_kv:
            q = self.q_proj(hidden_states)  # [num_tokens, q_size]
        else:
            qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "head":
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)  # [num_tokens, q_size]
            if k is not None:
                k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)  # [tokens, kv_size]
        elif self.qk_norm == "l2":  # no weight; commutes with the rotation applied later
            q, k = self._l2_norm(q), None if k is None else self._l2_norm(k)
        elif self.qk_norm is not None:  # headwise or over the projection
            q, k = self.q_norm(q), None if k is None else self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q = q.clamp(-c, c)
            if k is not None:
                k, v = k.clamp(-c, c), v.clamp(-c, c)
        if v is not None:
            v = v.contiguous() if self.v_norm_eps is None else self._v_norm(v)
        if self.position_query_scale is not None:  # commutes with the rotation: applied first
            beta, n = self.position_query_scale
            shifted = positions.float() + self.position_query_offset
            scale = 1 + beta * torch.log1p(torch.floor(shifted / n))  # [num_tokens]
            q = q * scale.to(q.dtype)[:, None]
        extra = {} if self.rotary_emb is None else {"positions": positions}
        if self.sinks is not None:
            extra["sinks"] = self.sinks
        assert self.attn is not None, "a KV-sharing layer was never linked to its source"
        out = self.attn(q, k, v, kv_cache, attn_metadata, **extra)
        if self.attn_gate is not None:
            out = out * torch.sigmoid(self.attn_gate(hidden_states))
        return self.o_proj(out)

    def _v_norm(self, v: torch.Tensor) -> torch.Tensor:
        """RMS of each value head to 1 (no weight), in float32: [num_tokens, kv_size]."""
        heads = v.reshape(-1, self.head_dim).float()  # [num_tokens * kv_heads, head_dim]
        normed = F.rms_norm(heads, (self.head_dim,), None, self.v_norm_eps)
        return normed.to(v.dtype).view(v.shape)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        spec: LayerSpec,
        rotary_emb: RotaryEmbedding | None,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ):
        super().__init__()
        self.spec = spec
        attention = DecoderAttention if spec.latent is None else LatentDecoderAttention
        self.self_attn = attention(spec, rotary_emb, linear_method, parallel)
        self.mlp: DecoderMLP | FusedMoE
        if spec.moe is None:
            self.mlp = DecoderMLP(spec, linear_method, parallel)
        else:
            self.mlp = FusedMoE(spec.hidden_size, spec.moe, linear_method, parallel)
        self.norm_names = spec.norm_names()  # role -> attribute (the checkpoint's name)
        for name in self.norm_names.values():
            setattr(self, name, make_norm(spec.norm, spec.hidden_size))
        if spec.per_layer_input_size:  # checkpoint names: Gemma 4's
            size, common = spec.per_layer_input_size, dict(linear_method=linear_method)
            self.per_layer_input_gate = ReplicatedLinear(spec.hidden_size, size, **common)
            self.per_layer_projection = ReplicatedLinear(size, spec.hidden_size, **common)
            self.post_per_layer_input_norm = make_norm(spec.norm, spec.hidden_size)
            self.per_layer_act = activation(spec.hidden_act)
        if spec.layer_scalar:
            self.layer_scalar = nn.Parameter(torch.ones(1))  # [1]

    def _norm(self, role: str) -> Norm | None:
        name = self.norm_names.get(role)
        return None if name is None else getattr(self, name)

    def _add_and_norm(
        self, role: str, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normed stream, the stream x + residual); no norm in this role: both the stream."""
        norm = self._norm(role)
        if residual is None:
            return (x if norm is None else norm(x)), x
        if norm is None:
            stream = x + residual
            return stream, stream
        return norm(x, residual)

    def _finish_branch(self, role: str, out: torch.Tensor) -> torch.Tensor:
        norm = self._norm(role)
        out = out if norm is None else norm(out)
        m = self.spec.residual_multiplier
        return out if m == 1.0 else out * m

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        per_layer_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, residual) in and out: the stream after this layer is their sum (residual
        None: hidden is the stream). per_layer_input: [num_tokens, per_layer_input_size]."""
        x, stream = self._add_and_norm("pre_attn", hidden_states, residual)
        attn_out = self.self_attn(positions, x, kv_cache, attn_metadata)
        if self.spec.parallel_block:  # attention and MLP both read the pre-attention norm
            out = attn_out + self.mlp(x)
            return self._finish_branch("post_mlp", out), stream
        attn_out = self._finish_branch("post_attn", attn_out)
        x, stream = self._add_and_norm("pre_mlp", attn_out, stream)
        out = self._finish_branch("post_mlp", self.mlp(x))
        if not (self.spec.per_layer_input_size or self.spec.layer_scalar):
            return out, stream
        stream = out + stream
        if self.spec.per_layer_input_size:
            if per_layer_input is None:
                raise ValueError("this layer takes a per-layer input: pass per_layer_input=")
            gate = self.per_layer_act(self.per_layer_input_gate(stream)) * per_layer_input
            stream = stream + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        if self.spec.layer_scalar:
            stream = stream * self.layer_scalar
        return stream, None

    def fused_unfit_reason(self) -> str | None:
        """Why the fused CPU decode kernel cannot run this layer, in plain words (None: it can:
        a pre-norm RMSNorm / gated-SiLU / full-rope layer with dense weights)."""
        spec, attn, mlp = self.spec, self.self_attn, self.mlp
        if not isinstance(mlp, DecoderMLP):
            return "it has a mixture-of-experts MLP, which the fused kernel does not compute"
        if spec.kv_source is not None:
            return "it attends to another layer's keys and values, which the fused kernel cannot"
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj if spec.gated else None)
        quantized = cpu_decode.quantized_reason((*linears, mlp.down_proj))
        if quantized is not None:
            return quantized
        rope = spec.rope
        features = {
            f"{spec.norm.kind} norms": spec.norm.kind != "rms",
            f"norms {sorted(self.norm_names)}": set(self.norm_names) != {"pre_attn", "pre_mlp"},
            "a parallel attention + MLP block": spec.parallel_block,
            "q/k norms": spec.qk_norm is not None,
            "an ungated or non-SiLU MLP": not (spec.gated and mlp.is_silu),
            "partial or no rotary embedding": rope is None or rope.rotary_dim != spec.head_dim,
            "a sliding window": spec.sliding_window is not None,
            "chunked attention": spec.chunk_size is not None,
            "attention soft-capping": spec.soft_cap is not None,
            "attention sinks": spec.sinks,
            "a residual multiplier": spec.residual_multiplier != 1.0,
            "position-scaled queries": spec.position_query_scale is not None,
            "q/k/v clipping": spec.clip_qkv is not None,
            "a gated attention output": spec.output_gate,
            "multi-head latent attention": spec.latent is not None,
            "value norms": spec.v_norm,
            "per-layer inputs": spec.per_layer_input_size > 0,
            "a layer scalar": spec.layer_scalar,
        }
        found = [name for name, present in features.items() if present]
        if found:
            return f"it has {', '.join(found)}, which the fused kernel does not compute"
        return None

    def fused_weights(self) -> DecoderLayerWeights | None:
        """This layer for the fused CPU decode kernel; None where `fused_unfit_reason` says why
        not."""
        if self.fused_unfit_reason() is not None:
            return None
        attn, mlp = self.self_attn, self.mlp
        assert attn.rotary_emb is not None
        pre_attn, pre_mlp = self._norm("pre_attn"), self._norm("pre_mlp")
        return DecoderLayerWeights(
            input_norm=pre_attn.weight.data,
            input_eps=pre_attn.eps,
            qkv=cpu_decode.fused_weight(attn.qkv_proj),
            qkv_bias=_data(attn.qkv_proj.bias),
            o=cpu_decode.fused_weight(attn.o_proj),
            o_bias=_data(attn.o_proj.bias),
            post_norm=pre_mlp.weight.data,
            post_eps=pre_mlp.eps,
            gate_up=cpu_decode.fused_weight(mlp.gate_up_proj),
            gate_up_bias=_data(mlp.gate_up_proj.bias),
            down=cpu_decode.fused_weight(mlp.down_proj),
            down_bias=_data(mlp.down_proj.bias),
            cos_sin_cache=attn.rotary_emb.cos_sin_cache,
            is_neox=attn.rotary_emb.is_neox_style,
            num_heads=attn.attn.num_heads,
            num_kv_heads=attn.attn.num_kv_heads,
            head_size=attn.attn.head_size,
            scale=attn.attn.scale,
        )


def _data(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.data
