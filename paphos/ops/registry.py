"""Choosing each op's implementation once, at start-up: the Triton kernel on CUDA, the C kernels on
CPUs where they could be built (paged attention, RMSNorm, rotary, SiLU-and-mul), the reference
elsewhere.

Paged attention is picked per layer (`pick_paged_attention`): a layer with a sliding window, a
soft-cap or a head size the C kernel does not take runs the reference on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paphos.kernels.cpu import activation as cpu_activation
from paphos.kernels.cpu import attention as cpu_attention
from paphos.kernels.cpu import isa
from paphos.kernels.cpu import norm_rope as cpu_norm_rope
from paphos.ops import (
    activation,
    causal_conv1d,
    gated_delta_rule,
    kv_cache,
    mla_attention,
    moe,
    paged_attention,
    rms_norm,
    rotary,
    ssd,
)

REFERENCES: dict[str, Callable[..., Any]] = {
    "rms_norm": rms_norm.rms_norm,
    "fused_add_rms_norm": rms_norm.fused_add_rms_norm,
    "silu_and_mul": activation.silu_and_mul,
    "rotary_embedding": rotary.rotary_embedding,
    "rotary_and_write_kv": rotary.rotary_and_write_kv,
    "write_kv_cache": kv_cache.write_kv_cache,
    "paged_attention": paged_attention.paged_attention,
    "mla_decode_attention": mla_attention.mla_decode_attention,
    "write_latent_cache": mla_attention.write_latent_cache,
    "fused_experts": moe.fused_experts,
    # hybrid models' state ops over flat batches with state slots
    "causal_conv1d": causal_conv1d.causal_conv1d,
    "ssd": ssd.ssd,
    "gated_delta_rule": gated_delta_rule.gated_delta_rule,
}


def pick(name: str, device_type: str) -> Callable[..., Any]:
    """The implementation of op `name` for a device type ("cpu" or "cuda")."""
    return pick_fast(name, device_type) or REFERENCES[name]


def pick_paged_attention(
    device_type: str,
    head_size: int,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: bool = False,
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """The paged attention of one layer. The Triton kernels take every feature; the C kernel
    only plain causal attention over head sizes it supports, so other layers (windows, soft-caps,
    sinks, chunks) get the reference."""
    if device_type == "cpu" and (
        sliding_window is not None
        or soft_cap is not None
        or sinks
        or chunk_size is not None
        or not _cpu_attention_takes(head_size)
    ):
        return REFERENCES["paged_attention"]
    return pick("paged_attention", device_type)


def pick_fast(name: str, device_type: str) -> Callable[..., Any] | None:
    """Op `name`'s kernel for a device type, None where there is only the reference (a caller
    that can compose the op from others keeps their fast versions)."""
    if device_type == "cuda":
        return _cuda_kernels().get(name)
    if device_type == "cpu":
        return _cpu_kernels().get(name)
    return None


def _cuda_kernels() -> dict[str, Callable[..., Any]]:
    try:
        from paphos.kernels import CUDA_KERNELS
    except ImportError:
        return {}
    return CUDA_KERNELS


def _cpu_kernels() -> dict[str, Callable[..., Any]]:
    """C kernels that built and loaded here (each decided once per process by its loader)."""
    kernels: dict[str, Callable[..., Any]] = {}
    if cpu_attention.load_library() is not None:
        kernels["paged_attention"] = cpu_attention.paged_attention
    if cpu_norm_rope.load_library() is not None:
        kernels["rms_norm"] = cpu_norm_rope.rms_norm
        kernels["fused_add_rms_norm"] = cpu_norm_rope.fused_add_rms_norm
        kernels["rotary_embedding"] = cpu_norm_rope.rotary_embedding
    if cpu_activation.load_library() is not None:
        kernels["silu_and_mul"] = cpu_activation.silu_and_mul
    return kernels


def describe_cpu_kernels() -> str:
    """One start-up line: the ISA level the C kernels run at and which of them loaded."""
    level = isa.selected()
    loaded = sorted(_cpu_kernels())
    if level is None or not loaded:
        return "CPU kernels: torch references only (no AVX2/FMA, no compiler or no x86-64)"
    return f"CPU kernels: {level} ({isa.DESCRIPTIONS[level]}): {', '.join(loaded)}"


def _cpu_attention_takes(head_size: int) -> bool:
    """The head sizes `cpu_attention.supports` accepts (it also falls back per call, so a head
    size routed here by mistake still computes the reference's result)."""
    return 16 <= head_size <= cpu_attention.MAX_HEAD and head_size % 16 == 0
