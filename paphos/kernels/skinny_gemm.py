"""Triton GEMM for few-row linear layers on CUDA (batched decode: 2 to 64 rows).

At M <= 64 a linear layer is bound by reading its weight once; cuBLAS's tiles for the large ones
leave bandwidth unused (H200, 64 rows: a 128256 x 2048 lm_head at 3.2 TB/s of 4.1; here 3.8),
while for small weights (a few MB) both are bound by launch and ramp-up, and cuBLAS is often a
little faster: each shape takes whichever timed faster on its first call. Each program streams a
[BLOCK_N, K / SPLIT_K] slice of the weight against all M rows. When the output has too few column
tiles to fill the GPU, the K range is split: each program stores its float32 partial tile, takes a
ticket from an atomic counter, and the last program of a column tile sums the partials, writes the
result and resets the counter to 0: one launch, no memset (CUDA-graph safe: the counters are all
zero between launches). Half-precision operands only (float32 goes to cuBLAS: tl.dot would round
it to tf32); float32 sums in another order than cuBLAS, so results agree to rounding.
`skinny_gemm_silu_and_mul` is an MLP's gate_up product and SiLU-and-mul in one kernel: each
program streams the gate and the up rows of its features and stores only silu(gate) * up.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing
from triton.runtime.errors import OutOfResources

from paphos.kernels._checks import SKINNY_GEMM_MAX_ROWS, num_sms, takes_skinny_gemm
from paphos.kernels.activation import silu_and_mul, silu_times
from paphos.kernels.pdl import pdl_options, pdl_prologue
from paphos.kernels.tickets import TICKETS


class GemmConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


SPLIT_WAVES = 4  # split launches have at most this many programs per SM
MAX_TILE_NUMEL = 64 * 128  # the largest BLOCK_M x BLOCK_N

# Every tile the benchmark sweeps (benchmarks/skinny_gemm.py).
SWEEP = tuple(
    GemmConfig(n, k, s, 4, stages)
    for n in (32, 64, 128)
    for k in (128, 256)
    for s in (1, 2, 4, 8)
    for stages in (3, 4)
)
# What the first call of a shape times, beside cuBLAS: each config that came within 2% of the best
# on some Llama-3 1B/8B shape at 16, 32 or 64 rows in the H200 sweep (notes/cuda.md, session 3).
CANDIDATES = (
    GemmConfig(32, 256, 1, 4, 4),
    GemmConfig(128, 128, 1, 4, 4),
    GemmConfig(128, 128, 1, 4, 3),
    GemmConfig(64, 128, 1, 4, 3),
    GemmConfig(64, 256, 1, 4, 4),
    GemmConfig(32, 256, 2, 4, 4),
    GemmConfig(32, 128, 4, 4, 4),
)

# The gated kernel's (block_n counts output features, each with a gate and an up row): the same
# weight rows per program as each of CANDIDATES.
GATED_CANDIDATES = tuple(
    dict.fromkeys(c._replace(block_n=max(16, c.block_n // 2)) for c in CANDIDATES)
)


@triton.jit
def _finish(acc, acc_up, b_ptr, cols, N, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, dtype):
    """The output tile from a program's float32 sums: + bias; with GATED (acc: gate, acc_up: up)
    silu(gate) * up, with the unfused path's roundings (each product output to `dtype` first)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc = silu_times(acc.to(dtype), acc_up.to(dtype))
    return acc


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    partial_ptr,
    ticket_ptr,
    M,
    N,  # output features (GATED: the weight has 2N rows, gate then up)
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_x,
    stride_w,
    stride_out,
    up_offset,  # GATED: elements from a feature's gate row to its up row (N * stride_w)
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: no masks on the K loads
    SPLIT: tl.constexpr,  # split_k > 1
    GATED: tl.constexpr,  # out = silu(x @ gate.T) * (x @ up.T)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Loads need no masks on M and N: rows past M repeat row M-1 and columns past N wrap around;
    # neither is stored.
    rows = tl.minimum(tl.arange(0, BLOCK_M), M - 1)  # [BLOCK_M]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # [BLOCK_N]
    k_start = pid_k * k_per_split
    ks = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GATED only
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
            if GATED:
                w_up = tl.load(w_ptrs + up_offset)
        else:
            in_k = ks + k < K  # [BLOCK_K]
            x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
            if GATED:
                w_up = tl.load(w_ptrs + up_offset, mask=in_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)  # [BLOCK_M, BLOCK_N]
        if GATED:
            acc_up = tl.dot(x, tl.trans(w_up), acc_up)  # [BLOCK_M, BLOCK_N]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    out_rows = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    out_mask = (out_rows < M)[:, None] & (out_cols < N)[None, :]
    out_ptrs = out_ptr + out_rows[:, None] * stride_out + out_cols[None, :]
    dtype = x_ptr.dtype.element_ty
    if SPLIT:
        # This column tile's partials: [num_splits, BLOCK_M, BLOCK_N] float32 (GATED: the gate's,
        # then as many of the up's).
        num_splits = tl.num_programs(1)
        tile_numel = BLOCK_M * BLOCK_N
        if GATED:
            tile = partial_ptr + pid_n * num_splits * tile_numel * 2
        else:
            tile = partial_ptr + pid_n * num_splits * tile_numel
        tile_up = tile + num_splits * tile_numel  # GATED only
        offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile + pid_k * tile_numel + offsets, acc)
        if GATED:
            tl.store(tile_up + pid_k * tile_numel + offsets, acc_up)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        if ticket == num_splits - 1:  # the last split of this tile: reduce and store
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            total_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, num_splits):
                total += tl.load(tile + s * tile_numel + offsets, cache_modifier=".cg")
                if GATED:
                    total_up += tl.load(tile_up + s * tile_numel + offsets, cache_modifier=".cg")
            total = _finish(total, total_up, b_ptr, out_cols, N, HAS_BIAS, GATED, dtype)
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)
    else:
        acc = _finish(acc, acc_up, b_ptr, out_cols, N, HAS_BIAS, GATED, dtype)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


class _Partials:
    """Per-device float32 partial tiles for split-K launches, allocated once at their largest
    (SPLIT_WAVES x SMs tiles of 64 x 128; ~17 MB on an H100), so that no launch ever sees them
    move: a captured CUDA graph keeps the pointers it saw."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, num_tiles: int, tile_numel: int) -> torch.Tensor:
        if device not in self.buffers:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "skinny_gemm's split-K partials are allocated on the first split launch, "
                    "which must run eagerly (the decode graphs warm up each bucket first)"
                )
            numel = SPLIT_WAVES * num_sms(device) * MAX_TILE_NUMEL
            self.buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
        partials = self.buffers[device]
        if num_tiles * tile_numel > partials.numel():
            raise ValueError(
                f"skinny_gemm: {num_tiles} split tiles of {tile_numel} exceed the split-K "
                f"partials ({SPLIT_WAVES} waves of programs); use fewer splits"
            )
        return partials


_PARTIALS = _Partials()
# (device, rows tile, N, K, dtype, has bias, gated) -> the first such call's fastest (None:
# cuBLAS, or for gated the plain product's choice and the SiLU-and-mul kernel).
_CHOSEN: dict[tuple, GemmConfig | None] = {}


def rows_tile(m: int) -> int:
    """The BLOCK_M a call with m rows compiles for: 16, 32 or 64 (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(m))


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in out_dtype (default x's), for
    2 <= M <= 64.
    `config` fixes the tile; None takes the fastest of cuBLAS and CANDIDATES for this shape
    (timed on its first call, see choose_config)."""
    x = _checked(x, weight, bias)
    if config is None:
        config = choose_config(x, weight, bias)
        if config is None:
            out = F.linear(x, weight, bias)  # [M, N]
            return out if out_dtype is None else out.to(out_dtype)
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
    _launch(x, weight, bias, out, config)
    return out  # [M, N]


def skinny_gemm_silu_and_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """silu_and_mul(skinny_gemm(x, weight, bias)) in one kernel, for a [gate | up] weight
    [2N, K]: each program computes a tile of features from both parts and stores only
    silu(gate) * up [M, N] (rounded as the two kernels round). `config.block_n` counts output
    features; None takes the fastest of the two kernels and GATED_CANDIDATES, timed on the first
    call."""
    x = _checked(x, weight, bias)
    if weight.shape[0] % 2:
        raise ValueError(f"a [gate | up] weight has an even number of rows; got {weight.shape[0]}")
    if config is None:
        config = choose_config(x, weight, bias, gated=True)
        if config is None:
            return silu_and_mul(skinny_gemm(x, weight, bias))
    out = torch.empty((x.shape[0], weight.shape[0] // 2), dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, out, config, gated=True)
    return out  # [M, N]


def _checked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x with contiguous rows, after checking it and the weight are what the kernel takes."""
    if not takes_skinny_gemm(x, weight):
        raise ValueError(
            f"skinny_gemm takes x [M, K] (2 <= M <= {SKINNY_GEMM_MAX_ROWS}) and weight [N, K] "
            f"with contiguous rows, both float16 or bfloat16; got {tuple(x.shape)} {x.dtype} and "
            f"{tuple(weight.shape)} {weight.dtype} (stride {weight.stride()})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    return x if x.stride(1) == 1 else x.contiguous()  # [M, K]


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: GemmConfig,
    gated: bool = False,
) -> None:
    """One launch; `gated`: weight is [gate | up] and out gets silu(gate) * up."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]  # output features
    block_m = rows_tile(m)
    num_col_tiles = triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    split = max(1, min(config.split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split) * config.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    partials, tickets = out, out  # unused without a split
    if split > 1:
        tile_numel = block_m * config.block_n * (2 if gated else 1)
        partials = _PARTIALS.get(x.device, num_col_tiles * split, tile_numel)
        tickets = TICKETS.get(x.device, num_col_tiles)
    _skinny_gemm_kernel[(num_col_tiles, split)](
        x,
        weight,
        bias if bias is not None else out,
        out,
        partials,
        tickets,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        n * weight.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % k_per_split == 0,
        SPLIT=split > 1,
        GATED=gated,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_options(x.device),
    )


def choose_config(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False
) -> GemmConfig | None:
    """The fastest of cuBLAS (None) and the CANDIDATES that suit this call's shape, timed on its
    first call as a decode step runs them: replays of a CUDA graph over enough weight copies to
    leave L2 (eager timing would measure Triton's host launch cost instead). `gated`: the
    gated kernel's GATED_CANDIDATES against (None) the plain product's choice followed by
    the SiLU-and-mul kernel. Tens of ms per shape at start-up; never during a capture: a shape
    must run eagerly first, as the decode graphs' warm-up does."""
    key = (x.device, rows_tile(x.shape[0]), *weight.shape, x.dtype, bias is not None, gated)
    if key in _CHOSEN:
        return _CHOSEN[key]
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"skinny_gemm: shape {key[1:]} was not run before the capture")
    l2_bytes = torch.cuda.get_device_properties(x.device).L2_cache_size
    num_copies = min(16, triton.cdiv(2 * l2_bytes, weight.numel() * weight.element_size()))
    weights = [weight] + [weight.clone() for _ in range(num_copies - 1)]
    n = weight.shape[0] // 2 if gated else weight.shape[0]  # output features
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)  # [M, N]
    if gated:
        unfused = lambda w: silu_and_mul(skinny_gemm(x, w, bias))  # noqa: E731
    else:
        unfused = lambda w: F.linear(x, w, bias)  # noqa: E731
    timings: dict[GemmConfig | None, float] = {None: graph_time_us(unfused, weights)}
    configs = GATED_CANDIDATES if gated else CANDIDATES
    for config in candidates(x.shape[0], n, weight.shape[1], configs, weight_tiles=1 + gated):
        try:
            timings[config] = graph_time_us(
                lambda w, c=config: _launch(x, w, bias, out, c, gated), weights
            )
        except OutOfResources:  # shared_bytes is an estimate; the compiler has the last word
            continue
    chosen = min(timings, key=timings.__getitem__)
    _CHOSEN[key] = chosen
    return chosen


def graph_time_us(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """GPU microseconds of one fn(weight): median of 5 replays of a CUDA graph that calls fn once
    per weight, divided by the number of weights."""
    for w in weights[:2]:
        fn(w)  # compile and pick algorithms outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    return replay_us(graph, 5) / len(weights)


def replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """GPU microseconds of one replay of a captured graph: the median of `replays`, timed with
    events after a first, untimed replay (which uploads the graph)."""
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def shared_bytes(block_m: int, c: GemmConfig, weight_tiles: int = 1) -> int:
    """Shared memory a config needs: num_stages buffers of the x and weight tiles (2-byte
    elements; `weight_tiles` of them: 2 for gate and up) and the float32 accumulators once, for
    the epilogue's layout change."""
    tiles = block_m + weight_tiles * c.block_n
    return c.num_stages * tiles * c.block_k * 2 + weight_tiles * block_m * c.block_n * 4


def candidates(
    m: int,
    n: int,
    k: int,
    configs: tuple[GemmConfig, ...] = CANDIDATES,
    weight_tiles: int = 1,
) -> list[GemmConfig]:
    """The configs worth timing for this shape (n output features; `weight_tiles` weight tiles
    per program: 2 for a gated [gate | up] product): tiles that fit in shared memory; a split
    only where the column tiles alone are too few to fill the GPU, each split still gets at least
    two K tiles, and the partial tiles fit the split-K scratch (SPLIT_WAVES waves)."""
    device = torch.cuda.current_device()
    sms = num_sms(torch.device("cuda", device))
    max_shared = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
    kept = []
    for c in configs:
        if shared_bytes(rows_tile(m), c, weight_tiles) > max_shared:
            continue
        col_tiles = triton.cdiv(n, c.block_n)
        if c.split_k > 1 and (
            col_tiles >= 2 * sms
            or col_tiles * c.split_k * weight_tiles > SPLIT_WAVES * sms
            or k < 2 * c.block_k * c.split_k
        ):
            continue
        kept.append(c)
    return kept
