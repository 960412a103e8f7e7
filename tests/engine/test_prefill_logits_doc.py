"""docs/adding_a_model.md's recipe for prefill logits (`prompt_logprobs` over a token-id prompt),
run literally on the shared tiny Llama: its assertion against transformers must hold."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding_a_model.md"


def test_the_documented_prefill_logits_recipe_runs_and_matches_transformers(tiny_llama_dir):
    text = DOC.read_text(encoding="utf-8")
    start = text.index("```python\n", text.index("SamplingParams(prompt_logprobs=k)")) + 10
    code = text[start : text.index("```", start)]
    assert "assert_close" in code and "prompt_token_ids" in code
    exec(compile(code, str(DOC), "exec"), {"path": str(tiny_llama_dir)})  # noqa: S102
