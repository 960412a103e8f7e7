"""GPT-NeoX for paphos, outside the paphos package: `register()` is the plugin entry point.

Invariant: importing this package registers nothing; only `register()` touches the registry.
"""

from __future__ import annotations

ARCHITECTURE = "GPTNeoXForCausalLM"


def register() -> None:
    """Serve HF `GPTNeoXForCausalLM` checkpoints with this package's model (imported lazily),
    in place of paphos's built-in GPT-NeoX: the example shows the out-of-tree path."""
    from paphos import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.gpt_neox:GPTNeoXForCausalLM")
