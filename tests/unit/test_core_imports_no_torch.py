"""paphos.core stays torch-free: the scheduler and KV manager run (and are tested) without it."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = (
    "paphos.core.block_pool",
    "paphos.core.kv_cache_manager",
    "paphos.core.scheduler",
    "paphos.core.step_data",
    "paphos.core.stopping",
)


def test_core_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in CORE_MODULES)
        + "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False", "a paphos.core module imports torch"
