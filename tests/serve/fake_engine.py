"""A small synchronous engine with the `Engine` API of docs/contracts.md, for unit tests of the
async layer: deterministic tokens, cumulative, delta or final-only outputs (OutputKind; deltas
through paphos.engine.deltas.DeltaTracker), stop strings, n, logprobs, block accounting.
Invariant: free blocks + blocks held by unfinished requests == num_kv_blocks."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from paphos.config import ModelConfig
from paphos.engine.deltas import DeltaTracker
from paphos.outputs import CompletionOutput, Logprob, OutputKind, RequestOutput
from paphos.sampling_params import SamplingParams


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_kv_blocks: int
    num_free_kv_blocks: int


@dataclass
class _Seq:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: list[CompletionOutput]
    num_blocks: int
    deltas: DeltaTracker | None = None  # OutputKind.DELTA
    final_only: bool = False  # OutputKind.FINAL_ONLY


class FakeEngine:
    """Token i of completion j is a pure function of (seed, j, prompt, i), so reruns agree."""

    def __init__(
        self,
        tokenizer: Any,
        max_model_len: int = 128,
        num_kv_blocks: int = 1024,
        block_size: int = 16,
        step_delay: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_config = ModelConfig(model="/models/fake-model", served_model_name=None)
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.num_free_blocks = num_kv_blocks
        self.step_delay = step_delay
        self.fail_next_step = False
        self.seqs: dict[str, _Seq] = {}
        self.num_prompt_total = 0
        self.num_generation_total = 0
        self.shut_down = False

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request_id={request_id!r} already exists")
        if isinstance(prompt, str):
            token_ids = list(self.tokenizer(prompt).input_ids)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = list(prompt["prompt_token_ids"])
        else:
            raise ValueError(f"prompt={prompt!r} is invalid")
        if not token_ids or len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; max_model_len={self.max_model_len}"
            )
        blocks = math.ceil(self.max_model_len / self.block_size) * params.n
        if blocks > self.num_free_blocks:
            raise ValueError("out of KV blocks")
        self.num_free_blocks -= blocks
        self.num_prompt_total += len(token_ids)
        outputs = [
            CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None else None)
            for i in range(params.n)
        ]
        deltas = DeltaTracker(params) if output_kind is OutputKind.DELTA else None
        final_only = output_kind is OutputKind.FINAL_ONLY
        self.seqs[request_id] = _Seq(
            request_id, token_ids, params, outputs, blocks, deltas, final_only
        )

    def step(self) -> list[RequestOutput]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        results = []
        for seq in list(self.seqs.values()):
            for out in seq.outputs:
                if not out.finished():
                    self._advance(seq, out)
            finished = all(o.finished() for o in seq.outputs)
            output = self._output(seq, finished)
            if seq.deltas is not None:
                output = seq.deltas.step(output)
            if output is not None and (finished or not seq.final_only):
                results.append(output)
            if finished:
                self._free(seq.request_id)
        return results

    def _advance(self, seq: _Seq, out: CompletionOutput) -> None:
        vocab = len(self.tokenizer)
        seed = seq.params.seed if seq.params.seed is not None else 0
        token = sum(seq.prompt_token_ids) * 7 + seed * 13 + out.index * 31 + len(out.token_ids) * 17
        token = 3 + token % (vocab - 3)  # never a special token
        out.token_ids.append(token)
        self.num_generation_total += 1
        out.text = self.tokenizer.decode(out.token_ids)
        if out.logprobs is not None:
            k = seq.params.logprobs or 0
            entry = {token: Logprob(-0.5, rank=1)}
            entry.update(
                {
                    3 + (token + j) % (vocab - 3): Logprob(-1.0 - j, rank=j + 1)
                    for j in range(1, k + 1)
                }
            )
            out.logprobs.append(entry)
        for stop in seq.params.stop:
            if stop in out.text:
                out.text = out.text[: out.text.index(stop)]
                out.finish_reason, out.stop_reason = "stop", stop
                return
        total = len(seq.prompt_token_ids) + len(out.token_ids)
        limit = seq.params.max_tokens
        if (limit is not None and len(out.token_ids) >= limit) or total >= self.max_model_len:
            out.finish_reason = "length"

    def _output(self, seq: _Seq, finished: bool) -> RequestOutput:
        outputs = [
            dataclasses.replace(
                o,
                token_ids=list(o.token_ids),
                logprobs=list(o.logprobs) if o.logprobs is not None else None,
            )
            for o in seq.outputs
        ]
        return RequestOutput(seq.request_id, None, list(seq.prompt_token_ids), outputs, finished)

    def _free(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id)
        self.num_free_blocks += seq.num_blocks

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if request_id in self.seqs:
                self._free(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.seqs)

    def get_stats(self) -> FakeStats:
        used = self.num_kv_blocks - self.num_free_blocks
        return FakeStats(
            num_running=len(self.seqs),
            num_waiting=0,
            kv_cache_usage=used / self.num_kv_blocks,
            prefix_cache_queries=self.num_prompt_total,
            prefix_cache_hits=0,
            num_prompt_tokens_total=self.num_prompt_total,
            num_generation_tokens_total=self.num_generation_total,
            num_kv_blocks=self.num_kv_blocks,
            num_free_kv_blocks=self.num_free_blocks,
        )

    def shutdown(self) -> None:
        self.shut_down = True
