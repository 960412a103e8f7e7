"""The KoboldAI API (as Aphrodite and KoboldCpp serve it, for SillyTavern and Kobold clients):
generate (whole, or streamed as SSE `event: message` / `data: {"token": ...}`), check and abort by
`genkey`, tokencount, and the model/version/config routes whose version strings clients read to
turn features on. Kobold field names map onto SamplingParams; unknown fields are ignored, as Kobold
servers do (clients send UI settings too). Errors are Kobold-shaped: {"detail": {"msg", "type"}}.
A client that disconnects aborts its generation, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from paphos.sampling_params import SamplingParams, StructuredOutputsParams
from paphos.serve.openai import serving
from paphos.serve.openai.errors import OpenAIError
from paphos.serve.openai.serving import ServingContext

KOBOLD_UNITED_VERSION = "1.2.4"  # /api/v1/info/version: what KoboldAI United answers
KOBOLDCPP_VERSION = "1.63"  # /api/extra/version: SillyTavern enables KoboldCpp features by it
DEFAULT_MAX_LENGTH = 80


class KoboldGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    genkey: str | None = None
    n: int = 1
    max_length: int = DEFAULT_MAX_LENGTH
    max_context_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    top_a: float = 0.0
    min_p: float = 0.0
    typical: float = 1.0
    tfs: float = 1.0
    eps_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    rep_pen: float = 1.0
    rep_pen_range: int = 0
    rep_pen_slope: float | None = None  # accepted; Aphrodite has no slope either
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    sampler_order: list[int] | None = None
    sampler_seed: int | None = None
    stop_sequence: list[str] | None = None
    include_stop_str_in_output: bool = False
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: list[str] | str | None = None
    dry_range: int = 0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    nsigma: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 0.0
    mirostat_eta: float = 0.0
    banned_tokens: list[str] | None = None
    use_default_badwordsids: bool = False
    grammar: str | None = None  # KoboldCpp's GBNF field: enforced with structured output
    logprobs: int | None = None


def sampling_params_of(body: KoboldGenerateRequest, eos_token_id: int | None) -> SamplingParams:
    """Kobold fields -> SamplingParams (ValueError naming a bad value)."""
    kwargs: dict[str, Any] = {
        "n": body.n,
        "max_tokens": body.max_length,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "top_a": body.top_a,
        "min_p": body.min_p,
        "typical_p": body.typical,
        "tfs": body.tfs,
        "epsilon_cutoff": body.eps_cutoff,
        "eta_cutoff": body.eta_cutoff,
        "repetition_penalty": body.rep_pen,
        "repetition_penalty_range": body.rep_pen_range,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "sampler_priority": body.sampler_order,
        "seed": body.sampler_seed,
        "stop": list(body.stop_sequence or []),
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "dynatemp_exponent": body.dynatemp_exponent,
        "smoothing_factor": body.smoothing_factor,
        "smoothing_curve": body.smoothing_curve,
        "dry_multiplier": body.dry_multiplier,
        "dry_base": body.dry_base,
        "dry_allowed_length": body.dry_allowed_length,
        "dry_range": body.dry_range,
        "xtc_threshold": body.xtc_threshold,
        "xtc_probability": body.xtc_probability,
        "nsigma": body.nsigma,
        "mirostat_mode": body.mirostat,
        "mirostat_tau": body.mirostat_tau,
        "mirostat_eta": body.mirostat_eta,
        "logprobs": body.logprobs,
    }
    if body.dynatemp_range:  # Kobold's range around the temperature
        kwargs["dynatemp_min"] = max(0.0, body.temperature - body.dynatemp_range)
        kwargs["dynatemp_max"] = body.temperature + body.dynatemp_range
    breakers = body.dry_sequence_breakers
    if isinstance(breakers, str):  # SillyTavern sends a JSON list as text
        try:
            breakers = json.loads(breakers)
        except json.JSONDecodeError as e:
            raise ValueError(f"dry_sequence_breakers={breakers!r} is invalid: {e}") from e
    if breakers is not None:
        kwargs["dry_sequence_breakers"] = breakers
    bans: list[int | str] = list(body.banned_tokens or [])
    if body.use_default_badwordsids and eos_token_id is not None:
        bans.append(eos_token_id)  # Kobold's default bad words: the EOS token
    kwargs["custom_token_bans"] = bans
    if body.grammar:
        kwargs["structured_outputs"] = StructuredOutputsParams(grammar=body.grammar)
    return SamplingParams(**kwargs)


def kobold_error(status: int, message: str, kind: str = "bad_input") -> JSONResponse:
    return JSONResponse({"detail": {"msg": message, "type": kind}}, status_code=status)


@dataclass
class _Generation:
    """One running generation: its text so far (per choice), for check/abort by genkey."""

    request_id: str
    texts: list[str]
    pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class KoboldAPI:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.generations: dict[str, _Generation] = {}  # genkey -> generation

    async def parse(self, request: Request) -> KoboldGenerateRequest:
        try:
            raw = await request.json()
        except json.JSONDecodeError as e:
            raise OpenAIError(400, f"request body is not valid JSON: {e}") from e
        try:
            return KoboldGenerateRequest.model_validate(raw)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "body"
            raise OpenAIError(422, f"{where}: {error['msg']}", code="validation_error") from e

    async def start(self, body: KoboldGenerateRequest) -> _Generation:
        """Check the request, add it to the engine and drain its deltas in a task."""
        ctx = self.ctx
        prompt_ids = ctx.tokenize(body.prompt)
        limit = body.max_context_length
        if limit is not None and len(prompt_ids) + body.max_length > limit:
            prompt_ids = prompt_ids[-max(1, limit - body.max_length) :]  # Kobold trims the left
        ctx.check_prompt(prompt_ids, body.max_length, "prompt")
        try:
            params = sampling_params_of(body, getattr(ctx.engine.engine, "eos_token_id", None))
        except ValueError as e:
            raise OpenAIError(400, str(e)) from e
        request_id = serving.random_id("kobold")
        genkey = body.genkey or request_id
        if genkey in self.generations:
            raise OpenAIError(400, f"genkey={genkey!r} is already generating")
        (stream,) = await serving.start_requests(
            ctx, [{"prompt_token_ids": prompt_ids}], params, request_id, stream=True
        )
        generation = _Generation(f"{request_id}-0", [""] * params.n)
        self.generations[genkey] = generation

        async def drain() -> None:
            try:
                async for delta in stream:
                    for completion in delta.outputs:
                        generation.texts[completion.index] += completion.text
                        if completion.index == 0 and completion.text:
                            generation.pieces.put_nowait(completion.text)
            finally:
                generation.pieces.put_nowait(None)
                self.generations.pop(genkey, None)

        generation.task = asyncio.ensure_future(drain())
        return generation

    async def generate(self, request: Request) -> JSONResponse:
        generation = await self.start(await self.parse(request))
        task = generation.task
        assert task is not None
        while not task.done():
            await asyncio.wait({task}, timeout=serving.DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # its stream's iterator aborts the engine request
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return kobold_error(400, "client disconnected", "aborted")
        if not task.cancelled() and task.exception() is not None:
            return kobold_error(500, f"generation failed: {task.exception()}", "server_error")
        return JSONResponse({"results": [{"text": text} for text in generation.texts]})

    async def stream(self, request: Request) -> StreamingResponse:
        generation = await self.start(await self.parse(request))

        async def events() -> AsyncIterator[str]:
            try:
                while (piece := await generation.pieces.get()) is not None:
                    yield f"event: message\ndata: {json.dumps({'token': piece})}\n\n"
            finally:  # the client left (the response was cancelled) or the generation ended
                if generation.task is not None and not generation.task.done():
                    generation.task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    def check(self, genkey: str | None) -> dict[str, Any]:
        generation = self.generations.get(genkey or "")
        return {"results": [{"text": generation.texts[0] if generation else ""}]}

    def abort(self, genkey: str | None) -> dict[str, Any]:
        generation = self.generations.get(genkey or "")
        if generation is None or generation.task is None:
            return {"success": False}
        generation.task.cancel()
        return {"success": True, "done": "true"}


async def _json_field(request: Request, name: str) -> Any:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return None
    return body.get(name) if isinstance(body, dict) else None


def add_kobold_routes(app: FastAPI, ctx: ServingContext) -> None:
    api = KoboldAPI(ctx)
    app.state.kobold = api

    def guarded(handler: Any) -> Any:
        """Kobold-shaped errors for everything a route raises."""

        async def route(request: Request) -> Any:
            try:
                return await handler(request)
            except OpenAIError as e:
                kind = "validation_error" if e.status == 422 else "bad_input"
                return kobold_error(e.status, e.message, kind)
            except ValueError as e:
                return kobold_error(400, str(e))

        return route

    async def tokencount(request: Request) -> dict[str, Any]:
        prompt = await _json_field(request, "prompt")
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt is required (a string)")
        ids = ctx.tokenize(prompt)
        return {"value": len(ids), "ids": ids}

    async def check(request: Request) -> dict[str, Any]:
        return api.check(await _json_field(request, "genkey"))

    async def abort(request: Request) -> dict[str, Any]:
        return api.abort(await _json_field(request, "genkey"))

    post = {
        "/api/v1/generate": api.generate,
        "/api/extra/generate/stream": api.stream,
        "/api/extra/generate/check": check,
        "/api/extra/abort": abort,
        "/api/extra/tokencount": tokencount,
    }
    for path, handler in post.items():
        app.add_api_route(path, guarded(handler), methods=["POST"], response_model=None)
    app.add_api_route("/api/extra/generate/check", guarded(check), methods=["GET"])
    values = {
        "/api/v1/model": {"result": f"paphos/{ctx.model_name}"},
        "/api/v1/info/version": {"result": KOBOLD_UNITED_VERSION},
        "/api/v1/config/max_length": {"value": DEFAULT_MAX_LENGTH},
        "/api/v1/config/max_context_length": {"value": ctx.max_model_len},
        "/api/extra/true_max_context_length": {"value": ctx.max_model_len},
        "/api/extra/version": {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION},
    }
    for path, value in values.items():
        app.add_api_route(path, _constant(value), methods=["GET"])


def _constant(value: dict[str, Any]) -> Any:
    async def route() -> dict[str, Any]:
        return value

    return route
