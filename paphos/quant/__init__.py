"""Quantization as a strategy object: the `LinearMethod` protocol and one module per method.

Invariant: layers never know a weight format; their linear method creates and applies the weights.
"""

from __future__ import annotations

from paphos.quant.base import LinearMethod, set_weight_attrs
from paphos.quant.unquantized import UnquantizedLinearMethod

__all__ = ["LinearMethod", "UnquantizedLinearMethod", "set_weight_attrs"]
