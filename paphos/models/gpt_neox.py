"""GPT-NeoX (Pythia) and GPT-J, from HF's definitions: a LayerNorm block whose attention and MLP
may read the same input (parallel residual: summed, then all-reduced once), partial rotary
(NeoX's halves, GPT-J's interleaved pairs), gelu MLP with biases, untied head.
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
from paphos.models.checkpoint_names import Load, load_mapped, per_head_to_qkv
from paphos.models.llama import rope_settings
from paphos.parallel import ParallelInfo, all_reduce
from paphos.quant.base import LinearMethod

_BUFFERS = (".inv_freq", ".masked_bias", ".attention.bias", ".attn.bias")


def _partial_rotary_factor(cfg: Any, default: float) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(cfg, "rotary_pct", default)))


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, total_heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_size = hidden // total_heads
        bias = getattr(cfg, "attention_bias", True)
        self.query_key_value = QKVParallelLinear(
            hidden, self.head_size, total_heads, bias=bias,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.dense = RowParallelLinear(
            hidden,
            hidden,
            bias=bias,
            reduce_results=False,
            linear_method=linear_method,
            parallel=parallel,
        )  # fmt: skip  (the layer all-reduces)
        self.q_size = self.query_key_value.num_heads * self.head_size
        theta, scaling = rope_settings(cfg)
        rotary_dim = int(self.head_size * _partial_rotary_factor(cfg, 0.25))
        self.rotary_emb = get_rope(
            self.head_size, rotary_dim, cfg.max_position_embeddings, theta, scaling
        )
        heads = self.query_key_value.num_heads
        self.attn = Attention(
            heads, self.head_size, self.head_size**-0.5, rotary_emb=self.rotary_emb
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden_states).split([self.q_size] * 3, dim=-1)
        out = self.attn(q, k, v, kv_cache, attn_metadata, positions=positions)
        return self.dense(out)  # [num_tokens, hidden] partial sum over ranks


class GPTNeoXMLP(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, cfg.intermediate_size, bias=True,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.act = activation(cfg.hidden_act)
        self.dense_4h_to_h = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, bias=True, reduce_results=False,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.parallel = parallel
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attention = GPTNeoXAttention(cfg, linear_method, parallel)
        self.mlp = GPTNeoXMLP(cfg, linear_method, parallel)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        attn = self.attention(
            positions, self.input_layernorm(hidden_states), kv_cache, attn_metadata
        )
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x)): one all-reduce
            mlp = self.mlp(self.post_attention_layernorm(hidden_states))
            return all_reduce(attn + mlp, self.parallel) + hidden_states
        hidden_states = all_reduce(attn, self.parallel) + hidden_states
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return all_reduce(mlp, self.parallel) + hidden_states


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel=parallel)
        self.layers = nn.ModuleList(
            GPTNeoXLayer(cfg, linear_method, parallel) for _ in range(cfg.num_hidden_layers)
        )
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.embed_in(input_ids)  # [num_tokens, hidden_size]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states = layer(positions, hidden_states, kv_cache, attn_metadata)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(CausalLMHead):
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
        self.gpt_neox = GPTNeoXModel(cfg, linear_method, parallel)
        tie = bool(getattr(cfg, "tie_word_embeddings", False))
        self.init_head(cfg.vocab_size, cfg.hidden_size, self.gpt_neox.embed_in, parallel, tie)
        self.embed_out = self.lm_head  # HF's name for the head

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, kv_caches, attn_metadata)

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[Load]:
        if name.endswith(_BUFFERS) or (name == "embed_out.weight" and self.tie_word_embeddings):
            return []
        name = name.replace("embed_out.", "lm_head.")
        if ".query_key_value." in name:  # fused per head: [heads, 3, head_size, *rest]
            cfg = self.hf_config
            head_size = cfg.hidden_size // cfg.num_attention_heads
            return per_head_to_qkv(tensor, cfg.num_attention_heads, head_size, name)
        return [(name, tensor, None)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self.map_weight)
