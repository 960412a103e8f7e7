"""Quantization as a strategy object: the `LinearMethod` protocol and one module per method.

Invariant: layers never know a weight format; their linear method creates and applies the weights.
"""

from __future__ import annotations

from typing import Any

from paphos.quant.base import LinearMethod, MoEMethod, set_weight_attrs
from paphos.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod
from paphos.quantization import hf_quantization_config


def create_linear_method(quant_method: str | None, hf_config: Any = None) -> LinearMethod | None:
    """The method named by `ModelConfig.quant_method` (resolved by paphos.quantization, which
    validated the checkpoint's settings); None for dense weights (each layer then uses
    UnquantizedLinearMethod)."""
    if quant_method is None:
        return None
    if quant_method == "gptq":
        from paphos.quant.gptq import GPTQLinearMethod

        config = hf_quantization_config(hf_config) or {}
        return GPTQLinearMethod(
            bits=int(config["bits"]),
            group_size=int(config.get("group_size", -1)),
            desc_act=bool(config.get("desc_act", False)),
            zero_offset=0 if config.get("checkpoint_format") == "gptq_v2" else 1,
        )
    if quant_method == "awq":
        from paphos.quant.awq import AWQLinearMethod

        config = hf_quantization_config(hf_config) or {}
        return AWQLinearMethod(
            group_size=int(config.get("group_size", config.get("q_group_size", -1)))
        )
    # imported here: the gguf package is needed only for GGUF formats
    from paphos.quant.gguf import RUNTIME_TYPES, GGUFLinearMethod

    if quant_method == "gguf":
        return GGUFLinearMethod()
    runtime = {t.name.lower(): t for t in RUNTIME_TYPES}
    if quant_method in runtime:  # a float checkpoint quantized into GGUF blocks at load
        return GGUFLinearMethod(quantize_to=runtime[quant_method])
    raise ValueError(
        f"quant_method={quant_method!r} is invalid: expected None, 'gguf' or one of "
        f"{sorted(runtime)}"
    )


def moe_method_for(linear_method: LinearMethod | None) -> MoEMethod:
    """The expert-weight method that goes with a model's linear method: dense experts for dense
    models; a quantized method gives its own through `moe_method()`, or is refused."""
    if linear_method is None or isinstance(linear_method, UnquantizedLinearMethod):
        return UnquantizedMoEMethod()
    make = getattr(linear_method, "moe_method", None)
    if make is None:
        raise ValueError(
            f"{type(linear_method).__name__} has no method for mixture-of-experts weights: "
            "quantized experts in this format are not supported; use a dense checkpoint"
        )
    return make()


__all__ = [
    "LinearMethod",
    "MoEMethod",
    "UnquantizedLinearMethod",
    "UnquantizedMoEMethod",
    "create_linear_method",
    "moe_method_for",
    "set_weight_attrs",
]
