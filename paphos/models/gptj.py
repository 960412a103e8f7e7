"""GPT-J, from HF's definition: one LayerNorm feeds attention and MLP in parallel (summed, one
all-reduce); rotary on the first `rotary_dim` dims in GPT-J's interleaved layout, base 10000;
q/k/v/out without biases; the head has a bias.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from paphos.attention import Attention, AttentionMetadata
from paphos.config import ModelConfig
from paphos.layers.activation import activation
from paphos.layers.embedding import VocabParallelEmbedding
from paphos.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from paphos.layers.norm import LayerNorm
from paphos.layers.rotary import get_rope
from paphos.models.causal_lm import CausalLMHead
from paphos.models.checkpoint_names import Load, load_mapped
from paphos.parallel import ParallelInfo, all_reduce
from paphos.quant.base import LinearMethod

_QKV = {".q_proj.": "q", ".k_proj.": "k", ".v_proj.": "v"}
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".embed_positions")
_ROPE_BASE = 10000.0  # GPT-J's sinusoidal table has a fixed base


class GPTJAttention(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, total_heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_size = hidden // total_heads
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_size, total_heads, linear_method=linear_method, parallel=parallel
        )
        self.out_proj = RowParallelLinear(
            hidden, hidden, reduce_results=False, linear_method=linear_method, parallel=parallel
        )
        self.q_size = self.qkv_proj.num_heads * self.head_size
        rotary_dim = cfg.rotary_dim or self.head_size
        self.rotary_emb = get_rope(
            self.head_size, rotary_dim, cfg.max_position_embeddings, _ROPE_BASE,
            is_neox_style=False,
        )  # fmt: skip
        self.attn = Attention(
            self.qkv_proj.num_heads, self.head_size, self.head_size**-0.5,
            rotary_emb=self.rotary_emb,
        )  # fmt: skip

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size] * 3, dim=-1)
        return self.out_proj(self.attn(q, k, v, kv_cache, attn_metadata, positions=positions))


class GPTJMLP(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.hidden_size
        self.fc_in = ColumnParallelLinear(
            cfg.hidden_size, inner, bias=True, linear_method=linear_method, parallel=parallel
        )
        self.act = activation(cfg.activation_function)
        self.fc_out = RowParallelLinear(
            inner, cfg.hidden_size, bias=True, reduce_results=False,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.parallel = parallel
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = GPTJAttention(cfg, linear_method, parallel)
        self.mlp = GPTJMLP(cfg, linear_method, parallel)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        normed = self.ln_1(hidden_states)
        attn = self.attn(positions, normed, kv_cache, attn_metadata)
        return all_reduce(attn + self.mlp(normed), self.parallel) + hidden_states


class GPTJModel(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel=parallel)
        self.h = nn.ModuleList(
            GPTJBlock(cfg, linear_method, parallel) for _ in range(cfg.num_hidden_layers)
        )
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.wte(input_ids)  # [num_tokens, hidden_size]
        for block, kv_cache in zip(self.h, kv_caches, strict=True):
            hidden_states = block(positions, hidden_states, kv_cache, attn_metadata)
        return self.ln_f(hidden_states)


class GPTJForCausalLM(CausalLMHead):
    def __init__(
        self,
        config: ModelConfig,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelInfo()
        cfg = self.hf_config = config.hf_config
        self.transformer = GPTJModel(cfg, linear_method, parallel)
        tie = bool(getattr(cfg, "tie_word_embeddings", False))
        self.init_head(
            cfg.vocab_size, cfg.hidden_size, self.transformer.wte, parallel, tie, bias=True
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.transformer(input_ids, positions, kv_caches, attn_metadata)

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[Load]:
        if name.endswith(_BUFFERS) or (name == "lm_head.weight" and self.tie_word_embeddings):
            return []
        for part, shard in _QKV.items():
            if part in name:
                return [(name.replace(part, ".qkv_proj."), tensor, shard)]
        return [(name, tensor, None)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self.map_weight)
