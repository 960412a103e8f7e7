"""What every OpenAI endpoint shares: the served model, prompt checks, SamplingParams construction,
running a request to its end (aborting it if the client goes away) and SSE framing.
Invariant: a request reaches the engine only after every check here passed."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from paphos.engine.async_engine import AsyncEngine, RequestFailedError
from paphos.outputs import Logprob, OutputKind, RequestOutput
from paphos.sampling_params import SamplingParams
from paphos.serve.metrics import ServerMetrics
from paphos.serve.openai.errors import OpenAIError, error_body
from paphos.serve.server_config import ServerConfig
from paphos.tokenizer import load_chat_template


@dataclass
class ServingContext:
    """The served model as the endpoints see it (built once at start-up)."""

    engine: AsyncEngine
    served_model_names: list[str]
    max_model_len: int
    tokenizer: Any
    chat_template: str | None
    metrics: ServerMetrics
    server_config: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_engine(
        cls,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        server_config: ServerConfig | None = None,
    ) -> ServingContext:
        sync = engine.engine
        model_config = sync.model_config
        return cls(
            server_config=server_config or ServerConfig(),
            engine=engine,
            served_model_names=served_model_names(model_config),
            max_model_len=int(sync.max_model_len),
            tokenizer=sync.tokenizer,
            chat_template=(
                load_chat_template(model_config.chat_template)
                if model_config.chat_template
                else None
            ),
            metrics=metrics,
        )

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if model is None or model in self.served_model_names:
            return self.model_name
        raise OpenAIError(
            404,
            f"model {model!r} does not exist; this server serves {self.served_model_names}",
            param="model",
            code="model_not_found",
        )

    def single_token_id(self, text: str) -> int | None:
        """The id of `text` if the tokenizer has it as one token (e.g. an added </think>)."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            return None
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError(400, "this server runs without a tokenizer: send token ids")
        return self.tokenizer

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self.require_tokenizer()
        return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def check_prompt(self, token_ids: list[int], max_tokens: int | None, param: str) -> None:
        """Reject empty prompts, prompts leaving no room to generate, and oversized max_tokens."""
        num = len(token_ids)
        if num == 0:
            raise OpenAIError(400, f"{param} is empty", param=param)
        if num >= self.max_model_len:
            raise OpenAIError(
                400,
                f"{param} has {num} tokens but max_model_len is {self.max_model_len} "
                "(prompt plus at least one generated token must fit)",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and num + max_tokens > self.max_model_len:
            raise OpenAIError(
                400,
                f"max_tokens={max_tokens} is too large: the prompt has {num} tokens and "
                f"max_model_len is {self.max_model_len}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        bad = [t for t in token_ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise OpenAIError(400, f"{param} holds invalid token ids {bad[:5]}", param=param)


def served_model_names(model_config: Any) -> list[str]:
    """--served-model-name if given; else the model's short name (directory name, or GGUF file name
    up to its first dot: "SmolLM2-135M-Instruct"), with the model path accepted as an alias."""
    if model_config.served_model_name:
        return [model_config.served_model_name]
    path = str(model_config.model).rstrip("/")
    base = os.path.basename(path)
    short = base.split(".")[0] if base.endswith(".gguf") else base
    return [short, path] if short and short != path else [path]


def make_sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise OpenAIError.from_value_error(e) from e


def check_max_tokens(value: int | None, name: str) -> None:
    if value is not None and value < 1:
        raise OpenAIError(400, f"{name}={value!r} is invalid: expected >= 1", param=name)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def start_requests(
    ctx: ServingContext,
    prompts: list[dict[str, Any]],
    params: SamplingParams,
    base_id: str,
    stream: bool,
) -> list[AsyncIterator[RequestOutput]]:
    """Add one engine request per prompt; if any is refused, abort the ones already added. A
    streamed response reads deltas; a whole one only the final output (no per-step outputs)."""
    arrival = time.monotonic()
    kind = OutputKind.DELTA if stream else OutputKind.FINAL_ONLY
    streams = []
    try:
        for i, prompt in enumerate(prompts):
            engine_stream = await ctx.engine.add_request(
                f"{base_id}-{i}", prompt, params, arrival, output_kind=kind
            )
            streams.append(ctx.metrics.track(ctx.engine.iterate(engine_stream), arrival))
    except ValueError as e:
        for i in range(len(streams)):
            ctx.engine.abort(f"{base_id}-{i}")
        raise OpenAIError.from_value_error(e) from e
    return streams


# How often a whole (non-streamed) response checks that its client is still there: a final-only
# request sends nothing until it ends, so this bounds the work done for a client that left.
DISCONNECT_POLL_S = 0.1


async def collect(
    request: Request, streams: list[AsyncIterator[RequestOutput]]
) -> list[list[RequestOutput]]:
    """Run every stream to its end; if the client disconnects first, cancel (and so abort) them."""

    async def drain(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
        return [output async for output in stream]

    task = asyncio.ensure_future(asyncio.gather(*(drain(s) for s in streams)))
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise OpenAIError(400, "client disconnected")
    try:
        return task.result()
    except RequestFailedError as e:
        raise OpenAIError(500, str(e)) from e


async def merge(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as their outputs arrive, tagging each with its stream index."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
            await queue.put((index, None))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer below
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def sse_error(error: BaseException) -> str:
    status = error.status if isinstance(error, OpenAIError) else 500
    return sse(error_body(status, str(error)))


SSE_DONE = "data: [DONE]\n\n"


def tokens_as_ids(ctx: ServingContext, body: Any) -> bool:
    """Whether logprobs write tokens as "token_id:N": the request's choice, else the server's."""
    wanted = body.return_tokens_as_token_ids
    return ctx.server_config.return_tokens_as_token_ids if wanted is None else wanted


def decode_token(
    ctx: ServingContext, token_id: int, logprob: Logprob | None, as_id: bool = False
) -> str:
    """A token's text for logprobs; "token_id:N" when asked (`as_id`) or without a tokenizer."""
    if as_id:
        return f"token_id:{token_id}"
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    if ctx.tokenizer is None:
        return f"token_id:{token_id}"
    return ctx.tokenizer.decode([token_id])
