"""The configurable decoder's latent attention (MLA, DeepSeek V2/V3), picked by a `LayerSpec` with
`latent` set: HF's module names (q_proj or q_a_proj/q_a_layernorm/q_b_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj) so that loading is the decoder's plain name map.

Tensor parallel: query heads, kv_b_proj's per-head rows and o_proj's inputs split over ranks; the
down-projections (q_a, kv_a) and the cached latent are the same on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from paphos.attention import AttentionMetadata, LatentAttention
from paphos.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from paphos.layers.norm import RMSNorm
from paphos.layers.rotary import RotaryEmbedding
from paphos.models.decoder_spec import LayerSpec
from paphos.parallel import ParallelInfo
from paphos.quant import UnquantizedLinearMethod
from paphos.quant.base import LinearMethod


class LatentDecoderAttention(nn.Module):
    def __init__(
        self,
        spec: LayerSpec,
        rotary_emb: RotaryEmbedding | None,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ):
        super().__init__()
        mla = spec.latent
        assert mla is not None
        if rotary_emb is None:
            raise ValueError("latent attention needs a rope (its rope key is what it rotates)")
        if spec.num_heads % parallel.world_size:
            raise ValueError(
                f"{spec.num_heads} attention heads do not split over {parallel.world_size} ranks"
            )
        hidden, heads, rank = spec.hidden_size, spec.num_heads, mla.kv_lora_rank
        self.nope, self.rope = mla.qk_nope_head_dim, mla.qk_rope_head_dim
        self.v_dim = mla.v_head_dim
        self.num_heads = heads // parallel.world_size
        qk_head = self.nope + self.rope
        common = dict(linear_method=linear_method, parallel=parallel)
        self.q_lora_rank = mla.q_lora_rank
        if mla.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_head, False, **common)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, mla.q_lora_rank, spec.qkv_bias, **common)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, mla.norm_eps)
            self.q_b_proj = ColumnParallelLinear(mla.q_lora_rank, heads * qk_head, False, **common)
        kv_a_size = rank + self.rope  # the latent and the shared rope key
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, kv_a_size, spec.qkv_bias, **common)
        self.kv_a_layernorm = RMSNorm(rank, mla.norm_eps)
        self.kv_b_proj = ColumnParallelLinear(rank, heads * (self.nope + self.v_dim), **common)
        if not isinstance(self.kv_b_proj.linear_method, UnquantizedLinearMethod):
            raise ValueError(
                "latent attention absorbs kv_b_proj's weight into queries and outputs: "
                f"kv_b_proj cannot be quantized ({type(self.kv_b_proj.linear_method).__name__})"
            )
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, spec.o_bias, **common)
        self.rotary_emb = rotary_emb  # shared by the layers with the same rope (no weights)
        self.attn = LatentAttention(
            self.num_heads, rank, self.nope, self.rope, self.v_dim, spec.attention_scale
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)  # [num_tokens, heads * (nope + rope)]
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(num_tokens, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(hidden_states)  # [num_tokens, rank + rope]
        latent, k_pe = kv_a.split([self.attn.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())  # [num_tokens, rank]
        q_pe, k_pe = self.rotary_emb(
            positions, q_pe.reshape(num_tokens, -1), k_pe.contiguous()
        )  # [num_tokens, heads * rope], [num_tokens, rope]
        q_pe = q_pe.view(num_tokens, self.num_heads, self.rope)
        w_kv_b = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, -1)
        out = self.attn(q_nope, q_pe, latent, k_pe, w_kv_b, kv_cache, attn_metadata)
        return self.o_proj(out)  # [num_tokens, hidden]
