"""GPT-2 and GPT-BigCode (StarCoder, SantaCoder), from HF's definitions: learned positions,
LayerNorm blocks, fused qkv, gelu MLP, tied head. GPT-2's Conv1D stores weights [in, out] (loaded
transposed); BigCode's are nn.Linear, with one kv head under `multi_query`.
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
from paphos.models.causal_lm import CausalLMHead
from paphos.models.checkpoint_names import Load, load_mapped, per_head_to_qkv
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # GPT-2 Conv1D: [in, out]
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


class GPT2Attention(nn.Module):
    def __init__(
        self,
        cfg: Any,
        layer_idx: int,
        num_kv_heads: int,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ):
        super().__init__()
        hidden, total_heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_size = hidden // total_heads
        self.c_attn = QKVParallelLinear(
            hidden, self.head_size, total_heads, num_kv_heads, bias=True,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.c_proj = RowParallelLinear(
            hidden, hidden, bias=True, linear_method=linear_method, parallel=parallel
        )
        scale = self.head_size**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        heads, kv_heads = self.c_attn.num_heads, self.c_attn.num_kv_heads
        self.sizes = [heads * self.head_size, kv_heads * self.head_size, kv_heads * self.head_size]
        self.attn = Attention(heads, self.head_size, scale, kv_heads)

    def forward(
        self, hidden_states: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).split(self.sizes, dim=-1)
        return self.c_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden = cfg.hidden_size
        inner = getattr(cfg, "n_inner", None) or 4 * hidden
        self.c_fc = ColumnParallelLinear(
            hidden, inner, bias=True, linear_method=linear_method, parallel=parallel
        )
        self.act = activation(cfg.activation_function)
        self.c_proj = RowParallelLinear(
            inner, hidden, bias=True, linear_method=linear_method, parallel=parallel
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(
        self,
        cfg: Any,
        layer_idx: int,
        num_kv_heads: int,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ):
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(cfg.hidden_size, eps)
        self.attn = GPT2Attention(cfg, layer_idx, num_kv_heads, linear_method, parallel)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps)
        self.mlp = GPT2MLP(cfg, linear_method, parallel)

    def forward(
        self, hidden_states: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), kv_cache, attn_metadata)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(
        self,
        cfg: Any,
        num_kv_heads: int,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel=parallel)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)  # replicated
        self.h = nn.ModuleList(
            GPT2Block(cfg, i, num_kv_heads, linear_method, parallel)
            for i in range(cfg.num_hidden_layers)
        )
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)  # [num_tokens, hidden_size]
        for block, kv_cache in zip(self.h, kv_caches, strict=True):
            hidden_states = block(hidden_states, kv_cache, attn_metadata)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(CausalLMHead):
    def __init__(
        self,
        config: ModelConfig,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelInfo()
        cfg = config.hf_config
        self.hf_config = cfg
        self.transformer = GPT2Model(cfg, self.total_num_kv_heads(cfg), linear_method, parallel)
        tie = bool(getattr(cfg, "tie_word_embeddings", True))
        self.init_head(cfg.vocab_size, cfg.hidden_size, self.transformer.wte, parallel, tie)

    @staticmethod
    def total_num_kv_heads(cfg: Any) -> int:
        return cfg.num_attention_heads

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
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"  # checkpoints of the bare GPT2Model
        if name.endswith(_CONV1D) and isinstance(tensor, torch.Tensor):
            tensor = tensor.t()  # Conv1D [in, out] -> [out, in] (GGUF blocks are [out, in])
        return [(name, tensor, None)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self.map_weight)


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """GPT-2's layout with nn.Linear weights; multi-query: c_attn is [q | k | v] with one kv
    head; otherwise c_attn is fused per head ([heads, 3, head_size])."""

    @staticmethod
    def total_num_kv_heads(cfg: Any) -> int:
        return 1 if cfg.multi_query else cfg.num_attention_heads

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[Load]:
        if name.endswith(_BUFFERS) or (name == "lm_head.weight" and self.tie_word_embeddings):
            return []
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"
        cfg = self.hf_config
        if ".c_attn." in name and not cfg.multi_query:
            head_size = cfg.hidden_size // cfg.num_attention_heads
            return per_head_to_qkv(tensor, cfg.num_attention_heads, head_size, name)
        return [(name, tensor, None)]
