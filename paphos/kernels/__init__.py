"""Triton kernels, one per file, each tested against its reference in paphos.ops.

CUDA_KERNELS maps an op name (see paphos.ops.registry.REFERENCES) to its Triton implementation,
with the same signature as the reference. Empty where Triton is not installed (CPU-only installs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _load_kernels() -> dict[str, Callable[..., Any]]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return {}
    from paphos.kernels.activation import silu_and_mul
    from paphos.kernels.causal_conv1d import causal_conv1d
    from paphos.kernels.dequant_gemm import dequant_gemm
    from paphos.kernels.fp8_block_gemm import fp8_block_gemm
    from paphos.kernels.fused_moe import fused_experts
    from paphos.kernels.gated_delta_rule import gated_delta_rule
    from paphos.kernels.gemv import gemv, gemv_silu_and_mul
    from paphos.kernels.kv_cache import write_kv_cache
    from paphos.kernels.mla_decode import mla_decode_attention, write_latent_cache
    from paphos.kernels.paged_attention import paged_attention
    from paphos.kernels.rms_norm import fused_add_rms_norm, rms_norm
    from paphos.kernels.rotary import rotary_and_write_kv, rotary_embedding
    from paphos.kernels.skinny_gemm import skinny_gemm, skinny_gemm_silu_and_mul
    from paphos.kernels.ssd_update import ssd

    return {
        "rms_norm": rms_norm,
        "fused_add_rms_norm": fused_add_rms_norm,
        "silu_and_mul": silu_and_mul,
        "rotary_embedding": rotary_embedding,
        "rotary_and_write_kv": rotary_and_write_kv,
        "write_kv_cache": write_kv_cache,
        "paged_attention": paged_attention,
        "mla_decode_attention": mla_decode_attention,
        "write_latent_cache": write_latent_cache,
        "fused_experts": fused_experts,
        # hybrid models' state ops: decode steps and prompt chunks (no host sync either way)
        "causal_conv1d": causal_conv1d,
        "ssd": ssd,
        "gated_delta_rule": gated_delta_rule,
        "gemv": gemv,  # one-row linear layers (ops.dense); not a registry op
        "skinny_gemm": skinny_gemm,  # 2-64-row linear layers (ops.dense); not a registry op
        # the same with the SiLU-and-mul after a [gate | up] product (ops.dense)
        "gemv_silu_and_mul": gemv_silu_and_mul,
        "skinny_gemm_silu_and_mul": skinny_gemm_silu_and_mul,
        "dequant_gemm": dequant_gemm,  # W4A16/W8A16 group formats (ops.dequant_gemm)
        "fp8_block_gemm": fp8_block_gemm,  # fp8 block-scaled weights (ops.scaled_mm)
    }


CUDA_KERNELS: dict[str, Callable[..., Any]] = _load_kernels()
