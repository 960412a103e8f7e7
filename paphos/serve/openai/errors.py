"""OpenAI-style errors: `OpenAIError` carries status, message and param; handlers turn it (and
pydantic validation errors, engine ValueErrors) into `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}
_PARAM_IN_MESSAGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


class OpenAIError(Exception):
    """An error answered to the client as `status` with an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def from_value_error(cls, error: ValueError | TypeError) -> OpenAIError:
        """A ValueError from SamplingParams/Engine ("name=value is invalid") -> 400 naming it."""
        message = str(error)
        match = _PARAM_IN_MESSAGE.match(message)
        return cls(400, message, param=match.group(1) if match else None)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}


def _validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    # Drop pydantic's union-member tags ("str", "list[int]") so the path names the user's field.
    path = [p for p in loc if not (p[:1].islower() and ("[" in p or p in _TYPE_TAGS))]
    param = ".".join(path) or None
    if error.get("type") == "json_invalid":
        return f"request body is not valid JSON: {error.get('msg')}", None
    if error.get("type") == "missing":
        return f"field {param!r} is required", param
    value = error.get("input")
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
    return f"{param or 'body'}={shown} is invalid: {error.get('msg')}", param


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "function-after", "literal"}


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as an OpenAI-style body; nothing surfaces as a bare 500/422."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return OpenAIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return OpenAIError(500, f"internal error: {exc!r}").response()

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return OpenAIError.from_value_error(exc).response()
