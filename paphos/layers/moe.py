"""`FusedMoE`: a mixture-of-experts MLP block (router, stacked experts, optional shared expert).

API (for model authors):
- `FusedMoE(hidden_size, MoESpec(router=RouterSpec(...), intermediate_size=...), linear_method,
  parallel)`: `forward(x [num_tokens, hidden]) -> [num_tokens, hidden]`, all-reduced over the
  tensor-parallel ranks (`reduce_results=False` leaves the partial sums to the caller).
- Routing (`RouterSpec`, paphos.ops.moe): softmax top-k with or without renormalisation, softmax
  over the top-k logits, sigmoid scores with `e_score_correction_bias`, grouped top-k
  (`num_groups`/`topk_groups`), `routed_scaling_factor`. The router (`gate`, a ReplicatedLinear,
  never quantized; float32 with `router_fp32`) may have a bias (gpt-oss).
- Experts: `w13_weight` [local experts, 2 * inter, hidden] ([gate | up] rows) and `w2_weight`
  [local experts, hidden, inter], created by the `MoEMethod` that goes with the model's linear
  method (quant.moe_method_for); optional biases `w13_bias`, `w2_bias`; activation silu/gelu or
  gpt-oss's clamped SwiGLU ("swiglu_oai").
- Shared expert (`shared_intermediate_size`): a gated SiLU MLP `shared_expert` over every token,
  scaled by sigmoid(`shared_expert_gate`(x)) when `shared_gate` (Qwen2-MoE), added to the routed
  sum.
- Loading: every expert parameter's `weight_loader(param, tensor, (part, expert_id))` takes one
  expert's checkpoint tensor, part "gate", "up", "gate_up" ([gate | up] fused) or "down"; an
  expert_id of None takes a tensor stacked over all experts (dim 0). `map_expert_name` maps the
  usual per-expert names (experts.{e}.gate_proj / up_proj / down_proj, w1 / w3 / w2).
- Parallelism: tensor parallel gives each rank a slice of every expert's intermediate dimension;
  `parallel.expert_parallel` gives each rank whole experts (num_experts / world_size of them,
  contiguous). Both all-reduce once after the down products (and the shared expert).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from paphos.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from paphos.layers.moe_experts import PerExpertMoEMethod, moe_method_for
from paphos.layers.weight_utils import copy_checked, narrow_checked
from paphos.ops.moe import ExpertActivation, RouterSpec, select_experts
from paphos.ops.registry import pick
from paphos.parallel import SINGLE_PROCESS, ParallelInfo, all_reduce, divide
from paphos.quant import LinearMethod, set_weight_attrs

EXPERT_PARTS = ("gate", "up", "gate_up", "down")
# checkpoint projection name of an expert -> its part
_CHECKPOINT_PARTS = {
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up",
    "w2": "down",
}  # fmt: skip
# the last part: weight/bias, or a quantized format's tensor (qweight, weight_packed, blocks, ...)
_EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(\w+)$")


@dataclass(frozen=True)
class MoESpec:
    """One MoE block: its router, experts' sizes and activation, shared expert."""

    router: RouterSpec
    intermediate_size: int  # of each routed expert
    activation: ExpertActivation = field(default_factory=ExpertActivation)
    expert_bias: bool = False  # w13_bias / w2_bias (gpt-oss)
    router_bias: bool = False
    router_fp32: bool = False  # router weight and logits in float32 (DeepSeek, GLM-4 MoE)
    shared_intermediate_size: int | None = None
    shared_gate: bool = False  # sigmoid(shared_expert_gate(x)) scales the shared expert
    # the routing weight scales the expert's input, not its output (Llama 4; top-1 only)
    apply_router_weight_on_input: bool = False

    def __post_init__(self) -> None:
        if self.apply_router_weight_on_input and self.router.top_k != 1:
            raise ValueError(
                f"apply_router_weight_on_input needs top_k=1; got top_k={self.router.top_k}"
            )


def map_expert_name(name: str) -> tuple[str, tuple[str, int]] | None:
    """`...mlp.experts.3.gate_proj.weight` -> ("...mlp.w13_weight", ("gate", 3)); None for a
    name of no routed expert. A quantized tensor maps alike (`...experts.3.down_proj.qweight` ->
    "...mlp.w2_qweight"); `expert_loads` then finds its parameter in the layer."""
    match = _EXPERT_NAME.search(name)
    if match is None:
        return None
    part = _CHECKPOINT_PARTS[match[2]]
    param = ("w2_" if part == "down" else "w13_") + match[3]
    return f"{name[: match.start()]}.{param}", (part, int(match[1]))


class SharedExpert(nn.Module):
    """A gated SiLU MLP whose down product is left unreduced (the block reduces once)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
    ) -> None:
        super().__init__()
        inter = intermediate_size
        common = dict(linear_method=linear_method, parallel=parallel)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [inter, inter], **common)
        self.down_proj = RowParallelLinear(inter, hidden_size, reduce_results=False, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x))


class FusedMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        spec: MoESpec,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        router, ws = spec.router, parallel.world_size
        self.spec, self.parallel, self.reduce_results = spec, parallel, reduce_results
        self.hidden_size = hidden_size
        self.num_experts = router.num_experts
        params_dtype = params_dtype or torch.get_default_dtype()
        if parallel.expert_parallel:  # whole experts per rank
            self.num_local_experts = divide(router.num_experts, ws, "num_experts")
            self.first_expert = parallel.rank * self.num_local_experts
            self.intermediate_per_rank, self.tp_rank, self.tp_size = spec.intermediate_size, 0, 1
        else:  # a slice of every expert per rank
            self.num_local_experts, self.first_expert = router.num_experts, 0
            self.intermediate_per_rank = divide(spec.intermediate_size, ws, "moe intermediate_size")
            self.tp_rank, self.tp_size = parallel.rank, ws
        gate_dtype = torch.float32 if spec.router_fp32 else params_dtype
        self.gate = ReplicatedLinear(
            hidden_size, router.num_experts, bias=spec.router_bias, params_dtype=gate_dtype
        )
        self.e_score_correction_bias = None
        if router.correction_bias:
            bias = torch.zeros(router.num_experts, dtype=torch.float32)  # [num_experts]
            self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)
        self.moe_method = moe_method_for(linear_method, torch.empty(0).device.type)
        self.moe_method.create_weights(
            self, self.num_local_experts, hidden_size, self.intermediate_per_rank, params_dtype
        )
        self._create_biases(spec.expert_bias, params_dtype)
        for name in ("w13_weight", "w2_weight", "w13_bias", "w2_bias"):
            param = getattr(self, name, None)  # (quantized experts: no stacked weights)
            if param is not None and not hasattr(param, "weight_loader"):
                set_weight_attrs(param, {"weight_loader": self.weight_loader})
        # the down bias once in the sum over ranks: by the rank holding the expert
        self.adds_down_bias = parallel.expert_parallel or parallel.rank == 0
        self.activation = spec.activation
        self.fused_experts_op = pick("fused_experts", torch.empty(0).device.type)
        self.shared_expert = None
        if spec.shared_intermediate_size is not None:
            self.shared_expert = SharedExpert(
                hidden_size, spec.shared_intermediate_size, linear_method, parallel
            )
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1) if spec.shared_gate else None

    def _create_biases(self, expert_bias: bool, dtype: torch.dtype) -> None:
        if not expert_bias:
            self.register_parameter("w13_bias", None)
            self.register_parameter("w2_bias", None)
            return
        num, inter = self.num_local_experts, self.intermediate_per_rank
        w13 = torch.zeros(num, 2 * inter, dtype=dtype)  # [local experts, 2 * inter]
        w2 = torch.zeros(num, self.hidden_size, dtype=dtype)  # [local experts, hidden]
        self.w13_bias = nn.Parameter(w13, requires_grad=False)
        self.w2_bias = nn.Parameter(w2, requires_grad=False)

    # ---- loading --------------------------------------------------------------------------------

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        """Load one expert's tensor (shard_id = (part, expert_id)); expert_id None: all experts,
        stacked along dim 0. Experts another rank holds (expert parallel) are skipped."""
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[0] in EXPERT_PARTS):
            raise ValueError(
                f"shard_id={shard_id!r} is invalid for FusedMoE: expected (part, expert_id) with "
                f"part in {EXPERT_PARTS}"
            )
        part, expert = shard_id
        if expert is None:
            if loaded_weight.shape[0] != self.num_experts:
                raise ValueError(
                    f"a tensor stacked over experts of shape {tuple(loaded_weight.shape)} should "
                    f"have {self.num_experts} experts along dim 0"
                )
            for index in range(self.num_experts):
                self.weight_loader(param, loaded_weight[index], (part, index))
            return
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert_id={expert} is invalid: expected [0, {self.num_experts})")
        local = expert - self.first_expert
        if not 0 <= local < self.num_local_experts:
            return  # held by another rank
        is_w13 = param is getattr(self, "w13_weight", None) or param is self.w13_bias
        if is_w13 == (part == "down"):
            raise ValueError(f"part {part!r} does not load into this parameter")
        if part == "gate_up":
            gate, up = loaded_weight.chunk(2, dim=0)
            self._load_w13(param.data[local], gate, 0, f"expert {expert} gate")
            self._load_w13(param.data[local], up, 1, f"expert {expert} up")
        elif part in ("gate", "up"):
            index = 0 if part == "gate" else 1
            self._load_w13(param.data[local], loaded_weight, index, f"expert {expert} {part}")
        elif param is getattr(self, "w2_weight", None):  # [hidden, inter]: this rank's inputs
            size = self.intermediate_per_rank
            full = size * self.tp_size
            what = f"expert {expert} down"
            src = narrow_checked(loaded_weight, 1, self.tp_rank * size, size, full, what)
            copy_checked(param.data[local], src, what)
        else:  # the down bias: whole
            copy_checked(param.data[local], loaded_weight, f"expert {expert} down bias")

    def expert_load_target(self, param_name: str, shard_id: tuple) -> tuple[str, object] | None:
        """(parameter name under this layer, shard id) that a routed expert's checkpoint tensor,
        mapped by `map_expert_name` to `param_name` ("w13_weight", "w2_qweight", ...), loads into;
        None for an expert another rank holds."""
        if param_name in self._parameters:  # stacked dense weights, expert biases
            return param_name, shard_id
        part, expert = shard_id
        if not isinstance(self.moe_method, PerExpertMoEMethod):
            raise ValueError(
                f"{param_name} of expert {expert}: a quantized expert tensor, but this model's "
                "experts are dense (the checkpoint's quantization_config does not cover them)"
            )
        if expert is None:
            raise ValueError(f"{param_name}: quantized experts load one expert at a time")
        if not 0 <= expert - self.first_expert < self.num_local_experts:
            return None  # held by another rank
        return self.moe_method.expert_param(part, expert, param_name.split("_", 1)[1])

    def _load_w13(self, dst: torch.Tensor, src: torch.Tensor, index: int, what: str) -> None:
        """Rows of this rank's slice of the gate (index 0) or up (1) part into dst's half."""
        size = self.intermediate_per_rank
        part = narrow_checked(src, 0, self.tp_rank * size, size, size * self.tp_size, what)
        copy_checked(dst.narrow(0, index * size, size), part, what)

    def process_weights_after_loading(self) -> None:
        self.moe_method.process_weights_after_loading(self)

    # ---- forward --------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32, expert ids) [num_tokens, top_k]; ids local to this rank, -1 where
        another rank holds the expert."""
        logits = self.gate(x.to(self.gate.params_dtype))  # [num_tokens, num_experts]
        weights, ids = select_experts(logits, self.spec.router, self.e_score_correction_bias)
        if self.parallel.expert_parallel:
            ids = ids - self.first_expert
            ids = ids.masked_fill((ids < 0) | (ids >= self.num_local_experts), -1)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        routed_in = x
        if self.spec.apply_router_weight_on_input:  # one expert per token, its input scaled
            routed_in, weights = x * weights.to(x.dtype), torch.ones_like(weights)
        out = self.moe_method.apply(self, routed_in, weights, ids)  # [num_tokens, hidden] (partial)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [num_tokens, hidden] (partial)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return all_reduce(out, self.parallel) if self.reduce_results else out

    # ---- sizes ----------------------------------------------------------------------------------

    def expert_bytes(self) -> int:
        """Bytes of this rank's routed experts (weights and biases; quantized experts: their
        parameters and the buffers their method keeps, GGUF blocks among them)."""
        tensors = [getattr(self, n, None) for n in ("w13_weight", "w2_weight")]
        tensors += [self.w13_bias, self.w2_bias]
        if "experts" in self._modules:
            tensors += [*self.experts.parameters(), *self.experts.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def active_expert_bytes(self) -> float:
        """Bytes of routed experts one token reads on this rank: top_k of num_experts (under
        expert parallelism the mean over ranks, routing spread evenly)."""
        return (
            self.expert_bytes()
            * self.spec.router.top_k
            / self.num_local_experts
            / (self.parallel.world_size if self.parallel.expert_parallel else 1)
        )

    def extra_repr(self) -> str:
        r = self.spec.router
        return (
            f"experts={self.num_local_experts}/{self.num_experts} from {self.first_expert}, "
            f"top_k={r.top_k}, scoring={r.scoring}, inter={self.intermediate_per_rank}"
        )


def experts_as_rows(
    weights: Iterable[tuple[str, torch.Tensor]], interleaved: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' stacked expert tensors stored [E, in, out] (gpt-oss, Llama 4) as FusedMoE's
    rows: `experts.gate_up_proj` [E, hidden, 2I] -> [E, 2I, hidden] ([gate | up]; `interleaved`:
    stored gate, up, gate, ...), its bias likewise, `experts.down_proj` [E, I, hidden] ->
    [E, hidden, I]. Other tensors pass unchanged. Names: decoder.STACKED_EXPERTS maps them."""
    for name, tensor in weights:
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.gate_up_proj_bias"):
            if interleaved:
                tensor = torch.cat([tensor[..., ::2], tensor[..., 1::2]], dim=-1)
            if tensor.dim() == 3:
                tensor = tensor.transpose(1, 2)  # [E, 2I, hidden]
        elif name.endswith(".experts.down_proj"):
            tensor = tensor.transpose(1, 2)  # [E, hidden, I]
        yield name, tensor


def moe_parameter_bytes(model: nn.Module) -> tuple[int, int] | None:
    """(parameter bytes, bytes one token reads) of this rank's share of `model`, None where it
    has no MoE layer. Active = all parameters but the experts a token does not choose."""
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if not layers:
        return None
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # the buffers quantized experts keep their weights in (GGUF blocks)
    total += sum(
        b.numel() * b.element_size()
        for layer in layers
        if "experts" in layer._modules
        for b in layer.experts.buffers()
    )
    inactive = sum(layer.expert_bytes() - layer.active_expert_bytes() for layer in layers)
    return total, int(total - inactive)


def is_expert_shard(shard_id: object) -> bool:
    """Whether a shard id is a routed expert's (part, expert_id)."""
    return isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[0] in EXPERT_PARTS


def expert_loads(
    model: nn.Module, target: str, tensor: torch.Tensor, shard_id: object
) -> list[tuple[str, torch.Tensor, object]]:
    """The load of a routed expert's tensor that `map_expert_name` mapped to `target` (a name
    under a FusedMoE layer of `model`): into the stacked dense weights, or into the expert's own
    quantized layers; none where another rank holds the expert."""
    prefix, param_name = target.rsplit(".", 1)
    layer = model.get_submodule(prefix)
    if not isinstance(layer, FusedMoE):
        raise ValueError(f"checkpoint expert tensor {target!r}: {prefix!r} is no MoE layer")
    resolved = layer.expert_load_target(param_name, shard_id)  # type: ignore[arg-type]
    if resolved is None:
        return []
    return [(f"{prefix}.{resolved[0]}", tensor, resolved[1])]


def experts_format(model: nn.Module) -> str:
    """How the model's routed experts are stored: "dense", or the quantized format's name."""
    for layer in model.modules():
        if isinstance(layer, FusedMoE) and isinstance(layer.moe_method, PerExpertMoEMethod):
            kept = "experts" in layer._modules
            name = layer.moe_method.format_name
            return f"{name} (kept quantized)" if kept else f"{name} (dequantized at load)"
    return "dense"
