"""The torch reference of paphos.kernels.dequant_gemm (group-quantized 4/8-bit weights), and the
repacking of each format's blocks into its layout, done once at load:
  W[n, k] = (q[n, k] - zero_offset - zero[n, g]) * scale[n, g] + minimum[n, g],  g = k // group
q: 4-bit [N, K / 8] int32 (value k at bits 4 * (k % 8) of word k // 8) or 8-bit [N, K] int8.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import paphos.kernels as triton_kernels

SHIFTS = tuple(range(0, 32, 4))


@dataclass(frozen=True)
class GroupWeights:
    """One weight in the dequant GEMM's layout (the kernel's arguments)."""

    q: torch.Tensor
    scale: torch.Tensor  # [N, K / group]
    group: int
    bits: int
    zero_offset: int = 0
    zero: torch.Tensor | None = None  # [N, K / group] float
    minimum: torch.Tensor | None = None  # [N, K / group] float

    def tensors(self) -> dict[str, torch.Tensor]:
        fields = {"q": self.q, "scale": self.scale, "zero": self.zero, "minimum": self.minimum}
        return {name: t for name, t in fields.items() if t is not None}

    def to(self, device: torch.device) -> GroupWeights:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GroupWeights(
            self.q.to(device), self.scale.to(device), self.group, self.bits,
            self.zero_offset, move(self.zero), move(self.minimum),
        )  # fmt: skip


def unpack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """[N, K / 8] int32 -> [N, K] int32 values in [0, 15]."""
    shifts = torch.tensor(SHIFTS, dtype=torch.int32, device=q.device)
    return ((q.unsqueeze(2) >> shifts) & 0xF).reshape(q.shape[0], -1)


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """[N, K] values in [0, 15] -> [N, K / 8] int32 (the inverse of unpack_int4_rows)."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)  # [N, K / 8, 8]
    shifts = torch.tensor(SHIFTS, dtype=torch.int64, device=values.device)
    words = (v << shifts).sum(2)  # [N, K / 8] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize(w: GroupWeights) -> torch.Tensor:
    """W [N, K] float32."""
    values = unpack_int4_rows(w.q) if w.bits == 4 else w.q.to(torch.int32)
    values = (values - w.zero_offset).float()  # [N, K]
    expand = lambda t: t.float().repeat_interleave(w.group, dim=1)  # noqa: E731 [N, K]
    if w.zero is not None:
        values = values - expand(w.zero)
    out = values * expand(w.scale)
    return out if w.minimum is None else out + expand(w.minimum)


def dequant_gemm(x: torch.Tensor, w: GroupWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) in float32 -> [M, N] in x's dtype."""
    out = F.linear(x.float(), dequantize(w), None if bias is None else bias.float())
    return out.to(x.dtype)


def from_gguf(blocks: torch.Tensor, type_name: str, in_features: int) -> GroupWeights:
    """GGUF Q4_0 / Q4_1 / Q8_0 rows [N, row_bytes] uint8 -> the dequant GEMM's layout: 32-value
    blocks of a float16 d (Q4_1: then a float16 m) and the values (Q4: element j in the low
    nibble of byte j, element j + 16 in its high nibble)."""
    header = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}.get(type_name)
    if header is None:
        raise ValueError(f"GGUF type {type_name} has no dequant GEMM layout: Q4_0, Q4_1, Q8_0")
    rows = blocks.shape[0]
    data = blocks.cpu().numpy().reshape(rows, in_features // 32, -1)  # [N, blocks, bytes]
    halves = data[:, :, :header].copy().view(np.float16)  # [N, blocks, 1 or 2]
    scale = torch.from_numpy(halves[:, :, 0].copy())  # [N, blocks] float16, as stored
    values = data[:, :, header:]
    if type_name == "Q8_0":
        q = torch.from_numpy(values.copy().view(np.int8).reshape(rows, in_features))
        return GroupWeights(q, scale, 32, 8)
    nibbles = np.concatenate([values & 0xF, values >> 4], axis=2)  # [N, blocks, 32]
    q = pack_int4_rows(torch.from_numpy(nibbles.reshape(rows, in_features).astype(np.int32)))
    if type_name == "Q4_0":
        return GroupWeights(q, scale, 32, 4, zero_offset=8)
    minimum = torch.from_numpy(halves[:, :, 1].copy())
    return GroupWeights(q, scale, 32, 4, minimum=minimum)


def from_columns_packed(
    q_in_out: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, bits: int
) -> GroupWeights:
    """GPTQ/AWQ after unpacking: values [K, N] (unsigned), scales and float zeros [K / group,
    N] -> the dequant GEMM's layout (rows = output features)."""
    values = q_in_out.t().contiguous()  # [N, K]
    q = pack_int4_rows(values) if bits == 4 else (values - 128).to(torch.int8)
    return GroupWeights(
        q, scale.t().contiguous(), group, bits,
        zero_offset=0 if bits == 4 else -128, zero=zero.t().contiguous().float(),
    )  # fmt: skip


# CUDA runs the Triton kernel (kernels/dequant_gemm.py) unless this variable is 0 at start-up:
# then the torch reference (dequantize, then one GEMM per call) serves CUDA too, for comparisons.
ENV_SWITCH = "PAPHOS_TRITON_DEQUANT_GEMM"


@functools.cache
def _switched_on() -> bool:
    """Read once, at the first load that asks."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def cuda_gemm_available(group: int) -> bool:
    """Whether a CUDA weight of this group size runs through the Triton kernel (asked at load).
    Its K tile divides the group and is at least 16 (kernels.dequant_gemm.tile_k)."""
    return _switched_on() and "dequant_gemm" in triton_kernels.CUDA_KERNELS and group % 16 == 0


def linear(
    x: torch.Tensor,
    w: GroupWeights,
    bias: torch.Tensor | None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T: the Triton kernel on CUDA (x's columns permuted first where act-order
    sorted W's), the reference elsewhere."""
    if perm is not None:
        x = x[:, perm]  # [M, K] in W's column order
    if not (x.is_cuda and cuda_gemm_available(w.group)):
        return dequant_gemm(x, w, bias)
    kernel = triton_kernels.CUDA_KERNELS["dequant_gemm"]
    return kernel(x, w.q, w.scale, w.group, w.bits, w.zero_offset, w.zero, w.minimum, bias)
