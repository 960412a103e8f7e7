"""POST /v1/chat/completions: messages rendered with the model's (or --chat-template) template, n,
logprobs/top_logprobs, stop, max_tokens/max_completion_tokens, usage, structured output, tools
(serve/openai/tools) and reasoning (serve/openai/reasoning); streamed as SSE deltas where each
choice first sends its role, then content (reasoning_content, tool_calls), then its finish
reason."""

from __future__ import annotations

import dataclasses
import json
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
from paphos.serve.openai.reasoning import THINK_END, ReasoningStreamer
from paphos.serve.openai.reasoning import split as split_reasoning
from paphos.serve.openai.serving import ServingContext
from paphos.serve.openai.tools.calls import ToolCallStreamer, ToolPlan, plan_tools, whole_calls


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ctx: ServingContext
) -> ChatCompletionResponse | StreamingResponse:
    model = ctx.check_model(body.model)
    max_tokens = _max_tokens(body)
    server = ctx.server_config
    plan = plan_tools(
        body.tools,
        body.tool_choice,
        body.parallel_tool_calls,
        server.tool_call_parser,
        server.enable_auto_tool_choice,
    )
    prompt_ids = render_chat(
        ctx,
        body.messages,
        body.add_generation_prompt,
        body.continue_final_message,
        body.chat_template_kwargs,
        tools=plan.tools if plan is not None else None,
    )
    ctx.check_prompt(prompt_ids, max_tokens, "messages")
    kwargs = body.common_sampling_kwargs()
    kwargs["max_tokens"] = max_tokens
    if body.logprobs:
        kwargs["logprobs"] = body.top_logprobs or 0
    _add_constraints(ctx, kwargs, plan)
    params = serving.make_sampling_params(kwargs)
    request_id = serving.random_id("chatcmpl")
    streams = await serving.start_requests(
        ctx, [{"prompt_token_ids": prompt_ids}], params, request_id, stream=body.stream
    )
    if body.stream:
        events = _stream(ctx, body, streams[0], request_id, model, plan)
        return StreamingResponse(events, media_type="text/event-stream")
    deltas = (await serving.collect(request, streams))[0]
    choices = []
    num_output = 0
    for completion in join_deltas(deltas):
        num_output += len(completion.token_ids)
        message, finish_reason = _message(ctx, plan, completion)
        choices.append(
            ChatChoice(
                index=completion.index,
                message=message,
                logprobs=_logprobs(ctx, body, completion) if body.logprobs else None,
                finish_reason=finish_reason,
                stop_reason=completion.stop_reason,
                token_ids=list(completion.token_ids) if body.return_token_ids else None,
            )
        )
    prompt_ids = list(deltas[0].prompt_token_ids)
    num_prompt = len(prompt_ids)
    usage = Usage(
        prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output
    )
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=choices,
        usage=usage,
        prompt_token_ids=prompt_ids if body.return_token_ids else None,
    )


def _add_constraints(ctx: ServingContext, kwargs: dict[str, Any], plan: ToolPlan | None) -> None:
    """The tool plan's constraint (required/named tool_choice), and with a reasoning parser the
    constraint's start after </think>."""
    if plan is not None and plan.constraint is not None:
        if "structured_outputs" in kwargs:
            raise OpenAIError(
                400,
                f"tool_choice={plan.mode!r} is enforced by structured output: it cannot be "
                "combined with response_format/structured_outputs",
                param="tool_choice",
            )
        kwargs["structured_outputs"] = plan.constraint
    spec = kwargs.get("structured_outputs")
    if spec is not None and ctx.server_config.reasoning_parser:
        end_id = ctx.single_token_id(THINK_END)
        if end_id is None:
            raise OpenAIError(
                400,
                f"structured output after reasoning needs {THINK_END!r} to be one token of this "
                "model's vocabulary",
            )
        kwargs["structured_outputs"] = dataclasses.replace(spec, reasoning_end_token_id=end_id)


def _message(
    ctx: ServingContext, plan: ToolPlan | None, completion: CompletionOutput
) -> tuple[AssistantMessage, str | None]:
    """The whole assistant message of a finished choice, and its finish reason."""
    text: str | None = completion.text
    reasoning = None
    parser = ctx.server_config.reasoning_parser
    if parser:
        reasoning, text = split_reasoning(parser, completion.text, final=True)
        reasoning = reasoning or None
    tool_calls = None
    finish_reason = completion.finish_reason
    if plan is not None:
        text, calls = whole_calls(plan, text or "")
        if calls:
            tool_calls = calls
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    message = AssistantMessage(content=text, reasoning_content=reasoning, tool_calls=tool_calls)
    return message, finish_reason


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
    tools: list[dict[str, Any]] | None = None,
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
    plain = [_template_message(m) for m in messages]
    extra = dict(template_kwargs or {})
    if tools:
        extra["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(
            plain,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **extra,
        )
    except Exception as e:  # noqa: BLE001 - a template that fails on this input is a bad request
        raise OpenAIError(400, f"cannot apply the chat template: {e}", param="messages") from e
    return ctx.tokenize(text, add_special_tokens=False)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: text content, and assistant tool calls' arguments
    as objects (OpenAI sends them as JSON text; templates write them with tojson)."""
    plain = {**message.model_dump(exclude_none=True), "content": message.text()}
    calls = plain.get("tool_calls")
    if isinstance(calls, list):
        plain["tool_calls"] = [_call_for_template(c) for c in calls]
    return plain


def _call_for_template(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass  # the template gets the text as sent
    return {**call, "function": function}


def _logprobs(
    ctx: ServingContext, body: ChatCompletionRequest, completion: CompletionOutput
) -> ChatLogprobs:
    num_top, as_ids = body.top_logprobs or 0, serving.tokens_as_ids(ctx, body)
    content = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or [], strict=False):
        content.append(_token_logprob(ctx, token_id, position, num_top, as_ids))
    return ChatLogprobs(content=content)


def _token_logprob(
    ctx: ServingContext, token_id: int, position: LogprobsDict, num_top: int, as_ids: bool
) -> TokenLogprob:
    """The sampled token and the `num_top` most likely ones (the sampled one among them if its
    rank is within `num_top`); tokens as "token_id:N" with `as_ids`."""

    def entry(tid: int) -> TopLogprob:
        token = serving.decode_token(ctx, tid, position[tid], as_ids)
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
    plan: ToolPlan | None,
) -> AsyncIterator[str]:
    def chunk(
        choices: list[ChatStreamChoice],
        usage: Usage | None = None,
        prompt_ids: list[int] | None = None,
    ) -> str:
        data = ChatCompletionChunk(
            id=request_id, model=model, choices=choices, usage=usage, prompt_token_ids=prompt_ids
        )
        return serving.sse(data if body.include_usage else data.model_dump(exclude={"usage"}))

    num_prompt = num_output = 0
    prompt_sent = not body.return_token_ids
    pieces = [_ChoicePieces(ctx.server_config.reasoning_parser, plan) for _ in range(body.n)]
    try:
        yield chunk(
            [
                ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(body.n)
            ]
        )
        async for delta in stream:
            num_prompt = len(delta.prompt_token_ids)
            prompt_ids = None if prompt_sent else list(delta.prompt_token_ids)
            choices = []
            for completion in delta.outputs:
                num_output += len(completion.token_ids)
                message, finish_reason = pieces[completion.index].feed(completion)
                choices.append(
                    ChatStreamChoice(
                        index=completion.index,
                        delta=message,
                        logprobs=_logprobs(ctx, body, completion) if body.logprobs else None,
                        finish_reason=finish_reason,
                        stop_reason=completion.stop_reason,
                        token_ids=list(completion.token_ids) if body.return_token_ids else None,
                    )
                )
            if choices:
                yield chunk(choices, prompt_ids=prompt_ids)
                prompt_sent = True
        if body.include_usage:
            total = num_prompt + num_output
            usage = Usage(
                prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=total
            )
            yield chunk([], usage)
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band
        yield serving.sse_error(e)
    yield serving.SSE_DONE


class _ChoicePieces:
    """One streamed choice's text split into reasoning, content and tool-call deltas."""

    def __init__(self, reasoning_parser: str | None, plan: ToolPlan | None) -> None:
        self.reasoning = ReasoningStreamer(reasoning_parser) if reasoning_parser else None
        self.tools = ToolCallStreamer(plan) if plan is not None else None

    def feed(self, completion: CompletionOutput) -> tuple[DeltaMessage, str | None]:
        final = completion.finish_reason is not None
        if self.reasoning is None and self.tools is None:
            return DeltaMessage(content=completion.text), completion.finish_reason
        reasoning, content = "", completion.text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(completion.text, final)
        calls: list[dict[str, Any]] = []
        finish_reason = completion.finish_reason
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
            if self.tools.has_calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        message = DeltaMessage(
            content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None
        )
        return message, finish_reason
