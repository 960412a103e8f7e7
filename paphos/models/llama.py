"""Llama (2, 3, 3.1+ rope scaling; GQA; tied embeddings; optional qkv/mlp bias), from HF's
definition.

Tokens of every scheduled request arrive flattened into one batch; attention goes through the paged
cache. On the CPU, pure-decode steps of up to 4 tokens run each layer as one C call
(paphos.layers.cpu_decode), with the same results as the layers below.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from paphos.attention import Attention, AttentionMetadata
from paphos.config import ModelConfig
from paphos.layers import cpu_decode
from paphos.layers.cpu_decode import DecoderLayerWeights, FusedDecode
from paphos.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from paphos.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from paphos.layers.logits import LogitsProcessor
from paphos.layers.norm import RMSNorm
from paphos.layers.rotary import get_rope
from paphos.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from paphos.models.checkpoint_names import Load, load_mapped
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod


def rope_settings(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either transformers 5 `rope_parameters` or older
    attributes."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else None
    return float(theta), scaling or getattr(hf_config, "rope_scaling", None)


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        bias = getattr(hf_config, "mlp_bias", False)
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported (silu)")
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [inter, inter], bias=bias, linear_method=linear_method, parallel=parallel
        )
        self.down_proj = RowParallelLinear(
            inter, hidden, bias=bias, linear_method=linear_method, parallel=parallel
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate_up and the SiLU-and-mul in one kernel where the linear method can
        return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x))


class LlamaAttention(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        hidden = hf_config.hidden_size
        total_heads = hf_config.num_attention_heads
        total_kv_heads = getattr(hf_config, "num_key_value_heads", None) or total_heads
        head_dim = getattr(hf_config, "head_dim", None) or hidden // total_heads
        bias = getattr(hf_config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            hidden,
            head_dim,
            total_heads,
            total_kv_heads,
            bias=bias,
            linear_method=linear_method,
            parallel=parallel,
        )
        self.o_proj = RowParallelLinear(
            total_heads * head_dim,
            hidden,
            bias=bias,
            linear_method=linear_method,
            parallel=parallel,
        )
        num_heads, num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        theta, scaling = rope_settings(hf_config)
        self.rotary_emb = get_rope(
            head_dim,
            head_dim,
            hf_config.max_position_embeddings,
            theta,
            scaling,
            freq_factors=getattr(hf_config, "rope_freq_factors", None),  # from a GGUF file
        )
        # the layer rotates q and k: on CUDA one kernel with the KV-cache write
        self.attn = Attention(
            num_heads, head_dim, head_dim**-0.5, num_kv_heads, rotary_emb=self.rotary_emb
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata, positions=positions))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.self_attn = LlamaAttention(hf_config, linear_method, parallel)
        self.mlp = LlamaMLP(hf_config, linear_method, parallel)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def fused_unfit_reason(self) -> str | None:
        """Why the fused CPU decode kernel cannot run this layer, in plain words (None: it can)."""
        attn, mlp = self.self_attn, self.mlp
        return cpu_decode.quantized_reason(
            (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        )

    def fused_weights(self) -> DecoderLayerWeights | None:
        """This layer for the fused CPU decode kernel; None where its linears are quantized."""
        if self.fused_unfit_reason() is not None:
            return None
        attn, mlp = self.self_attn, self.mlp
        return DecoderLayerWeights(
            input_norm=self.input_layernorm.weight.data,
            input_eps=self.input_layernorm.eps,
            qkv=cpu_decode.fused_weight(attn.qkv_proj),
            qkv_bias=_data(attn.qkv_proj.bias),
            o=cpu_decode.fused_weight(attn.o_proj),
            o_bias=_data(attn.o_proj.bias),
            post_norm=self.post_attention_layernorm.weight.data,
            post_eps=self.post_attention_layernorm.eps,
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


class LlamaModel(nn.Module):
    def __init__(self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            hf_config.vocab_size,
            hf_config.hidden_size,
            parallel=parallel,
            linear_method=linear_method,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, linear_method, parallel)
            for _ in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        # Decided at start-up: single process and not switched off by PAPHOS_CPU_FUSED_DECODE.
        self.fused_decode_allowed = parallel.world_size == 1 and cpu_decode.enabled_from_env()
        self._fused_decode: FusedDecode | None = None
        self._fused_decode_built = False

    def fused_decode(self) -> FusedDecode | None:
        """The fused CPU decode path, built at first use (after loading), rebuilt when the
        weights moved; None where it does not apply (then every step runs the layers)."""
        anchor = getattr(self.layers[0].self_attn.qkv_proj, "weight", None)
        if anchor is None:  # a packed format without a `weight` (GPTQ): the layers run
            return None
        fused = self._fused_decode
        if fused is not None and fused.still_valid(anchor):
            return fused
        if fused is None and (self._fused_decode_built or not self.fused_decode_allowed):
            return None
        self._fused_decode = cpu_decode.build_fused_decode(
            cpu_decode.layer_weights(self.layers), anchor
        )
        self._fused_decode_built = True
        return self._fused_decode

    def reset_fused_decode(self) -> None:
        """Forget the fused path (new weights were loaded); the next step builds it again."""
        self._fused_decode, self._fused_decode_built = None, False

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        fused = self.fused_decode() if input_ids.is_cpu else None
        if fused is not None and fused.takes(hidden_states, kv_caches, attn_metadata):
            hidden_states, residual = fused.forward(
                positions, hidden_states, kv_caches, attn_metadata
            )
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden_states, residual = layer(
                    positions, hidden_states, residual, kv_cache, attn_metadata
                )
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

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
        self.model = LlamaModel(hf_config, linear_method, parallel)
        self.lm_head = ParallelLMHead(
            hf_config.vocab_size,
            hf_config.hidden_size,
            parallel=parallel,
            linear_method=linear_method,
        )
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(hf_config.vocab_size, parallel)
        self.sampler = Sampler()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(
        self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        selected = hidden_states.index_select(0, attn_metadata.logits_indices)
        return self.logits_processor(self.lm_head, selected)  # [num_logits, vocab_size]

    def sample(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata) -> SamplerOutput:
        return self.sampler(logits, sampling_metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self.model.reset_fused_decode()
        return load_mapped(self, weights, self._map_weight)

    def _map_weight(self, name: str, tensor: torch.Tensor) -> list[Load]:
        """The load a checkpoint tensor makes (none for rotary buffers and tied names)."""
        if "rotary_emb.inv_freq" in name:
            return []
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return []  # tied: the embedding's weight serves both
        target, shard_id = _map_name(name, self.stacked_params)
        return [(target, tensor, shard_id)]


def _data(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.data


def _map_name(name: str, stacked: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    for ckpt_part, (param_part, shard_id) in stacked.items():
        if ckpt_part in name:
            return name.replace(ckpt_part, param_part), shard_id
    return name, None
