"""Exact rounding onto any :mod:`formats` value set, on the raw bits with integer ops.

Float tricks such as ``(x + C) - C`` are not exact under XLA on CPU (it flushes denormals and
folds such expressions), so the whole computation here works on the unsigned integer word of
``x``: find the quantum exponent of the target grid around ``x``, split the significand into kept
part and remainder, decide the increment from the mode, rebuild the word, then apply the format's
overflow / special-value rules.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcore import backend

from ._bits import F32, F64, Word, from_bits, hash_bits, seeds_from_key, to_bits, word_of
from .formats import FixedFormat, FloatFormat, IntFormat, format_of

MODES = (
    "nearest_even",
    "nearest_away",
    "nearest_zero",
    "toward_zero",
    "up",
    "down",
    "odd",
    "stochastic",
)

FAMILY = "lowp.round"
backend.register_family(
    FAMILY,
    ("reference", "xla"),
    "xla",
    doc="round onto a FloatFormat/FixedFormat/IntFormat grid: exact Fraction reference (numpy, "
    "host) or the integer bit kernel",
)


def as_grid(fmt: Any, name: str = "fmt") -> FloatFormat | FixedFormat:
    """Normalise a format argument (IntFormat -> FixedFormat; a dtype -> its FloatFormat)."""
    if isinstance(fmt, FloatFormat | FixedFormat):
        return fmt
    if isinstance(fmt, IntFormat):
        return fmt.fixed
    try:
        return format_of(fmt)
    except ValueError:
        pass
    raise ValueError(
        f"{name}: expected a FloatFormat, FixedFormat, IntFormat or ml_dtypes dtype, got {fmt!r}"
    )


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def check_float_input(x: Any, name: str = "x") -> Any:
    dt = jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{name}: expected a floating dtype (float32, float64, bfloat16, float16), got {dt}"
        )
    if np.dtype(dt) not in (np.float32, np.float64, np.float16, np.dtype(jnp.bfloat16)):
        raise TypeError(f"{name}: expected float32, float64, bfloat16 or float16, got {dt}")
    return dt


def _fits(fmt: FloatFormat | FixedFormat, dt: Any) -> bool:
    """Whether every value of ``fmt`` (and inf/NaN) is exactly representable in dtype ``dt``."""
    d = format_of(dt)
    if isinstance(fmt, FloatFormat):
        lo = fmt.emin - (fmt.mantissa_bits if fmt.subnormals else 0)
        return (
            fmt.mantissa_bits <= d.mantissa_bits
            and fmt.max_exact <= d.max_exact
            and lo >= d.emin - d.mantissa_bits
        )
    width = fmt.integer_bits + fmt.fraction_bits
    return (
        width <= d.mantissa_bits + 1
        and fmt.max_exact <= d.max_exact
        and -fmt.fraction_bits >= d.emin - d.mantissa_bits
    )


def _check_word(fmt: FloatFormat | FixedFormat, w: Word) -> None:
    if isinstance(fmt, FloatFormat) and fmt.mantissa_bits > w.mant:
        raise ValueError(
            f"mantissa_bits: expected <= {w.mant} for a {w.fdtype} input, got "
            f"{fmt.mantissa_bits} (use float64 input with jax_enable_x64 for wider formats)"
        )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static numbers for rounding format ``fmt`` on word ``w``."""

    is_float: bool
    emin: int  # float: smallest normal exponent
    mant: int  # float: mantissa bits
    subnormals: bool
    qe_fixed: int  # fixed: quantum exponent
    max_pos: int  # word bits of the largest value (>= 0)
    max_neg: int  # word bits of the magnitude of the most negative value
    min_pos: int  # word bits of the smallest positive value (zero=False formats)
    need_clz: bool
    const_shift: int | None


def _plan(fmt: FloatFormat | FixedFormat, w: Word) -> _Plan:
    if isinstance(fmt, FloatFormat):
        maxb = w.bits_floor(fmt.max_exact)
        need_clz = fmt.emin < w.emin
        const = None
        if fmt.subnormals and fmt.zero and fmt.emin == w.emin:
            const = w.mant - fmt.mantissa_bits
        return _Plan(
            True,
            fmt.emin,
            fmt.mantissa_bits,
            fmt.subnormals,
            0,
            maxb,
            maxb,
            w.bits_floor(Fraction(2) ** fmt.emin) if not fmt.zero else 0,
            need_clz,
            const,
        )
    return _Plan(
        False,
        0,
        0,
        False,
        fmt.quantum_exp,
        w.bits_floor(fmt.max_exact),
        w.bits_floor(-fmt.min_exact),
        0,
        False,
        None,
    )


def _increment(mode, sticky, rem, half, lsb, neg, frac, rand, sr_bits):
    if mode == "nearest_even":
        return sticky & ((rem > half) | ((rem == half) & lsb))
    if mode == "nearest_away":
        return sticky & (rem >= half)
    if mode == "nearest_zero":
        return rem > half
    if mode == "toward_zero":
        return jnp.zeros_like(sticky)
    if mode == "up":
        return sticky & ~neg
    if mode == "down":
        return sticky & neg
    if mode == "odd":
        return sticky & ~lsb
    # stochastic: P(inc) = fraction of the quantum, truncated to sr_bits bits
    drop = np.uint32(32 - sr_bits)
    return (rand >> drop) < (frac >> drop)


def round_bits(
    u: jax.Array,
    w: Word,
    fmt: FloatFormat | FixedFormat,
    mode: str,
    *,
    rand: jax.Array | None = None,
    sr_bits: int = 32,
    eoff: jax.Array | None = None,
) -> jax.Array:
    """Round the word bits ``u`` onto ``fmt``; returns the result's word bits.

    ``eoff`` (int32, broadcastable) scales the grid by ``2**eoff`` elementwise (block formats):
    the result is ``2**eoff * round(x * 2**-eoff)`` computed without any float multiply.
    """
    p = _plan(fmt, w)
    U, I = w.udtype, w.idtype
    mant, bias, width = w.mant, w.bias, w.width
    a = u & w.u(w.abs_mask)
    neg = (u >> w.u(width - 1)) != w.u(0)
    ex = (a >> w.u(mant)).astype(I)
    is_sub = ex == w.i(0)
    sig = jnp.where(is_sub, a, (a & w.u(2**mant - 1)) | w.u(2**mant))

    simple = p.is_float and p.subnormals and not p.need_clz and eoff is None
    if p.const_shift is not None and eoff is None:
        shift_i = None
        s = w.u(p.const_shift)
    elif simple:
        # emin >= the word's emin: shift = (mant - M) + max(0, emin - e), e = max(ex, 1) - bias
        ex1 = jnp.maximum(ex, w.i(1))
        shift_i = w.i(mant - p.mant) + jnp.maximum(w.i(0), w.i(p.emin + bias) - ex1)
        s = jnp.minimum(shift_i, w.i(width - 1)).astype(U)
        qe = w.i(p.emin - p.mant)  # the quantum wherever the result is tiny
    else:
        ue = jnp.where(is_sub, w.i(1 - bias - mant), ex - w.i(bias + mant))
        if p.is_float:
            if p.need_clz or eoff is not None:
                lead = w.i(width - 1) - lax.clz(a).astype(I)
                e = jnp.where(is_sub, lead + w.i(1 - bias - mant), ex - w.i(bias))
            else:
                e = jnp.maximum(ex, w.i(1)) - w.i(bias)
            emin = w.i(p.emin) if eoff is None else w.i(p.emin) + eoff.astype(I)
            if p.subnormals:
                qe = jnp.maximum(e, emin) - w.i(p.mant)
            else:
                qe = jnp.where(e >= emin, e - w.i(p.mant), emin)
        else:
            qe = w.i(p.qe_fixed) if eoff is None else w.i(p.qe_fixed) + eoff.astype(I)
            qe = jnp.broadcast_to(qe, a.shape)
        shift_i = qe - ue
        s = jnp.clip(shift_i, 0, width - 1).astype(U)

    one = w.u(1)
    if mode == "nearest_even" and p.is_float and p.mant < mant and (simple or shift_i is None):
        # shift >= 1 everywhere: the classic add-half-minus-one-plus-lsb on the word, with the
        # parity taken from the significand (implicit bit included), as ml_dtypes does
        half = (one << s) >> one
        lsb = (sig >> s) & one
        r = ((a + (half - one) + lsb) >> s) << s
        if shift_i is not None:
            tiny = shift_i > w.i(mant)
            qbits = w.u(max(1, min(p.emin - p.mant + bias, 2 * bias)) << mant)
            r = jnp.where(tiny, jnp.where(sig > half, qbits, w.u(0)), r)
        return _finish(r, u, a, ex, neg, w, p, fmt, mode, eoff)
    mask = (one << s) - one
    rem = sig & mask
    half = (one << s) >> one
    lsb = ((sig >> s) & one) != w.u(0)
    sticky = rem != w.u(0)

    frac = None
    if mode == "stochastic":
        if rand is None:
            raise ValueError("key: mode='stochastic' needs key= or random_bits=")
        if shift_i is None:
            sh = jnp.full(a.shape, p.const_shift, I)
        else:
            sh = shift_i
        up_sh = jnp.clip(w.i(32) - sh, 0, width - 1).astype(U)
        dn_sh = jnp.clip(sh - w.i(32), 0, width - 1).astype(U)
        frac = jnp.where(sh >= w.i(32), sig >> dn_sh, rem << up_sh)
        frac = jnp.where(sticky, frac, w.u(0))
        if width == 64:
            rand = rand.astype(U)
        else:
            frac = frac.astype(jnp.uint32)
    inc = _increment(mode, sticky, rem, half, lsb, neg, frac, rand, sr_bits)
    incu = inc.astype(U)

    r = ((a >> s) + incu) << s
    if shift_i is not None:
        tiny = shift_i > w.i(mant)
        qbits = (jnp.clip(qe + w.i(bias), 1, 2 * bias)).astype(U) << w.u(mant)
        r = jnp.where(tiny, jnp.where(inc, qbits, w.u(0)), r)
    return _finish(r, u, a, ex, neg, w, p, fmt, mode, eoff)


def _finish(r, u, a, ex, neg, w, p, fmt, mode, eoff):
    """Overflow, saturation, specials and the sign, on the rounded magnitude word ``r``."""
    U, I = w.udtype, w.idtype
    mant, width = w.mant, w.width

    # ---- overflow / saturation ---------------------------------------------------------------
    if eoff is None:
        max_pos = w.u(p.max_pos)
        max_neg = w.u(p.max_neg)
    else:
        off = eoff.astype(I) << w.i(mant)
        max_pos = (w.i(p.max_pos) + off).astype(U)
        max_neg = (w.i(p.max_neg) + off).astype(U)
    lim = max_pos if p.max_pos == p.max_neg else jnp.where(neg, max_neg, max_pos)
    over = r > lim
    finite = ex != w.i(2 ** (width - 1 - mant) - 1)
    isnan = a > w.u(w.inf_bits)
    nan_bits = u | w.u(w.quiet_bit)
    inf_bits = w.u(w.inf_bits)

    if p.is_float:
        fmt_f: FloatFormat = fmt  # type: ignore[assignment]
        if mode in ("toward_zero", "odd"):
            to_max = jnp.ones_like(neg)
        elif mode == "up":
            to_max = neg
        elif mode == "down":
            to_max = ~neg
        else:
            to_max = jnp.zeros_like(neg)
        if fmt_f.overflow == "saturate":
            over_val = lim
        elif fmt_f.overflow == "inf":
            over_val = jnp.where(to_max, lim, inf_bits)
        else:
            over_val = jnp.where(to_max, lim, w.u(w.inf_bits | w.quiet_bit))
        r = jnp.where(over, over_val, r)
        if fmt_f.overflow == "saturate":
            inf_val = lim
        elif fmt_f.overflow == "inf":
            inf_val = inf_bits
        else:
            inf_val = w.u(w.inf_bits | w.quiet_bit)
        r = jnp.where(finite, r, inf_val)
        out = r | (u & w.u(w.sign_bit))
        if not fmt_f.zero:
            minb = w.u(p.min_pos) if eoff is None else (w.i(p.min_pos) + off).astype(U)
            out = jnp.where((r == w.u(0)) & (a != w.u(0)), minb, out)
            out = jnp.where(a == w.u(0), w.u(w.inf_bits | w.quiet_bit), out)
        if not fmt_f.signed:
            out = jnp.where(neg & (a != w.u(0)), w.u(w.inf_bits | w.quiet_bit), out)
            out = jnp.where(neg & (a == w.u(0)) & fmt_f.zero, w.u(0), out)
        elif fmt_f.specials == "fnuz":
            out = jnp.where(r == w.u(0), w.u(0), out)
        out = jnp.where(isnan, nan_bits, out)
    else:
        r = jnp.where(over | ~finite, lim, r)
        out = r | jnp.where(neg, w.u(w.sign_bit), w.u(0))
        # two's complement has no -0: zero results are +0, as the codes are
        out = jnp.where(r == w.u(0), w.u(0), out)
        out = jnp.where(isnan, nan_bits, out)
    return out


def random_words(
    shape: tuple[int, ...], key: jax.Array | None, random_bits: jax.Array | None
) -> jax.Array:
    """uint32 words for stochastic rounding from ``key`` (hash generator) or given bits."""
    if random_bits is not None:
        rb = jnp.asarray(random_bits)
        if rb.dtype != jnp.uint32:
            raise TypeError(f"random_bits: expected dtype uint32, got {rb.dtype}")
        if rb.shape != tuple(shape):
            raise ValueError(f"random_bits: expected shape {tuple(shape)}, got {rb.shape}")
        return rb
    if key is None:
        raise ValueError("key: mode='stochastic' needs key= or random_bits=, got neither")
    return hash_bits(seeds_from_key(key), tuple(shape))


def check_sr_bits(stochastic_bits: int | None) -> int:
    if stochastic_bits is None:
        return 32
    if not isinstance(stochastic_bits, int) or not 1 <= stochastic_bits <= 32:
        raise ValueError(f"stochastic_bits: expected an int in 1..32, got {stochastic_bits!r}")
    return stochastic_bits


def round(  # noqa: A001 - the issue's public name
    x: jax.Array,
    fmt: Any,
    mode: str = "nearest_even",
    *,
    key: jax.Array | None = None,
    random_bits: jax.Array | None = None,
    stochastic_bits: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Round ``x`` onto the values of ``fmt``; same shape and dtype as ``x``.

    Args:
      x: float32 / float64 array (bfloat16 / float16 when every value of ``fmt`` fits).
      fmt: FloatFormat, FixedFormat, IntFormat or an ml_dtypes dtype.
      mode: one of ``MODES``. ``"stochastic"`` rounds up with probability equal to the distance
        to the lower neighbour in quanta, using ``random_bits`` (uint32, x's shape) or words
        hashed from ``key`` and each element's global index (so sharding does not change them).
      stochastic_bits: how many random bits stochastic rounding uses (1..32, default 32).
      implementation: None/"xla" (integer bit kernel) or "reference" (exact Fraction arithmetic
        on the host; not traceable).

    Overflow, NaN, inf, signed zeros and subnormals follow the format (ml_dtypes semantics for
    its types), except that NaN inputs stay NaN for formats without a NaN code.
    """
    impl = backend.resolve_implementation(FAMILY, implementation)
    dt = check_float_input(x)
    grid = as_grid(fmt)
    check_mode(mode)
    sr_bits = check_sr_bits(stochastic_bits)
    if impl == "reference":
        from .reference import round_reference

        return round_reference(
            x, grid, mode, key=key, random_bits=random_bits, stochastic_bits=stochastic_bits
        )
    x = jnp.asarray(x)
    if np.dtype(dt) in (np.float32, np.float64):
        w = word_of(dt)
        xin = x
    else:
        if not _fits(grid, dt):
            raise ValueError(
                f"fmt: {grid} has values that {np.dtype(dt).name} cannot hold; cast x to "
                "float32 first"
            )
        w = F32
        xin = x.astype(jnp.float32)
    _check_word(grid, w)
    rand = None
    if mode == "stochastic":
        rand = random_words(x.shape, key, random_bits)
    out = from_bits(round_bits(to_bits(xin, w), w, grid, mode, rand=rand, sr_bits=sr_bits), w)
    return out.astype(dt)


__all__ = ["MODES", "round", "F32", "F64"]
