"""CUDA graphs of the decode step: one per batch-size bucket, captured once the KV cache exists.

A graph replays model forward + compute_logits (+ argmax) over the runner's persistent input buffers
and leaves float32 logits and their row-wise argmax in persistent buffers. It is replayed only for
pure-decode batches (every request computes one token and samples it) of at most the largest bucket
and at most `max_seq_len` tokens per sequence; the captured region has no host sync.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from paphos.attention import AttentionMetadata
from paphos.ops.argmax import argmax_rows
from paphos.runner.inputs import InputBuffers

logger = logging.getLogger(__name__)

# Longest sequence a decode graph serves (vLLM's default too): it fixes the decode split count
# captured in the graph; longer sequences run eagerly.
MAX_SEQ_LEN_TO_CAPTURE = 8192
LARGEST_BUCKET = 512
PROGRESS_DELAY_S = 2.0  # the capture bar shows only when capturing takes longer


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8, up to max_num_seqs (itself a bucket), at most 512."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs={max_num_seqs} must be >= 1")
    top = min(max_num_seqs, LARGEST_BUCKET)
    sizes = [b for b in [1, 2, 4, *range(8, LARGEST_BUCKET + 1, 8)] if b < top]
    return [*sizes, top]


class DecodeGraphs:
    """Captured decode steps keyed by batch size; `replay(bs)` returns logits [bs, vocab_size]."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        buffers: InputBuffers,
        batch_sizes: list[int],
        max_seq_len: int,
        vocab_size: int,
    ) -> None:
        if max(batch_sizes) > buffers.max_num_seqs or max(batch_sizes) > buffers.max_num_tokens:
            raise ValueError(
                f"batch sizes up to {max(batch_sizes)} do not fit the input buffers "
                f"({buffers.max_num_seqs} requests, {buffers.max_num_tokens} tokens)"
            )
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.batch_sizes = sorted(batch_sizes)
        self.max_seq_len = max_seq_len
        device = buffers.device
        self.logits = torch.empty(
            (max(batch_sizes), vocab_size), dtype=torch.float32, device=device
        )  # [max_bs, vocab]
        # The argmax of each row, computed in the graph: a greedy step needs no launch after it.
        self.argmax = torch.zeros(max(batch_sizes), dtype=torch.int64, device=device)  # [max_bs]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest captured batch size holding num_seqs rows (None: too many)."""
        for bs in self.batch_sizes:
            if bs >= num_seqs:
                return bs
        return None

    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, all in one memory pool."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        sizes = tqdm(list(reversed(self.batch_sizes)), desc="Capturing CUDA graphs",
                     unit=" graphs", delay=PROGRESS_DELAY_S)  # fmt: skip
        for bs in sizes:
            input_ids, positions, metadata = self._dummy_decode(bs)
            self._forward(bs, input_ids, positions, metadata)  # compiles kernels, picks GEMMs
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bs, input_ids, positions, metadata)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
            len(self.graphs),
            self.batch_sizes[0],
            self.batch_sizes[-1],
            time.perf_counter() - start,
        )

    def replay(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the captured step of batch size bs over the current buffers.
        Returns (logits [bs, vocab], argmax token ids [bs])."""
        self.graphs[bs].replay()
        return self.logits[:bs], self.argmax[:bs]

    def _forward(
        self, bs: int, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> None:
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)  # [bs, hidden]
        logits = self.model.compute_logits(hidden, metadata)  # [bs, vocab]
        self.logits[:bs].copy_(logits)
        argmax_rows(logits, out=self.argmax[:bs])  # [bs]

    def _dummy_decode(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The buffers' decode views of batch size bs, holding harmless rows: token 0 at position
        0, slot -1 (nothing written), seq_len 1 over block 0, the scratch state slot (hybrid
        models: the warm-up writes no request's state)."""
        input_ids, positions, metadata = self.buffers.decode_views(bs, self.max_seq_len)
        input_ids.zero_()
        positions.zero_()
        metadata.seq_lens.fill_(1)
        for slot_mapping, block_tables in (
            (metadata.slot_mapping, metadata.block_tables),
            *metadata.group_tables,
        ):
            slot_mapping.fill_(-1)
            block_tables.zero_()
        if metadata.state_indices is not None:
            metadata.state_indices.fill_(self.buffers.num_state_slots or 0)
        device = input_ids.device
        metadata.query_start_loc.copy_(torch.arange(bs + 1, device=device))  # [bs + 1]
        metadata.logits_indices.copy_(torch.arange(bs, device=device))  # [bs]
        return input_ids, positions, metadata
