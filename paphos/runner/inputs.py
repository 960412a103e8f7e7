"""The runner's copy of each running request, and the flat model inputs built from it every step.

A step lays out the scheduled requests in `SchedulerOutput.num_scheduled_tokens` order; request i's
tokens are `token_ids[num_computed : num_computed + num_scheduled]`. Host-side work is numpy, vectorized
over tokens; the only per-request Python work is list slicing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from paphos.attention import AttentionMetadata
from paphos.layers.sampler import RequestSamplingState


@dataclass
class RunnerRequestState:
    request_id: str
    token_ids: list[int]  # prompt + outputs known so far
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: RequestSamplingState
    wants_prompt_logprobs: bool = False


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    # Requests that sample this step, in the order of the first rows of `logits_indices`.
    sampling_request_ids: list[str]
    # (request_id, first logits row, target prompt token ids) for prompt logprobs, after the sampled rows.
    prompt_logprob_rows: list[tuple[str, int, list[int]]] = field(default_factory=list)


def build_step_inputs(
    states: list[RunnerRequestState],
    num_scheduled: list[int],
    block_size: int,
    device: torch.device,
) -> StepInputs:
    """Flatten the scheduled requests (in batch order) into model inputs and attention metadata."""
    starts = np.array([s.num_computed_tokens for s in states], dtype=np.int64)  # [num_seqs]
    counts = np.array(num_scheduled, dtype=np.int64)  # [num_seqs]
    query_start_loc = np.zeros(len(states) + 1, dtype=np.int64)  # [num_seqs + 1]
    np.cumsum(counts, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    seq_index = np.repeat(np.arange(len(states)), counts)  # [num_tokens]
    positions = starts[seq_index] + (np.arange(num_tokens) - query_start_loc[seq_index])
    input_ids = np.fromiter(
        (t for s, a, n in zip(states, starts, counts) for t in s.token_ids[a : a + n]),
        dtype=np.int64,
        count=num_tokens,
    )  # [num_tokens]
    seq_lens = starts + counts  # [num_seqs]
    max_blocks = max(len(s.block_ids) for s in states)
    block_tables = np.zeros((len(states), max_blocks), dtype=np.int64)  # [num_seqs, max_blocks]
    for i, s in enumerate(states):
        block_tables[i, : len(s.block_ids)] = s.block_ids
    slot_mapping = (
        block_tables[seq_index, positions // block_size] * block_size + positions % block_size
    )  # [num_tokens]
    sampling_ids, sample_rows, prompt_rows, prompt_lp = _logits_rows(
        states, starts, counts, query_start_loc
    )
    logits_indices = np.array(sample_rows + prompt_rows, dtype=np.int64)  # [num_logits]

    def to_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        slot_mapping=to_dev(slot_mapping),
        query_start_loc=to_dev(query_start_loc),
        seq_lens=to_dev(seq_lens),
        block_tables=to_dev(block_tables),
        logits_indices=to_dev(logits_indices),
        max_query_len=int(counts.max()),
        max_seq_len=int(seq_lens.max()),
    )
    return StepInputs(to_dev(input_ids), to_dev(positions), metadata, sampling_ids, prompt_lp)


def _logits_rows(
    states: list[RunnerRequestState],
    starts: np.ndarray,
    counts: np.ndarray,
    query_start_loc: np.ndarray,
) -> tuple[list[str], list[int], list[int], list[tuple[str, int, list[int]]]]:
    """Rows whose logits are needed: the last token of each request that samples, then the prompt
    positions of requests that asked for prompt logprobs (position p predicts prompt token p + 1)."""
    sampling_ids: list[str] = []
    sample_rows: list[int] = []
    prompt_rows: list[int] = []
    prompt_lp: list[tuple[str, int, list[int]]] = []
    num_sampled = sum(
        1 for s, a, n in zip(states, starts, counts) if a + n == len(s.token_ids)
    )
    for i, s in enumerate(states):
        start, end = int(starts[i]), int(starts[i] + counts[i])
        if end == len(s.token_ids):
            sampling_ids.append(s.request_id)
            sample_rows.append(int(query_start_loc[i + 1]) - 1)
        if s.wants_prompt_logprobs and start < s.num_prompt_tokens - 1:
            last = min(end, s.num_prompt_tokens - 1)  # positions start..last-1 predict prompt tokens
            first_row = num_sampled + len(prompt_rows)
            prompt_rows.extend(range(int(query_start_loc[i]), int(query_start_loc[i]) + last - start))
            prompt_lp.append((s.request_id, first_row, s.token_ids[start + 1 : last + 1]))
    return sampling_ids, sample_rows, prompt_rows, prompt_lp
