"""RMSNorm, plain and fused with the residual add that precedes it in every pre-norm block."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden]; weight: [hidden]. Computed in float32, returned in x's dtype."""
    # x * rsqrt(mean(x^2) + eps) in float32 (torch's fused op), rounded, then scaled: HF's order.
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)  # [num_tokens, hidden]
    return normed.to(x.dtype) * weight


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); both [num_tokens, hidden] in x's dtype."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
