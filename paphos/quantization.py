"""Which weight format (linear method) a model runs with: from `-q/--quantization`, else from the
checkpoint (GGUF tensor types; `quantization_config.quant_method` in config.json).

Invariant: a format or type paphos cannot run fails here, at start-up, with a ValueError naming
the format, the field it came from and the supported formats; never later at load or run time.
"""

from __future__ import annotations

import logging
from typing import Any

from paphos import quant_schemes

logger = logging.getLogger(__name__)

# User-facing values of `quantization`: auto = what the checkpoint says; none = dense weights
# (a GGUF file is dequantized at load, the reference path); gguf = GGUF blocks kept (CPU);
# q8_0 ... q4_0 = a float checkpoint quantized into those GGUF blocks at load (CPU).
# int8/fp8 = a float checkpoint quantized per channel at load (ScaledLinearMethod, any device).
RUNTIME_GGUF = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
RUNTIME_SCALED = ("int8", "fp8")
QUANTIZATIONS = ("auto", "none", "gguf", *RUNTIME_GGUF, *RUNTIME_SCALED)
# GGUF tensor types the kept-quantized path runs (F32/F16/BF16 tensors load as dense parts).
GGUF_KEPT_TYPE_NAMES = (
    *("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"),
)
GGUF_FLOAT_TYPE_NAMES = ("F32", "F16", "BF16")
# ... and on CUDA (the Triton dequant GEMM); a file with other types is dequantized there
GGUF_CUDA_TYPE_NAMES = ("Q4_0", "Q4_1", "Q8_0")
# config.json quant_method values paphos loads, and the GPTQ/AWQ settings it takes
# (compressed-tensors and fp8 settings: paphos.quant_schemes).
HF_QUANT_METHODS: tuple[str, ...] = ("gptq", "awq", "compressed-tensors", "fp8", "mxfp4")
GPTQ_BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_BITS = (4,)
AWQ_VERSIONS = ("gemm",)


def resolve_quant_method(
    requested: str, model: str, gguf_file: str | None, hf_config: Any, device: str
) -> str | None:
    """The linear method to build (a checkpoint's quant_method, 'gguf', a runtime GGUF type or
    'runtime-int8'/'runtime-fp8') or None for dense weights. `device` is the device type
    ('cpu'/'cuda'): on CUDA, GGUF blocks are kept for Q4_0/Q4_1/Q8_0 files only."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization={requested!r} is invalid: expected one of {QUANTIZATIONS}")
    hf_method = _hf_quant_method(model, hf_config, gguf_file)
    if hf_method is not None:
        if requested != "auto":
            raise ValueError(
                f"quantization={requested!r} but {model!r} is a {hf_method} checkpoint (field: "
                "quantization_config.quant_method in its config.json); use --quantization auto"
            )
        return hf_method
    if requested in RUNTIME_SCALED:  # a GGUF file's blocks are dequantized, then quantized
        return f"runtime-{requested}"
    if requested in RUNTIME_GGUF:
        if gguf_file is not None:
            raise ValueError(
                f"quantization={requested!r} quantizes float checkpoints; {model!r} is a GGUF "
                "file (its own types run with --quantization auto/gguf)"
            )
        if device != "cpu":
            raise ValueError(f"quantization={requested!r} runs on CPU only (device={device!r})")
        return requested
    if gguf_file is None:
        if requested == "gguf":
            raise ValueError(
                f"quantization='gguf' but {model!r} is not a GGUF file; supported for it: "
                f"{_supported(hf_config)}"
            )
        return None
    if requested == "none":
        return None
    if device != "cpu":
        types = _gguf_type_names(gguf_file) - set(GGUF_FLOAT_TYPE_NAMES)
        if types and types <= set(GGUF_CUDA_TYPE_NAMES):  # kept: the Triton dequant GEMM
            return "gguf"
        if requested == "gguf":
            raise ValueError(
                f"quantization='gguf' on {device} keeps GGUF types "
                f"{', '.join(GGUF_CUDA_TYPE_NAMES)} quantized; {model!r} has "
                f"{sorted(types - set(GGUF_CUDA_TYPE_NAMES)) or 'no quantized tensors'}, which "
                "run kept quantized on CPU only; use --quantization none to dequantize the file "
                "at load"
            )
        logger.info("GGUF types %s run kept on CPU only: dequantizing %s at load", types, model)
        return None
    quantized = _quantized_gguf_types(gguf_file)
    if requested == "auto" and not quantized:
        return None
    return "gguf"


def _gguf_type_names(gguf_file: str) -> set[str]:
    from paphos.gguf_file import tensor_types  # the gguf package only for GGUF files

    return {ggml_type.name for ggml_type in tensor_types(gguf_file).values()}


def _quantized_gguf_types(gguf_file: str) -> set[str]:
    """The quantized types of the file's matrices; an unsupported one raises."""
    from paphos.gguf_file import tensor_types  # the gguf package only for GGUF files

    found = set()
    for name, ggml_type in tensor_types(gguf_file).items():
        type_name = ggml_type.name
        if type_name in GGUF_FLOAT_TYPE_NAMES:
            continue
        if type_name not in GGUF_KEPT_TYPE_NAMES:
            raise ValueError(
                f"GGUF tensor type {type_name} (field: the tensor table's ggml type of {name!r} "
                f"in {gguf_file!r}) is not supported kept quantized; supported GGUF types: "
                f"{', '.join(GGUF_KEPT_TYPE_NAMES + GGUF_FLOAT_TYPE_NAMES)} (or --quantization "
                "none to dequantize at load)"
            )
        found.add(type_name)
    return found


def _hf_quant_method(model: str, hf_config: Any, gguf_file: str | None) -> str | None:
    """The config.json `quantization_config` method paphos runs (None: the checkpoint is not
    quantized); one it cannot run raises, naming the format and its field."""
    config = hf_quantization_config(hf_config) if gguf_file is None else None
    if config is None:
        return None
    method = str(config.get("quant_method"))
    bits = config.get("bits", config.get("w_bit"))
    described = f"{method!r}" + (f" ({bits}-bit)" if bits is not None else "")
    field = f"quantization_config.quant_method in {model}/config.json"
    if method not in HF_QUANT_METHODS:
        raise ValueError(
            f"quantization format {described} (field: {field}) is not supported; supported: "
            f"{_supported(hf_config)}"
        )
    where = f"{model}/config.json"
    if method == "compressed-tensors":
        quant_schemes.parse_compressed_tensors(config, where)
        return method
    if method == "fp8":
        quant_schemes.parse_fp8(config, where)
        return method
    if method == "mxfp4":  # gpt-oss: routed experts in MXFP4 blocks, all else dense
        return method
    allowed_bits = GPTQ_BITS if method == "gptq" else AWQ_BITS
    if bits not in allowed_bits:
        raise ValueError(
            f"quantization format {described} (field: quantization_config.bits in "
            f"{model}/config.json) is not supported; supported {method} bits: {allowed_bits}"
        )
    if method == "gptq":
        _check_setting(model, config, "checkpoint_format", "gptq", GPTQ_FORMATS)
    else:
        _check_setting(model, config, "version", "gemm", AWQ_VERSIONS)
        _check_setting(model, config, "zero_point", True, (True,))
    return method


def _check_setting(
    model: str, config: dict[str, Any], key: str, default: Any, allowed: tuple[Any, ...]
) -> None:
    value = config.get(key)
    value = default if value is None else value
    value = value.lower() if isinstance(value, str) else value
    if value not in allowed:
        raise ValueError(
            f"{config.get('quant_method')} {key}={value!r} (field: quantization_config.{key} in "
            f"{model}/config.json) is not supported; supported: {allowed}"
        )


def hf_quantization_config(hf_config: Any) -> dict[str, Any] | None:
    """config.json's `quantization_config` as a dict, or None."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _supported(hf_config: Any) -> str:
    del hf_config
    return (
        "unquantized safetensors/.bin checkpoints, GGUF files with tensor types "
        f"{', '.join(GGUF_KEPT_TYPE_NAMES + GGUF_FLOAT_TYPE_NAMES)}"
        + f", and config.json quant_method gptq (bits {GPTQ_BITS}), awq (bits {AWQ_BITS}, "
        "GEMM layout), compressed-tensors (formats "
        f"{', '.join(quant_schemes.CT_FORMATS)}: int4/int8 and fp8 weights, 8-bit "
        "activations), fp8 (e4m3, per-tensor/channel or block scales) or mxfp4 (gpt-oss's "
        "MXFP4 experts)"
    )
