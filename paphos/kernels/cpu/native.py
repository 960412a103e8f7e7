"""Building and loading the C kernels of this package: compile at first use with the system
compiler into ~/.cache/paphos/kernels, one library per ISA level (paphos.kernels.cpu.isa), load
with ctypes.

Invariant: a library file under the cache is complete (built beside it, then renamed), and its name
is keyed by the source and every file it includes, the flags (so the level) and the compiler's
version, so a stale build is never loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from paphos.kernels.cpu import isa

logger = logging.getLogger(__name__)

CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")  # plus the level's ISA flags
_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def find_compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def flags_for(level: str) -> tuple[str, ...]:
    return (*CFLAGS, *isa.build_flags(level))


def library_path(name: str, compiler: str, source: bytes, level: str) -> Path:
    """Cache path of kernel `name` at an ISA level, keyed by the source, the flags and the
    compiler's banner."""
    banner = subprocess.run([compiler, "--version"], capture_output=True, check=True).stdout
    flags = " ".join(flags_for(level)).encode()
    digest = hashlib.sha256(source + banner + flags).hexdigest()[:16]
    return Path.home() / ".cache" / "paphos" / "kernels" / f"{name}-{level}-{digest}.so"


def source_with_includes(source: Path) -> bytes:
    """The bytes of `source` followed by those of every file it includes with `#include "..."`
    (recursively, each once, in order of first inclusion): what a build of `source` reads."""
    seen: list[Path] = []

    def visit(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.append(path)
        for name in _LOCAL_INCLUDE.findall(path.read_bytes()):
            visit(path.parent / name.decode())

    visit(source)
    return b"".join(path.read_bytes() for path in seen)


def build(compiler: str, source: Path, target: Path, level: str) -> None:
    """Compile into a temporary file beside `target`, then rename: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags_for(level), "-o", tmp, str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:2000]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(
    name: str,
    source: Path,
    compiler: str | None,
    target_for: Callable[[str, bytes, str], Path],
    bind: Callable[[ctypes.CDLL], ctypes.CDLL],
    level: str | None = None,
) -> ctypes.CDLL | None:
    """Kernel `name` built from `source` for ISA `level` (default: the process's,
    `isa.selected()`) at `target_for(compiler, source_with_includes(source), level)` and bound,
    or None with one logged warning where it cannot run here. The library must export
    `int paphos_cpu_supported(void)` (nonzero when the CPU has every feature of its level)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.warning("CPU %s kernel off: %s is not x86-64; using torch", name, platform.machine())
        return None
    level = isa.selected() if level is None else level
    if level is None:
        logger.warning("CPU %s kernel off: this CPU lacks AVX2/FMA; using torch", name)
        return None
    if compiler is None:
        logger.warning("CPU %s kernel off: no C compiler (cc/gcc) found; using torch", name)
        return None
    level = isa.kernel_level(level)
    lib = None
    for attempt in reversed(isa.LEVELS[: isa.LEVELS.index(level) + 1]):
        # a compiler too old for a level's flags (or a failed build) falls back to the one below
        lib = _build_and_load(name, source, compiler, target_for, bind, attempt)
        if lib is not None:
            break
    if lib is None:
        return None
    if not lib.paphos_cpu_supported():
        logger.warning(
            "CPU %s kernel off: this CPU lacks %s; using torch", name, lib.paphos_isa_level
        )
        return None
    return lib


def _build_and_load(
    name: str,
    source: Path,
    compiler: str,
    target_for: Callable[[str, bytes, str], Path],
    bind: Callable[[ctypes.CDLL], ctypes.CDLL],
    level: str,
) -> ctypes.CDLL | None:
    try:
        target = target_for(compiler, source_with_includes(source), level)
        if not target.exists():
            build(compiler, source, target, level)
        lib = ctypes.CDLL(str(target))
        lib.paphos_cpu_supported.argtypes = []
        lib.paphos_cpu_supported.restype = ctypes.c_int
        lib = bind(lib)
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        below = "" if level == isa.LEVELS[0] else "; trying the level below"
        logger.warning("CPU %s kernel at %s: build or load failed (%s)%s", name, level, exc, below)
        return None
    lib.paphos_isa_level = level  # type: ignore[attr-defined]
    return lib
