"""Shared helpers for the scan kernels: implementation names, chunking, segment resets."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxcore import checks

Array = Any

# Implementation names shared by the scan families ("reference" is the autodiff'd lax.scan oracle).
SCAN_IMPLEMENTATIONS: tuple[str, ...] = (
    "reference",
    "sequential",
    "associative",
    "chunked",
    "pallas",
    "pallas_interpret",
)


def default_chunk(length: int) -> int:
    """A chunk length near sqrt(length), a power of two in [8, 256] (static)."""
    if length <= 8:
        return max(length, 1)
    c = 2 ** round(math.log2(math.sqrt(length)))
    return int(min(256, max(8, c)))


def check_chunk(chunk_size: int | None, length: int, name: str = "chunk_size") -> int:
    """Validate a static chunk size (None = automatic)."""
    if chunk_size is None:
        return default_chunk(length)
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool):
        raise ValueError(f"{name}: expected a positive int or None, got {chunk_size!r}")
    checks.check_positive(chunk_size, name)
    return int(chunk_size)


def split_for_programs(units: int, programs: int, target: int, most: int | None = None):
    """(units per chunk, chunks): split ``units`` (steps, blocks or chunks of a sequence) into
    the fewest chunks that give a grid of ``programs`` per chunk about ``target`` programs in
    all, at most ``most`` chunks (default ``units``), at least one."""
    want = -(-max(0, target) // max(programs, 1))
    want = max(1, min(want, units, units if most is None else most))
    per = -(-units // want)
    return per, -(-units // per)


def pad_time(x: Array, length: int, axis: int = 1, value: float = 0.0) -> Array:
    """Pad ``x`` along ``axis`` at the end up to ``length``."""
    n = x.shape[axis]
    if n == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - n)
    return jnp.pad(x, widths, constant_values=value)


def check_segment_ids(segment_ids: Array | None, batch: int, length: int) -> None:
    """segment_ids: (batch, length) integers (or None)."""
    if segment_ids is None:
        return
    checks.check_shape(segment_ids, (batch, length), "segment_ids")
    checks.check_dtype(segment_ids, "segment_ids", kinds="iu")


def reset_mask(segment_ids: Array, reverse: bool = False) -> Array:
    """(batch, length) bool: True where a new segment starts (the state is reset there).

    Forward: position t resets when segment_ids[t] != segment_ids[t-1] (t >= 1). Reverse: when
    segment_ids[t] != segment_ids[t+1] (t <= L-2). Position 0 (L-1 in reverse) never resets: the
    initial state applies to the first segment.
    """
    s = segment_ids
    if reverse:
        r = s[:, :-1] != s[:, 1:]
        return jnp.concatenate([r, jnp.zeros_like(s[:, :1], dtype=bool)], axis=1)
    r = s[:, 1:] != s[:, :-1]
    return jnp.concatenate([jnp.zeros_like(s[:, :1], dtype=bool), r], axis=1)


def expand_to(mask: Array, ndim: int) -> Array:
    """Append singleton axes to a (batch, length) mask up to ``ndim``."""
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))
