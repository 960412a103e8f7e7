"""POST /v1/tokenize (a prompt or chat messages -> token ids) and /v1/detokenize (ids -> text)."""

from __future__ import annotations

from typing import Any

from paphos.serve.openai.chat import render_chat
from paphos.serve.openai.errors import OpenAIError
from paphos.serve.openai.protocol import DetokenizeRequest, TokenizeRequest
from paphos.serve.openai.serving import ServingContext


def tokenize(body: TokenizeRequest, ctx: ServingContext) -> dict[str, Any]:
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError(400, "send exactly one of 'prompt' or 'messages'", param="prompt")
    if body.messages is not None:
        tokens = render_chat(ctx, body.messages, body.add_generation_prompt)
    else:
        tokens = ctx.tokenize(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_model_len}


def detokenize(body: DetokenizeRequest, ctx: ServingContext) -> dict[str, Any]:
    ctx.check_model(body.model)
    tokenizer = ctx.require_tokenizer()
    vocab = len(tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise OpenAIError(400, f"tokens holds ids outside [0, {vocab}): {bad[:5]}", "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}
