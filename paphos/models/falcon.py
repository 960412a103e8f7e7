"""Falcon, from HF's definition, both decoder layouts: the original (7B: multi-query, one
LayerNorm feeding attention and MLP in parallel; or sequential with two) and the new one (40B/180B:
grouped kv heads, qkv fused per group, one or two LayerNorms in parallel). Rotary only: alibi
checkpoints are refused.
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


def _num_kv_heads(cfg: Any) -> int:
    if cfg.new_decoder_architecture:
        return cfg.num_kv_heads
    return 1 if cfg.multi_query else cfg.num_attention_heads


def _num_layer_norms(cfg: Any) -> int:
    """LayerNorms at a layer's input: 2 (ln_attn, ln_mlp) or 1 (input_layernorm)."""
    if cfg.new_decoder_architecture:
        return cfg.num_ln_in_parallel_attn or 2
    return 1


class FalconAttention(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, total_heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_size = hidden // total_heads
        self.query_key_value = QKVParallelLinear(
            hidden, self.head_size, total_heads, _num_kv_heads(cfg), bias=cfg.bias,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.dense = RowParallelLinear(
            hidden,
            hidden,
            bias=cfg.bias,
            reduce_results=False,
            linear_method=linear_method,
            parallel=parallel,
        )  # fmt: skip  (the layer all-reduces)
        heads, kv_heads = self.query_key_value.num_heads, self.query_key_value.num_kv_heads
        self.sizes = [heads * self.head_size, kv_heads * self.head_size, kv_heads * self.head_size]
        theta, scaling = rope_settings(cfg)
        self.rotary_emb = get_rope(
            self.head_size, self.head_size, cfg.max_position_embeddings, theta, scaling
        )
        self.attn = Attention(
            heads, self.head_size, self.head_size**-0.5, kv_heads, rotary_emb=self.rotary_emb
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden_states).split(self.sizes, dim=-1)
        return self.dense(self.attn(q, k, v, kv_cache, attn_metadata, positions=positions))


class FalconMLP(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        inner = cfg.ffn_hidden_size or 4 * cfg.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, inner, bias=cfg.bias, linear_method=linear_method, parallel=parallel
        )
        self.act = activation(cfg.activation)
        self.dense_4h_to_h = RowParallelLinear(
            inner, cfg.hidden_size, bias=cfg.bias, reduce_results=False,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.parallel = parallel
        self.parallel_attn = cfg.new_decoder_architecture or cfg.parallel_attn
        self.self_attention = FalconAttention(cfg, linear_method, parallel)
        self.mlp = FalconMLP(cfg, linear_method, parallel)
        if _num_layer_norms(cfg) == 2:
            self.ln_attn = LayerNorm(hidden, eps)
            self.ln_mlp = LayerNorm(hidden, eps)
        else:
            self.input_layernorm = LayerNorm(hidden, eps)
            if not self.parallel_attn:
                self.post_attention_layernorm = LayerNorm(hidden, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        two_norms = hasattr(self, "ln_attn")
        attn_in = (self.ln_attn if two_norms else self.input_layernorm)(hidden_states)
        attn = self.self_attention(positions, attn_in, kv_cache, attn_metadata)
        if self.parallel_attn:  # x + attn(ln(x)) + mlp(ln'(x)): one all-reduce
            mlp_in = self.ln_mlp(hidden_states) if two_norms else attn_in
            return all_reduce(attn + self.mlp(mlp_in), self.parallel) + hidden_states
        hidden_states = all_reduce(attn, self.parallel) + hidden_states
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return all_reduce(mlp, self.parallel) + hidden_states


class FalconModel(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, parallel=parallel
        )
        self.h = nn.ModuleList(
            FalconDecoderLayer(cfg, linear_method, parallel) for _ in range(cfg.num_hidden_layers)
        )
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.word_embeddings(input_ids)  # [num_tokens, hidden_size]
        for layer, kv_cache in zip(self.h, kv_caches, strict=True):
            hidden_states = layer(positions, hidden_states, kv_cache, attn_metadata)
        return self.ln_f(hidden_states)


class FalconForCausalLM(CausalLMHead):
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
        if cfg.alibi:
            raise ValueError(
                "FalconForCausalLM with alibi=True is not supported (paphos's attention has no "
                "alibi bias); rotary Falcon checkpoints are"
            )
        self.transformer = FalconModel(cfg, linear_method, parallel)
        tie = bool(getattr(cfg, "tie_word_embeddings", True))
        self.init_head(
            cfg.vocab_size, cfg.hidden_size, self.transformer.word_embeddings, parallel, tie
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
        if name.endswith(".inv_freq") or (name == "lm_head.weight" and self.tie_word_embeddings):
            return []
        if ".query_key_value." not in name:
            return [(name, tensor, None)]
        cfg = self.hf_config
        heads, head_size = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        if cfg.new_decoder_architecture:  # per kv group: [kv, heads/kv q rows + k + v, head_size]
            kv_heads = cfg.num_kv_heads
            rest = tensor.shape[1:]
            groups = tensor.view(kv_heads, heads // kv_heads + 2, head_size, *rest)
            q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
            return [
                (name, q.reshape(heads * head_size, *rest), "q"),
                (name, k.reshape(kv_heads * head_size, *rest), "k"),
                (name, v.reshape(kv_heads * head_size, *rest), "v"),
            ]
        if cfg.multi_query:  # [q heads | k | v]: the fused layout QKVParallelLinear reads
            return [(name, tensor, None)]
        return per_head_to_qkv(tensor, heads, head_size, name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self.map_weight)
