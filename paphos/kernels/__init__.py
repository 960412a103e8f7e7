"""Triton kernels, one per file, each tested against its reference in paphos.ops.

CUDA_KERNELS maps an op name (see paphos.ops.registry.REFERENCES) to its Triton implementation, with the
same signature as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CUDA_KERNELS: dict[str, Callable[..., Any]] = {}
