"""Imports flow one way (DESIGN.md section 3): data -> core/parallel -> kernels/ops/attention ->
quant -> layers -> models -> runner -> engine -> serve. Checked on the AST of every module, imports
inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "paphos"
RANKS = {
    "core": 1,
    "parallel": 1,
    "kernels": 2,
    "ops": 2,
    "attention": 2,
    "quant": 3,
    "layers": 4,
    "models": 5,
    "runner": 6,
    "engine": 7,
    "serve": 8,
}  # top-level modules (config, sampling_params, request, outputs, gguf_file, tokenizer) are data: 0


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANKS.get(parts[1], 0) if len(parts) > 1 else 0


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return [name for name in found if name == "paphos" or name.startswith("paphos.")]


def test_no_module_imports_from_a_higher_layer():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name == "paphos":
            continue  # the package root re-exports lazily
        for imported in _imports(ast.parse(path.read_text())):
            if _rank(imported) > _rank(name):
                violations.append(f"{name} imports {imported}")
    assert not violations, "imports against the layer order:\n" + "\n".join(sorted(violations))


def test_the_layer_check_sees_a_violation():
    tree = ast.parse("def f():\n    from paphos.serve import app\n")
    assert _rank(_imports(tree)[0]) > _rank("paphos.core.scheduler")
