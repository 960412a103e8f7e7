"""Loader and Python entries of threads.c: pin the OpenMP compute threads (torch's pool, which the
C kernels share) to CPUs and learn their kernel thread ids.

Invariant: `bind` returns one thread id per CPU it bound, in team order; without the library
nothing is bound (None), never an error.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from paphos.kernels.cpu import native

SOURCE = Path(__file__).with_name("threads.c")

find_compiler = native.find_compiler  # module attributes, so tests can replace them


def library_path(compiler: str, source: bytes, level: str) -> Path:
    return native.library_path("threads", compiler, source, level)


def bind_functions(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, c_int = ctypes.c_void_p, ctypes.c_int
    lib.paphos_bind_threads.argtypes = [ptr, c_int, ptr]
    lib.paphos_bind_threads.restype = c_int
    lib.paphos_unbind_threads.argtypes = [ptr, c_int, c_int]
    lib.paphos_unbind_threads.restype = c_int
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    compiler = find_compiler()
    return native.load_library("threads", SOURCE, compiler, library_path, bind_functions, level)


def bind(cpus: Sequence[int]) -> list[int] | None:
    """Thread t of a team of len(cpus) runs on cpus[t] from now on; their thread ids (None where
    the library is missing or a binding failed)."""
    lib = load_library()
    if lib is None or not cpus:
        return None
    cpu_array = (ctypes.c_int * len(cpus))(*cpus)
    tids = (ctypes.c_int64 * len(cpus))()
    if lib.paphos_bind_threads(cpu_array, len(cpus), tids) != 0:
        return None
    return list(tids)


def unbind(allowed: Sequence[int], num_threads: int) -> bool:
    """Every thread of a team of num_threads may run on any of `allowed` again."""
    lib = load_library()
    if lib is None or not allowed:
        return False
    cpu_array = (ctypes.c_int * len(allowed))(*allowed)
    return lib.paphos_unbind_threads(cpu_array, len(allowed), num_threads) == 0
