"""Activations of MLP blocks; gated ones get the gate and up projections concatenated."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] = [gate | up]; returns silu(gate) * up: [num_tokens, d]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x: [num_tokens, 2 * d] = [gate | up]; returns gelu(gate) * up: [num_tokens, d]
    (approximate="tanh": transformers' gelu_pytorch_tanh)."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate=approximate) * x[..., d:]
