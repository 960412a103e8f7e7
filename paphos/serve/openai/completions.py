"""POST /v1/completions: prompts as a string, strings, token ids or lists of token ids; n, echo,
logprobs, stop, usage; streamed as SSE chunks. One engine request per prompt; choice index is
`prompt_index * n + completion_index`, as OpenAI numbers them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from paphos.outputs import CompletionOutput, LogprobsDict, RequestOutput
from paphos.sampling_params import SamplingParams
from paphos.serve.openai import serving
from paphos.serve.openai.errors import OpenAIError
from paphos.serve.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    Usage,
)
from paphos.serve.openai.serving import ServingContext

MAX_LOGPROBS = 20


async def create_completion(
    body: CompletionRequest, request: Request, ctx: ServingContext
) -> CompletionResponse | StreamingResponse:
    model = ctx.check_model(body.model)
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    serving.check_max_tokens(body.max_tokens, "max_tokens")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise OpenAIError(
            400, f"logprobs={body.logprobs} is invalid: expected 0..{MAX_LOGPROBS}", "logprobs"
        )
    prompts = _prompts(ctx, body.prompt)
    for _, token_ids in prompts:
        ctx.check_prompt(token_ids, body.max_tokens, "prompt")
    params = _sampling_params(body)
    request_id = serving.random_id("cmpl")
    engine_prompts = [
        {"prompt_token_ids": token_ids}
        if text is None
        else {"prompt_token_ids": token_ids, "prompt": text}
        for text, token_ids in prompts
    ]
    streams = await serving.start_requests(
        ctx, engine_prompts, params, request_id, stream=body.stream
    )
    builder = _ChoiceBuilder(ctx, body, prompts)
    if body.stream:
        events = _stream(builder, streams, request_id, model, params.n)
        return StreamingResponse(events, media_type="text/event-stream")
    results = await serving.collect(request, streams)
    return _response(builder, results, request_id, model, params.n)


def _response(
    builder: _ChoiceBuilder,
    results: list[list[RequestOutput]],
    request_id: str,
    model: str,
    n: int,
) -> CompletionResponse:
    """The whole response from each prompt's stream of deltas."""
    choices: list[CompletionChoice] = []
    num_prompt = num_output = 0
    for prompt_index, deltas in enumerate(results):
        num_prompt += len(deltas[0].prompt_token_ids)
        for completion in join_deltas(deltas):
            num_output += len(completion.token_ids)
            index = prompt_index * n + completion.index
            choices.append(builder.choice(index, prompt_index, deltas[0], completion, first=True))
    usage = Usage(
        prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output
    )
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)


def _sampling_params(body: CompletionRequest) -> SamplingParams:
    kwargs = body.common_sampling_kwargs()
    kwargs["max_tokens"] = body.max_tokens
    if body.logprobs is not None:
        kwargs["logprobs"] = body.logprobs
        if body.echo:
            kwargs["prompt_logprobs"] = body.logprobs
    return serving.make_sampling_params(kwargs)


def _prompts(ctx: ServingContext, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) per prompt; text is None when the prompt came as token ids."""
    if isinstance(prompt, str):
        return [(prompt, ctx.tokenize(prompt))]
    if not prompt:
        raise OpenAIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, ctx.tokenize(p)) for p in prompt]
    return [(None, list(p)) for p in prompt]


def join_deltas(deltas: list[RequestOutput]) -> list[CompletionOutput]:
    """The whole completions of a request from its stream of deltas, ordered by index."""
    joined: dict[int, CompletionOutput] = {}
    for delta in deltas:
        for piece in delta.outputs:
            done = joined.get(piece.index)
            if done is None:
                logprobs = list(piece.logprobs) if piece.logprobs is not None else None
                joined[piece.index] = CompletionOutput(
                    piece.index, piece.text, list(piece.token_ids), logprobs=logprobs
                )
                done = joined[piece.index]
            else:
                done.text += piece.text
                done.token_ids.extend(piece.token_ids)
                if piece.logprobs is not None:
                    done.logprobs = (done.logprobs or []) + list(piece.logprobs)
            done.finish_reason = piece.finish_reason
            done.stop_reason = piece.stop_reason
            done.cumulative_logprob = piece.cumulative_logprob
    return [joined[i] for i in sorted(joined)]


class _ChoiceBuilder:
    """Builds choices (whole or streamed pieces) including echo and OpenAI's logprobs layout."""

    def __init__(
        self,
        ctx: ServingContext,
        body: CompletionRequest,
        prompts: list[tuple[str | None, list[int]]],
    ) -> None:
        self.ctx = ctx
        self.body = body
        self.prompts = prompts
        self.as_ids = serving.tokens_as_ids(ctx, body)
        self.wants_prompt_logprobs = (body.model_extra or {}).get("prompt_logprobs") is not None
        self.prompt_logprobs_sent: set[int] = set()  # choice indices

    def choice(
        self,
        index: int,
        prompt_index: int,
        output: RequestOutput,
        completion: CompletionOutput,
        first: bool,
    ) -> CompletionChoice:
        text = completion.text
        token_ids = list(completion.token_ids)
        logprobs = list(completion.logprobs or [])
        if self.body.echo and first:
            prompt_text, prompt_ids = self.prompts[prompt_index]
            if prompt_text is None:
                prompt_text = self.ctx.tokenizer.decode(prompt_ids) if self.ctx.tokenizer else ""
            text = prompt_text + text
            if self.body.logprobs is not None and output.prompt_logprobs is not None:
                token_ids = list(output.prompt_token_ids) + token_ids
                logprobs = list(output.prompt_logprobs) + logprobs
        formatted = None
        if self.body.logprobs is not None:
            formatted = self._logprobs(token_ids, logprobs)
        ids = self.body.return_token_ids
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=formatted,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            prompt_token_ids=list(output.prompt_token_ids) if ids and first else None,
            token_ids=list(completion.token_ids) if ids else None,
            prompt_logprobs=self._prompt_logprobs(index, output),
        )

    def _prompt_logprobs(
        self, index: int, output: RequestOutput
    ) -> list[dict[str, PromptLogprob] | None] | None:
        """The prompt's logprobs, once per choice, as soon as every position has them."""
        found = output.prompt_logprobs
        if not self.wants_prompt_logprobs or index in self.prompt_logprobs_sent or found is None:
            return None
        if len(found) < len(output.prompt_token_ids):
            return None  # a stream whose prompt is still being computed (chunked prefill)
        self.prompt_logprobs_sent.add(index)
        return [
            None
            if position is None
            else {
                str(tid): PromptLogprob(
                    logprob=max(lp.logprob, -9999.0),
                    rank=lp.rank,
                    decoded_token=serving.decode_token(self.ctx, tid, lp, self.as_ids),
                )
                for tid, lp in position.items()
            }
            for position in found
        ]

    def _logprobs(
        self, token_ids: list[int], logprobs: list[LogprobsDict | None]
    ) -> CompletionLogprobs:
        out = CompletionLogprobs()
        offset = 0
        for token_id, position in zip(token_ids, logprobs, strict=False):
            if position is None or token_id not in position:  # first prompt token: no logprob
                token = serving.decode_token(self.ctx, token_id, None, self.as_ids)
                out.tokens.append(token)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                token = serving.decode_token(self.ctx, token_id, position[token_id], self.as_ids)
                out.tokens.append(token)
                out.token_logprobs.append(max(position[token_id].logprob, -9999.0))
                top: dict[str, float] = {}
                for tid, lp in position.items():  # tokens sharing a text keep the best logprob
                    key = serving.decode_token(self.ctx, tid, lp, self.as_ids)
                    top[key] = max(top.get(key, -9999.0), lp.logprob)
                out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        return out


async def _stream(
    builder: _ChoiceBuilder,
    streams: list[AsyncIterator[RequestOutput]],
    request_id: str,
    model: str,
    n: int,
) -> AsyncIterator[str]:
    started: set[int] = set()  # choice indices already sent
    counted: set[int] = set()  # prompt indices whose tokens are in the usage
    num_prompt = num_output = 0
    try:
        async for prompt_index, delta in serving.merge(streams):
            if prompt_index not in counted:
                counted.add(prompt_index)
                num_prompt += len(delta.prompt_token_ids)
            choices = []
            for completion in delta.outputs:
                index = prompt_index * n + completion.index
                first = index not in started
                started.add(index)
                num_output += len(completion.token_ids)
                choices.append(builder.choice(index, prompt_index, delta, completion, first))
            chunk = CompletionResponse(id=request_id, model=model, choices=choices)
            yield serving.sse(chunk.model_dump(exclude={"usage"}))
        if builder.body.include_usage:
            usage = Usage(
                prompt_tokens=num_prompt,
                completion_tokens=num_output,
                total_tokens=num_prompt + num_output,
            )
            last = CompletionResponse(id=request_id, model=model, choices=[], usage=usage)
            yield serving.sse(last)
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band
        yield serving.sse_error(e)
    yield serving.SSE_DONE
