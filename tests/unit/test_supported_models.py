"""The README's supported-models table is the one generated from the registry: adding a built-in
architecture without regenerating it (`python -m paphos.models.supported README.md`) fails here."""

from __future__ import annotations

from pathlib import Path

from paphos.models.registry import ModelRegistry
from paphos.models.supported import FAMILY_NOTES, readme_table, supported_models_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_the_generated_one():
    assert readme_table(README.read_text(encoding="utf-8")) == supported_models_table(), (
        "README.md's supported-models table is stale: run python -m paphos.models.supported "
        "README.md"
    )


def test_every_builtin_architecture_has_examples_and_notes():
    missing = [a for a in ModelRegistry.builtin_architectures() if a not in FAMILY_NOTES]
    assert not missing, f"add examples and notes to paphos/models/supported.py for {missing}"


def test_the_table_lists_every_builtin_and_the_fallback():
    table = supported_models_table()
    for arch in ModelRegistry.builtin_architectures():
        assert f"| `{arch}` |" in table
    assert "--model-impl transformers" in table.splitlines()[-1]
