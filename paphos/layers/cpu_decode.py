"""Fused CPU decode of pre-norm, gated-SiLU decoder stacks (the Llama family): a pure-decode step
of 1..MAX_TOKENS tokens runs each layer as one C call (paphos.kernels.cpu.decoder_layer).

Invariant: `FusedDecode.takes` is True only for steps the fused stack computes exactly as the
model's unfused layers do (one token per sequence, per-layer caches in the weights' dtype, weights
where they were when it was built); the model runs every other step through its own layers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from paphos.attention import AttentionMetadata
from paphos.gguf_file import GGUFQuantizedTensor
from paphos.kernels.cpu import decoder_layer
from paphos.kernels.cpu.decoder_layer import DecoderLayerWeights, DecoderStack, Weight
from paphos.quant import UnquantizedLinearMethod
from paphos.quant.gguf import GGUFLinearMethod

logger = logging.getLogger(__name__)

ENV_SWITCH = "PAPHOS_CPU_FUSED_DECODE"
MAX_TOKENS = decoder_layer.MAX_TOKENS
_OFF = ("0", "false", "off", "no")

__all__ = [
    "ENV_SWITCH",
    "DecoderLayerWeights",
    "FusedDecode",
    "FusedDecodeSlot",
    "build_fused_decode",
    "fused_weight",
    "layer_weights",
    "quantized_reason",
]


def enabled_from_env() -> bool:
    """Read when a model is built (start-up): PAPHOS_CPU_FUSED_DECODE=0 (or false/off/no) turns
    the fused path off; anything else, or unset, leaves it on where it applies."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF


class FusedDecode:
    """A model's layers as one `DecoderStack`; `num_steps` counts the steps it ran."""

    def __init__(self, stack: DecoderStack, anchor: torch.Tensor) -> None:
        self._stack = stack
        self._anchor_address = anchor.data_ptr()
        self.num_steps = 0

    def still_valid(self, anchor: torch.Tensor) -> bool:
        """False once the weights moved (e.g. `model.to(...)`): the stack holds their old
        addresses. `anchor` is the tensor given at build time, looked up again."""
        return anchor.data_ptr() == self._anchor_address

    def takes(
        self,
        hidden_states: torch.Tensor,
        kv_caches: Sequence[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> bool:
        """Whether this step is pure decode of 1..MAX_TOKENS tokens the stack can run."""
        num_tokens = hidden_states.shape[0]
        return (
            0 < num_tokens <= MAX_TOKENS
            and attn_metadata.max_query_len == 1
            and attn_metadata.seq_lens.shape[0] == num_tokens
            and hidden_states.dtype == self._stack.dtype
            and self._stack.check_caches(kv_caches)
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_caches: Sequence[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer on the step's embeddings; (hidden, residual) [num_tokens, hidden] as the
        last layer returns them (views valid until the next step)."""
        self.num_steps += 1
        md = attn_metadata
        return self._stack.run(
            positions,
            hidden_states,
            kv_caches,
            md.slot_mapping,
            md.query_start_loc,
            md.seq_lens,
            md.block_tables,
        )


def fused_weight(linear: Any) -> Weight | None:
    """What the fused kernel multiplies for this linear layer: its dense weight, or its GGUF
    blocks where they are one part of one block type; None where it cannot (other methods)."""
    method = getattr(linear, "linear_method", None)
    if isinstance(method, UnquantizedLinearMethod):
        return linear.weight.data
    parts = getattr(linear, "gguf_parts", ())
    if isinstance(method, GGUFLinearMethod) and len(parts) == 1 and parts[0].ggml_type is not None:
        part = parts[0]
        return GGUFQuantizedTensor(part.ggml_type, getattr(linear, part.name), linear.gguf_shape)
    return None


def quantized_reason(linears: Iterable[Any]) -> str | None:
    """The reason a layer with these linears (None entries skipped) cannot be fused, when one
    of them is quantized in a way the kernel does not multiply (`fused_weight`)."""
    for lin in linears:
        if lin is not None and fused_weight(lin) is None:
            return (
                f"its weights are quantized ({type(lin.linear_method).__name__}); the fused "
                "kernel multiplies dense bfloat16/float32 weights and single-type GGUF blocks only"
            )
    return None


def layer_weights(layers: Iterable[Any]) -> list[DecoderLayerWeights | str]:
    """Each decoder layer's weights for the fused stack (its `fused_weights()`), or the reason,
    in words, it has none (its `fused_unfit_reason()`)."""
    return [
        layer.fused_weights() or layer.fused_unfit_reason() or "its layout is not supported"
        for layer in layers
    ]


def build_fused_decode(
    layers: Sequence[DecoderLayerWeights | str], anchor: torch.Tensor
) -> FusedDecode | None:
    """The fused path for these layers, or None (logged with the reason) where it does not apply:
    the kernel did not build, a layer cannot be fused (a str: why) or the kernel refuses it."""
    off = "fused CPU decode off (decode steps run layer by layer): layer %d: %s"
    if not layers:
        return None
    for index, layer in enumerate(layers):
        if isinstance(layer, str):
            logger.info(off, index, layer)
            return None
    lib = decoder_layer.load_library()
    if lib is None:
        return None  # load_library logged why
    for index, layer in enumerate(layers):
        assert not isinstance(layer, str)
        reason = decoder_layer.unsupported_reason(layer)
        if reason is not None:
            logger.info(off, index, reason)
            return None
    return FusedDecode(DecoderStack(lib, layers), anchor)  # type: ignore[arg-type]


class FusedDecodeSlot:
    """A model's fused path, built at first use (after loading), rebuilt when the weights moved;
    `get` is None where it does not apply (then every step runs the layers). `allowed` is decided
    at start-up: single process and not switched off by PAPHOS_CPU_FUSED_DECODE."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self._fused: FusedDecode | None = None
        self._built = False

    def get(
        self, layers: Callable[[], Sequence[DecoderLayerWeights | None]], anchor: torch.Tensor
    ) -> FusedDecode | None:
        """`layers` gives each layer's weights (called only to build); `anchor` is a weight
        whose address tells whether the weights moved."""
        fused = self._fused
        if fused is not None and fused.still_valid(anchor):
            return fused
        if fused is None and (self._built or not self.allowed):
            return None
        self._fused = build_fused_decode(layers(), anchor)
        self._built = True
        return self._fused

    def reset(self) -> None:
        """Forget the fused path (new weights were loaded); the next step builds it again."""
        self._fused, self._built = None, False
