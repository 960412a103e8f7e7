"""OPT, from HF's definition: learned positions (offset by 2), LayerNorm before (most sizes) or
after (350m) each sublayer, relu MLP, optional projections between the word-embedding width and
the hidden size, tied head.
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
from paphos.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from paphos.layers.norm import LayerNorm
from paphos.models.causal_lm import CausalLMHead
from paphos.models.checkpoint_names import Load, load_mapped
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

_QKV = {".q_proj.": "q", ".k_proj.": "k", ".v_proj.": "v"}
_POSITION_OFFSET = 2  # OPT's position table starts 2 rows in (a fairseq padding convention)


def _norm(cfg: Any) -> LayerNorm:
    return LayerNorm(cfg.hidden_size)


class OPTAttention(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, total_heads = cfg.hidden_size, cfg.num_attention_heads
        head_size = hidden // total_heads
        bias = getattr(cfg, "enable_bias", True)
        self.qkv_proj = QKVParallelLinear(
            hidden, head_size, total_heads, bias=bias,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.out_proj = RowParallelLinear(
            hidden, hidden, bias=bias, linear_method=linear_method, parallel=parallel
        )
        self.q_size = self.qkv_proj.num_heads * head_size
        self.attn = Attention(self.qkv_proj.num_heads, head_size, head_size**-0.5)

    def forward(
        self, hidden_states: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size] * 3, dim=-1)
        return self.out_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        bias = getattr(cfg, "enable_bias", True)
        self.norm_before = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, linear_method, parallel)
        self.self_attn_layer_norm = _norm(cfg)
        self.fc1 = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_dim, bias=bias, linear_method=linear_method, parallel=parallel
        )
        self.activation_fn = activation(cfg.activation_function)
        self.fc2 = RowParallelLinear(
            cfg.ffn_dim, cfg.hidden_size, bias=bias, linear_method=linear_method, parallel=parallel
        )
        self.final_layer_norm = _norm(cfg)

    def forward(
        self, hidden_states: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        x = self.self_attn_layer_norm(hidden_states) if self.norm_before else hidden_states
        hidden_states = hidden_states + self.self_attn(x, kv_cache, attn_metadata)
        if not self.norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        x = self.final_layer_norm(hidden_states) if self.norm_before else hidden_states
        hidden_states = hidden_states + self.fc2(self.activation_fn(self.fc1(x)))
        if not self.norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class OPTDecoder(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, word_dim = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, word_dim, parallel=parallel)
        # [max_positions + 2, hidden], replicated
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + _POSITION_OFFSET, hidden)
        self.project_in = self.project_out = None
        if word_dim != hidden:
            self.project_in = ReplicatedLinear(word_dim, hidden, linear_method=linear_method)
            self.project_out = ReplicatedLinear(hidden, word_dim, linear_method=linear_method)
        self.final_layer_norm = None
        if cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False):
            self.final_layer_norm = _norm(cfg)
        self.layers = nn.ModuleList(
            OPTDecoderLayer(cfg, linear_method, parallel) for _ in range(cfg.num_hidden_layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [num_tokens, word_embed_proj_dim]
        if self.project_in is not None:
            hidden_states = self.project_in(hidden_states)  # [num_tokens, hidden_size]
        hidden_states = hidden_states + self.embed_positions(positions + _POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states = layer(hidden_states, kv_cache, attn_metadata)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)  # [num_tokens, word_embed_proj_dim]
        return hidden_states


class OPTModel(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.decoder = OPTDecoder(cfg, linear_method, parallel)


class OPTForCausalLM(CausalLMHead):
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
        if not getattr(cfg, "layer_norm_elementwise_affine", True):
            raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported")
        self.model = OPTModel(cfg, linear_method, parallel)
        tie = bool(getattr(cfg, "tie_word_embeddings", True))
        embedding = self.model.decoder.embed_tokens
        self.init_head(cfg.vocab_size, cfg.word_embed_proj_dim, embedding, parallel, tie)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, kv_caches, attn_metadata)

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[Load]:
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return []
        if name.startswith("decoder."):
            name = f"model.{name}"  # checkpoints of the bare OPTModel
        for part, shard in _QKV.items():
            if part in name:
                return [(name.replace(part, ".qkv_proj."), tensor, shard)]
        return [(name, tensor, None)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self.map_weight)
