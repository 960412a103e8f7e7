"""Logprobs of chosen tokens and the top-N, from a [rows, vocab] logprob table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogprobsTensors:
    token_ids: Tensor  # [num_rows, 1 + N] long: sampled (or target) token first, then the top-N
    logprobs: Tensor  # [num_rows, 1 + N] float32
    ranks: Tensor  # [num_rows, 1 + N] long, 1 = most likely


def gather_logprobs(logprobs: Tensor, token_ids: Tensor, num_top: int) -> LogprobsTensors:
    """logprobs [rows, vocab] float32, token_ids [rows] long."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [rows, 1]
    chosen_rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1  # [rows, 1]
    top_values, top_ids = torch.topk(logprobs, num_top, dim=-1)  # [rows, N]
    top_ranks = torch.arange(1, num_top + 1, device=logprobs.device).expand_as(top_ids)
    return LogprobsTensors(
        token_ids=torch.cat([token_ids.unsqueeze(1), top_ids], dim=1),  # [rows, 1 + N]
        logprobs=torch.cat([chosen, top_values], dim=1).float(),  # [rows, 1 + N]
        ranks=torch.cat([chosen_rank, top_ranks], dim=1),  # [rows, 1 + N]
    )
