"""One configurable decoder for the Llama-like families: each layer is built from its `LayerSpec`
(paphos.models.decoder_layer: norm kind and placement, biases, q/k norm, activation, parallel
block, rope or none, sliding window, soft-cap, scales), the model from a `DecoderSpec`. Family
files subclass `DecoderForCausalLM` with a `describe(hf_config)` and their checkpoint renames.

On the CPU, pure-decode steps run as one C call per layer (paphos.layers.cpu_decode) when every
layer is a plain pre-norm RMSNorm / gated-SiLU / full-rope layer (Qwen 2, Mistral without window).
A layer sharing an earlier layer's keys and values (`LayerSpec.kv_source`) owns no KV cache:
`kv_caches` holds one tensor per cache-owning layer, in order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from paphos.attention import AttentionMetadata
from paphos.config import ModelConfig
from paphos.layers import cpu_decode
from paphos.layers.cpu_decode import FusedDecodeSlot
from paphos.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from paphos.layers.linear import ReplicatedLinear
from paphos.layers.logits import LogitsProcessor
from paphos.layers.moe import expert_loads, is_expert_shard, map_expert_name
from paphos.layers.rotary import RotaryEmbedding, get_rope
from paphos.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from paphos.models.checkpoint_names import Load, load_mapped
from paphos.models.decoder_layer import DecoderLayer, make_norm
from paphos.models.decoder_spec import DecoderSpec, NormSpec, RopeSpec
from paphos.parallel import ParallelInfo
from paphos.quant.base import LinearMethod

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
# transformers' stacked expert tensors (gpt-oss, Llama 4; reordered by layers.moe.experts_as_rows)
# -> FusedMoE's parameters; the biases' names contain the weights': they come first
STACKED_EXPERTS: dict[str, tuple[str, Any]] = {
    ".mlp.experts.gate_up_proj_bias": (".mlp.w13_bias", ("gate_up", None)),
    ".mlp.experts.down_proj_bias": (".mlp.w2_bias", ("down", None)),
    ".mlp.experts.gate_up_proj": (".mlp.w13_weight", ("gate_up", None)),
    ".mlp.experts.down_proj": (".mlp.w2_weight", ("down", None)),
}


def _rope(spec: RopeSpec, head_dim: int, max_position: int) -> RotaryEmbedding:
    factors = list(spec.freq_factors) if spec.freq_factors else None
    return get_rope(
        head_dim, spec.rotary_dim, max_position, spec.theta, spec.scaling, spec.is_neox, factors
    )


class PerLayerInputs(nn.Module):
    """Gemma 4's per-layer embeddings: for each token and layer an input of `size`, the mean of
    a token embedding (x sqrt(size)) and a normed projection of the main embedding (x 1 /
    sqrt(hidden)), each / sqrt(2). Checkpoint names: Gemma 4's."""

    def __init__(
        self,
        spec: DecoderSpec,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ) -> None:
        super().__init__()
        assert spec.per_layer_inputs is not None
        vocab, self.size = spec.per_layer_inputs
        self.num_layers = len(spec.layers)
        width = self.num_layers * self.size
        self.embed_tokens_per_layer = VocabParallelEmbedding(
            vocab, width, parallel=parallel, linear_method=linear_method
        )
        self.per_layer_model_projection = ReplicatedLinear(
            spec.hidden_size, width, linear_method=linear_method
        )
        self.per_layer_projection_norm = make_norm(NormSpec("rms", spec.final_norm.eps), self.size)
        dtype = self.embed_tokens_per_layer.params_dtype  # the scale rounded to it, as HF
        self.embed_scale = float(torch.tensor(self.size**0.5, dtype=dtype))
        self.projection_scale = spec.hidden_size**-0.5

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """input_ids [num_tokens], the scaled main embeddings [num_tokens, hidden] ->
        [num_tokens, num_layers, size]."""
        shape = (input_ids.shape[0], self.num_layers, self.size)
        tokens = (self.embed_tokens_per_layer(input_ids) * self.embed_scale).view(shape)
        projected = self.per_layer_model_projection(embeds) * self.projection_scale
        projected = self.per_layer_projection_norm(projected.view(-1, self.size)).view(shape)
        return (projected + tokens) * 2**-0.5


class DecoderModel(nn.Module):
    def __init__(
        self, spec: DecoderSpec, linear_method: LinearMethod | None, parallel: ParallelInfo
    ):
        super().__init__()
        self.spec = spec
        self.embed_tokens = VocabParallelEmbedding(
            spec.vocab_size, spec.hidden_size, parallel=parallel, linear_method=linear_method
        )
        ropes: list[tuple[RopeSpec, RotaryEmbedding]] = []  # one table per distinct rope
        layers = []
        for layer in spec.layers:
            rope = None
            if layer.rope is not None:
                rope = next((emb for key, emb in ropes if key == layer.rope), None)
                if rope is None:
                    rope = _rope(layer.rope, layer.rope_head_size, spec.max_position)
                    ropes.append((layer.rope, rope))
            layers.append(DecoderLayer(layer, rope, linear_method, parallel))
        self.cache_index: list[int] = []  # layer -> its KV cache (its source's, when shared)
        for index, layer in enumerate(spec.layers):
            source = layer.kv_source
            if source is None:
                self.cache_index.append(len(set(self.cache_index)))
                continue
            if not 0 <= source < index or spec.layers[source].kv_source is not None:
                raise ValueError(f"layer {index}: kv_source={source} is not an earlier owner")
            layers[index].self_attn.share_kv_of(layers[source].self_attn)
            self.cache_index.append(self.cache_index[source])
        self.layers = nn.ModuleList(layers)
        self.per_layer_inputs = None
        if spec.per_layer_inputs is not None:
            self.per_layer_inputs = PerLayerInputs(spec, linear_method, parallel)
        self.norm = make_norm(spec.final_norm, spec.hidden_size)
        self.fused = FusedDecodeSlot(parallel.world_size == 1 and cpu_decode.enabled_from_env())
        self.embedding_multiplier = spec.embedding_multiplier  # a host float: graph-safe
        if spec.embedding_multiplier is not None and spec.embedding_multiplier_in_dtype:
            dtype = self.embed_tokens.params_dtype  # Gemma: sqrt(hidden) rounded to it
            self.embedding_multiplier = float(torch.tensor(spec.embedding_multiplier, dtype=dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        m = self.embedding_multiplier
        return hidden_states if m is None else hidden_states * m

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden_states = self.embed(input_ids)  # [num_tokens, hidden_size]
        fused = None
        qkv_proj = getattr(self.layers[0].self_attn, "qkv_proj", None)  # None: MLA
        anchor = getattr(qkv_proj, "weight", None)  # None: GPTQ/AWQ, MLA
        if input_ids.is_cpu and anchor is not None:
            fused = self.fused.get(lambda: cpu_decode.layer_weights(self.layers), anchor)
        residual: torch.Tensor | None
        if fused is not None and fused.takes(hidden_states, kv_caches, attn_metadata):
            hidden_states, residual = fused.forward(
                positions, hidden_states, kv_caches, attn_metadata
            )
        else:
            if len(kv_caches) != len(set(self.cache_index)):
                raise ValueError(
                    f"{len(kv_caches)} KV caches for {len(set(self.cache_index))} cache-owning "
                    "layers"
                )
            per_layer = None  # [num_tokens, num_layers, size]
            if self.per_layer_inputs is not None:
                per_layer = self.per_layer_inputs(input_ids, hidden_states)
            residual = None
            for index, layer in enumerate(self.layers):
                hidden_states, residual = layer(
                    positions,
                    hidden_states,
                    residual,
                    kv_caches[self.cache_index[index]],
                    attn_metadata,
                    None if per_layer is None else per_layer[:, index],
                )
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class DecoderForCausalLM(nn.Module):
    """A family: `describe` maps its HF config to a DecoderSpec; `checkpoint_renames` (substring ->
    replacement, applied first) and `stacked_params` map its checkpoint names onto parameters."""

    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }
    checkpoint_renames: ClassVar[dict[str, str]] = {}
    skipped_weights: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # checkpoints with multi-token-prediction layers past the decoder's (GLM-4 MoE, DeepSeek V3)
    skips_extra_layers: ClassVar[bool] = False

    @classmethod
    def describe(cls, hf_config: Any) -> DecoderSpec:
        raise NotImplementedError(f"{cls.__name__} must describe its decoder")

    def __init__(
        self,
        config: ModelConfig,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelInfo()
        self.hf_config = config.hf_config
        self.spec = self.describe(config.hf_config)
        self.model = DecoderModel(self.spec, linear_method, parallel)
        self.lm_head = ParallelLMHead(
            self.spec.vocab_size,
            self.spec.hidden_size,
            parallel=parallel,
            linear_method=linear_method,
        )
        self.tie_word_embeddings = self.spec.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(self.spec.vocab_size, parallel)
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
        logits = self.logits_processor(self.lm_head, selected)  # [num_logits, vocab_size] fp32
        if self.spec.logits_multiplier != 1.0:
            logits = logits * self.spec.logits_multiplier
        cap = self.spec.final_soft_cap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def sample(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata) -> SamplerOutput:
        return self.sampler(logits, sampling_metadata)

    def map_name(self, name: str) -> tuple[str, Any]:
        """(our parameter name, shard id or None) of a checkpoint name."""
        for old, new in self.checkpoint_renames.items():
            name = name.replace(old, new)
        expert = map_expert_name(name)  # a routed expert's tensor: stacked experts, (part, id)
        if expert is not None:
            return expert
        for ckpt_part, (param_part, shard_id) in self.stacked_params.items():
            if ckpt_part in name and (shard_id != 1 or self.spec.layers[0].gated):
                return name.replace(ckpt_part, param_part), shard_id
        return name, None

    def _is_extra_layer(self, name: str) -> bool:
        match = _LAYER_INDEX.match(name) if self.skips_extra_layers else None
        return match is not None and int(match[1]) >= len(self.spec.layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self.model.fused.reset()
        return load_mapped(self, weights, self._map_weight)

    def _map_weight(self, name: str, tensor: torch.Tensor) -> list[Load]:
        """The load a checkpoint tensor makes (none for skipped and tied names)."""
        if any(part in name for part in self.skipped_weights) or self._is_extra_layer(name):
            return []
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return []  # tied: the embedding's weight serves both
        target, shard_id = self.map_name(name)
        if is_expert_shard(shard_id):  # stacked dense experts, or one quantized expert's layers
            return expert_loads(self, target, tensor, shard_id)
        return [(target, tensor, shard_id)]
