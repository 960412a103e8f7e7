"""The request fields that ask for structured output, turned into one `StructuredOutputsParams`:
OpenAI's `response_format`, vLLM's `structured_outputs` and the older `guided_*` names (which
SillyTavern still sends). At most one constraint per request: two (even of the same kind) are a
400, as is anything unknown, so a constraint is never silently dropped."""

from __future__ import annotations

from typing import Any

from paphos.sampling_params import StructuredOutputsParams
from paphos.serve.openai.errors import OpenAIError

# legacy field -> structured_outputs kind
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_BACKENDS = (None, "", "auto", "xgrammar")


def structured_outputs_of(body: Any) -> StructuredOutputsParams | None:
    """The request's constraint (None: free output); OpenAIError 400 naming a bad field."""
    found: list[tuple[str, dict[str, Any]]] = []  # (field it came from, StructuredOutputs kwargs)
    if body.response_format is not None:
        kwargs = _from_response_format(body.response_format)
        if kwargs is not None:
            found.append(("response_format", kwargs))
    if body.structured_outputs is not None:
        if not isinstance(body.structured_outputs, dict):
            raise OpenAIError(
                400, "structured_outputs is invalid: expected an object", "structured_outputs"
            )
        found.append(("structured_outputs", dict(body.structured_outputs)))
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(body, name)
        if value is not None:
            found.append((name, {kind: value}))
    if body.guided_decoding_backend not in _BACKENDS:
        raise OpenAIError(
            400,
            f"guided_decoding_backend={body.guided_decoding_backend!r} is invalid: this server "
            "uses xgrammar ('xgrammar' or 'auto')",
            "guided_decoding_backend",
        )
    if body.guided_whitespace_pattern is not None:
        raise OpenAIError(
            400,
            "guided_whitespace_pattern is not supported: JSON whitespace is bounded by the grammar",
            "guided_whitespace_pattern",
        )
    if not found:
        return None
    if len(found) > 1:
        names = [name for name, _ in found]
        raise OpenAIError(
            400, f"conflicting structured output fields {names}: give one", param=names[1]
        )
    name, kwargs = found[0]
    try:
        return StructuredOutputsParams.from_any(kwargs)
    except ValueError as e:
        raise OpenAIError(400, str(e), param=name) from e


def _from_response_format(response_format: Any) -> dict[str, Any] | None:
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise OpenAIError(
            400,
            f"response_format={response_format!r} is invalid: expected an object with a 'type'",
            "response_format",
        )
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise OpenAIError(
                400,
                "response_format.json_schema is invalid: expected "
                "{'name': ..., 'schema': {...}, 'strict': bool}",
                "response_format",
            )
        # strict or not, the schema is enforced: the grammar is the only way we sample JSON
        return {"json": spec.get("schema", {})}
    if kind == "structural_tag":  # xgrammar's {"type", "format"} or {"structures", "triggers"}
        if "format" in response_format:
            return {"structural_tag": dict(response_format)}
        return {"structural_tag": {k: v for k, v in response_format.items() if k != "type"}}
    raise OpenAIError(
        400,
        f"response_format.type={kind!r} is invalid: expected 'text', 'json_object', "
        "'json_schema' or 'structural_tag'",
        "response_format",
    )
