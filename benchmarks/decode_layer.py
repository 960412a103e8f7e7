"""Where a decode step's GPU time goes, kernel group by kernel group, in CUDA graphs.

Llama-3.2-1B decode layers (bf16) for 16 layers of distinct weights and KV caches (beyond L2),
replayed as one graph: the four products alone (as `ops.dense.linear` routes them), then adding
the layer's other kernels one group at a time (fused add + RMSNorm x2, SiLU-and-mul as the model
runs it: in the gate_up product's kernel where that takes it, rotary + KV write, paged decode
attention with the split count a decode graph captures for 2048 tokens).
Each row: GPU us per layer (median of 20 replays), its increase over the row above, and the
layer's byte floor (weights, plus K/V once attention is in) at the measured copy bandwidth.

    python benchmarks/decode_layer.py [--rows 1,64] [--context 192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import copy_bandwidth  # noqa: E402
from triton_kernels import paged_batch  # noqa: E402

from paphos.kernels.skinny_gemm import replay_us  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD = 2048, 8192, 32, 8, 64
LAYERS = 16
GRAPH_MAX_SEQ_LEN = 2048
GROUPS = ("products", "+ add+RMSNorm x2", "+ SiLU-and-mul", "+ rotary + KV write", "+ attention")


def build_layers(rows: int, context: int, dev: torch.device) -> list[dict]:
    from paphos.layers.rotary import get_rope

    rope = get_rope(HEAD, HEAD, GRAPH_MAX_SEQ_LEN * 2, 500000.0, None).to(dev)
    layers = []
    for _ in range(LAYERS):
        batch = paged_batch([(1, context)] * rows, dev, HEADS, KV_HEADS, HEAD)
        seq_blocks = batch["block_tables"][:, (context - 1) // 16].long()
        layers.append(
            dict(
                qkv=torch.randn(HEADS * HEAD + 2 * KV_HEADS * HEAD, HIDDEN, device=dev) / 45,
                o=torch.randn(HIDDEN, HEADS * HEAD, device=dev) / 45,
                gate_up=torch.randn(2 * INTER, HIDDEN, device=dev) / 45,
                down=torch.randn(HIDDEN, INTER, device=dev) / 90,
                norm1=torch.ones(HIDDEN, device=dev),
                norm2=torch.ones(HIDDEN, device=dev),
                slots=seq_blocks * 16 + (context - 1) % 16,
                positions=torch.full((rows,), context - 1, device=dev, dtype=torch.int64),
                cos_sin=rope.cos_sin_cache,
                **batch,
            )
        )
        for name in ("qkv", "o", "gate_up", "down", "norm1", "norm2"):
            layers[-1][name] = layers[-1][name].to(torch.bfloat16)
    return layers


def run_layers(layers: list[dict], hidden: torch.Tensor, groups: int) -> None:
    from paphos.kernels import CUDA_KERNELS as K
    from paphos.ops.dense import linear, linear_silu_and_mul

    residual = hidden
    q_size, kv_size = HEADS * HEAD, KV_HEADS * HEAD
    for layer in layers:
        x = hidden
        if groups > 1:
            x, residual = K["fused_add_rms_norm"](hidden, residual, layer["norm1"], 1e-5)
        qkv = linear(x, layer["qkv"])
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        attn_in = q
        if groups > 3:
            attn_in = K["rotary_and_write_kv"](
                layer["positions"],
                q,
                k,
                v,
                layer["cos_sin"],
                HEAD,
                True,
                layer["kv_cache"],
                layer["slots"],
            )
        if groups > 4:
            attn_in = K["paged_attention"](
                attn_in.view(-1, HEADS, HEAD),
                layer["kv_cache"],
                layer["query_start_loc"],
                layer["seq_lens"],
                layer["block_tables"],
                layer["scale"],
                max_query_len=1,
                max_seq_len=GRAPH_MAX_SEQ_LEN,
            ).view(-1, q_size)
        h = linear(attn_in.contiguous(), layer["o"])
        x = h
        if groups > 1:
            x, residual = K["fused_add_rms_norm"](h, residual, layer["norm2"], 1e-5)
        if groups > 2:  # as LlamaMLP runs it: one kernel where the product's kernel can
            act = linear_silu_and_mul(x, layer["gate_up"])
        else:
            act = linear(x, layer["gate_up"])[:, :INTER]
        hidden = linear(act, layer["down"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,64")
    parser.add_argument("--context", type=int, default=192)
    args = parser.parse_args()
    dev = torch.device("cuda")
    bandwidth = copy_bandwidth()
    weight_bytes = 2 * HIDDEN * (HEADS * HEAD + 2 * KV_HEADS * HEAD + HEADS * HEAD + 3 * INTER)
    print(
        f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
        f"1B layer, context {args.context}"
    )
    print(f"{'rows':>4} {'kernels':22} {'us/layer':>9} {'added':>7} {'floor us':>9} {'x floor':>7}")
    for rows in (int(r) for r in args.rows.split(",")):
        layers = build_layers(rows, args.context, dev)
        hidden = torch.randn(rows, HIDDEN, device=dev, dtype=torch.bfloat16)
        kv_bytes = 2 * rows * args.context * KV_HEADS * HEAD * 2
        previous = 0.0
        for groups, label in enumerate(GROUPS, start=1):
            run_layers(layers, hidden, groups)  # compile, autotune, choose tiles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_layers(layers, hidden, groups)
            us = replay_us(graph, 20) / LAYERS
            floor = (weight_bytes + (kv_bytes if groups == 5 else 0)) / bandwidth * 1e6
            print(
                f"{rows:4} {label:22} {us:9.2f} {us - previous:+7.2f} {floor:9.2f} "
                f"{us / floor:7.2f}"
            )
            previous = us


if __name__ == "__main__":
    main()
