"""CPU decode of one MoE layer's routed experts, kept quantized (layers/moe_experts.py: one layer
pair per expert, each product through its format's CPU path) beside dense bf16 stacked experts
(ops.moe.fused_experts, the matvec kernel at decode). Formats: MXFP4, GGUF Q4_0,
compressed-tensors W4A16 (group 128). Shapes: gpt-oss-20b's experts (hidden 2880,
intermediate 2880, top-4) or Qwen3-30B-A3B's (2048, 768, top-8), with fewer experts held than the
model has (a token reads top-k of them either way). Medians; on a shared machine read ratios.
    python benchmarks/cpu_quantized_moe.py [--shape gpt-oss-20b] [--rows 1,4] [--repeats 11]
"""

from __future__ import annotations

import argparse
import functools

import torch
from cpu_matvec import median_ms  # benchmarks/: one warm-up, then the median of the repeats

from paphos.layers.moe import FusedMoE, MoESpec
from paphos.ops.moe import RouterSpec
from paphos.quant.gguf import GGUFLinearMethod
from paphos.quant.mxfp4 import MXFP4ExpertsLinearMethod

# name -> (hidden, intermediate, top_k, experts held here)
SHAPES = {"gpt-oss-20b": (2880, 2880, 4, 8), "qwen3-30b-a3b": (2048, 768, 8, 16)}


def _layer(hidden: int, inter: int, top_k: int, experts: int, method) -> FusedMoE:
    return FusedMoE(hidden, MoESpec(RouterSpec(experts, top_k), inter), method)


def _fill_mxfp4(layer: FusedMoE) -> None:
    for expert in layer.experts.values():
        for linear in (expert.gate_up_proj, expert.down_proj):
            linear.blocks.data.random_(0, 256)
            linear.scales.data.fill_(120)


def _fill_gguf_q4_0(layer: FusedMoE) -> None:
    """Each expert's projections as Q4_0 blocks (the gguf package's quantizer)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from paphos.gguf_file import GGUFQuantizedTensor

    for expert in layer.experts.values():
        for linear in (expert.gate_up_proj, expert.down_proj):
            rows, cols = linear.gguf_shape
            values = (torch.randn(rows, cols) * 0.02).numpy()
            data = torch.from_numpy(quantize(values, GGMLQuantizationType.Q4_0))
            linear.weight.store_slice(GGUFQuantizedTensor(GGMLQuantizationType.Q4_0, data,
                                                          (rows, cols)), None, 0)  # fmt: skip
            linear.linear_method.process_weights_after_loading(linear)


def _ct_w4a16_method():
    """compressed-tensors pack-quantized W4A16, group 128 (llm-compressor's Qwen3-30B-A3B)."""
    from paphos import quant_schemes
    from paphos.quant.scaled import ScaledLinearMethod

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": 128}  # fmt: skip
    config = {"format": "pack-quantized", "config_groups": {"g": {"targets": ["Linear"],
              "weights": weights}}}  # fmt: skip
    return ScaledLinearMethod(quant_schemes.parse_compressed_tensors(config, "benchmark"))


def _fill_ct(layer: FusedMoE) -> None:
    for expert in layer.experts.values():
        for linear in (expert.gate_up_proj, expert.down_proj):
            linear.weight_packed.data.random_(-(2**31), 2**31 - 1)
            linear.weight_scale.data.fill_(0.01)
            linear.linear_method.process_weights_after_loading(linear)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt-oss-20b", choices=list(SHAPES))
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, inter, top_k, experts = SHAPES[args.shape]
    torch.manual_seed(0)
    dense = _layer(hidden, inter, top_k, experts, None).to(torch.bfloat16)
    for p in (dense.w13_weight, dense.w2_weight):
        p.data.normal_(0, 0.02)
    mxfp4 = _layer(hidden, inter, top_k, experts, MXFP4ExpertsLinearMethod())
    _fill_mxfp4(mxfp4)
    q4_0 = _layer(hidden, inter, top_k, experts, GGUFLinearMethod())
    _fill_gguf_q4_0(q4_0)
    ct = _layer(hidden, inter, top_k, experts, _ct_w4a16_method())
    _fill_ct(ct)
    layers = {"dense bf16": dense, "MXFP4 kept": mxfp4, "GGUF Q4_0 kept": q4_0,
              "CT W4A16 g128 kept": ct}  # fmt: skip
    print(f"{args.shape}: hidden {hidden}, intermediate {inter}, top-{top_k} of {experts}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| rows | experts | MiB held | ms per layer |")
    print("|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(rows)])  # [rows, k]
        weights = torch.full((rows, top_k), 1.0 / top_k)
        for name, layer in layers.items():
            dtype = torch.bfloat16 if name == "dense bf16" else torch.float32
            x = torch.randn(rows, hidden, dtype=dtype)
            step = functools.partial(layer.moe_method.apply, layer, x, weights, ids)
            with torch.inference_mode():
                ms = median_ms(step, args.repeats)
            mib = layer.expert_bytes() / 2**20
            print(f"| {rows} | {name} | {mib:.0f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
