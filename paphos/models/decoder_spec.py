"""The description of a Llama-like decoder that `paphos.models.decoder` builds: one `LayerSpec`
per layer (features, not families) and a `DecoderSpec` around them.

A family file maps its HF config onto these (`llama_like_layers` reads the fields every
Llama-like config shares) and its checkpoint names onto the decoder's parameters.
Invariant: a spec is plain frozen data; nothing here touches torch modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from paphos.layers.moe import MoESpec
from paphos.ops.moe import ExpertActivation

NormKind = Literal["rms", "rms_offset", "layer"]  # RMSNorm, RMSNorm(1 + w), LayerNorm
# Where a layer normalizes: before attention / after it (before the residual add) / before the
# MLP / after it. Llama: pre_attn + pre_mlp; OLMo 2: post_attn + post_mlp; Gemma 2: all four.
NORM_ROLES = ("pre_attn", "post_attn", "pre_mlp", "post_mlp")
LLAMA_NORMS = (("pre_attn", "input_layernorm"), ("pre_mlp", "post_attention_layernorm"))
SANDWICH_NORMS = (
    ("pre_attn", "input_layernorm"),
    ("post_attn", "post_attention_layernorm"),
    ("pre_mlp", "pre_feedforward_layernorm"),
    ("post_mlp", "post_feedforward_layernorm"),
)


@dataclass(frozen=True)
class NormSpec:
    kind: NormKind
    eps: float
    bias: bool = False  # LayerNorm only


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rotary_dim: int  # < head_dim: partial rotary (the first rotary_dim dims of each head)
    is_neox: bool = True  # rotate halves; False: interleaved pairs (GPT-J, GLM, Cohere)
    scaling: dict[str, Any] | None = field(default=None, hash=False)
    freq_factors: tuple[float, ...] | None = None  # llama.cpp's rope_freqs (GGUF)


@dataclass(frozen=True)
class LatentSpec:
    """Multi-head latent attention (DeepSeek V2/V3): queries through a low-rank q_a/q_b pair (or
    one q_proj when q_lora_rank is None), keys and values from a cached kv_lora_rank latent plus
    a rope key shared by the heads."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    norm_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm (HF builds them with the default)


@dataclass(frozen=True)
class LayerSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: NormSpec
    norms: tuple[tuple[str, str], ...] = LLAMA_NORMS  # (role, checkpoint attribute name)
    parallel_block: bool = False  # x + attn(n(x)) + mlp(n(x)) with the pre_attn norm n
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # q/k norm per head (one weight for all heads), per head with each head's own weight
    # (a LayerNorm without bias: StableLM, Cohere), over all q (k) heads at once (OLMo 2), or
    # per head without weight ("l2": Llama 4)
    qk_norm: Literal["head", "headwise", "projection", "l2"] | None = None
    qk_norm_spec: NormSpec | None = None  # defaults to `norm`
    hidden_act: str = "silu"
    gated: bool = True  # act(gate) * up; else act(up)
    rope: RopeSpec | None = None  # None: no position embedding in this layer
    sliding_window: int | None = None
    chunk_size: int | None = None  # attention within chunks of this many positions (Llama 4)
    scale: float | None = None  # None: head_dim ** -0.5
    soft_cap: float | None = None  # attention scores: c * tanh(s / c)
    sinks: bool = False  # a learned logit per head joins each softmax (gpt-oss)
    residual_multiplier: float = 1.0  # each branch's output is scaled before the residual add
    # (beta, n): queries scaled by 1 + beta * log(1 + floor(position / n)) (Llama 4, Ministral 3)
    position_query_scale: tuple[float, int] | None = None
    position_query_offset: int = 0  # ... of position + offset (Llama 4: 1)
    clip_qkv: float | None = None  # q, k, v clamped to [-c, c] after the q/k norms (OLMoE)
    moe: MoESpec | None = None  # a mixture-of-experts MLP (layers.moe.FusedMoE) instead
    # attention output * sigmoid(gate) before o_proj, the gate a projection of its own
    # (`attn_gate`; Qwen3-Next / Qwen3.5 checkpoints carry it inside q_proj)
    output_gate: bool = False
    # MLA instead of q/k/v heads (head_dim is then the q/k head: nope + rope dims)
    latent: LatentSpec | None = None
    # An earlier layer (of the same attention shape) whose keys and values this layer attends
    # to: it has a query projection only and no cache of its own (Gemma 4's last layers).
    kv_source: int | None = None
    v_norm: bool = False  # values RMS-normalized per head, without a weight (Gemma 4)
    # Per-layer input (Gemma 4): after the MLP, x += norm(proj(act(gate(x)) * input)), the
    # input of this size from the model's per-layer embedding; 0: none.
    per_layer_input_size: int = 0
    layer_scalar: bool = False  # the layer's output times a loaded scalar (Gemma 4)

    @property
    def rope_head_size(self) -> int:
        """The size of the vectors the rotary embedding turns: MLA's rope part, else a head."""
        return self.head_dim if self.latent is None else self.latent.qk_rope_head_dim

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5 if self.scale is None else self.scale

    def norm_names(self) -> dict[str, str]:
        names = dict(self.norms)
        unknown = set(names) - set(NORM_ROLES)
        if unknown:
            raise ValueError(f"unknown norm roles {sorted(unknown)}; roles: {NORM_ROLES}")
        return names


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    max_position: int
    layers: tuple[LayerSpec, ...]
    final_norm: NormSpec
    tie_word_embeddings: bool = False
    embedding_multiplier: float | None = None
    embedding_multiplier_in_dtype: bool = False  # Gemma rounds sqrt(hidden) to the model dtype
    logits_multiplier: float = 1.0  # Cohere's logit_scale, Granite's 1 / logits_scaling
    final_soft_cap: float | None = None  # logits: c * tanh(l / c)
    # Gemma 4's per-layer embeddings: (vocab size, size per layer); each layer's input is a
    # token embedding plus a projection of the main embedding (`PerLayerInputs`).
    per_layer_inputs: tuple[int, int] | None = None

    def with_layers(self, layers: list[LayerSpec]) -> DecoderSpec:
        return dataclasses.replace(self, layers=tuple(layers))


def rope_settings(hf_config: Any, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5 `rope_parameters` (per layer type where it
    is keyed so, as Gemma 3's) or older attributes."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else None
    return float(theta), scaling or getattr(hf_config, "rope_scaling", None)


def partial_rotary_factor(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    return float(factor if factor is not None else 1.0)


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )


def layer_types(hf_config: Any) -> list[str]:
    """transformers 5's per-layer attention kinds ("full_attention", "sliding_attention")."""
    types = getattr(hf_config, "layer_types", None)
    return list(types) if types else ["full_attention"] * hf_config.num_hidden_layers


def llama_like_layers(hf_config: Any, norm: NormSpec, **features: Any) -> list[LayerSpec]:
    """Layers from the fields Llama-like configs share: sizes, heads, rope (partial, per layer
    type), sliding windows from `layer_types`; `features` set the rest for every layer."""
    head_dim = head_dim_of(hf_config)
    rotary_dim = int(head_dim * partial_rotary_factor(hf_config))
    window = getattr(hf_config, "sliding_window", None)
    features.setdefault("hidden_act", getattr(hf_config, "hidden_act", "silu"))
    layers = []
    for kind in layer_types(hf_config):
        theta, scaling = rope_settings(hf_config, kind)
        factors = getattr(hf_config, "rope_freq_factors", None)  # from a GGUF file
        rope = RopeSpec(theta, rotary_dim, True, scaling, tuple(factors) if factors else None)
        layers.append(
            LayerSpec(
                hidden_size=hf_config.hidden_size,
                num_heads=hf_config.num_attention_heads,
                num_kv_heads=getattr(hf_config, "num_key_value_heads", None)
                or hf_config.num_attention_heads,
                head_dim=head_dim,
                intermediate_size=hf_config.intermediate_size,
                norm=norm,
                rope=rope,
                sliding_window=window if kind == "sliding_attention" else None,
                **features,
            )
        )
    return layers


def decoder_spec(
    hf_config: Any, layers: list[LayerSpec], final_norm: NormSpec | None = None, **model: Any
) -> DecoderSpec:
    return DecoderSpec(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        max_position=hf_config.max_position_embeddings,
        layers=tuple(layers),
        final_norm=final_norm or layers[0].norm,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        **model,
    )


def with_features(layers: list[LayerSpec], **features: Any) -> list[LayerSpec]:
    return [dataclasses.replace(layer, **features) for layer in layers]


def with_moe(
    layers: list[LayerSpec], moe: MoESpec, is_moe_layer: Callable[[int], bool] = lambda i: True
) -> list[LayerSpec]:
    """The layers with `moe` as their MLP where `is_moe_layer(index)`; the others keep their
    dense MLP of `intermediate_size`."""
    return [
        dataclasses.replace(layer, moe=moe) if is_moe_layer(i) else layer
        for i, layer in enumerate(layers)
    ]


def num_experts_of(hf_config: Any) -> int:
    """Routed experts per MoE layer, under any of the names configs give it."""
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(hf_config, name, None)
        if value:
            return int(value)
    raise ValueError(f"{type(hf_config).__name__} names no number of experts")


def expert_activation_of(hf_config: Any) -> ExpertActivation:
    """The experts' gated activation named by `hidden_act` (SiLU or GELU)."""
    act = getattr(hf_config, "hidden_act", "silu")
    names = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    return ExpertActivation(names.get(act, act))
