"""Which x86 vector ISA the C kernels are built for: the highest level this CPU has, lowered (never
raised) by PAPHOS_CPU_ISA, read once at start-up.

Levels, each including the ones before it:
- "avx2": AVX2 + FMA, the floor of every kernel;
- "avx512": AVX-512 F/BW/VL/DQ (16-lane products and reductions);
- "avx512_bf16": + VNNI and BF16 (`vdpbf16ps`: bf16 pairs multiplied into fp32 sums);
- "amx": + AMX tiles (bf16/int8). The C kernels build as for avx512_bf16; the tiles serve batched
  bf16 products through oneDNN (torch's bf16 GEMM), see paphos.ops.dense.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import cache

logger = logging.getLogger(__name__)

ENV_VAR = "PAPHOS_CPU_ISA"
LEVELS = ("avx2", "avx512", "avx512_bf16", "amx")
# /proc/cpuinfo flags each level adds to the ones below it
_FLAGS = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx512_vnni", "avx512_bf16"),
    "amx": ("amx_tile", "amx_bf16", "amx_int8"),
}
# compiler flags each level adds to the ones below it
_CFLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
    "avx512_bf16": ("-mavx512vnni", "-mavx512bf16"),
    "amx": (),
}
DESCRIPTIONS = {
    "avx2": "AVX2+FMA",
    "avx512": "AVX-512 F/BW/VL/DQ",
    "avx512_bf16": "AVX-512 with VNNI and BF16 (vdpbf16ps)",
    "amx": "AVX-512 BF16 kernels, AMX tiles through oneDNN",
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def detect(flags: frozenset[str]) -> str | None:
    """The highest level whose flags (and those of every level below) are all in `flags`; None
    where even AVX2+FMA is missing."""
    found = None
    for level in LEVELS:
        if not set(_FLAGS[level]) <= flags:
            break
        found = level
    return found


def lowered(detected: str | None, requested: str | None) -> str | None:
    """`detected`, or the lower `requested` level; a requested level above what the CPU has is
    ignored (logged), an unknown name is a ValueError naming the levels."""
    if not requested:
        return detected
    requested = requested.strip().lower()
    if requested not in LEVELS:
        raise ValueError(f"{ENV_VAR}={requested!r} is not one of {', '.join(LEVELS)}")
    if detected is None or LEVELS.index(requested) > LEVELS.index(detected):
        logger.warning("%s=%s: this CPU only has %s; using that", ENV_VAR, requested, detected)
        return detected
    return requested


@cache
def selected() -> str | None:
    """The level of this process (read once, at the first kernel build): None off x86-64 or
    below AVX2, where the torch references run."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return lowered(detect(cpu_flags()), os.environ.get(ENV_VAR))


def available() -> tuple[str, ...]:
    """Every kernel build this CPU can run, lowest first, whatever PAPHOS_CPU_ISA says (the
    kernel tests cover each; "amx" builds as "avx512_bf16", so it is not listed twice)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    top = detect(cpu_flags())
    return () if top is None else LEVELS[: LEVELS.index(kernel_level(top)) + 1]


def build_flags(level: str) -> tuple[str, ...]:
    """Compiler flags of a level: its own and those of every level below it."""
    index = LEVELS.index(level)
    return tuple(flag for lower in LEVELS[: index + 1] for flag in _CFLAGS[lower])


def kernel_level(level: str) -> str:
    """The level the C code is built for: "amx" builds as "avx512_bf16" (same library)."""
    return "avx512_bf16" if level == "amx" else level
