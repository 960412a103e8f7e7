"""Compiling `StructuredOutputsParams` into xgrammar grammars, with a cache keyed by the constraint.

One `GrammarCompiler` per tokenizer (vocabulary, stop tokens). `compile` is thread-safe and meant to
run off the engine loop (AsyncEngine calls it in a worker thread under a time limit); a constraint
xgrammar cannot compile, or a JSON schema keyword it cannot enforce, is a ValueError naming it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from paphos.sampling_params import StructuredOutputsParams

# JSON-schema keywords xgrammar 0.2 accepts but does not enforce (output would break them silently)
# or enforces wrongly (uniqueItems and contains reject every non-empty array), found by feeding
# matchers outputs that break each one.
UNENFORCED_SCHEMA_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "uniqueItems",
        "multipleOf",
        "contains",
        "minContains",
        "maxContains",
        "dependentSchemas",
        "dependentRequired",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
# String formats whose matchers reject a malformed value; any other `format` is a 400.
ENFORCED_FORMATS = frozenset(
    {
        "date",
        "time",
        "date-time",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "uri-template",
        "uuid",
        "json-pointer",
        "relative-json-pointer",
    }
)
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONES = ("items", "additionalProperties", "propertyNames")
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and sometimes a check text).
_CXX_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: .*? is false: )?")
MAX_CACHED_GRAMMARS = 512


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:  # GPU images may lack it: only constrained requests need it
        raise ValueError(
            "structured_outputs needs the xgrammar package on the server (pip install xgrammar)"
        ) from e
    return xgrammar


class GrammarCompilerCache:
    """Compiles constraints for one tokenizer; compiled grammars are kept (LRU, by constraint)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        xgr = import_xgrammar()
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec` (from the cache when compiled before)."""
        key = _cache_key(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        kind = spec.kind
        compiler = self._compiler
        try:
            if kind == "json":
                schema = _schema_text(spec.json)
                return compiler.compile_json_schema(
                    schema, any_whitespace=spec.any_whitespace, strict_mode=True
                )
            if kind == "json_object":  # any object, whitespace bounded like a schema's
                return compiler.compile_json_schema(
                    {"type": "object"}, any_whitespace=spec.any_whitespace, strict_mode=False
                )
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice or []))
            if kind == "grammar":
                return compiler.compile_grammar(spec.grammar)
            return self._compile_structural_tag(spec.structural_tag)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with a C++ message
            raise ValueError(f"structured_outputs.{kind} is invalid: {clean_error(e)}") from e

    def _compile_structural_tag(self, tag: dict[str, Any] | str | None) -> Any:
        """xgrammar's structural tag ({"type": "structural_tag", "format": ...}), or the older
        {"structures": [{"begin", "schema", "end"}], "triggers": [...]} that vLLM accepts."""
        if isinstance(tag, dict) and "structures" in tag:
            items = [
                self._xgr.StructuralTagItem(
                    begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"]
                )
                for s in tag["structures"]
            ]
            return self._compiler.compile_structural_tag(items, list(tag.get("triggers", [])))
        return self._compiler.compile_structural_tag(
            tag if isinstance(tag, str) else json.dumps(tag)
        )


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose language is exactly `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def clean_error(error: BaseException) -> str:
    lines = [_CXX_PREFIX.sub("", line).strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line) or type(error).__name__


def _schema_text(schema: dict[str, Any] | str | None) -> str:
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is invalid: not JSON ({e})") from e
    else:
        parsed = schema
    if not isinstance(parsed, (dict, bool)):
        raise ValueError(
            f"structured_outputs.json={parsed!r} is invalid: a JSON schema is an object"
        )
    check_schema_enforceable(parsed)
    return json.dumps(parsed)


def check_schema_enforceable(schema: Any, path: str = "#") -> None:
    """ValueError naming the first keyword (and where) that xgrammar would not enforce."""
    if not isinstance(schema, dict):
        return
    for key in schema:
        if key in UNENFORCED_SCHEMA_KEYWORDS:
            raise ValueError(
                f"structured_outputs.json is invalid: the schema keyword {key!r} at {path} "
                "cannot be enforced by the grammar engine (xgrammar)"
            )
    fmt = schema.get("format")
    if fmt is not None and fmt not in ENFORCED_FORMATS:
        raise ValueError(
            f"structured_outputs.json is invalid: format {fmt!r} at {path} cannot be enforced "
            f"by the grammar engine (xgrammar); supported: {sorted(ENFORCED_FORMATS)}"
        )
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_schema_enforceable(sub, f"{path}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_schema_enforceable(sub, f"{path}/{key}/{i}")
    for key in _SCHEMA_ONES:
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, item in enumerate(sub):
                check_schema_enforceable(item, f"{path}/{key}/{i}")
        else:
            check_schema_enforceable(sub, f"{path}/{key}")


def _cache_key(spec: StructuredOutputsParams) -> str:
    value = getattr(spec, spec.kind)
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return f"{spec.kind}:{int(spec.any_whitespace)}:{text}"
