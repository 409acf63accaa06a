"""Slow, obvious references: exact rational arithmetic with :class:`fractions.Fraction` on the host.

These are the oracles the fast kernels are tested against. They run element by element in
Python (use them on samples) and are not traceable.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from .formats import FixedFormat, FloatFormat

_TWO = Fraction(2)


def _floor_log2(v: Fraction) -> int:
    e = v.numerator.bit_length() - v.denominator.bit_length()
    if _TWO**e > v:
        e -= 1
    return e


def _neighbours(v: Fraction, fmt: FloatFormat | FixedFormat) -> tuple[Fraction, Fraction, int]:
    """For v > 0: (lower grid value, quantum, parity of lower's significand integer)."""
    if isinstance(fmt, FloatFormat):
        e = _floor_log2(v)
        if e >= fmt.emin:
            qe = e - fmt.mantissa_bits
        elif fmt.subnormals:
            qe = fmt.emin - fmt.mantissa_bits
        else:
            qe = fmt.emin
    else:
        qe = -fmt.fraction_bits
    q = _TWO**qe
    k = math.floor(v / q)
    return k * q, q, k & 1


def round_fraction(
    v: Fraction, neg: bool, fmt: FloatFormat | FixedFormat, mode: str, rand: int = 0, sr_bits=32
) -> Fraction | str:
    """Round the exact magnitude ``v`` (sign ``neg``) onto ``fmt`` with unbounded exponent range,
    then apply overflow. Returns a signed Fraction or "nan"/"inf"/"-inf"/"-0"."""
    if v == 0:
        lo, q, lsb, frac = Fraction(0), Fraction(1), 0, Fraction(0)
        res = Fraction(0)
    else:
        lo, q, lsb = _neighbours(v, fmt)
        frac = (v - lo) / q
        if frac == 0:
            inc = False
        elif mode == "nearest_even":
            inc = frac > Fraction(1, 2) or (frac == Fraction(1, 2) and lsb == 1)
        elif mode == "nearest_away":
            inc = frac >= Fraction(1, 2)
        elif mode == "nearest_zero":
            inc = frac > Fraction(1, 2)
        elif mode == "toward_zero":
            inc = False
        elif mode == "up":
            inc = not neg
        elif mode == "down":
            inc = neg
        elif mode == "odd":
            inc = lsb == 0
        elif mode == "stochastic":
            f32 = math.floor(frac * 2**32)
            drop = 32 - sr_bits
            inc = (rand >> drop) < (f32 >> drop)
        else:
            raise ValueError(f"mode: unknown {mode!r}")
        res = lo + q if inc else lo
    to_max = (
        mode in ("toward_zero", "odd") or (mode == "up" and neg) or (mode == "down" and not neg)
    )
    if isinstance(fmt, FloatFormat):
        if not fmt.signed and neg and v != 0:  # before overflow: a huge negative is NaN too
            return "nan"
        mx = fmt.max_exact
        if res > mx:
            if to_max or fmt.overflow == "saturate":
                res = mx
            elif fmt.overflow == "inf":
                return "-inf" if neg else "inf"
            else:
                return "nan"
        if not fmt.zero:
            if v == 0:
                return "nan"
            if res == 0:
                res = _TWO**fmt.emin
        if not fmt.signed and neg:
            return "nan" if v != 0 else Fraction(0)
        if res == 0:
            if neg and fmt.has_negative_zero:
                return "-0"
            return Fraction(0)
        return -res if neg else res
    # fixed point: saturate
    if neg:
        res = min(res, -fmt.min_exact)
        return -res if res != 0 else Fraction(0)
    return min(res, fmt.max_exact)


def _to_float(r: Fraction | str, dtype: Any) -> Any:
    dt = np.dtype(dtype)
    if isinstance(r, str):
        return dt.type({"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "-0": -0.0}[r])
    # Exact when representable; the fast kernel documents the same word limits.
    return dt.type(float(r)) if dt != np.float32 else np.float32(_f32_floor(r))


def _f32_floor(r: Fraction) -> float:
    """float32 value of r, rounding the magnitude down (saturating grid limits beyond float32)."""
    if r == 0:
        return 0.0
    neg = r < 0
    v = -r if neg else r
    f = np.float32(float(v))  # RNE through float64; fix up to floor
    if Fraction(float(f)) > v:
        f = np.nextafter(f, np.float32(0))
    out = float(f)
    if math.isinf(out) or out > float(np.finfo(np.float32).max):
        out = (
            float(np.finfo(np.float32).max)
            if v <= Fraction(float(np.finfo(np.float32).max))
            else math.inf
        )
    return -out if neg else out


def round_reference(
    x: Any,
    fmt: FloatFormat | FixedFormat,
    mode: str = "nearest_even",
    *,
    key: Any = None,
    random_bits: Any = None,
    stochastic_bits: int | None = None,
) -> np.ndarray:
    """Exact rounding of each element of ``x`` (numpy in, numpy out, x's dtype)."""
    xn = np.asarray(x)
    rand = None
    if mode == "stochastic":
        from .rounding import random_words

        rand = np.asarray(random_words(xn.shape, key, random_bits)).ravel()
    sr_bits = 32 if stochastic_bits is None else stochastic_bits
    flat = xn.ravel()
    out = np.empty(flat.shape, flat.dtype)
    for i, xi in enumerate(flat):
        fx = float(xi)
        if math.isnan(fx):
            out[i] = np.nan
            continue
        neg = math.copysign(1.0, fx) < 0
        if math.isinf(fx):
            if isinstance(fmt, FloatFormat):
                if not fmt.signed and neg:
                    out[i] = np.nan
                elif fmt.has_inf:
                    out[i] = fx
                elif fmt.overflow == "saturate":
                    out[i] = -fmt.max if neg else fmt.max
                else:
                    out[i] = np.nan
            else:
                lim = fmt.min_exact if neg else fmt.max_exact
                out[i] = _to_float(lim, flat.dtype) if lim != 0 else 0.0
            continue
        r = round_fraction(
            Fraction(abs(fx)), neg, fmt, mode, 0 if rand is None else int(rand[i]), sr_bits
        )
        out[i] = _to_float(r, flat.dtype)
    return out.reshape(xn.shape)
