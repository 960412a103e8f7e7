"""The shared frame of hybrid models (Mamba2, NemotronH, Qwen3.5 / Qwen3-Next): layers whose token
mixer is attention (a KV cache) or a recurrent layer (a state cache: Mamba2, Gated DeltaNet).

A `HybridLayer` is norm -> mixer -> residual add, then optionally norm -> MLP -> residual add; its
parts carry the checkpoint's attribute names, so loading is a short name map. The model hands the
cache entries to the layers in order (`kv_caches[i]` is the i-th cache-owning layer's: a KV tensor
or a state tuple; runner/state_cache.py). A family subclasses `HybridForCausalLM` with
`build_layers` and its name map.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from paphos.attention import AttentionMetadata
from paphos.config import ModelConfig
from paphos.layers.embedding import VocabParallelEmbedding
from paphos.layers.moe import expert_loads, is_expert_shard, map_expert_name
from paphos.models.causal_lm import CausalLMHead
from paphos.models.checkpoint_names import Load, load_mapped
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

Mixer = nn.Module  # forward(positions, hidden, cache, attn_metadata) -> hidden


class HybridLayer(nn.Module):
    """x + m * mixer(norm(x)), then (with an MLP) x + m * mlp(mlp_norm(x)) (m: the residual
    multiplier, Granite's); `names` are the checkpoint's attribute names of (norm, mixer,
    mlp_norm, mlp)."""

    def __init__(
        self,
        names: tuple[str, str, str | None, str | None],
        norm: nn.Module,
        mixer: Mixer,
        mlp_norm: nn.Module | None = None,
        mlp: nn.Module | None = None,
        residual_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.names, self.residual_multiplier = names, residual_multiplier
        for name, module in zip(names, (norm, mixer, mlp_norm, mlp)):
            if name is not None and module is not None:
                setattr(self, name, module)
        self.has_cache = _owns_cache(mixer)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        cache: Any,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        norm_name, mixer_name, mlp_norm_name, mlp_name = self.names
        m = self.residual_multiplier
        x = getattr(self, norm_name)(hidden_states)
        out = getattr(self, mixer_name)(positions, x, cache, attn_metadata)
        hidden_states = hidden_states + (out if m == 1.0 else out * m)
        if mlp_name is not None:
            assert mlp_norm_name is not None
            out = getattr(self, mlp_name)(getattr(self, mlp_norm_name)(hidden_states))
            hidden_states = hidden_states + (out if m == 1.0 else out * m)
        return hidden_states


def _owns_cache(module: nn.Module) -> bool:
    return any(
        type(m).__name__ == "Attention" or callable(getattr(m, "state_shapes", None))
        for m in module.modules()
    )


class MLPMixer(nn.Module):
    """An MLP in a mixer's place (NemotronH's "-" layers): the mixer signature, no cache."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, positions, hidden_states, cache, attn_metadata) -> torch.Tensor:  # noqa: ANN001
        return self.mlp(hidden_states)


class HybridModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        layers: list[HybridLayer],
        final_norm: nn.Module,
        names: tuple[str, str],
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
        embedding_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.embed_name, self.norm_name = names
        self.embedding_multiplier = (
            embedding_multiplier  # the checkpoint's embedding / final norm names
        )
        embed = VocabParallelEmbedding(
            vocab_size, hidden_size, parallel=parallel, linear_method=linear_method
        )
        setattr(self, self.embed_name, embed)
        self.layers = nn.ModuleList(layers)
        setattr(self, self.norm_name, final_norm)

    @property
    def embedding(self) -> VocabParallelEmbedding:
        return getattr(self, self.embed_name)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[Any],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.embedding(input_ids)  # [num_tokens, hidden_size]
        if self.embedding_multiplier != 1.0:
            hidden_states = hidden_states * self.embedding_multiplier
        caches: Iterator[Any] = iter(kv_caches)
        for layer in self.layers:
            cache = next(caches) if layer.has_cache else None
            hidden_states = layer(positions, hidden_states, cache, attn_metadata)
        if next(caches, None) is not None:
            raise ValueError("more caches than cache-owning layers were passed")
        return getattr(self, self.norm_name)(hidden_states)


class HybridForCausalLM(CausalLMHead):
    """A hybrid family: `build_layers` makes its layers; `model_prefix` and `model_names` (the
    embedding and final norm) are its checkpoint's names; `stacked_params` maps checkpoint
    parts onto fused parameters (shard ids), `checkpoint_renames` renames the rest."""

    model_prefix: ClassVar[str] = "model"
    model_names: ClassVar[tuple[str, str]] = ("embed_tokens", "norm")
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }
    checkpoint_renames: ClassVar[dict[str, str]] = {}
    # checkpoint names (substrings) that are loaded and ignored: multi-token-prediction heads
    # until speculative decoding exists, vision towers until multimodal serving does
    ignored_weights: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        config: ModelConfig,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelInfo()
        hf = self.text_config(config.hf_config)
        self.hf_config = hf
        layers, final_norm = self.build_layers(hf, linear_method, parallel)
        multipliers = self.multipliers(hf)
        model = HybridModel(
            hf.vocab_size, hf.hidden_size, layers, final_norm, self.model_names,
            linear_method, parallel, multipliers[0],
        )  # fmt: skip
        self.logits_multiplier = multipliers[1]
        setattr(self, self.model_prefix, model)
        tie = bool(getattr(hf, "tie_word_embeddings", False))
        self.init_head(hf.vocab_size, hf.hidden_size, model.embedding, parallel, tie)

    @classmethod
    def text_config(cls, hf_config: Any) -> Any:
        return hf_config

    @classmethod
    def multipliers(cls, hf_config: Any) -> tuple[float, float]:
        """(embedding multiplier, logits multiplier); Granite's differ from 1."""
        return 1.0, 1.0

    def compute_logits(
        self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        logits = super().compute_logits(hidden_states, attn_metadata)  # [num_logits, vocab]
        m = self.logits_multiplier
        return logits if m == 1.0 else logits * m

    def build_layers(
        self, hf_config: Any, linear_method: LinearMethod | None, parallel: ParallelInfo
    ) -> tuple[list[HybridLayer], nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must build its layers")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[Any],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return getattr(self, self.model_prefix)(input_ids, positions, kv_caches, attn_metadata)

    def split_weight(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A family's hook: one checkpoint tensor as several (Qwen3.5's q_proj holds the gate)."""
        return [(name, tensor)]

    def map_name(self, name: str) -> tuple[str, Any]:
        for old, new in self.checkpoint_renames.items():
            name = name.replace(old, new)
        expert = map_expert_name(name)  # a routed expert's tensor: stacked experts, (part, id)
        if expert is not None:
            return expert
        for part, (target, shard_id) in self.stacked_params.items():
            if part in name:
                return name.replace(part, target), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self._map_weight)

    def _map_weight(self, checkpoint_name: str, whole: torch.Tensor) -> list[Load]:
        """The loads a checkpoint tensor makes (none for ignored and tied names)."""
        if any(part in checkpoint_name for part in self.ignored_weights):
            return []
        if checkpoint_name == "lm_head.weight" and self.tie_word_embeddings:
            return []
        loads = []
        for name, tensor in self.split_weight(checkpoint_name, whole):
            target, shard_id = self.map_name(name)
            if is_expert_shard(shard_id):
                loads += expert_loads(self, target, tensor, shard_id)
            else:
                loads.append((target, tensor, shard_id))
        return loads
