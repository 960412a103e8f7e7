"""Tensor-parallel layers over real gloo process groups equal the unsharded torch reference.

One group of spawned processes per world size (1, 2, 3, 4) runs every check; each test below reads
the outcome of its check on every rank. Full weights are seeded identically on all ranks and loaded
through each parameter's `weight_loader`, exactly as a checkpoint would be.
"""

from __future__ import annotations

import queue
import traceback
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from paphos.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from paphos.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from paphos.layers.logits import LogitsProcessor
from paphos.layers.moe import FusedMoE, MoESpec
from paphos.layers.weight_utils import default_weight_loader
from paphos.ops.moe import ExpertActivation, RouterSpec
from paphos.parallel import (
    ParallelInfo,
    all_gather,
    all_reduce,
    broadcast_object,
    destroy_distributed,
    init_distributed,
)

WORLD_SIZES = (1, 2, 3, 4)
HIDDEN, NUM_TOKENS, VOCAB = 8, 5, 50  # VOCAB is divisible by neither 3 nor 4
# Each check is seeded alike first, so torch.randn gives the same full weights on every rank.
TIMEOUT_S = 90


def _load(param: torch.nn.Parameter, full: torch.Tensor, shard_id: object = None) -> None:
    param.weight_loader(param, full, shard_id)


def check_collectives(p: ParallelInfo) -> None:
    x = torch.full((2, 3), float(p.rank + 1))  # [2, 3]
    assert_close(all_reduce(x, p), torch.full((2, 3), p.world_size * (p.world_size + 1) / 2))
    gathered = all_gather(torch.full((2, 1), float(p.rank)), p, dim=-1)  # [2, world_size]
    assert_close(gathered, torch.arange(p.world_size).float().expand(2, -1))
    assert all_gather(torch.ones(2, 3), p, dim=0).shape == (2 * p.world_size, 3)
    src = p.world_size - 1
    assert broadcast_object({"rank": p.rank}, p, src=src) == {"rank": src}


def check_replicated_linear(p: ParallelInfo) -> None:
    w, b, x = torch.randn(6, HIDDEN), torch.randn(6), torch.randn(NUM_TOKENS, HIDDEN)
    layer = ReplicatedLinear(HIDDEN, 6, bias=True, parallel=p)
    _load(layer.weight, w)
    _load(layer.bias, b)
    assert_close(layer(x), F.linear(x, w, b))


def check_column_parallel_linear(p: ParallelInfo) -> None:
    out = 12
    w, b, x = torch.randn(out, HIDDEN), torch.randn(out), torch.randn(NUM_TOKENS, HIDDEN)
    ref = F.linear(x, w, b)  # [num_tokens, out]
    for gather in (True, False):
        layer = ColumnParallelLinear(HIDDEN, out, bias=True, gather_output=gather, parallel=p)
        _load(layer.weight, w)
        _load(layer.bias, b)
        shard = out // p.world_size
        expected = ref if gather else ref[:, p.rank * shard : (p.rank + 1) * shard]
        assert_close(layer(x), expected)


def check_merged_column_parallel_linear(p: ParallelInfo) -> None:
    gate, up, x = torch.randn(12, HIDDEN), torch.randn(24, HIDDEN), torch.randn(NUM_TOKENS, HIDDEN)
    g, u = 12 // p.world_size, 24 // p.world_size
    expected = torch.cat(  # [num_tokens, g + u]: this rank's gate columns, then its up columns
        [F.linear(x, gate)[:, p.rank * g : (p.rank + 1) * g],
         F.linear(x, up)[:, p.rank * u : (p.rank + 1) * u]], dim=-1)  # fmt: skip
    by_part = MergedColumnParallelLinear(HIDDEN, [12, 24], parallel=p)
    _load(by_part.weight, gate, 0)
    _load(by_part.weight, up, 1)
    assert_close(by_part(x), expected)
    fused = MergedColumnParallelLinear(HIDDEN, [12, 24], parallel=p)
    _load(fused.weight, torch.cat([gate, up]))  # a checkpoint that stores gate_up fused
    assert_close(fused(x), expected)
    with pytest.raises(ValueError, match="two equal parts"):
        fused.forward_silu_and_mul(x)
    # An MLP's gate_up: silu(gate) * up of this rank's features, bias on both parts.
    gate_up = MergedColumnParallelLinear(HIDDEN, [12, 12], bias=True, parallel=p)
    up, b_gate, b_up = up[:12], torch.randn(12), torch.randn(12)
    _load(gate_up.weight, torch.cat([gate, up]))
    _load(gate_up.bias, torch.cat([b_gate, b_up]))
    mine = slice(p.rank * g, (p.rank + 1) * g)
    activated = F.silu(F.linear(x, gate, b_gate)) * F.linear(x, up, b_up)  # [num_tokens, 12]
    assert_close(gate_up.forward_silu_and_mul(x), activated[:, mine])


def _kv_heads_of_rank(p: ParallelInfo, num_heads: int, num_kv_heads: int) -> list[int]:
    """Global kv heads the query heads of this rank attend to (GQA grouping, no TP knowledge)."""
    per_rank = num_heads // p.world_size
    q_heads = range(p.rank * per_rank, (p.rank + 1) * per_rank)
    return sorted({h // (num_heads // num_kv_heads) for h in q_heads})


def check_qkv_parallel_linear(p: ParallelInfo) -> None:
    head, heads = 2, 12
    for kv in (1, 2, 6, 12):
        valid = p.world_size % kv == 0 or kv % p.world_size == 0
        if not valid:  # e.g. 2 kv heads at world size 3
            with pytest.raises(ValueError, match="total_num_kv_heads"):
                QKVParallelLinear(HIDDEN, head, heads, kv, parallel=p)
            continue
        wq = torch.randn(heads * head, HIDDEN)  # [heads * head, hidden]
        wk, wv = torch.randn(kv * head, HIDDEN), torch.randn(kv * head, HIDDEN)
        bq, bk, bv = torch.randn(heads * head), torch.randn(kv * head), torch.randn(kv * head)
        x = torch.randn(NUM_TOKENS, HIDDEN)
        layer = QKVParallelLinear(HIDDEN, head, heads, kv, bias=True, parallel=p)
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            _load(layer.weight, w, sid)
            _load(layer.bias, b, sid)
        kv_heads = _kv_heads_of_rank(p, heads, kv)
        assert (layer.num_heads, layer.num_kv_heads) == (heads // p.world_size, len(kv_heads))
        q_rows = slice(p.rank * layer.num_heads * head, (p.rank + 1) * layer.num_heads * head)
        kv_rows = slice(kv_heads[0] * head, (kv_heads[-1] + 1) * head)
        expected = torch.cat(  # [num_tokens, (num_heads + 2 * num_kv_heads) * head]
            [F.linear(x, wq[q_rows], bq[q_rows]), F.linear(x, wk[kv_rows], bk[kv_rows]),
             F.linear(x, wv[kv_rows], bv[kv_rows])], dim=-1)  # fmt: skip
        assert_close(layer(x), expected)


def check_row_parallel_linear(p: ParallelInfo) -> None:
    inp = 12
    w, b, x = torch.randn(HIDDEN, inp), torch.randn(HIDDEN), torch.randn(NUM_TOKENS, inp)
    ref = F.linear(x, w, b)  # [num_tokens, hidden]
    shard = inp // p.world_size
    x_local = x[:, p.rank * shard : (p.rank + 1) * shard]  # [num_tokens, shard]
    for input_is_parallel, reduce_results in ((True, True), (False, True), (True, False)):
        layer = RowParallelLinear(
            inp, HIDDEN, bias=True, input_is_parallel=input_is_parallel,
            reduce_results=reduce_results, parallel=p,
        )  # fmt: skip
        _load(layer.weight, w)
        _load(layer.bias, b)
        out = layer(x_local if input_is_parallel else x)
        if not reduce_results:  # the caller reduces; the bias must still count once
            out = all_reduce(out, p)
        assert_close(out, ref)


def check_vocab_parallel_embedding(p: ParallelInfo) -> None:
    table = torch.randn(VOCAB, HIDDEN)
    ids = torch.cat([torch.arange(VOCAB), torch.randint(0, VOCAB, (7,))])  # every id, then some
    layer = VocabParallelEmbedding(VOCAB, HIDDEN, parallel=p)
    _load(layer.weight, table)
    assert layer.num_embeddings_padded % (64 * p.world_size) == 0
    assert_close(layer(ids), F.embedding(ids, table))
    assert_close(layer(ids.view(1, -1)), F.embedding(ids, table).view(1, -1, HIDDEN))


def check_lm_head_and_logits(p: ParallelInfo) -> None:
    w, b, hidden = torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB), torch.randn(NUM_TOKENS, HIDDEN)
    head = ParallelLMHead(VOCAB, HIDDEN, bias=True, parallel=p)
    _load(head.weight, w)
    _load(head.bias, b)
    logits = LogitsProcessor(VOCAB, p)(head, hidden.to(torch.bfloat16).float())
    assert logits.dtype == torch.float32 and logits.shape == (NUM_TOKENS, VOCAB)
    assert_close(logits, F.linear(hidden.to(torch.bfloat16).float(), w, b))


def check_tied_lm_head(p: ParallelInfo) -> None:
    table, hidden = torch.randn(VOCAB, HIDDEN), torch.randn(NUM_TOKENS, HIDDEN)
    embedding = VocabParallelEmbedding(VOCAB, HIDDEN, parallel=p)
    _load(embedding.weight, table)
    head = ParallelLMHead(VOCAB, HIDDEN, parallel=p).tie_weights(embedding)
    assert head.weight is embedding.weight
    assert_close(LogitsProcessor(VOCAB, p)(head, hidden), hidden @ table.T)


MOE_SPECS = (  # 12 experts and 24 features split over 1-4 ranks
    MoESpec(RouterSpec(12, 2, renormalize=True), 24, shared_intermediate_size=36, shared_gate=True),
    MoESpec(
        RouterSpec(12, 3, "sigmoid", True, True, num_groups=4, topk_groups=2),
        24,
        ExpertActivation("swiglu_oai", limit=1.0),
        expert_bias=True,
        router_bias=True,
    ),
)


def check_fused_moe(p: ParallelInfo) -> None:
    """Tensor parallel (a slice of every expert) and expert parallel (whole experts) equal one
    rank, loaded expert by expert from the same full tensors."""
    device = torch.empty(0).device
    for spec in MOE_SPECS:
        full = FusedMoE(HIDDEN, spec)
        for param in full.parameters():
            torch.nn.init.normal_(param)
        x = torch.randn(NUM_TOKENS, HIDDEN)
        expected = full(x)
        for expert_parallel in (False, True):
            layer = FusedMoE(HIDDEN, spec, parallel=replace(p, expert_parallel=expert_parallel))
            weights = dict(full.named_parameters())
            for name, param in layer.named_parameters():
                if name.startswith("w13"):
                    param.weight_loader(param, weights[name], ("gate_up", None))
                elif name.startswith("w2"):
                    param.weight_loader(param, weights[name], ("down", None))
                elif name == "shared_expert.gate_up_proj.weight":
                    _load(param, weights[name].to(device))
                else:
                    getattr(param, "weight_loader", default_weight_loader)(param, weights[name])
            assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


CHECKS: dict[str, Callable[[ParallelInfo], None]] = {
    f.__name__.removeprefix("check_"): f
    for f in (
        check_collectives,
        check_replicated_linear,
        check_column_parallel_linear,
        check_merged_column_parallel_linear,
        check_qkv_parallel_linear,
        check_row_parallel_linear,
        check_vocab_parallel_embedding,
        check_lm_head_and_logits,
        check_tied_lm_head,
        check_fused_moe,
    )
}


def _run_rank(rank: int, world_size: int, backend: str, init_file: str, results: mp.Queue) -> None:
    """One rank: join the group, run every check (seeded alike on all ranks), report."""
    outcome: dict[str, str | None] = {}
    try:
        torch.set_num_threads(1)
        parallel = init_distributed(rank, world_size, backend, f"file://{init_file}")
        if backend == "nccl":
            torch.set_default_device(f"cuda:{torch.cuda.current_device()}")
        for name, check in CHECKS.items():
            torch.manual_seed(1234)
            try:
                check(parallel)
                outcome[name] = None
            except Exception:
                outcome[name] = traceback.format_exc()
    except Exception:
        outcome["setup"] = traceback.format_exc()
    finally:
        destroy_distributed()
        results.put((rank, outcome))


def _spawn_group(world_size: int, backend: str, init_file: str) -> dict[str, list[str | None]]:
    """check name -> the failure (traceback) or None of each rank, from one spawned group."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_run_rank, args=(r, world_size, backend, init_file, results), daemon=True
        )
        for r in range(world_size)
    ]
    outcomes: dict[int, dict[str, str | None]] = {}
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only; inherited by the ranks
            for proc in procs:
                proc.start()
        for _ in procs:
            rank, outcome = results.get(timeout=TIMEOUT_S)
            outcomes[rank] = outcome
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(outcomes))
        pytest.fail(f"world size {world_size}: ranks {missing} did not finish in {TIMEOUT_S} s")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    by_check: dict[str, list[str | None]] = {}
    for rank in range(world_size):
        for name, failure in outcomes[rank].items():
            by_check.setdefault(name, []).append(failure)
    return by_check


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda ws: f"world_size={ws}")
def rank_outcomes(request, tmp_path_factory) -> dict[str, list[str | None]]:
    world_size = request.param
    init_file = tmp_path_factory.mktemp(f"gloo{world_size}") / "init"
    return _spawn_group(world_size, "gloo", str(init_file))


def _assert_passed_on_every_rank(outcomes: dict[str, list[str | None]], name: str) -> None:
    assert "setup" not in outcomes, outcomes["setup"][0]
    failures = [f for f in outcomes[name] if f is not None]
    assert not failures, failures[0]


def test_collectives_reduce_gather_and_broadcast(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "collectives")


def test_replicated_linear_equals_full_linear(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "replicated_linear")


def test_column_parallel_linear_equals_full_linear_gathered_or_sharded(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "column_parallel_linear")


def test_merged_column_parallel_linear_shards_each_part_and_activates_gate_up(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "merged_column_parallel_linear")


def test_qkv_parallel_linear_shards_heads_and_replicates_kv_heads(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "qkv_parallel_linear")


def test_row_parallel_linear_sums_partials_and_adds_bias_once(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "row_parallel_linear")


def test_vocab_parallel_embedding_equals_full_embedding_with_padded_vocab(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "vocab_parallel_embedding")


def test_lm_head_logits_are_gathered_float32_with_padding_cut(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "lm_head_and_logits")


def test_tied_lm_head_uses_embedding_weight(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "tied_lm_head")


def test_fused_moe_tensor_and_expert_parallel_equal_one_rank(rank_outcomes):
    _assert_passed_on_every_rank(rank_outcomes, "fused_moe")


@pytest.mark.gpu
def test_every_layer_over_nccl_equals_the_reference(tmp_path):
    num_gpus = torch.cuda.device_count()
    if num_gpus < 2:
        pytest.skip(f"needs 2 GPUs for NCCL tensor parallelism, found {num_gpus}")
    outcomes = _spawn_group(min(num_gpus, 4), "nccl", str(tmp_path / "init"))
    for name in CHECKS:
        _assert_passed_on_every_rank(outcomes, name)
