"""Quantization as a strategy object: the `LinearMethod` protocol and one module per method.

Invariant: layers never know a weight format; their linear method creates and applies the weights.
"""

from __future__ import annotations

from paphos.quant.base import LinearMethod, set_weight_attrs
from paphos.quant.unquantized import UnquantizedLinearMethod


def create_linear_method(quant_method: str | None) -> LinearMethod | None:
    """The method named by `ModelConfig.quant_method` (resolved by paphos.quantization); None
    for dense weights (each layer then uses UnquantizedLinearMethod)."""
    if quant_method is None:
        return None
    if quant_method == "gguf":
        # imported here: the gguf package is needed only for GGUF files
        from paphos.quant.gguf import GGUFLinearMethod

        return GGUFLinearMethod()
    raise ValueError(f"quant_method={quant_method!r} is invalid: expected None or 'gguf'")


__all__ = ["LinearMethod", "UnquantizedLinearMethod", "create_linear_method", "set_weight_attrs"]
