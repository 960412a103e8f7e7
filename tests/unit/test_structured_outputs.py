"""The structured-output pieces without a model: constraint validation, the compile cache, schema
keywords xgrammar would not enforce, choice escaping, both structural-tag forms, and the matcher
(accepting outputs, EOS only at the end, starting after the reasoning end token)."""

from __future__ import annotations

import pickle

import pytest
import torch

from paphos.sampling_params import SamplingParams, StructuredOutputsParams
from tests.conftest import build_tiny_tokenizer

xgr = pytest.importorskip("xgrammar")
from paphos.ops.token_bitmask import unpack_token_bitmask  # noqa: E402
from paphos.structured.compiler import GrammarCompilerCache, check_schema_enforceable  # noqa: E402
from paphos.structured.matcher import GrammarState  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def cache(tokenizer) -> GrammarCompilerCache:  # noqa: ANN001
    return GrammarCompilerCache(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def _allowed(state: GrammarState, vocab: int) -> set[int]:
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    state.fill(bitmask, 0)
    return set(unpack_token_bitmask(bitmask, vocab)[0].nonzero().flatten().tolist())


def test_params_validate_and_pickle_without_the_grammar() -> None:
    params = SamplingParams(structured_outputs={"regex": "[ab]+"})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert params.structured_outputs.kind == "regex" and not params.samples_on_device_alone
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a"})
    params._grammar = object()
    assert pickle.loads(pickle.dumps(params))._grammar is None
    for bad, words in [
        ({}, "exactly one of"),
        ({"choice": []}, "choice"),
        ({"regex": ""}, "regex"),
        ({"json": {}, "regex": "a"}, "exactly one of"),
        ({"schema": {}}, "unknown field"),
        ("json", "expected an object"),
    ]:
        with pytest.raises(ValueError, match=words):
            SamplingParams(structured_outputs=bad)


def test_compiles_are_cached(cache: GrammarCompilerCache) -> None:
    spec = StructuredOutputsParams(
        json={"type": "object", "properties": {"a": {"type": "integer"}}}
    )
    first = cache.compile(spec)
    same = StructuredOutputsParams(
        json='{"properties": {"a": {"type": "integer"}}, "type": "object"}'
    )
    assert cache.compile(same) is first


def test_unenforceable_schema_keywords_are_named_with_their_place() -> None:
    schema = {
        "type": "object",
        "properties": {"not": {"type": "string"}, "xs": {"type": "array", "uniqueItems": True}},
    }
    with pytest.raises(ValueError, match=r"'uniqueItems' at #/properties/xs"):
        check_schema_enforceable(schema)  # a property called "not" is fine
    check_schema_enforceable({"type": "object", "properties": {"not": {"type": "string"}}})
    check_schema_enforceable({"type": "string", "format": "email"})
    with pytest.raises(ValueError, match=r"format 'idn-email' at #/items"):
        check_schema_enforceable({"type": "array", "items": {"format": "idn-email"}})
    with pytest.raises(ValueError, match=r"'not' at #/patternProperties/\^a"):
        check_schema_enforceable({"patternProperties": {"^a": {"not": {}}}})


def test_choice_with_quotes_and_unicode(cache: GrammarCompilerCache, tokenizer) -> None:  # noqa: ANN001
    choices = ['say "hi"', "caf\u00e9", "a\\b"]
    grammar = cache.compile(StructuredOutputsParams(choice=choices))
    for choice in choices:
        state = GrammarState(grammar)
        state.advance(tokenizer.encode(choice, add_special_tokens=False))
        assert tokenizer.eos_token_id in _allowed(state, len(tokenizer)), choice


def test_structural_tag_forms(cache: GrammarCompilerCache) -> None:
    old = {
        "structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}],
        "triggers": ["<f>"],
    }
    new = {
        "type": "structural_tag",
        "format": {"type": "const_string", "value": "fox"},
    }
    for tag in (old, new):
        cache.compile(StructuredOutputsParams(structural_tag=tag))
    with pytest.raises(ValueError, match="structural_tag is invalid"):
        cache.compile(StructuredOutputsParams(structural_tag={"type": "structural_tag"}))


def test_eos_only_when_complete_and_start_after_reasoning(
    cache: GrammarCompilerCache,
    tokenizer,  # noqa: ANN001
) -> None:
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    grammar = cache.compile(StructuredOutputsParams(regex="fox"))
    end_id = tokenizer.convert_tokens_to_ids("<pad>")  # stands in for </think>
    state = GrammarState(grammar, reasoning_end_token_id=end_id)
    thinking = tokenizer.encode("Hello world", add_special_tokens=False)
    state.advance(thinking)
    assert len(_allowed(state, vocab)) == vocab  # still thinking: free
    outputs = [*thinking, end_id]
    state.advance(outputs)
    allowed = _allowed(state, vocab)
    assert eos not in allowed and 0 < len(allowed) < vocab
    outputs += tokenizer.encode("fox", add_special_tokens=False)
    state.advance(outputs)
    assert _allowed(state, vocab) == {eos}


def test_xgrammar_stays_out_of_the_import_path() -> None:
    """GPU images may lack xgrammar: the engine, runner and server import without it, and only a
    constrained request loads it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import paphos.engine.engine, paphos.runner.model_runner, paphos.serve.app\n"
        "print('xgrammar' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
