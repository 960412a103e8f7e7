"""Pydantic models of the OpenAI-compatible API (requests and responses).

Requests accept OpenAI's own fields plus, as extra body fields, every field of `SamplingParams`
(found by introspection, so new samplers need no change here); any other field is rejected.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from paphos.sampling_params import SamplingParams
from paphos.serve.openai.errors import OpenAIError
from paphos.serve.openai.structured import structured_outputs_of


def _sampling_field_adapters() -> dict[str, TypeAdapter]:
    try:
        hints = typing.get_type_hints(SamplingParams)
    except (NameError, TypeError):  # a hint we cannot resolve: still pass the value through
        hints = {}
    return {
        f.name: TypeAdapter(hints.get(f.name, Any))
        for f in dataclasses.fields(SamplingParams)
        if f.init and not f.name.startswith("_")  # private: filled by the engine, never sent
    }


SAMPLING_FIELDS: dict[str, TypeAdapter] = _sampling_field_adapters()


class OpenAIRequest(BaseModel):
    """Common base: extra fields are allowed only if they are `SamplingParams` fields."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured output (serve/openai/structured.py turns these into one constraint).
    response_format: dict[str, Any] | None = None
    structured_outputs: Any = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # vLLM's extras: the token ids of the prompt and of each choice in the response; tokens in
    # logprobs written as "token_id:N" (None: the server's --return-tokens-as-token-ids).
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool | None = None

    def sampling_extras(self) -> dict[str, Any]:
        """The validated extra fields (None means: keep the default)."""
        extras: dict[str, Any] = {}
        for name, value in (self.model_extra or {}).items():
            adapter = SAMPLING_FIELDS.get(name)
            if adapter is None:
                raise OpenAIError(400, f"unknown field {name!r}", param=name)
            if value is None:
                continue
            try:
                extras[name] = adapter.validate_python(value)
            except ValidationError as e:
                msg = e.errors()[0]["msg"]
                raise OpenAIError(400, f"{name}={value!r} is invalid: {msg}", param=name) from e
        return extras

    def common_sampling_kwargs(self) -> dict[str, Any]:
        kwargs = self.sampling_extras()
        kwargs["n"] = self.n
        if self.stop is not None:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            kwargs["seed"] = self.seed
        constraint = structured_outputs_of(self)
        if constraint is not None:
            kwargs["structured_outputs"] = constraint
        return kwargs

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: handed to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


# ---- responses -----------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


def _only_if_set() -> Any:
    """A response field left out of the JSON unless the request asked for it (set: not None)."""
    return Field(default=None, exclude_if=lambda value: value is None)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # return_token_ids (the prompt's in the first piece of a stream)
    prompt_token_ids: list[int] | None = _only_if_set()
    token_ids: list[int] | None = _only_if_set()
    # prompt_logprobs=N: per prompt position, {token id: logprob} (None for the first token)
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = _only_if_set()


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _only_if_set()  # return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = _only_if_set()  # return_token_ids


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _only_if_set()  # return_token_ids: this chunk's ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = _only_if_set()  # return_token_ids: first chunk


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "paphos"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


OpenAIRequest.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
