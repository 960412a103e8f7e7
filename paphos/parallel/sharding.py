"""Arithmetic of splitting a dimension over ranks, with errors that name the dimension.

Invariant: pure functions of integers; no tensors, no process group.
"""

from __future__ import annotations


def divide(numerator: int, denominator: int, what: str) -> int:
    """`numerator // denominator`, or a ValueError naming `what` if it does not divide evenly."""
    if denominator < 1 or numerator % denominator != 0:
        raise ValueError(
            f"{what}={numerator} is not divisible by the tensor-parallel world size "
            f"{denominator}: use a tensor_parallel_size that divides it"
        )
    return numerator // denominator


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= `value`."""
    if multiple < 1:
        raise ValueError(f"multiple={multiple!r} is invalid: expected >= 1")
    return -(-value // multiple) * multiple
