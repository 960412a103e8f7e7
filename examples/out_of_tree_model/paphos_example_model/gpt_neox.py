"""GPT-NeoX (Pythia) as a paphos model, adapted from transformers' `modeling_gpt_neox.py`.

Tokens of every scheduled request arrive flattened; attention goes through the paged KV cache. With
the parallel residual, a layer sums its attention and MLP partial outputs, then all-reduces once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from paphos.attention import Attention, AttentionMetadata
from paphos.config import ModelConfig
from paphos.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from paphos.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from paphos.layers.logits import LogitsProcessor
from paphos.layers.rotary import get_rope
from paphos.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from paphos.layers.weight_utils import default_weight_loader
from paphos.parallel import ParallelInfo, all_reduce
from paphos.quant.base import LinearMethod
from torch import nn

# hidden_act -> GELU approximation (HF's "gelu" is exact, "gelu_new"/"gelu_fast" are tanh)
_GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh"}


def _rope_settings(hf_config: Any) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers 5 `rope_parameters` or older names."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0))
    factor = params.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 0.25))
    return float(theta), float(factor)


class GPTNeoXAttention(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, total_heads = hf_config.hidden_size, hf_config.num_attention_heads
        self.head_size = hidden // total_heads
        bias = getattr(hf_config, "attention_bias", True)
        # HF fuses q, k, v per head; QKVParallelLinear keeps all q, then all k, then all v, so that
        # each rank's shard is contiguous (load_weights below reorders the checkpoint).
        self.query_key_value = QKVParallelLinear(
            hidden,
            self.head_size,
            total_heads,
            total_heads,
            bias=bias,
            linear_method=linear_method,
            parallel=parallel,
        )
        # The caller all-reduces (once for attention + MLP when the residual is parallel).
        self.dense = RowParallelLinear(
            hidden,
            hidden,
            bias=bias,
            reduce_results=False,
            linear_method=linear_method,
            parallel=parallel,
        )
        self.num_heads = self.query_key_value.num_heads
        self.q_size = self.num_heads * self.head_size
        theta, partial = _rope_settings(hf_config)
        self.rotary_emb = get_rope(
            self.head_size, int(self.head_size * partial), hf_config.max_position_embeddings, theta
        )
        self.attn = Attention(self.num_heads, self.head_size, self.head_size**-0.5)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.query_key_value(hidden_states)  # [num_tokens, 3 * q_size]
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v, kv_cache, attn_metadata))  # partial sum


class GPTNeoXMLP(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        act = getattr(hf_config, "hidden_act", "gelu")
        if act not in _GELU_APPROXIMATIONS:
            raise ValueError(
                f"hidden_act={act!r} is not supported: expected one of {list(_GELU_APPROXIMATIONS)}"
            )
        self.dense_h_to_4h = ColumnParallelLinear(
            hidden, inter, bias=True, linear_method=linear_method, parallel=parallel
        )
        self.dense_4h_to_h = RowParallelLinear(
            inter,
            hidden,
            bias=True,
            reduce_results=False,
            linear_method=linear_method,
            parallel=parallel,
        )
        self.act = nn.GELU(approximate=_GELU_APPROXIMATIONS[act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))  # partial sum


class GPTNeoXLayer(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, eps = hf_config.hidden_size, hf_config.layer_norm_eps
        self.parallel = parallel
        self.use_parallel_residual = getattr(hf_config, "use_parallel_residual", True)
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.attention = GPTNeoXAttention(hf_config, linear_method, parallel)
        self.mlp = GPTNeoXMLP(hf_config, linear_method, parallel)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        attn_in = self.input_layernorm(hidden_states)
        attn_out = self.attention(positions, attn_in, kv_cache, attn_metadata)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)): both partial sums reduced by one all-reduce
            mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
            return all_reduce(attn_out + mlp_out, self.parallel) + hidden_states
        hidden_states = all_reduce(attn_out, self.parallel) + hidden_states
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return all_reduce(mlp_out, self.parallel) + hidden_states


class GPTNeoXModel(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(
            hf_config.vocab_size, hf_config.hidden_size, parallel=parallel
        )
        self.layers = nn.ModuleList(
            GPTNeoXLayer(hf_config, linear_method, parallel)
            for _ in range(hf_config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(hf_config.hidden_size, eps=hf_config.layer_norm_eps)

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


class GPTNeoXForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelInfo()
        hf_config = config.hf_config
        self.hf_config = hf_config
        self.gpt_neox = GPTNeoXModel(hf_config, linear_method, parallel)
        self.embed_out = ParallelLMHead(
            hf_config.vocab_size, hf_config.hidden_size, parallel=parallel
        )
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.embed_out.tie_weights(self.gpt_neox.embed_in)
        self.logits_processor = LogitsProcessor(hf_config.vocab_size, parallel)
        self.sampler = Sampler()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(
        self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        selected = hidden_states.index_select(0, attn_metadata.logits_indices)
        return self.logits_processor(self.embed_out, selected)  # [num_logits, vocab_size]

    def sample(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata) -> SamplerOutput:
        return self.sampler(logits, sampling_metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith((".attention.bias", ".attention.masked_bias", ".inv_freq")):
                continue  # buffers of old checkpoints, rebuilt here
            name = name.replace("lm_head.", "embed_out.")  # newer transformers' name
            if name.startswith("embed_out.") and self.tie_word_embeddings:
                continue  # tied: the embedding's weight serves both
            param = params.get(name)
            if param is None:
                raise ValueError(
                    f"checkpoint weight {name!r} has no parameter in {type(self).__name__}"
                )
            if ".query_key_value." in name:
                self._load_fused_qkv(param, tensor)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded

    def _load_fused_qkv(self, param: nn.Parameter, tensor: torch.Tensor) -> None:
        """HF lays q, k, v out per head: [num_heads, 3, head_size, ...]; hand each part over whole
        and let the layer's weight_loader cut this rank's heads."""
        num_heads = self.hf_config.num_attention_heads
        head_size = self.hf_config.hidden_size // num_heads
        rest = tensor.shape[1:]  # (hidden_size,) for the weight, () for the bias
        per_head = tensor.view(num_heads, 3, head_size, *rest)  # [heads, 3, head_size, *rest]
        for index, shard_id in enumerate(("q", "k", "v")):
            part = per_head[:, index].reshape(num_heads * head_size, *rest)  # [hidden, *rest]
            param.weight_loader(param, part, shard_id)
