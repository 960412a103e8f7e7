"""`ServerConfig`: the HTTP server's own settings (host, port, API keys, uvicorn log level), frozen
and validated; kept free of server imports so `paphos run --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
PAPHOS_LOG_LEVELS = ("error", "warning", "info", "debug")
# Kept here (not imported from the parsers) so that `paphos run --help` stays light.
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder")
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings (the CLI generates its flags from these fields)."""

    host: str = field(default="127.0.0.1", metadata=_help("Address to listen on."))
    port: int = field(default=2242, metadata=_help("Port to listen on."))
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "Accepted API keys (Authorization: Bearer KEY or x-api-key: KEY); "
            "none: no authentication.",
            nargs="+",
        ),
    )
    uvicorn_log_level: str = field(
        default="info", metadata=_help("uvicorn's log level.", choices=LOG_LEVELS)
    )
    log_level: str = field(
        default="info",
        metadata=_help(
            "paphos's log level (debug adds the resolved engine config).", choices=PAPHOS_LOG_LEVELS
        ),
    )
    enable_auto_tool_choice: bool = field(
        default=False,
        metadata=_help("Let the model decide to call tools (tool_choice='auto'); needs a parser."),
    )
    tool_call_parser: str | None = field(
        default=None,
        metadata=_help(
            "How tool calls are found in the model's text (tool_choice='auto').",
            choices=TOOL_CALL_PARSERS,
        ),
    )
    reasoning_parser: str | None = field(
        default=None,
        metadata=_help(
            "Split <think> output into message.reasoning_content.", choices=REASONING_PARSERS
        ),
    )
    kobold_api: bool = field(
        default=True, metadata=_help("Serve the KoboldAI API (/api/v1, /api/extra) too.")
    )
    return_tokens_as_token_ids: bool = field(
        default=False,
        metadata=_help(
            'Write tokens in logprobs as "token_id:N" (a request\'s return_tokens_as_token_ids '
            "overrides this); for clients that need ids where a token's text is ambiguous."
        ),
    )
    grammar_compile_timeout_s: float = field(
        default=30.0,
        metadata=_help("A structured output grammar compiling longer than this is refused."),
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} is invalid: expected 0..65535")
        if self.log_level not in PAPHOS_LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r} is invalid: one of {PAPHOS_LOG_LEVELS}")
        if self.uvicorn_log_level not in LOG_LEVELS:
            raise ValueError(
                f"uvicorn_log_level={self.uvicorn_log_level!r} is invalid: one of {LOG_LEVELS}"
            )
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys holds an empty key")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(
                f"tool_call_parser={self.tool_call_parser!r} is invalid: one of {TOOL_CALL_PARSERS}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice=True is invalid without a tool_call_parser")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(
                f"reasoning_parser={self.reasoning_parser!r} is invalid: one of {REASONING_PARSERS}"
            )
        if not self.grammar_compile_timeout_s > 0:
            raise ValueError(
                f"grammar_compile_timeout_s={self.grammar_compile_timeout_s!r} is invalid: > 0"
            )
