"""RMSNorm, plain and fused with the residual add that precedes it in every pre-norm block."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden]; weight: [hidden]. Computed in float32, returned in x's dtype."""
    x32 = x.float()
    variance = x32.pow(2).mean(dim=-1, keepdim=True)  # [num_tokens, 1]
    return (x32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); both [num_tokens, hidden] in x's dtype."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
