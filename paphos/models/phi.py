"""Phi (1, 1.5, 2) and Phi-3/3.5/4 from HF's definitions.

Phi: one LayerNorm feeds attention and MLP in parallel (summed, one all-reduce), partial rotary,
dense biases, optional per-head q/k LayerNorm, an LM head with a bias. Phi-3 is Llama with q/k/v
and gate/up fused in the checkpoint (loaded through the fused weight loaders), LongRoPE and
partial rotary (Phi-4-mini): it reuses paphos's Llama with its rotary tables replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
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
from paphos.models.llama import LlamaForCausalLM, rope_settings
from paphos.parallel import ParallelInfo, all_reduce
from paphos.quant.base import LinearMethod

logger = logging.getLogger(__name__)

_QKV = {".q_proj.": "q", ".k_proj.": "k", ".v_proj.": "v"}


def _rotary(cfg: Any, head_size: int) -> Any:
    """The rotary embedding of `cfg` over its partial rotary dims (neox layout)."""
    theta, scaling = rope_settings(cfg)
    params = getattr(cfg, "rope_parameters", None) or {}
    partial = float(params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1)))
    if scaling is not None and "original_max_position_embeddings" not in scaling:
        original = getattr(cfg, "original_max_position_embeddings", None)
        scaling = {**scaling, "original_max_position_embeddings": original}
    rotary_dim = int(head_size * partial)
    return get_rope(head_size, rotary_dim, cfg.max_position_embeddings, theta, scaling)


class PhiAttention(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, total_heads = cfg.hidden_size, cfg.num_attention_heads
        total_kv_heads = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.head_size = getattr(cfg, "head_dim", None) or hidden // total_heads
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_size, total_heads, total_kv_heads, bias=True,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.dense = RowParallelLinear(
            total_heads * self.head_size,
            hidden,
            bias=True,
            reduce_results=False,
            linear_method=linear_method,
            parallel=parallel,
        )  # fmt: skip  (the layer all-reduces)
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.sizes = [heads * self.head_size, kv_heads * self.head_size, kv_heads * self.head_size]
        self.qk_layernorm = bool(getattr(cfg, "qk_layernorm", False))
        if self.qk_layernorm:  # over each head
            self.q_layernorm = LayerNorm(self.head_size, cfg.layer_norm_eps)
            self.k_layernorm = LayerNorm(self.head_size, cfg.layer_norm_eps)
        self.rotary_emb = _rotary(cfg, self.head_size)
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
        q, k, v = self.qkv_proj(hidden_states).split(self.sizes, dim=-1)
        if self.qk_layernorm:
            num_tokens = q.shape[0]
            # [num_tokens, heads, head_size] normed per head, then flat again
            q = self.q_layernorm(q.reshape(num_tokens, -1, self.head_size)).flatten(1)
            k = self.k_layernorm(k.reshape(num_tokens, -1, self.head_size)).flatten(1)
        return self.dense(self.attn(q, k, v, kv_cache, attn_metadata, positions=positions))


class PhiMLP(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.fc1 = ColumnParallelLinear(
            cfg.hidden_size, cfg.intermediate_size, bias=True,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip
        self.activation_fn = activation(cfg.hidden_act)
        self.fc2 = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, bias=True, reduce_results=False,
            linear_method=linear_method, parallel=parallel,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.parallel = parallel
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg, linear_method, parallel)
        self.mlp = PhiMLP(cfg, linear_method, parallel)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        attn = self.self_attn(positions, normed, kv_cache, attn_metadata)
        return all_reduce(attn + self.mlp(normed), self.parallel) + hidden_states


class PhiModel(nn.Module):
    def __init__(self, cfg: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, parallel=parallel
        )
        self.layers = nn.ModuleList(
            PhiDecoderLayer(cfg, linear_method, parallel) for _ in range(cfg.num_hidden_layers)
        )
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states = layer(positions, hidden_states, kv_cache, attn_metadata)
        return self.final_layernorm(hidden_states)


class PhiForCausalLM(CausalLMHead):
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
        self.model = PhiModel(cfg, linear_method, parallel)
        tie = bool(getattr(cfg, "tie_word_embeddings", False))
        embedding = self.model.embed_tokens
        self.init_head(cfg.vocab_size, cfg.hidden_size, embedding, parallel, tie, bias=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[Load]:
        if name.endswith(".inv_freq") or (name == "lm_head.weight" and self.tie_word_embeddings):
            return []
        for part, shard in _QKV.items():
            if part in name:
                return [(name.replace(part, ".qkv_proj."), tensor, shard)]
        return [(name, tensor, None)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self.map_weight)


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's layers; the checkpoint's fused qkv_proj and gate_up_proj load through the fused
    weight loaders as they are. Only the rotary embedding differs (LongRoPE, partial)."""

    def __init__(
        self,
        config: ModelConfig,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo | None = None,
        prefix: str = "",
    ) -> None:
        cfg = config.hf_config
        # Llama's layers with a plain rope (replaced below: LongRoPE factors fit the partial dims)
        plain = copy.copy(cfg)
        plain.rope_parameters = {"rope_type": "default", "rope_theta": rope_settings(cfg)[0]}
        super().__init__(dataclasses.replace(config, hf_config=plain), linear_method, parallel)
        self.hf_config = cfg
        window = getattr(cfg, "sliding_window", None)
        if window is not None and window >= cfg.max_position_embeddings:
            window = None  # no sequence is longer: the same as none
        takes_window = "sliding_window" in inspect.signature(Attention.__init__).parameters
        if window is not None and not takes_window:
            logger.warning(
                "Phi-3 sliding_window=%d is not applied: sequences longer than it attend to "
                "their whole context (transformers limits them to the window)",
                window,
            )
            window = None
        for layer in self.model.layers:
            attn = layer.self_attn
            old = attn.attn
            rotary = _rotary(cfg, old.head_size)
            extra = {} if window is None else {"sliding_window": window}
            attn.rotary_emb = rotary
            attn.attn = Attention(
                old.num_heads, old.head_size, old.scale, old.num_kv_heads, rotary, **extra
            )
        # The fused CPU decode kernel rotates whole heads over the whole context.
        if rotary.cos_sin_cache.shape[-1] < old.head_size or window is not None:
            self.model.fused_decode_allowed = False
