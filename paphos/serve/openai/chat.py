"""POST /v1/chat/completions: messages rendered with the model's (or --chat-template) template, n,
logprobs/top_logprobs, stop, max_tokens/max_completion_tokens, usage; streamed as SSE deltas
where each choice first sends its role, then content, then its finish reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from paphos.outputs import CompletionOutput, LogprobsDict, RequestOutput
from paphos.serve.openai import serving
from paphos.serve.openai.completions import MAX_LOGPROBS, join_deltas
from paphos.serve.openai.errors import OpenAIError
from paphos.serve.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from paphos.serve.openai.serving import ServingContext


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ctx: ServingContext
) -> ChatCompletionResponse | StreamingResponse:
    model = ctx.check_model(body.model)
    max_tokens = _max_tokens(body)
    prompt_ids = render_chat(
        ctx,
        body.messages,
        body.add_generation_prompt,
        body.continue_final_message,
        body.chat_template_kwargs,
    )
    ctx.check_prompt(prompt_ids, max_tokens, "messages")
    kwargs = body.common_sampling_kwargs()
    kwargs["max_tokens"] = max_tokens
    if body.logprobs:
        kwargs["logprobs"] = body.top_logprobs or 0
    params = serving.make_sampling_params(kwargs)
    request_id = serving.random_id("chatcmpl")
    streams = await serving.start_requests(
        ctx, [{"prompt_token_ids": prompt_ids}], params, request_id, stream=body.stream
    )
    if body.stream:
        events = _stream(ctx, body, streams[0], request_id, model)
        return StreamingResponse(events, media_type="text/event-stream")
    deltas = (await serving.collect(request, streams))[0]
    choices = []
    num_output = 0
    for completion in join_deltas(deltas):
        num_output += len(completion.token_ids)
        choices.append(
            ChatChoice(
                index=completion.index,
                message=AssistantMessage(content=completion.text),
                logprobs=_logprobs(ctx, completion, body.top_logprobs or 0)
                if body.logprobs
                else None,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
            )
        )
    num_prompt = len(deltas[0].prompt_token_ids)
    usage = Usage(
        prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output
    )
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)


def _max_tokens(body: ChatCompletionRequest) -> int | None:
    serving.check_max_tokens(body.max_tokens, "max_tokens")
    serving.check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise OpenAIError(
            400,
            f"top_logprobs={body.top_logprobs} is invalid: expected 0..{MAX_LOGPROBS}",
            param="top_logprobs",
        )
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


def render_chat(
    ctx: ServingContext,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of the conversation rendered by the chat template (400 if it cannot be)."""
    if not messages:
        raise OpenAIError(400, "messages is empty: send at least one message", param="messages")
    tokenizer = ctx.require_tokenizer()
    template = ctx.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise OpenAIError(
            400, "the model has no chat template; start the server with --chat-template"
        )
    plain = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            plain,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as e:  # noqa: BLE001 - a template that fails on this input is a bad request
        raise OpenAIError(400, f"cannot apply the chat template: {e}", param="messages") from e
    return ctx.tokenize(text, add_special_tokens=False)


def _logprobs(ctx: ServingContext, completion: CompletionOutput, num_top: int) -> ChatLogprobs:
    content = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or [], strict=False):
        content.append(_token_logprob(ctx, token_id, position, num_top))
    return ChatLogprobs(content=content)


def _token_logprob(
    ctx: ServingContext, token_id: int, position: LogprobsDict, num_top: int
) -> TokenLogprob:
    """The sampled token and the `num_top` most likely ones (the sampled one among them if its
    rank is within `num_top`)."""

    def entry(tid: int) -> TopLogprob:
        token = serving.decode_token(ctx, tid, position[tid])
        logprob = max(position[tid].logprob, -9999.0)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    by_rank = sorted(position, key=lambda tid: -position[tid].logprob)
    tops = [entry(tid) for tid in by_rank[:num_top]]
    return TokenLogprob(**entry(token_id).model_dump(), top_logprobs=tops)


async def _stream(
    ctx: ServingContext,
    body: ChatCompletionRequest,
    stream: AsyncIterator[RequestOutput],
    request_id: str,
    model: str,
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
        data = ChatCompletionChunk(id=request_id, model=model, choices=choices, usage=usage)
        return serving.sse(data if body.include_usage else data.model_dump(exclude={"usage"}))

    num_prompt = num_output = 0
    try:
        yield chunk(
            [
                ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(body.n)
            ]
        )
        async for delta in stream:
            num_prompt = len(delta.prompt_token_ids)
            choices = []
            for completion in delta.outputs:
                num_output += len(completion.token_ids)
                choices.append(
                    ChatStreamChoice(
                        index=completion.index,
                        delta=DeltaMessage(content=completion.text),
                        logprobs=_logprobs(ctx, completion, body.top_logprobs or 0)
                        if body.logprobs
                        else None,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    )
                )
            if choices:
                yield chunk(choices)
        if body.include_usage:
            total = num_prompt + num_output
            usage = Usage(
                prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=total
            )
            yield chunk([], usage)
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band
        yield serving.sse_error(e)
    yield serving.SSE_DONE
