"""Differentiable fake quantization with a straight-through estimator (``jax.custom_jvp``).

The forward value is exactly ``round(x, fmt)`` (or ``block_round``); the backward pass is the
identity (``ste="identity"``) or the identity masked to the representable range
(``ste="clipped"``). Unlike ``x + stop_gradient(q(x) - x)``, the forward is bit-exact
(``q(1e30) = 448`` stays 448, not ``(1e30 + (448 - 1e30)) = 0``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._bits import F32, from_bits, to_bits, word_of
from .block import BlockFormat, block_round_with_limit
from .formats import FloatFormat
from .rounding import (
    _check_word,
    _fits,
    as_grid,
    check_float_input,
    check_mode,
    check_sr_bits,
    random_words,
    round_bits,
)

STES = ("identity", "clipped")


def _forward(x, rand, fmt, mode, ste, sr_bits):
    """(quantized x, gradient mask or None)."""
    dt = x.dtype
    if isinstance(fmt, BlockFormat):
        y, lim = block_round_with_limit(x, fmt, mode, rand, sr_bits)
        mask = None
        if ste == "clipped":
            mask = jnp.abs(x.astype(jnp.float32)) <= lim
        return y.astype(dt), mask
    w = word_of(dt) if np.dtype(dt) in (np.float32, np.float64) else F32
    xin = x.astype(w.fdtype)
    y = from_bits(round_bits(to_bits(xin, w), w, fmt, mode, rand=rand, sr_bits=sr_bits), w)
    mask = None
    if ste == "clipped":
        if isinstance(fmt, FloatFormat):
            lo, hi = -fmt.max, fmt.max
        else:
            lo, hi = fmt.min, fmt.max
        mask = (xin >= w.fdtype.type(lo)) & (xin <= w.fdtype.type(hi))
    return y.astype(dt), mask


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _fq(x, rand, fmt, mode, ste, sr_bits):
    """(quantized x, mask or None): the mask rides along so one rounding serves both."""
    return _forward(x, rand, fmt, mode, ste, sr_bits)


@_fq.defjvp
def _fq_jvp(fmt, mode, ste, sr_bits, primals, tangents):
    """The straight-through tangent: dx (masked to the range for "clipped"). Linear in dx, so
    reverse mode transposes it (the residual is the mask); forward mode and higher orders work
    (the rule calls ``_fq`` again for its value; the mask has no tangent)."""
    x, rand = primals
    dx = tangents[0]
    y, mask = _fq(x, rand, fmt, mode, ste, sr_bits)
    if mask is not None:
        dx = jnp.where(mask, dx, jnp.zeros_like(dx))
        return (y, mask), (dx.astype(y.dtype), np.zeros(mask.shape, jax.dtypes.float0))
    return (y, None), (dx.astype(y.dtype), None)


def fake_quant(
    x: jax.Array,
    fmt: Any,
    mode: str = "nearest_even",
    *,
    ste: str = "identity",
    key: jax.Array | None = None,
    stochastic_bits: int | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` onto ``fmt`` (FloatFormat / FixedFormat / IntFormat / dtype /
    BlockFormat); same shape and dtype as ``x``; gradients by straight-through estimation.

    ste: ``"identity"`` (dL/dx = dL/dy) or ``"clipped"`` (dL/dy where x is inside the format's
      range, [-max, max] or per block [-scale * elem_max, scale * elem_max]; 0 outside).
    """
    dt = check_float_input(x)
    check_mode(mode)
    if ste not in STES:
        raise ValueError(f"ste: expected one of {STES}, got {ste!r}")
    sr_bits = check_sr_bits(stochastic_bits)
    x = jnp.asarray(x)
    if isinstance(fmt, BlockFormat):
        grid: Any = fmt
        if np.dtype(dt) == np.float64:
            raise ValueError("x: block formats take float32 (or bfloat16/float16), got float64")
    else:
        grid = as_grid(fmt)
        if np.dtype(dt) in (np.float32, np.float64):
            _check_word(grid, word_of(dt))
        else:
            _check_word(grid, F32)
            if not _fits(grid, dt):
                raise ValueError(
                    f"fmt: {grid} has values that {np.dtype(dt).name} cannot hold; cast x to "
                    "float32 first"
                )
    rand = random_words(x.shape, key, None) if mode == "stochastic" else None
    return _fq(x, rand, grid, mode, ste, sr_bits)[0]
