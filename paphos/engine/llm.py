"""Offline inference: `LLM(model=...).generate(prompts, params)` and `.chat(messages, params)`.

Offline generation has no streams to keep smooth and no later arrivals to admit quickly, so on
CUDA it runs multi-step decodes by default (num_scheduler_steps=OFFLINE_SCHEDULER_STEPS; the
server's default is 1): the host's per-step work is paid once per that many tokens (H200, 1B
shape, 256 requests: 44K -> 77K output tok/s; GPU-bound runs unchanged, notes/cuda.md).
Pass num_scheduler_steps to choose.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from paphos.config import EngineConfig, auto_device
from paphos.engine.engine import Engine, Prompt
from paphos.outputs import OutputKind, RequestOutput
from paphos.sampling_params import SamplingParams
from paphos.tokenizer import apply_chat_template

Message = dict[str, Any]
OFFLINE_SCHEDULER_STEPS = 8


class LLM:
    def __init__(self, model: str = "", **engine_kwargs: Any) -> None:
        if "num_scheduler_steps" not in engine_kwargs:
            on_cuda = auto_device(engine_kwargs.get("device", "auto")) == "cuda"
            engine_kwargs["num_scheduler_steps"] = OFFLINE_SCHEDULER_STEPS if on_cuda else 1
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **engine_kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = _broadcast_params(sampling_params, len(prompts))
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(
                    request_id, prompt, params, output_kind=OutputKind.FINAL_ONLY
                )
                ids.append(request_id)
        except ValueError:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the model's chat template is
        applied."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was given)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            text = apply_chat_template(self.tokenizer, conv, add_generation_prompt, chat_template)
            # the template already holds the special tokens: encode without adding more
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm, unit="req")
        start, num_generated = time.perf_counter(), 0
        wanted = set(request_ids)
        while len(finished) < len(request_ids) and self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished and output.request_id in wanted:
                    finished[output.request_id] = output
                    num_generated += sum(len(c.token_ids) for c in output.outputs)
                    bar.update(1)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{num_generated / elapsed:.1f} output tok/s")
        bar.close()
        return [finished[rid] for rid in request_ids]

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _broadcast_params(
    params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(num_prompts)]
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return list(params)
