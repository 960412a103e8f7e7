"""`ServerConfig`: the HTTP server's own settings (host, port, API keys, uvicorn log level), frozen
and validated; kept free of server imports so `paphos run --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} is invalid: expected 0..65535")
        if self.uvicorn_log_level not in LOG_LEVELS:
            raise ValueError(
                f"uvicorn_log_level={self.uvicorn_log_level!r} is invalid: one of {LOG_LEVELS}"
            )
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys holds an empty key")
