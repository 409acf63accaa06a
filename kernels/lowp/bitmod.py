"""BitMoD mixture of datatypes (Chen et al., HPCA 2025): per group, pick the FP3/FP4 variant
(a basic low-bit float whose redundant -0 code is repurposed as one extra special value) and
the scale that give the smallest squared error.

The variants follow the authors' released code (abdelfattah-lab/BitMoD-HPCA-25,
``quant_weight.py``), in their search order: FP3 = {0, 1, 2, 4} with extra resolution +3 / -3 or
extra asymmetry +6 / -6; FP4 = E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6} with +5 / -5 or +8 / -8 (their
tables are these times 2). Their per-group scale is ``absmax / max|table|`` (``scale="absmax"``,
the default); ``scale="fit"`` instead takes the smallest scale at which the group's max and min
both fit the variant's positive and negative ranges (never saturates, coarser grid)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .rounding import check_float_input

# Basic magnitudes (codes 0..2**(bits-1)-1) and candidate special values that take the -0 code.
BASE_MAGNITUDES = {3: (0.0, 1.0, 2.0, 4.0), 4: (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)}
# In the authors' search order (ER+, ER-, EA+, EA-): equal errors keep the earlier variant.
SPECIAL_VALUES = {3: (3.0, -3.0, 6.0, -6.0), 4: (5.0, -5.0, 8.0, -8.0)}
SCALE_RULES = ("absmax", "fit")


def bitmod_tables(bits: int, special_values: tuple[float, ...] | None = None) -> np.ndarray:
    """float32 (n_variants, 2**bits) value of each code: sign-magnitude codes, code
    2**(bits-1) (the -0 code) holds the variant's special value."""
    if bits not in BASE_MAGNITUDES:
        raise ValueError(f"bits: expected 3 or 4, got {bits!r}")
    sv = SPECIAL_VALUES[bits] if special_values is None else tuple(special_values)
    mags = np.array(BASE_MAGNITUDES[bits], np.float32)
    half = len(mags)
    tabs = np.zeros((len(sv), 2 * half), np.float32)
    for v, spec in enumerate(sv):
        tabs[v, :half] = mags
        tabs[v, half:] = -mags
        tabs[v, half] = spec
    return tabs


class BitModResult(NamedTuple):
    """values: dequantized (w's shape, float32); codes: uint8 (w's shape); variant: int32 index
    of the chosen datatype per group; scale: float32 per group. Groups run along ``axis``;
    per-group arrays have shape (..., n_groups) with the group axis moved last."""

    values: jax.Array
    codes: jax.Array
    variant: jax.Array
    scale: jax.Array


def bitmod_quantize(
    w: jax.Array,
    bits: int = 4,
    group_size: int = 128,
    *,
    axis: int = -1,
    special_values: tuple[float, ...] | None = None,
    scale: str = "absmax",
) -> BitModResult:
    """Quantize weights ``w`` group-wise with BitMoD's mixture of datatypes.

    For every group of ``group_size`` elements along ``axis`` and every variant: a scale
    (``scale="absmax"``: max|w| / max|table|, as in the authors' code, so the far end of an
    asymmetric variant may saturate; ``"fit"``: max(max(w) / max positive value, -min(w) /
    -min negative value); 1 for an all-zero group), each element takes the nearest code (ties
    to the smaller value), and the variant with the smallest squared error wins (ties to the
    lower index, i.e. the earlier of ``SPECIAL_VALUES``). Computed in float32 (the authors'
    code runs in float16 and clamps the scale to [1e-5, 1e4]).
    """
    check_float_input(w, "w")
    if scale not in SCALE_RULES:
        raise ValueError(f"scale: expected one of {SCALE_RULES}, got {scale!r}")
    rule = scale
    tabs = jnp.asarray(bitmod_tables(bits, special_values))  # (V, C)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    w = jnp.asarray(w).astype(jnp.float32)
    if w.ndim == 0:
        raise ValueError("w: expected at least rank 1, got a scalar")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis: expected an axis of a rank-{w.ndim} array, got {axis}")
    wm = jnp.moveaxis(w, axis, -1)
    n = wm.shape[-1]
    if n % group_size:
        raise ValueError(
            f"w: expected axis {axis} of size a multiple of group_size={group_size}, "
            f"got shape {w.shape}"
        )
    g = wm.reshape(*wm.shape[:-1], n // group_size, group_size)  # (..., G, S)
    pos_max = jnp.max(jnp.where(tabs > 0, tabs, 0), axis=1)  # (V,)
    neg_max = jnp.max(jnp.where(tabs < 0, -tabs, 0), axis=1)
    hi = jnp.max(jnp.maximum(g, 0), axis=-1, keepdims=True)[..., None]  # (..., G, 1, 1)
    lo = jnp.max(jnp.maximum(-g, 0), axis=-1, keepdims=True)[..., None]
    lead = (1,) * (hi.ndim - 2)
    pm = pos_max.reshape(*lead, -1, 1)
    nm = neg_max.reshape(*lead, -1, 1)
    if rule == "absmax":
        scale = jnp.maximum(hi, lo) / jnp.maximum(pm, nm)  # (..., G, V, 1)
    else:
        scale = jnp.maximum(hi / pm, lo / nm)
    scale = jnp.where(scale > 0, scale, np.float32(1.0))
    gv = g[..., None, :] / scale  # (..., G, V, S)
    # nearest code per element: tables sorted per variant so ties go to the smaller value
    order = jnp.argsort(tabs, axis=1, stable=True)
    sorted_t = jnp.take_along_axis(tabs, order, axis=1)  # (V, C)
    st = sorted_t.reshape(*lead, *sorted_t.shape[:1], 1, sorted_t.shape[1])  # (..., V, 1, C)
    dist = jnp.abs(gv[..., None] - st)  # (..., G, V, S, C)
    idx = jnp.argmin(dist, axis=-1)  # (..., G, V, S)
    q = jnp.take_along_axis(
        jnp.broadcast_to(sorted_t[:, None, :], (*idx.shape, sorted_t.shape[-1])),
        idx[..., None],
        axis=-1,
    )[..., 0]
    deq = q * scale
    err = jnp.sum((g[..., None, :] - deq) ** 2, axis=-1)  # (..., G, V)
    best = jnp.argmin(err, axis=-1)  # (..., G)
    sel = best[..., None, None]
    values = jnp.take_along_axis(deq, sel, axis=-2)[..., 0, :]
    code_of_sorted = jnp.broadcast_to(order[:, None, :], (*idx.shape, order.shape[-1]))
    codes = jnp.take_along_axis(code_of_sorted, idx[..., None], axis=-1)[..., 0]
    codes = jnp.take_along_axis(codes, sel, axis=-2)[..., 0, :]
    sc = jnp.take_along_axis(scale[..., 0], best[..., None], axis=-1)[..., 0]
    values = jnp.moveaxis(values.reshape(wm.shape), -1, axis)
    codes = jnp.moveaxis(codes.reshape(wm.shape), -1, axis).astype(jnp.uint8)
    return BitModResult(values, codes, best.astype(jnp.int32), sc)
