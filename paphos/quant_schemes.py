"""compressed-tensors and `quant_method: fp8` quantization configs, and the runtime `-q int8`/
`-q fp8` schemes, as plain data: how each linear layer's weight is stored and its input quantized.

Invariant: parsed once at start-up (paphos.quantization); a config paphos cannot run raises a
ValueError naming the field, its value and what is supported. No torch here (data layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
CT_WEIGHT_STRATEGIES = ("tensor", "channel", "group", "block")
CT_ACTIVATION_STRATEGIES = ("token", "group", "tensor")
INT8_HALF_RANGE_CT = 127.5  # compressed-tensors: scale = amax / ((127 - (-128)) / 2)
INT8_HALF_RANGE = 127.0  # vLLM's and -q int8's dynamic per-token int8
FP8_HALF_RANGE = 448.0  # e4m3's largest value
RUNTIME_SCHEMES = ("int8", "fp8")


@dataclass(frozen=True)
class WeightScheme:
    type: str  # "int" | "float" (fp8 e4m3)
    bits: int = 8
    column_block: int | None = None  # input columns per scale; None: the whole input
    row_block: int = 1  # output rows per checkpoint scale row
    symmetric: bool = True
    packed: bool = False  # compressed-tensors pack-quantized (int32 words along the input)
    scale_name: str = "weight_scale"
    quantize_at_load: bool = False  # runtime -q: quantized from dense weights after loading


@dataclass(frozen=True)
class ActivationScheme:
    type: str  # "int" | "float"
    strategy: str  # "token" | "group" | "tensor"
    group_size: int | None = None
    static: bool = False  # one checkpoint input_scale per tensor
    half_range: float = INT8_HALF_RANGE


@dataclass(frozen=True)
class LinearScheme:
    weights: WeightScheme
    activations: ActivationScheme | None = None  # None: weight-only (activations stay float)


# `ignore` entries paphos honours: layers it never quantizes (lm_head; MoE routers and Qwen2-MoE's
# shared-expert gate, plain ReplicatedLinears in layers.moe, as llm-compressor's MoE recipes list)
CT_IGNORED_DENSE = (
    "lm_head", "re:.*lm_head", "re:.*mlp.gate$", "re:.*mlp.router$", "re:.*block_sparse_moe.gate$",
    "re:.*shared_expert_gate$",
)  # fmt: skip


def _check_kv_cache_scheme(scheme: dict[str, Any] | None, field: str) -> None:
    """compressed-tensors' fp8 KV cache: static per-tensor scales (`self_attn.k_scale` /
    `v_scale` in the checkpoint), which an fp8 cache (--kv-cache-dtype fp8) uses."""
    if not scheme:
        return
    kind = (scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy"))
    if kind != ("float", 8, "tensor") or scheme.get("dynamic"):
        raise ValueError(
            f"compressed-tensors {field}={scheme!r} is not supported: paphos takes static "
            "per-tensor 8-bit float KV scales (type float, num_bits 8, strategy tensor)"
        )


def parse_compressed_tensors(config: dict[str, Any], where: str) -> LinearScheme:
    """The one scheme of a compressed-tensors config (where: the config.json it came from)."""
    field = _fields(where)
    for key in ("sparsity_config", "transform_config"):
        if config.get(key):
            raise ValueError(
                f"compressed-tensors {field(key)} is not supported (only dense "
                f"quantized weights): {config[key]!r}"
            )
    _check_kv_cache_scheme(config.get("kv_cache_scheme"), field("kv_cache_scheme"))
    groups = config.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(
            f"compressed-tensors {field('config_groups')} has {len(groups)} groups; paphos runs "
            "exactly one scheme for every Linear layer"
        )
    name, group = next(iter(groups.items()))
    targets = group.get("targets") or []
    if list(targets) != ["Linear"]:
        raise ValueError(f"{field(f'config_groups.{name}.targets')}={targets!r}: only ['Linear']")
    ignored = [i for i in config.get("ignore") or [] if i not in CT_IGNORED_DENSE]
    if ignored:
        raise ValueError(
            f"{field('ignore')} lists {ignored!r}: paphos keeps only lm_head and MoE routers "
            f"unquantized ({', '.join(CT_IGNORED_DENSE)})"
        )
    if group.get("output_activations"):
        raise ValueError(f"{field(f'config_groups.{name}.output_activations')} is not supported")
    fmt = group.get("format") or config.get("format")
    if fmt not in CT_FORMATS:
        raise ValueError(
            f"compressed-tensors format={fmt!r} (field: {field('format')}) is not supported; "
            f"supported: {CT_FORMATS}"
        )
    weights = _ct_weights(group.get("weights") or {}, fmt, field(f"config_groups.{name}.weights"))
    acts = group.get("input_activations")
    if acts and fmt == "pack-quantized":
        raise ValueError(f"{field('format')}='pack-quantized' with input_activations")
    act_field = field(f"config_groups.{name}.input_activations")
    return LinearScheme(weights, _ct_activations(acts, act_field) if acts else None)


def _ct_weights(args: dict[str, Any], fmt: str, field: str) -> WeightScheme:
    kind, bits, strategy = args.get("type"), args.get("num_bits"), args.get("strategy")
    allowed = {"int": (4, 8) if fmt == "pack-quantized" else (8,), "float": (8,)}
    packed = fmt == "pack-quantized"
    if kind not in allowed or bits not in allowed[kind] or (kind == "float" and packed):
        raise ValueError(
            f"{field}: type={kind!r} num_bits={bits!r} in format {fmt!r} is not supported; "
            "supported: int 4/8 (pack-quantized), int 8 (int-quantized), float 8 (float-quantized)"
        )
    if strategy not in CT_WEIGHT_STRATEGIES or args.get("dynamic"):
        raise ValueError(f"{field}.strategy={strategy!r}: supported {CT_WEIGHT_STRATEGIES}")
    symmetric = bool(args.get("symmetric", True))
    if not symmetric and (kind == "float" or strategy not in ("group", "channel")):
        raise ValueError(f"{field}: asymmetric {kind} {strategy} weights are not supported")
    column_block, row_block = None, 1
    if strategy == "group":
        column_block = _positive(args.get("group_size"), f"{field}.group_size")
    elif strategy == "block":
        block = args.get("block_structure") or []
        if len(block) != 2:
            raise ValueError(f"{field}.block_structure={block!r}: expected [rows, columns]")
        row_block = _positive(block[0], f"{field}.block_structure")
        column_block = _positive(block[1], f"{field}.block_structure")
    actorder = args.get("actorder")
    if actorder not in (None, "static", "weight"):  # both keep each group's columns together
        raise ValueError(
            f"{field}.actorder={actorder!r} (a weight_g_idx per layer, which compressed-tensors "
            "no longer writes) is not supported; supported: None, static, weight"
        )
    assert isinstance(bits, int)  # checked above: one of the allowed widths
    return WeightScheme(
        type=kind,
        bits=bits,
        column_block=column_block,
        row_block=row_block,
        symmetric=symmetric,
        packed=packed,
    )


def _ct_activations(args: dict[str, Any], field: str) -> ActivationScheme:
    kind, bits, strategy = args.get("type"), args.get("num_bits"), args.get("strategy")
    if kind not in ("int", "float") or bits != 8 or not args.get("symmetric", True):
        raise ValueError(f"{field}: type={kind!r} num_bits={bits!r}: only symmetric 8-bit")
    dynamic = args.get("dynamic")
    if strategy not in CT_ACTIVATION_STRATEGIES or dynamic not in (True, False):
        raise ValueError(f"{field}: strategy={strategy!r} dynamic={dynamic!r} is not supported")
    if not dynamic and strategy != "tensor":
        raise ValueError(f"{field}: static activation scales are supported per tensor only")
    group = (
        _positive(args.get("group_size"), f"{field}.group_size") if strategy == "group" else None
    )
    half_range = INT8_HALF_RANGE_CT if kind == "int" else FP8_HALF_RANGE
    return ActivationScheme(kind, strategy, group, static=not dynamic, half_range=half_range)


def parse_fp8(config: dict[str, Any], where: str) -> LinearScheme:
    """`quant_method: fp8` (HF FineGrainedFP8, DeepSeek-V3/Qwen3-FP8, vLLM-serialized): e4m3
    weights with per-tensor (or per-channel) `weight_scale`, or 128x128-style blocks whose
    `weight_scale_inv` is multiplied; activations dynamic (per token, or per token and block
    column for block weights) or static per tensor (`input_scale`)."""
    field = _fields(where)
    fmt = config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"fp8 fmt={fmt!r} (field: {field('fmt')}) is not supported: e4m3")
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8 {field('activation_scheme')}={scheme!r}: dynamic or static")
    ignored = [
        m
        for key in ("modules_to_not_convert", "ignored_layers")
        for m in config.get(key) or []
        if m != "lm_head"
    ]
    if ignored:
        raise ValueError(f"fp8 {field('modules_to_not_convert')}: {ignored!r} (only lm_head)")
    block = config.get("weight_block_size")
    if block is None:
        acts = ActivationScheme(
            "float",
            "tensor" if scheme == "static" else "token",
            static=scheme == "static",
            half_range=FP8_HALF_RANGE,
        )
        return LinearScheme(WeightScheme("float"), acts)
    if len(block) != 2 or scheme != "dynamic":
        raise ValueError(
            f"fp8 {field('weight_block_size')}={block!r} with activation_scheme={scheme!r}: "
            "block weights take [rows, columns] and dynamic activations"
        )
    rows, cols = (_positive(b, field("weight_block_size")) for b in block)
    weights = WeightScheme(
        "float", column_block=cols, row_block=rows, scale_name="weight_scale_inv"
    )
    return LinearScheme(
        weights, ActivationScheme("float", "group", cols, half_range=FP8_HALF_RANGE)
    )


def runtime_scheme(name: str, w8a8: bool) -> LinearScheme:
    """`-q int8` (per-channel weights; W8A8 with dynamic per-token int8 activations when
    `w8a8`, i.e. the product is faster in int8 on this device) or `-q fp8` (per-channel weights,
    dynamic per-token activations)."""
    if name == "int8":
        acts = ActivationScheme("int", "token") if w8a8 else None
        return LinearScheme(WeightScheme("int", quantize_at_load=True), acts)
    if name == "fp8":
        acts = ActivationScheme("float", "token", half_range=FP8_HALF_RANGE)
        return LinearScheme(WeightScheme("float", quantize_at_load=True), acts)
    raise ValueError(f"runtime quantization {name!r}: expected one of {RUNTIME_SCHEMES}")


def _fields(where: str) -> Callable[[str], str]:
    return lambda key: f"quantization_config.{key} in {where}"


def _positive(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field}={value!r}: expected a positive int")
    return value
