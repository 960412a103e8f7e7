"""paphos: an LLM inference and serving engine.

>>> from paphos import LLM, SamplingParams
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "paphos.engine.llm",
    "Engine": "paphos.engine.engine",
    "SamplingParams": "paphos.sampling_params",
    "RequestOutput": "paphos.outputs",
    "CompletionOutput": "paphos.outputs",
    "EngineConfig": "paphos.config",
    "ModelRegistry": "paphos.models.registry",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy so that `import paphos` stays cheap (no torch) for tools that only need the data classes.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'paphos' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
