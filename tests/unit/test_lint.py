"""The repo stays lint-clean (STYLE.md "Tooling"): ruff check and ruff format over the whole repo at
100 columns, and mypy --strict on the data and core modules as configured in pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DATA_MODULES = ("config.py", "sampling_params.py", "request.py", "outputs.py")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m <args>` at the repo root, so the tools read its pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_ruff_is_configured_for_100_columns_on_python_310() -> None:
    ruff = _pyproject()["tool"]["ruff"]
    assert ruff["line-length"] == 100
    assert ruff["target-version"] == "py310"


def test_ruff_check_finds_nothing_in_the_repo() -> None:
    result = _run("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"


def test_ruff_format_would_change_no_file_in_the_repo() -> None:
    result = _run("ruff", "format", "--no-cache", "--check", ".")
    unformatted = re.findall(r"^\s*--> (\S+?):\d+", result.stdout, flags=re.MULTILINE)
    assert result.returncode == 0, f"ruff format would reformat {sorted(set(unformatted))}"


def test_mypy_config_covers_the_data_and_core_modules() -> None:
    mypy = _pyproject()["tool"]["mypy"]
    assert mypy["strict"] is True
    assert sorted(mypy["files"]) == sorted([f"paphos/{m}" for m in DATA_MODULES] + ["paphos/core"])


def test_mypy_strict_passes_on_the_data_and_core_modules() -> None:
    pytest.importorskip("mypy")
    result = _run("mypy")  # the file list and strictness come from [tool.mypy]
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
    checked = re.search(r"no issues found in (\d+) source files", result.stdout)
    expected = len(DATA_MODULES) + len(list((REPO / "paphos" / "core").rglob("*.py")))
    assert checked is not None and int(checked.group(1)) == expected, result.stdout
