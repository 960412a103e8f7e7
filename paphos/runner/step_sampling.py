"""Sampling one step on the device and bringing its results to the host without waiting.

`StepSampling.sample` draws the step's tokens (a plain argmax when every row allows it, else the
model's Sampler), starts non-blocking copies into pinned memory and returns the function that waits
for them and builds the `RunnerOutput`. It remembers the last step's sampled ids (on the device,
for the next step's pending input tokens, and on the host, for samplers that must read a pending
token's value before the scheduler hands it back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from paphos.core.step_data import RunnerOutput, TokenLogprobs
from paphos.layers.sampler import (
    LogprobsTensors,
    RequestSamplingState,
    SamplingMetadata,
    compute_prompt_logprobs,
)
from paphos.layers.sampling.batch import to_device
from paphos.ops.argmax import argmax_rows
from paphos.ops.token_bitmask import bitmask_op
from paphos.runner.inputs import RunnerRequestState, StepInputs

# A multi-step decode's next step: sampled ids [num_seqs] in, (logits, graph argmax or None) out.
NextStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


class StepSampling:
    """Per-runner sampling of each step (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, device: torch.device) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.device = device
        # The last step's sampled ids on the device and each sampling request's row in them.
        self.last_sampled: torch.Tensor | None = None
        self.last_rows: dict[str, int] = {}
        # The last step's sampled ids on the host (once copied; rows as in last_rows), copy event.
        self._last_host: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.apply_bitmask = bitmask_op(device)  # constrained rows' token bitmask, in place

    def sample(
        self,
        requests: dict[str, RunnerRequestState],
        logits: torch.Tensor,
        argmax: torch.Tensor | None,
        inputs: StepInputs,
        num_steps: int = 1,
        next_step: NextStep | None = None,
    ) -> Callable[[], RunnerOutput]:
        """Sample on the device and start copying the results to the host (no wait). Returns the
        function that waits for the copies and builds the step's RunnerOutput. A multi-step
        decode (num_steps > 1) samples, calls next_step(sampled ids) for the next step's
        (logits, argmax), and so on: every request samples num_steps tokens."""
        ids = inputs.sampling_request_ids
        top: torch.Tensor | None = None
        logprob_tensors: LogprobsTensors | None = None
        wanted: list[int | None] = []
        if ids:
            sampling = [requests[rid] for rid in ids]
            behind = [
                st
                for st in sampling
                if st.num_pending > st.num_seen_ahead
                and (st.sampling.needs_history or st.grammar is not None)
            ]
            if behind:
                self._read_previous_tokens(behind)
            grammar_mask = self._grammar_bitmask(sampling, logits.device)
            plain = True
            for state in sampling:  # one pass: this runs for every request every step
                # outputs before this step's that only the device has
                state.sampling.num_unseen = state.num_pending - state.num_seen_ahead
                state.num_pending += num_steps
                plain = plain and state.plain_greedy
            n = len(ids)
            metadata = None
            if not plain:
                states = [s.sampling for s in sampling]
                metadata = SamplingMetadata.build(states, self.vocab_size, self.device)
                wanted = [s.params.logprobs for s in states]
                if num_steps > 1 and any(w is not None for w in wanted):
                    raise ValueError("a multi-step decode cannot return logprobs")
            steps = None  # [n, num_steps] sampled ids of a multi-step decode
            if num_steps > 1:
                steps = torch.empty((n, num_steps), dtype=torch.long, device=logits.device)
            for step in range(num_steps):
                if step:
                    logits, argmax = next_step(top)
                    for state in sampling:
                        state.sampling.num_unseen += 1  # seeds follow the number of outputs
                rows = logits[:n]  # [n, vocab]
                if grammar_mask is not None:  # constrained requests take single steps
                    assert num_steps == 1, "a multi-step decode with a grammar"
                    rows = self.apply_bitmask(rows, *grammar_mask)
                if metadata is None:  # argmax: no sampler metadata, no logprobs
                    top = argmax[:n] if argmax is not None else argmax_rows(rows)  # [n]
                else:
                    result = self.model.sample(rows, metadata)
                    top, logprob_tensors = result.sampled_token_ids, result.logprobs  # [n]
                if steps is not None:
                    steps[:, step].copy_(top)  # the graph's argmax buffer is overwritten next
                    top = steps[:, step]
            self.last_sampled = top  # [n]: the last step's
            self.last_rows = dict(zip(ids, range(n)))
            top = steps if steps is not None else top.view(n, 1)  # [n, num_steps]
        prompt = self._prompt_logprob_tensors(requests, logits, inputs)
        to_copy = [top, logprob_tensors, *(tensors for _, tensors, _ in prompt)]
        copies, copied = _to_host(to_copy)
        self._last_host = (copies[0], copied) if ids else None

        def finish() -> RunnerOutput:
            if copied is not None:
                copied.synchronize()
            host_top, host_logprobs, *host_prompt = copies
            sampled = dict(zip(ids, host_top.tolist())) if host_top is not None else {}  # lists
            logprobs: dict[str, TokenLogprobs] = {}
            if host_logprobs is not None:
                logprobs = _split_logprobs(host_logprobs, ids, wanted)
            prompt_logprobs = {
                rid: list(_rows_to_token_logprobs(tensors, [num_top] * len(tensors.ranks)))
                for (rid, _, num_top), tensors in zip(prompt, host_prompt)
            }
            return RunnerOutput(sampled, logprobs, prompt_logprobs)

        return finish

    def _grammar_bitmask(
        self, sampling: list[RunnerRequestState], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step's token bitmask, on the device: (bitmask [n, words] int32, the constrained
        rows [m] long), or None when no row is constrained. Each matcher first takes the
        outputs it has not seen (the previous step's token included: read ahead above)."""
        constrained = [i for i, st in enumerate(sampling) if st.grammar is not None]
        if not constrained:
            return None
        num_words = (self.vocab_size + 31) // 32
        pin = device.type == "cuda"
        # [n, words]: xgrammar fills the constrained rows; the others are never read
        bitmask = torch.empty((len(sampling), num_words), dtype=torch.int32, pin_memory=pin)
        for i in constrained:
            state = sampling[i]
            state.grammar.advance(state.sampling.output_token_ids)
            state.grammar.fill(bitmask, i)
        rows = torch.tensor(constrained, dtype=torch.long, pin_memory=pin)  # [m]
        return bitmask.to(device, non_blocking=True), rows.to(device, non_blocking=True)

    def _read_previous_tokens(self, states: list[RunnerRequestState]) -> None:
        """Append the previous step's token, which the scheduler has not handed back yet, to the
        sampler history of requests whose samplers read token values. Waits for that step's
        copy to the host only: this step's forward is already queued behind it."""
        assert self._last_host is not None, "a pending token without a previous step"
        host_top, copied = self._last_host
        if copied is not None:
            copied.synchronize()
        values = host_top[:, -1].tolist()  # [rows]: the token each row sampled last
        for state in states:
            row = self.last_rows.get(state.request_id)
            if row is None or state.num_pending - state.num_seen_ahead != 1:
                raise ValueError(
                    f"request {state.request_id!r} has {state.num_pending} pending tokens; only "
                    "the previous step's can be read ahead"
                )
            state.sampling.append_output_token(values[row])
            state.num_seen_ahead += 1

    def _prompt_logprob_tensors(
        self, requests: dict[str, RunnerRequestState], logits: torch.Tensor, inputs: StepInputs
    ) -> list[tuple[str, LogprobsTensors, int]]:
        out = []
        for rid, first_row, targets in inputs.prompt_logprob_rows:
            num_top = requests[rid].sampling.params.prompt_logprobs or 0
            rows = logits[first_row : first_row + len(targets)]
            target_ids = to_device(targets, logits.device, torch.long)  # [len(targets)]
            out.append((rid, compute_prompt_logprobs(rows, target_ids, num_top), num_top))
        return out


def is_plain_greedy(state: RequestSamplingState) -> bool:
    """Greedy with nothing that could move the argmax and no logprobs: the sampled token is the
    argmax of the raw logits, so the shared Sampler (and its per-step metadata) can be skipped.
    Decided once per request (min_tokens requests always take the Sampler, which bans stops)."""
    p = state.params
    return (
        state.is_greedy
        and not state.samplers
        and not state.custom_bans
        and not state.bad_words
        and not p.logit_bias
        and p.allowed_token_ids is None
        and p.logprobs is None
        and (p.min_tokens == 0 or not state.min_tokens_bans)
    )


def _split_logprobs(
    tensors: LogprobsTensors, request_ids: list[str], wanted: list[int | None]
) -> dict[str, TokenLogprobs]:
    rows = _rows_to_token_logprobs(tensors, [w or 0 for w in wanted])
    return {rid: row for rid, want, row in zip(request_ids, wanted, rows) if want is not None}


def _to_host(
    items: list[torch.Tensor | LogprobsTensors | None],
) -> tuple[list[Any], torch.cuda.Event | None]:
    """Start non-blocking copies of device tensors into pinned host memory; returns the host
    copies (same structure) and an event recorded after them (None: nothing was on a GPU)."""
    on_device = any(_device_of(item) == "cuda" for item in items)
    if not on_device:
        return list(items), None

    def copy(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # [*t.shape]
        return host.copy_(t, non_blocking=True)

    copies: list[Any] = []
    for item in items:
        if isinstance(item, LogprobsTensors):
            copies.append(
                LogprobsTensors(copy(item.token_ids), copy(item.logprobs), copy(item.ranks))
            )
        else:
            copies.append(None if item is None else copy(item))
    event = torch.cuda.Event()
    event.record()
    return copies, event


def _device_of(item: torch.Tensor | LogprobsTensors | None) -> str | None:
    if item is None:
        return None
    tensor = item if isinstance(item, torch.Tensor) else item.token_ids
    return tensor.device.type


def _rows_to_token_logprobs(tensors: LogprobsTensors, num_top: list[int]):  # noqa: ANN202
    ids, values = tensors.token_ids.tolist(), tensors.logprobs.tolist()
    ranks = tensors.ranks.tolist()
    for i, n in enumerate(num_top):
        k = n + 1
        yield TokenLogprobs(tuple(ids[i][:k]), tuple(values[i][:k]), tuple(ranks[i][:k]))
