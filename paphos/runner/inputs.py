"""The runner's copy of each running request, and the flat model inputs built from it every step.

A step lays out the scheduled requests in `SchedulerOutput.num_scheduled_tokens` order; request i's
tokens are `token_ids[num_computed : num_computed + num_scheduled]`. `InputBuffers` keeps a numpy
mirror of every request's tokens and blocks in a row of its own, and persistent (pinned host and
device) buffers: a step is a few vectorized gathers and two host-to-device copies, no token loop.
With several KV cache groups (sliding-window layers) each group has its own block table mirror and
slots; before a step the entries of a sliding group's blocks no query of it can see any more become
the null block, the same entries the scheduler's KV cache manager freed (`first_live_block`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from paphos.attention import AttentionMetadata
from paphos.core.kv_cache_groups import NULL_BLOCK_ID
from paphos.layers.sampler import RequestSamplingState

# Up to this many block-table entries per step, whole rows are copied (contiguous, one memcpy).
FULL_ROW_COPY_ENTRIES = 1 << 16


@dataclass
class RunnerRequestState:
    request_id: str
    token_ids: list[int]  # prompt + outputs known so far
    num_prompt_tokens: int
    block_ids: list[list[int]]  # the block table of each KV cache group
    num_computed_tokens: int
    sampling: RequestSamplingState
    wants_prompt_logprobs: bool = False
    row: int | None = None  # this request's row in InputBuffers' mirrors (None: not mirrored yet)
    # Tokens this runner sampled that have not come back in a SchedulerOutput yet. With an
    # overlapped step in flight, the last of them is read from the previous step's device result.
    num_pending: int = 0
    # Pending tokens already appended to `sampling.output_token_ids`, read early from the previous
    # step's host copy for samplers that need token values (penalties, ...).
    num_seen_ahead: int = 0
    # Sampled by a plain argmax of the raw logits (see model_runner._is_plain_greedy).
    plain_greedy: bool = False
    # The request's grammar matcher (paphos.structured.matcher.GrammarState), if constrained.
    grammar: Any = None
    # Hybrid models: the request's recurrent-state slot (None for models without state layers).
    state_slot: int | None = None


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    # Requests that sample this step, in the order of the first rows of `logits_indices`.
    sampling_request_ids: list[str]
    # (request_id, first logits row, target prompt token ids) for prompt logprobs, after the
    # sampled rows.
    prompt_logprob_rows: list[tuple[str, int, list[int]]] = field(default_factory=list)
    # The graph batch size the step was padded to (pure decode only), or None: not padded.
    padded_to: int | None = None
    # (src [n], dst [n]) device indices: input_ids[dst] = previous step's sampled ids[src], for
    # tokens the host has not received yet (overlapped steps). None: every input id is known.
    pending_copy: tuple[torch.Tensor, torch.Tensor] | None = None


class InputBuffers:
    """Per-request mirrors (one row each) and persistent step buffers of fixed addresses.

    The device buffers keep their addresses for the runner's lifetime: captured CUDA graphs read
    them. Small per-step arrays share one int64 buffer (one copy per step); the block table is
    `[max_rows, max_blocks_per_seq]` and a step copies only the `[num_seqs, widest]` corner of it
    (entries past a sequence's length are never read, so stale ones there are harmless).
    `group_windows`: the sliding window of each KV cache group (None: full attention).
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_num_tokens: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        num_state_slots: int | None = None,
        group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_tokens", max_num_tokens),
            ("max_model_len", max_model_len),
            ("block_size", block_size),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.block_size = block_size
        # Hybrid models: slot ids run 0..num_state_slots - 1; padded rows use num_state_slots.
        self.num_state_slots = num_state_slots
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.group_windows = group_windows
        num_groups = len(group_windows)
        # Mirrors: np.zeros is calloc, so untouched rows of a long max_model_len cost no memory.
        self.token_table = np.zeros((max_num_seqs, max_model_len), dtype=np.int64)  # [rows, len]
        # [groups, rows, max_blocks]
        self.block_tables = np.zeros((num_groups, max_num_seqs, self.max_blocks), dtype=np.int64)
        self.num_blocks = np.zeros(max_num_seqs, dtype=np.int64)  # [rows]: entries per group
        self.num_nulled = np.zeros((num_groups, max_num_seqs), dtype=np.int64)  # [groups, rows]
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        t, s = max_num_tokens, max_num_seqs
        # Offsets of the small arrays in one flat buffer: ids, positions, slots, logits rows,
        # seq_lens, query_start_loc, pending-token sources and destinations, state slots, then
        # the slots of KV cache groups 1, 2, ...
        sizes = (t, t, t, t + s, s, s + 1, s, s, s) + (t,) * (num_groups - 1)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self._slot_offsets = [self._offsets[2]] + self._offsets[9 : 9 + num_groups - 1]
        self._on_host = device.type == "cpu"
        total = self._offsets[-1]
        pin = device.type == "cuda"
        self._host_small = torch.zeros(total, dtype=torch.int64, pin_memory=pin)  # [total]
        num_entries = num_groups * s * self.max_blocks
        self._host_blocks = torch.zeros(num_entries, dtype=torch.int64, pin_memory=pin)
        self._small_np = self._host_small.numpy()
        self._blocks_np = self._host_blocks.numpy()
        # On the CPU the host buffers are the model's inputs; elsewhere they are staged copies.
        self.small = self._host_small
        self.blocks = self._host_blocks.view(num_groups, s, self.max_blocks)  # [groups, rows, blk]
        self._copied: torch.cuda.Event | None = None
        self._graph_views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, Any]] = {}
        if not self._on_host:
            self.small = torch.zeros(total, dtype=torch.int64, device=device)  # [total]
            shape = (num_groups, s, self.max_blocks)
            self.blocks = torch.zeros(shape, dtype=torch.int64, device=device)

    # ---- mirrors --------------------------------------------------------------------------------

    def add(self, state: RunnerRequestState) -> None:
        """Give the request a row and mirror its tokens and blocks there."""
        if not self.free_rows:
            raise ValueError(f"more than max_num_seqs={self.max_num_seqs} requests are running")
        state.row = self.free_rows.pop()
        self.num_blocks[state.row] = 0
        self.num_nulled[:, state.row] = 0
        self.append(state, state.token_ids, 0, state.block_ids)

    def append(
        self,
        state: RunnerRequestState,
        new_token_ids: list[int] | tuple[int, ...],
        first_position: int,
        new_block_ids: Sequence[Sequence[int]],
    ) -> None:
        """Mirror tokens from first_position on, and blocks appended to each group's table
        (new_block_ids: one sequence per group, or empty: none)."""
        row = state.row
        assert row is not None, "request was never added to the input buffers"
        num_new = len(new_token_ids)
        if first_position + num_new > self.max_model_len:
            raise ValueError(
                f"request {state.request_id!r} has {first_position + num_new} "
                f"tokens; max_model_len={self.max_model_len}"
            )
        if num_new == 1:  # a decode step's sampled token: one scalar store
            self.token_table[row, first_position] = new_token_ids[0]
        elif num_new:
            self.token_table[row, first_position : first_position + num_new] = new_token_ids
        if new_block_ids and new_block_ids[0]:
            if len(new_block_ids) != len(self.group_windows):
                raise ValueError(
                    f"request {state.request_id!r}: blocks for {len(new_block_ids)} KV cache "
                    f"groups; the cache has {len(self.group_windows)}"
                )
            first_block = int(self.num_blocks[row])
            last_block = first_block + len(new_block_ids[0])
            if last_block > self.max_blocks:
                raise ValueError(
                    f"request {state.request_id!r} holds {last_block} blocks; at most "
                    f"{self.max_blocks} fit max_model_len={self.max_model_len}"
                )
            for table, ids in zip(self.block_tables, new_block_ids):
                table[row, first_block:last_block] = ids
            self.num_blocks[row] = last_block

    def advance(self, inputs: StepInputs, sampled: torch.Tensor) -> None:
        """Turn a decode step's inputs into the next decode step's, on the device (multi-step
        decode): each request's input id becomes the token it just sampled (sampled [n], the
        first n rows), its position and sequence length grow by one, its slot follows from its
        block table (which holds blocks for every step: the scheduler allocated them). Padded
        rows stay as they are."""
        n = sampled.shape[0]
        md = inputs.attn_metadata
        positions = inputs.positions[:n]  # [n]
        positions += 1
        md.seq_lens[:n] += 1
        inputs.input_ids[:n].copy_(sampled)
        for group in range(len(self.group_windows)):
            slot_mapping, block_tables = md.kv_group(group)
            blocks = block_tables[:n].gather(1, (positions // self.block_size).unsqueeze(1))
            torch.add(
                positions % self.block_size,
                blocks.squeeze(1),
                alpha=self.block_size,
                out=slot_mapping[:n],
            )  # [n]

    def remove(self, state: RunnerRequestState) -> None:
        if state.row is not None:
            self.free_rows.append(state.row)
            state.row = None

    def decode_views(
        self, batch_size: int, max_seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) over the device buffers for a decode batch of
        batch_size rows: the exact tensors a padded `prepare` fills, for CUDA graph capture."""
        o, bs = self._offsets, batch_size
        metadata = AttentionMetadata(
            slot_mapping=self.small[o[2] : o[2] + bs],
            query_start_loc=self.small[o[5] : o[5] + bs + 1],
            seq_lens=self.small[o[4] : o[4] + bs],
            block_tables=self.blocks[0, :bs],
            logits_indices=self.small[o[3] : o[3] + bs],
            max_query_len=1,
            max_seq_len=max_seq_len,
            state_indices=self._state_view(bs),
            group_tables=tuple(
                (self.small[start : start + bs], self.blocks[g, :bs])
                for g, start in enumerate(self._slot_offsets[1:], start=1)
            ),
        )
        return self.small[o[0] : o[0] + bs], self.small[o[1] : o[1] + bs], metadata

    # ---- one step -------------------------------------------------------------------------------

    def prepare(
        self,
        states: list[RunnerRequestState],
        num_scheduled: list[int],
        pad_to: int | None = None,
        pad_max_seq_len: int | None = None,
        sampled_rows: dict[str, int] | None = None,
    ) -> StepInputs:
        """Model inputs of one step. `pad_to` (a graph's batch size) pads the batch only when it
        is pure decode (every request computes one token and samples it) with no sequence longer
        than pad_max_seq_len; padded rows hold token 0 at position 0, slot -1, seq_len 1.
        `sampled_rows`: request id -> its row in the previous step's sampled ids, the source of
        a pending token this step computes."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have read the pinned buffers
        num_seqs = len(states)
        facts = np.array(
            [(s.row, s.num_computed_tokens, len(s.token_ids), s.num_pending) for s in states],
            dtype=np.int64,
        )  # [num_seqs, 4]: one pass over the requests
        rows, starts, known = facts[:, 0], facts[:, 1], facts[:, 2]  # [num_seqs] each
        lengths = known + facts[:, 3]  # [num_seqs]
        counts = np.asarray(num_scheduled, dtype=np.int64)  # [num_seqs]
        ends = starts + counts  # [num_seqs]
        samples = np.flatnonzero(ends == lengths)  # [num_sampling]
        pure_decode = len(samples) == num_seqs and bool((counts == 1).all())
        if not pure_decode or (pad_max_seq_len is not None and ends.max() > pad_max_seq_len):
            pad_to = None
        padded = max(pad_to or num_seqs, num_seqs)
        num_tokens = int(ends.sum() - starts.sum()) + padded - num_seqs
        if padded > self.max_num_seqs or num_tokens > self.max_num_tokens:
            raise ValueError(
                f"a step of {padded} requests and {num_tokens} tokens does not fit the buffers "
                f"({self.max_num_seqs} requests, {self.max_num_tokens} tokens)"
            )
        self._null_out_of_window(rows, starts)
        qsl = self._fill_tokens(rows, starts, counts, padded, num_tokens)
        if self.num_state_slots is not None:
            self._fill_state_slots(states, padded)
        o = self._offsets
        seq_lens = self._small_np[o[4] : o[4] + padded]  # [padded]
        seq_lens[:num_seqs] = ends
        seq_lens[num_seqs:] = 1
        sampling_ids, prompt_lp, logits_rows = self._logits_rows(
            states, samples, starts, counts, qsl, num_tokens if pad_to else None
        )
        self._small_np[o[3] : o[3] + len(logits_rows)] = logits_rows
        width = int(self.num_blocks[rows].max())
        pending_copy = self._pending_copy(
            states, qsl, starts, ends, known, facts[:, 3], sampled_rows
        )
        inputs = self._upload(
            padded,
            num_tokens,
            len(logits_rows),
            width,
            rows,
            counts,
            seq_lens,
            graph_seq_len=pad_max_seq_len if pad_to else None,
        )
        inputs.sampling_request_ids, inputs.prompt_logprob_rows = sampling_ids, prompt_lp
        inputs.padded_to = pad_to
        inputs.pending_copy = pending_copy
        return inputs

    def _fill_state_slots(self, states: list[RunnerRequestState], padded: int) -> None:
        """Each request's state slot into the host buffer; rows past them (padding) get the
        scratch slot. Written before `_upload`."""
        o, n = self._offsets, len(states)
        slots = [s.state_slot for s in states]
        if None in slots:
            missing = states[slots.index(None)].request_id
            raise ValueError(f"request {missing!r} has no state slot, and this model needs one")
        target = self._small_np[o[8] : o[8] + padded]  # [padded]
        target[:n] = slots
        target[n:] = self.num_state_slots

    def _state_view(self, padded: int) -> torch.Tensor | None:
        if self.num_state_slots is None:
            return None
        return self.small[self._offsets[8] : self._offsets[8] + padded]  # [padded]

    def _pending_copy(
        self,
        states: list[RunnerRequestState],
        qsl: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        known: np.ndarray,
        pending: np.ndarray,
        sampled_rows: dict[str, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where this step's not-yet-known input tokens come from (see StepInputs.pending_copy):
        a request computing a token the host lacks must be computing exactly its last pending
        token (the previous step sampled it; the tokens before it, from a multi-step decode,
        are computed already). Written into the host small buffer: call it before `_upload`."""
        waiting = np.flatnonzero(ends > known)  # [n]: requests computing a pending token
        if len(waiting) == 0:
            return None
        n, o = len(waiting), self._offsets
        last_pending = known + pending - 1  # [num_seqs]: position of each last pending token
        steady = n == len(states) and bool((starts == last_pending).all())
        if steady and list(sampled_rows or ()) == [s.request_id for s in states]:
            # steady decode: the same requests in the same order as the step before
            self._small_np[o[6] : o[6] + n] = np.arange(n)
            self._small_np[o[7] : o[7] + n] = qsl[:n]
            return self.small[o[6] : o[6] + n], self.small[o[7] : o[7] + n]
        sources = []
        for i in waiting.tolist():
            state = states[i]
            source = (sampled_rows or {}).get(state.request_id)
            if starts[i] != last_pending[i] or ends[i] != starts[i] + 1 or source is None:
                raise ValueError(
                    f"request {state.request_id!r} computes a token the runner does not have "
                    f"({state.num_pending} pending; the previous step sampled it: "
                    f"{source is not None})"
                )
            sources.append(source)
        self._small_np[o[6] : o[6] + n] = sources
        self._small_np[o[7] : o[7] + n] = qsl[waiting]
        return self.small[o[6] : o[6] + n], self.small[o[7] : o[7] + n]

    def _fill_tokens(
        self,
        rows: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        padded: int,
        num_tokens: int,
    ) -> np.ndarray:
        """Write query_start_loc, positions, input ids and slots into the host buffer (padded
        rows: one token each, id 0, position 0, slot -1). Returns query_start_loc [padded + 1]."""
        num_seqs, o, bs = len(rows), self._offsets, self.block_size
        qsl = self._small_np[o[5] : o[5] + padded + 1]  # [padded + 1]
        qsl[0] = 0
        np.cumsum(counts, out=qsl[1 : num_seqs + 1])
        qsl[num_seqs + 1 :] = qsl[num_seqs] + np.arange(1, padded - num_seqs + 1)
        real = int(qsl[num_seqs])
        positions = self._small_np[o[1] : o[1] + num_tokens]  # [num_tokens]
        if real == num_seqs:  # one token per request (decode): no expansion over tokens
            positions[:real] = starts
            token_rows = rows  # [real]
        else:
            seq_index = np.repeat(np.arange(num_seqs), counts)  # [real]
            positions[:real] = starts[seq_index] + (np.arange(real) - qsl[seq_index])
            token_rows = rows[seq_index]  # [real]
        positions[real:] = 0
        ids = self._small_np[o[0] : o[0] + num_tokens]  # [num_tokens]
        ids[:real] = self.token_table[token_rows, positions[:real]]
        ids[real:] = 0
        block_index, offset = positions[:real] // bs, positions[:real] % bs  # [real] each
        for table, start in zip(self.block_tables, self._slot_offsets):
            slots = self._small_np[start : start + num_tokens]  # [num_tokens]
            slots[:real] = table[token_rows, block_index] * bs
            slots[:real] += offset
            slots[real:] = -1
        return qsl

    def _null_out_of_window(self, rows: np.ndarray, starts: np.ndarray) -> None:
        """In each sliding group, point the entries of blocks no query from `starts` on sees
        at the null block (as the KV cache manager did when it freed them)."""
        for group, window in enumerate(self.group_windows):
            if window is None:
                continue
            # first_live_block of each row, vectorized
            first = np.maximum(starts - window + 1, 0) // self.block_size  # [num_seqs]
            nulled = self.num_nulled[group]
            behind = first > nulled[rows]  # [num_seqs]
            for row, end in zip(rows[behind].tolist(), first[behind].tolist()):
                self.block_tables[group, row, nulled[row] : end] = NULL_BLOCK_ID
                nulled[row] = end

    def _upload(
        self,
        padded: int,
        num_tokens: int,
        num_logits: int,
        width: int,
        rows: np.ndarray,
        counts: np.ndarray,
        seq_lens: np.ndarray,
        graph_seq_len: int | None = None,
    ) -> StepInputs:
        """Copy the host buffers to the device (one copy each) and view them as model inputs
        (a padded graph step reuses its cached views: the graph reads the buffers, not them)."""
        o = self._offsets
        num_seqs = len(rows)
        if not self._on_host and num_seqs * self.max_blocks <= FULL_ROW_COPY_ENTRIES:
            width = self.max_blocks  # whole rows: one contiguous copy beats a strided one
        num_groups = len(self.group_windows)
        entries = num_groups * num_seqs * width
        host_blocks = self._blocks_np[:entries].reshape(num_groups, num_seqs, width)  # [g, seqs, w]
        np.take(self.block_tables[:, :, :width], rows, axis=1, out=host_blocks)
        staged = self._host_blocks[:entries].view(num_groups, num_seqs, width)  # [g, seqs, w]
        if self._on_host:
            tables = list(staged.unbind(0))  # per group [seqs, w]
        else:
            self.small.copy_(self._host_small, non_blocking=True)
            self.blocks[:, :num_seqs, :width].copy_(staged, non_blocking=True)
            if self._copied is None:
                self._copied = torch.cuda.Event()
            self._copied.record()
            tables = list(self.blocks[:, :padded].unbind(0))  # per group [padded, max_blocks]
        if graph_seq_len is not None:
            key = (padded, graph_seq_len)
            if key not in self._graph_views:
                self._graph_views[key] = self.decode_views(padded, graph_seq_len)
            input_ids, positions, graph_metadata = self._graph_views[key]
            return StepInputs(input_ids, positions, graph_metadata, [])
        small = self.small
        metadata = AttentionMetadata(
            slot_mapping=small[o[2] : o[2] + num_tokens],
            query_start_loc=small[o[5] : o[5] + padded + 1],
            seq_lens=small[o[4] : o[4] + padded],
            block_tables=tables[0],
            logits_indices=small[o[3] : o[3] + num_logits],
            max_query_len=int(counts.max()) if len(counts) else 1,
            max_seq_len=int(seq_lens.max()),
            state_indices=self._state_view(padded),
            group_tables=tuple(
                (small[start : start + num_tokens], table)
                for start, table in zip(self._slot_offsets[1:], tables[1:])
            ),
        )
        return StepInputs(
            small[o[0] : o[0] + num_tokens], small[o[1] : o[1] + num_tokens], metadata, []
        )

    def _logits_rows(
        self,
        states: list[RunnerRequestState],
        samples: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        qsl: np.ndarray,
        pad_rows: int | None,
    ) -> tuple[list[str], list[tuple[str, int, list[int]]], np.ndarray]:
        """Rows whose logits are needed: the last token of each request that samples, then the
        prompt positions of requests that asked for prompt logprobs (position p predicts prompt
        token p + 1). A padded (graph) step asks for every row, padded ones included."""
        sampling_ids = [states[i].request_id for i in samples.tolist()]
        sample_rows = qsl[1:][samples] - 1  # [num_sampling]
        if pad_rows is not None:
            return sampling_ids, [], np.arange(pad_rows)  # [padded]
        prompt_rows: list[np.ndarray] = []
        prompt_lp: list[tuple[str, int, list[int]]] = []
        first_row = len(sample_rows)
        for i in (i for i, s in enumerate(states) if s.wants_prompt_logprobs):
            s, start = states[i], int(starts[i])
            if start >= s.num_prompt_tokens - 1:
                continue
            last = min(start + int(counts[i]), s.num_prompt_tokens - 1)
            prompt_rows.append(np.arange(qsl[i], qsl[i] + last - start))  # [last - start]
            prompt_lp.append((s.request_id, first_row, s.token_ids[start + 1 : last + 1]))
            first_row += last - start
        return sampling_ids, prompt_lp, np.concatenate([sample_rows, *prompt_rows])


def build_step_inputs(
    states: list[RunnerRequestState],
    num_scheduled: list[int],
    block_size: int,
    device: torch.device,
    num_state_slots: int | None = None,
) -> StepInputs:
    """One-off inputs for a batch (tests, the profiling step): buffers sized to exactly this batch
    (`num_state_slots`: a hybrid model's pool size, each state then names its slot).

    The states are mirrored into a fresh `InputBuffers` without changing their `row`."""
    longest = max(
        max(len(s.token_ids), s.num_computed_tokens + n) for s, n in zip(states, num_scheduled)
    )
    num_blocks = max(len(s.block_ids[0]) for s in states)
    buffers = InputBuffers(
        len(states),
        max(sum(num_scheduled), 1),
        max(longest, num_blocks * block_size),
        block_size,
        device,
        num_state_slots,
        (None,) * len(states[0].block_ids),
    )
    rows = [s.row for s in states]
    try:
        for s in states:
            buffers.add(s)
        return buffers.prepare(states, list(num_scheduled))
    finally:
        for s, row in zip(states, rows):
            s.row = row
