"""Quantization as a strategy object: the `LinearMethod` protocol and one module per method.

Invariant: layers never know a weight format; their linear method creates and applies the weights.
"""

from __future__ import annotations

from typing import Any

from paphos import quant_schemes
from paphos.quant.base import LinearMethod, MoEMethod, set_weight_attrs
from paphos.quant.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod
from paphos.quantization import hf_quantization_config


def create_linear_method(
    quant_method: str | None, hf_config: Any = None, device_type: str = "cpu"
) -> LinearMethod | None:
    """The method named by `ModelConfig.quant_method` (resolved by paphos.quantization, which
    validated the checkpoint's settings); None for dense weights (each layer then uses
    UnquantizedLinearMethod). `device_type` picks -q int8's product: W8A8 on CUDA and on CPUs
    with int8 dot products (VNNI/AMX), weight-only elsewhere."""
    if quant_method is None:
        return None
    if quant_method in ("compressed-tensors", "fp8", "runtime-int8", "runtime-fp8"):
        return _scaled_method(quant_method, hf_config, device_type)
    if quant_method == "mxfp4":  # gpt-oss: MXFP4 experts, dense everything else
        from paphos.quant.mxfp4 import MXFP4ExpertsLinearMethod

        return MXFP4ExpertsLinearMethod()
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

    if quant_method == "gguf":  # on CUDA: its Q4_0/Q4_1/Q8_0 through the Triton dequant GEMM
        return GGUFLinearMethod(group_gemm=device_type == "cuda")
    runtime = {t.name.lower(): t for t in RUNTIME_TYPES}
    if quant_method in runtime:  # a float checkpoint quantized into GGUF blocks at load
        return GGUFLinearMethod(quantize_to=runtime[quant_method])
    raise ValueError(
        f"quant_method={quant_method!r} is invalid: expected None, 'gguf' or one of "
        f"{sorted(runtime)}"
    )


def _scaled_method(quant_method: str, hf_config: Any, device_type: str) -> LinearMethod:
    from paphos.kernels.cpu import isa
    from paphos.quant.scaled import ScaledLinearMethod

    config = hf_quantization_config(hf_config) or {}
    if quant_method == "compressed-tensors":
        return ScaledLinearMethod(quant_schemes.parse_compressed_tensors(config, "config.json"))
    if quant_method == "fp8":
        return ScaledLinearMethod(quant_schemes.parse_fp8(config, "config.json"))
    int8_dot = {"avx512_vnni", "avx_vnni", "amx_int8"} & isa.cpu_flags()
    w8a8 = device_type == "cuda" or bool(int8_dot)
    return ScaledLinearMethod(quant_schemes.runtime_scheme(quant_method[len("runtime-") :], w8a8))


def expert_linear_method(linear_method: LinearMethod | None) -> LinearMethod | None:
    """The linear method of each routed expert's projections (layers.moe_experts builds one
    gate_up and one down layer per expert with it): None for dense stacked experts (dense models);
    a method's own `expert_linear_method()` where its checkpoints quantize the experts in another
    format than the dense layers (mxfp4); else the method itself, where it declares
    `runs_experts`. Any other method is refused, naming its format."""
    if linear_method is None:
        return None
    own = getattr(linear_method, "expert_linear_method", None)
    if own is not None:
        return own()
    if isinstance(linear_method, UnquantizedLinearMethod):
        return None
    if not getattr(linear_method, "runs_experts", False):
        raise ValueError(
            f"quantized mixture-of-experts weights in the format of {type(linear_method).__name__}"
            " are not supported (no per-expert method); supported expert formats: GPTQ, AWQ, "
            "compressed-tensors, fp8, GGUF, MXFP4, -q int8/fp8/q8_0..q4_0; or use a dense "
            "checkpoint"
        )
    return linear_method


def quantizes_activations(linear_method: LinearMethod) -> bool:
    """Whether the method quantizes its input per call (W8A8, fp8 activations): its product is
    then not dequantize-then-matmul of float activations."""
    return getattr(linear_method, "act", None) is not None


__all__ = [
    "LinearMethod",
    "MoEMethod",
    "UnquantizedLinearMethod",
    "UnquantizedMoEMethod",
    "create_linear_method",
    "expert_linear_method",
    "quantizes_activations",
    "set_weight_attrs",
]
