"""Argument checks that run at trace time and fail with a message naming the argument.

Every message has the form ``"<name>: expected <what>, got <what came>"``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(x: Any, rank: int | Sequence[int], name: str) -> None:
    """Raise ValueError unless ``x.ndim`` is ``rank`` (or one of several ranks)."""
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    shape = _shape(x)
    if len(shape) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name}: expected rank {want}, got shape {shape} (rank {len(shape)})")


def check_shape(x: Any, expected: Sequence[int | None], name: str) -> None:
    """Raise ValueError unless ``x.shape`` matches ``expected`` (``None`` matches any size)."""
    shape = _shape(x)
    exp = tuple(expected)
    ok = len(shape) == len(exp) and all(e is None or e == s for e, s in zip(exp, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in exp) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {shape}")


def check_same(value: Any, expected: Any, name: str, what: str = "size") -> None:
    """Raise ValueError unless ``value == expected``."""
    if value != expected:
        raise ValueError(f"{name}: expected {what} {expected}, got {value}")


def check_dtype(x: Any, name: str, *, kinds: str = "f", dtypes: Sequence[Any] = ()) -> None:
    """Raise TypeError unless x's dtype is one of ``dtypes`` or of a numpy kind in ``kinds``.

    Kinds: "f" floating (incl. bfloat16 / float8), "c" complex, "i" signed, "u" unsigned, "b" bool.
    """
    dt = jnp.result_type(x)
    if dtypes and any(dt == jnp.dtype(d) for d in dtypes):
        return
    kind = "f" if jnp.issubdtype(dt, jnp.floating) else np.dtype(dt).kind
    if kind in kinds:
        return
    names = {
        "f": "floating",
        "c": "complex",
        "i": "signed integer",
        "u": "unsigned integer",
        "b": "bool",
    }
    want = [names[k] for k in kinds] + [str(jnp.dtype(d)) for d in dtypes]
    raise TypeError(f"{name}: expected dtype {' or '.join(want)}, got {dt}")


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless a static number is > 0 (or >= 0)."""
    if value is None:
        raise ValueError(f"{name}: expected a positive number, got None")
    bad = value < 0 if allow_zero else value <= 0
    if bad:
        want = "a non-negative number" if allow_zero else "a positive number"
        raise ValueError(f"{name}: expected {want}, got {value}")


def is_tile_size(value: Any, lo: int = 16) -> bool:
    """True for a static integer that is a power of two >= ``lo`` (a Triton tile dimension)."""
    try:
        v = operator.index(value)
    except TypeError:
        return False
    return v >= lo and not v & (v - 1)


def check_choice(value: Any, choices: Sequence[Any], name: str) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
