"""Emulated low-precision arithmetic: quantized ``dot_general`` (narrow accumulators, the
int8 x int8 -> int32 path), L-Mul, and a bit-serial dot product with its cycle count."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._bits import _GOLD, F32, _mix32, flat_index, from_bits, seeds_from_key, to_bits
from .block import BlockFormat, block_round
from .formats import FixedFormat, FloatFormat, IntFormat, format_of
from .rounding import as_grid, check_float_input, check_mode, check_sr_bits, round, round_bits

DimensionNumbers = tuple[
    tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]
]


def _quantize(x: jax.Array, fmt: Any, mode: str, name: str) -> jax.Array:
    if fmt is None:
        return x
    if isinstance(fmt, BlockFormat):
        return block_round(x, fmt, mode)
    try:
        return round(x, fmt, mode)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def _norm_dims(dimension_numbers: Any, lhs: jax.Array, rhs: jax.Array) -> DimensionNumbers:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    except (TypeError, ValueError) as e:
        raise ValueError(
            "dimension_numbers: expected ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), "
            f"got {dimension_numbers!r}"
        ) from e
    (lc, rc), (lb, rb) = dn
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"dimension_numbers: mismatched lengths in {dimension_numbers!r}")
    for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(
                f"dimension_numbers: lhs axis {a} (size {lhs.shape[a]}) does not match rhs axis "
                f"{b} (size {rhs.shape[b]})"
            )
    return dn


def _to_bmkn(lhs, rhs, dn):
    """Transpose/reshape to lhs (B, M, K), rhs (B, K, N); returns them and the output shape."""
    (lc, rc), (lb, rb) = dn
    lf = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
    rf = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
    bshape = [lhs.shape[i] for i in lb]
    mshape = [lhs.shape[i] for i in lf]
    nshape = [rhs.shape[i] for i in rf]
    B = int(np.prod(bshape)) if bshape else 1
    M = int(np.prod(mshape)) if mshape else 1
    N = int(np.prod(nshape)) if nshape else 1
    K = int(np.prod([lhs.shape[i] for i in lc])) if lc else 1
    l3 = jnp.transpose(lhs, (*lb, *lf, *lc)).reshape(B, M, K)
    r3 = jnp.transpose(rhs, (*rb, *rc, *rf)).reshape(B, K, N)
    return l3, r3, (*bshape, *mshape, *nshape)


def int8_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, *, preferred_element_type=jnp.int32
) -> jax.Array:
    """Exact int8 x int8 -> int32 ``lax.dot_general`` (wraps on int32 overflow, K > 2**17)."""
    for n, v in (("lhs", lhs), ("rhs", rhs)):
        if jnp.result_type(v) != jnp.int8:
            raise TypeError(f"{n}: expected dtype int8, got {jnp.result_type(v)}")
    dn = _norm_dims(dimension_numbers, lhs, rhs)
    return lax.dot_general(lhs, rhs, dn, preferred_element_type=preferred_element_type)


def _small_int(fmt: Any) -> bool:
    return isinstance(fmt, IntFormat) and fmt.bits + (0 if fmt.signed else 1) <= 8


# ---- narrow accumulator: exact per-step rounding ---------------------------------------------
#
# Each step rounds the exact rational v = acc + a*b once onto the accumulator grid G. The
# computation finds z = RO(v), v rounded to odd at float32's 24-bit precision (truncate, then set
# the last bit if anything was dropped), as an ordinary float32 word x, and hands x to
# ``round_bits``. That is exact because of the classic round-to-odd property: every "boundary"
# of G that a rounding decision compares against (grid points, midpoints, and for stochastic
# rounding with k random bits the points of G refined 2**k times) is a multiple of twice the
# float32 spacing at its magnitude (checked by ``_accumulator_limits``: mantissa_bits <= 21,
# fixed integer_bits + fraction_bits <= 22, m + k <= 22, quanta >= 2**-147, ...). If v is a
# float32 value, x = v. Otherwise x is odd, so x is not a boundary, and v lies in the open
# interval (x - ulp, x + ulp) whose ends are even; that interval holds no boundary, so v and x
# fall between the same two boundaries and every mode (and the floor of the residual scaled by
# 2**k that stochastic rounding compares with its random bits) gives the same answer for both.
#
# RO(acc + P + PL), with p = a*b = P + PL exactly (P = fl(a*b), Dekker's TwoProduct with a
# bit-mask split into 12 + 12 bits, so all partial products are exact), is Boldo and Melquiond's
# sum of three: (th, tl) = TwoSum(acc, P); w = RO(tl + PL); z = RO(th + w), with
# RO(s + e) from a TwoSum pair (s, e) obtained by moving an even s one ulp toward e when e != 0
# (``_round_odd``). Why it is exact: if acc and -P are within a factor 2, th = acc + P exactly
# (Sterbenz), tl = 0, w = PL and z = RO(th + PL) = RO(v). Otherwise |th| >= |P|/2, so
# |tl + PL| <= 1.5 ulp(th): w has ulp <= 2**-22 ulp(th), th and the float32 grid near th + w are
# multiples of 2 ulp(w), and th + w and v = th + tl + PL lie in the same open gap of that grid
# (the round-to-odd argument again), so RO(th + w) = RO(v).
#
# All of this needs float32 arithmetic without underflow or overflow (XLA on CPU flushes
# subnormals to zero). The fast path (``fast_x``) computes it directly; it is exact when every
# nonzero operand, product and accumulator value is a multiple of 2**-126 (so every partial sum
# is zero or normal) and |acc| + |a*b| <= 2**128 - 2**105. The operand formats guarantee that
# statically (e.g. fp8 or int operands), or a per-call check on the operands' exponents picks a
# scan that uses the fast path throughout, or, when some step is unsafe, a scan that chooses per
# step (``lax.cond``; under ``vmap`` both branches run). The other path (``scaled_x``) scales
# the terms by 2**-R (R = the larger of the accumulator's and the product's exponents; operands
# and the accumulator are normalised from their bits, subnormals included); a term more than
# 2**60 below the other is replaced by the same-sign stand-in (its significand) * 2**-60, which,
# like the true term, lies strictly inside one gap of width 2**-46 of the other term's grid, so
# the round-to-odd class of the sum does not change; the sum is formed in that normal range,
# and x is rebuilt from z * 2**R with integer ops: the exponent field for normal results, a
# shift with a sticky bit (round to odd on the 2**-149 grid) for float32-subnormal results, and
# +-float32 max (deterministic modes) or +-inf (stochastic) from 2**128 on, where every mode is
# decided (overflow, or max for the modes that round toward it).
#
# XLA on CPU contracts a*b + c into FMAs; the partial products here are exact (so contraction
# cannot change them) and fl(a*b) feeds several ops, which keeps it rounded; the tests with
# float32 and 16-bit integer operands would catch a change.
#
# Inputs with inf or NaN follow the extended reals: inf * 0 and inf - inf give NaN, else the
# signed inf (then the format's inf/NaN/saturation rule). An exact zero sum is -0 only when acc
# and a*b are both -0 (IEEE round-to-nearest addition), in every mode.

_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)
_F32_MAX = np.uint32(0x7F7FFFFF)
_STANDIN = 60  # terms more than 2**60 below the larger one become same-sign stand-ins
_FAST_LIMIT = Fraction(2) ** 128 - Fraction(2) ** 105  # |acc| + |a*b| bound of the fast path


def _fl(u: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(u, jnp.float32)


def _ub(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, jnp.uint32)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: s = fl(a + b) and the exact error e = a + b - s (no overflow)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x = hi + lo with hi the top 12 significand bits (a bit mask, so no float trick for XLA
    to fold) and lo the other <= 12 bits; both exact for normal x."""
    hi = _fl(_ub(x) & np.uint32(0xFFFFF000))
    return hi, x - hi


def _round_odd(s: jax.Array, e: jax.Array) -> jax.Array:
    """Bits of RO(s + e) from s = fl(s + e) (round to nearest) and its exact error e: the
    truncation toward zero (s, or s one ulp closer to zero when e points the other way) with the
    last bit set when e != 0. A NaN e (non-finite s) leaves s as it is."""
    us = _ub(s)
    ne = (jnp.abs(e) > 0).astype(jnp.uint32)
    opp = (_ub(e) ^ us) >> np.uint32(31)
    return (us - (ne & opp)) | ne


def _ro_sum3(a: jax.Array, p: jax.Array, pl: jax.Array | None):
    """(bits of RO(a + p + pl), th = fl(a + p)) for floats with |pl| <= ulp(p)/2."""
    th, tl = _two_sum(a, p)
    if pl is None:
        return _round_odd(th, tl), th
    w0, we = _two_sum(tl, pl)
    w = _fl(_round_odd(w0, we))
    z0, ze = _two_sum(th, w)
    return _round_odd(z0, ze), th


def _normalise(u: jax.Array, subnormals: bool) -> tuple[jax.Array, jax.Array]:
    """float32 bits -> (n, e): n = +-[1, 2) with the same significand and sign (+-0 for
    zeros), e the int32 exponent (x = n * 2**e exactly; -1000 for zeros)."""
    mag = u & _ABS
    sign = u & _SIGN
    ex = (mag >> np.uint32(23)).astype(jnp.int32)
    n_bits = sign | np.uint32(0x3F800000) | (mag & np.uint32(0x7FFFFF))
    e = ex - np.int32(127)
    if subnormals:
        sub = ex == 0
        sh = lax.clz(mag).astype(jnp.int32) - np.int32(8)  # bring the leading 1 to bit 23
        sig = mag << jnp.clip(sh, 0, 31).astype(jnp.uint32)
        n_bits = jnp.where(sub, sign | np.uint32(0x3F800000) | (sig & np.uint32(0x7FFFFF)), n_bits)
        e = jnp.where(sub, np.int32(-126) - sh, e)
    zero = mag == 0
    return _fl(jnp.where(zero, sign, n_bits)), jnp.where(zero, np.int32(-1000), e)


def _pow2(d: jax.Array) -> jax.Array:
    """2.0**d for int32 d in [-126, 127]."""
    return _fl(((d + np.int32(127)).astype(jnp.uint32)) << np.uint32(23))


def _unscale(z: jax.Array, r: jax.Array, stochastic: bool) -> jax.Array:
    """Bits of a float32 in the round-to-odd class of z * 2**r (z = bits of a normal float32 or
    a zero): exact when normal, round-to-odd onto 2**-149 below 2**-126, +-max (or +-inf for
    stochastic rounding) at or beyond 2**128."""
    mag = z & _ABS
    sign = z & _SIGN
    field = (mag >> np.uint32(23)).astype(jnp.int32) + r  # biased exponent of the result
    normal = sign | (jnp.clip(field, 1, 254).astype(jnp.uint32) << np.uint32(23))
    normal = normal | (mag & np.uint32(0x7FFFFF))
    sig = (mag & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    sh = np.int32(1) - field  # right shift onto the subnormal grid (>= 1 there)
    shc = jnp.clip(sh, 0, 31).astype(jnp.uint32)
    kept = jnp.where(sh > 24, np.uint32(0), sig >> shc)
    sticky = jnp.where(sh > 24, True, (sig & ((np.uint32(1) << shc) - np.uint32(1))) != 0)
    sub = sign | kept | sticky.astype(jnp.uint32)
    big = sign | (_INF if stochastic else _F32_MAX)
    out = jnp.where(field >= 255, big, jnp.where(field >= 1, normal, sub))
    return jnp.where(mag == 0, z, out)


def _special(uc: jax.Array, ua: jax.Array, ub: jax.Array) -> jax.Array:
    """Bits of acc + a*b in the extended reals when an input is inf or NaN: NaN for a NaN
    input, inf * 0 or inf - inf, else the signed inf (no float op, so no FMA contraction)."""

    def parts(u):
        mag = u & _ABS
        return mag > _INF, mag == _INF, mag == 0, u & _SIGN

    an, ai, az, asg = parts(ua)
    bn, bi, bz, bsg = parts(ub)
    cn, ci, _, csg = parts(uc)
    pnan = (ai & bz) | (bi & az)
    pinf = (ai | bi) & ~pnan
    psg = asg ^ bsg
    nan = an | bn | cn | pnan | (ci & pinf & (csg != psg))
    return jnp.where(nan, np.uint32(0x7FC00000), jnp.where(ci, csg, psg) | _INF)


class _OpInfo(NamedTuple):
    sig: int  # significand bits of any operand value
    qmin: int  # every operand value is a multiple of 2**qmin
    emax: int  # |operand| <= 2**emax (finite values)


_F32_INFO = _OpInfo(24, -149, 128)


def _grid_info(g: FloatFormat | FixedFormat) -> _OpInfo:
    if isinstance(g, FloatFormat):
        return _OpInfo(
            min(g.mantissa_bits + 1, 24),
            max(g.emin - g.mantissa_bits, -149),
            min(g.emax + 1, 128),
        )
    return _OpInfo(
        min(max(g.integer_bits + g.fraction_bits, 1), 24),
        max(-g.fraction_bits, -149),
        min(g.integer_bits, 128),
    )


def _exponent_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For x (K, ...) float32, per k: (lower bound of the exponent of the last bit of the
    nonzero finite entries, e with every such |x| < 2**e); +-1000 where there are none."""
    u = _ub(x) & _ABS
    field = (u >> np.uint32(23)).astype(jnp.int32)
    live = (u != 0) & (field < 255)
    axes = tuple(range(1, x.ndim))
    lsb = jnp.where(field == 0, np.int32(-149), field - np.int32(150))
    top = jnp.maximum(field, 1) - np.int32(126)
    return (
        jnp.min(jnp.where(live, lsb, np.int32(1000)), axis=axes),
        jnp.max(jnp.where(live, top, np.int32(-1000)), axis=axes),
    )


def _grid_max(g: FloatFormat | FixedFormat) -> Fraction:
    """The largest magnitude of a finite value of ``g``."""
    if isinstance(g, FloatFormat):
        return g.max_exact
    return max(g.max_exact, -g.min_exact)


def _operand_info(fmt: Any, dtype: Any, int_in: bool) -> _OpInfo:
    if int_in:
        return _OpInfo(8, 0, 7)
    if fmt is None:
        dt = np.dtype(dtype)
        if dt == np.float16 or dt == np.dtype(jnp.bfloat16):
            return _grid_info(format_of(dt))
        return _F32_INFO
    if isinstance(fmt, BlockFormat):
        return _F32_INFO
    return _grid_info(as_grid(fmt))


def _accumulator_limits(g: FloatFormat | FixedFormat) -> tuple[str | None, int]:
    """(why the grid cannot be accumulated exactly in float32, or None; the largest number of
    stochastic-rounding bits that stay exact)."""
    if isinstance(g, FloatFormat):
        if not g.zero:
            return "a format without a zero (the accumulator starts at 0)", 0
        if g.mantissa_bits > 21:
            return f"mantissa_bits <= 21, got {g.mantissa_bits}", 0
        if g.max_exact >= Fraction(2) ** 128:
            return f"a max below 2**128, got {g.max}", 0
        q = g.emin - g.mantissa_bits  # finest quantum (also near 2**emin without subnormals)
        if q < -147:
            return f"a smallest quantum >= 2**-147, got 2**{q}", 0
        return None, min(22 - g.mantissa_bits, q + 148, 32)
    width = g.integer_bits + g.fraction_bits
    if width > 22:
        return f"integer_bits + fraction_bits <= 22, got {width}", 0
    return None, min(23 - width, 148 - g.fraction_bits, 32)


def _step_words(seeds: jax.Array, k: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The uint32 words ``hash_bits(seeds, (K, *shape))[k]`` (one step's slice), built from the
    global element index so that sharding does not change them."""
    size = int(np.prod(shape)) if shape else 1
    c = flat_index(shape) + k.astype(jnp.uint32) * np.uint32(size % 2**32)
    h = _mix32(c * _GOLD + seeds[0])
    return _mix32(h ^ seeds[1])


def _accumulate(
    l3: jax.Array,
    r3: jax.Array,
    grid: FloatFormat | FixedFormat,
    mode: str,
    li: _OpInfo,
    ri: _OpInfo,
    seeds: jax.Array | None,
    rbits: jax.Array | None,
    sr_bits: int,
) -> jax.Array:
    """Sequential accumulation over K of lhs (B, M, K) x rhs (B, K, N) onto ``grid``; (B, M, N)
    float32."""
    gi = _grid_info(grid)
    exact_products = li.sig + ri.sig <= 24
    fast = (
        min(li.qmin, ri.qmin) >= -126
        and li.qmin + ri.qmin >= -126
        and _grid_max(grid) + Fraction(2) ** (li.emax + ri.emax) <= _FAST_LIMIT
    )
    stochastic = mode == "stochastic"
    B, M, N = l3.shape[0], l3.shape[1], r3.shape[2]

    def fast_x(acc, lk, rk):
        A = _fl(acc)
        a, b = lk[:, :, None], rk[:, None, :]
        p = a * b
        if exact_products:
            x, _ = _ro_sum3(A, p, None)  # non-finite input: x = fl(acc + a*b) (see _round_odd)
            return x
        lh, ll = _split(lk)
        rh, rl = _split(rk)
        ah, al, bh, bl = lh[:, :, None], ll[:, :, None], rh[:, None, :], rl[:, None, :]
        pl = ((ah * bh - p) + ah * bl + al * bh) + al * bl
        x, th = _ro_sum3(A, p, pl)
        tb = _ub(th)
        x = jnp.where((tb & _ABS) < _INF, x, tb)  # non-finite input: fl(acc + a*b)
        return jnp.where((x & _ABS) == 0, tb, x)  # exact zero: the sign of fl(acc + a*b)

    def scaled_x(acc, lk, rk):
        an, ea = _normalise(_ub(lk), li.qmin < -126)
        bn, eb = _normalise(_ub(rk), ri.qmin < -126)
        cn, ec = _normalise(acc, gi.qmin < -126)
        pn = an[:, :, None] * bn[:, None, :]  # +-[1, 4) or 0, exact when exact_products
        pl = None
        if not exact_products:
            lh, ll = _split(an)
            rh, rl = _split(bn)
            ah, al, bh, bl = lh[:, :, None], ll[:, :, None], rh[:, None, :], rl[:, None, :]
            pl = ((ah * bh - pn) + ah * bl + al * bh) + al * bl
        ep = ea[:, :, None] + eb[:, None, :]
        r = jnp.maximum(ec, ep)
        sc = _pow2(jnp.maximum(ec - r, -_STANDIN))
        sp = _pow2(jnp.maximum(ep - r, -_STANDIN))
        z, th = _ro_sum3(cn * sc, pn * sp, None if pl is None else pl * sp)
        z = jnp.where((z & _ABS) == 0, _ub(th), z)  # exact zero: the sign of fl(acc + a*b)
        x = _unscale(z, r, stochastic)
        la, rb = _ub(lk)[:, :, None], _ub(rk)[:, None, :]
        finite = ((acc & _ABS) < _INF) & ((la & _ABS) < _INF) & ((rb & _ABS) < _INF)
        return jnp.where(finite, x, _special(acc, la, rb))

    def step(acc, xs, mixed):
        lk, rk, k, ok, rb = xs  # (B, M), (B, N), (), (), (B, M, N) or None
        if stochastic:
            rand = rb if rb is not None else _step_words(seeds, k, (B, M, N))
        else:
            rand = None
        if mixed:
            x = lax.cond(ok, fast_x, scaled_x, acc, lk, rk)
        else:
            x = fast_x(acc, lk, rk)
        return round_bits(x, F32, grid, mode, rand=rand, sr_bits=sr_bits), None

    K = l3.shape[2]
    lt, rt = jnp.moveaxis(l3, 2, 0), jnp.moveaxis(r3, 1, 0)  # (K, B, M), (K, B, N)
    # a barrier, so that XLA cannot fold +0 + x into x (wrong for x = -0) in an unrolled step
    acc0 = lax.optimization_barrier(jnp.zeros((B, M, N), jnp.uint32))
    ks = jnp.arange(K, dtype=jnp.int32)
    if fast:
        ok = jnp.ones((K,), bool)
        acc, _ = lax.scan(lambda c, x: step(c, x, False), acc0, (lt, rt, ks, ok, rbits))
        return _fl(acc)
    # per step: is the unscaled (fast) formula exact? Every nonzero operand, product and
    # accumulator value must be a multiple of 2**-126 (no subnormal anywhere: acc is a multiple
    # of the smallest product quantum so far) and |acc| + |a*b| <= 2**128 - 2**105 (acc is on the
    # grid, so |acc| <= 2**128 - 2**106: |a*b| <= 2**105 suffices).
    la, ta = _exponent_stats(lt)
    lb, tb = _exponent_stats(rt)
    ok = (jnp.minimum(la, lb) >= -126) & (lax.cummin(la + lb) >= -126) & (ta + tb <= 105)
    xs = (lt, rt, ks, ok, rbits)
    acc = lax.cond(
        jnp.all(ok),
        lambda: lax.scan(lambda c, x: step(c, x, False), acc0, xs)[0],
        lambda: lax.scan(lambda c, x: step(c, x, True), acc0, xs)[0],
    )
    return _fl(acc)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    *,
    lhs_format: Any = None,
    rhs_format: Any = None,
    accumulate_format: FloatFormat | FixedFormat | IntFormat | None = None,
    preferred_element_type: Any = None,
    mode: str = "nearest_even",
    accumulate_mode: str = "nearest_even",
    key: jax.Array | None = None,
    random_bits: jax.Array | None = None,
    stochastic_bits: int | None = None,
) -> jax.Array:
    """``lax.dot_general`` with operands rounded onto formats and an optional narrow accumulator.

    Args:
      lhs, rhs: float arrays (or int8 arrays for the integer path).
      lhs_format, rhs_format: FloatFormat / FixedFormat / IntFormat / dtype / BlockFormat (block
        axis given by the BlockFormat) or None (operand used as is); rounded with ``mode``.
      accumulate_format: emulate an accumulator of this format. The contraction runs
        sequentially over the contracting elements k = 0..K-1 (row-major over the contracting
        axes) from acc = +0, and each step sets ``acc = round(acc + a_k * b_k)``: the exact
        rational value rounded once onto ``accumulate_format`` with ``accumulate_mode`` (an
        exact fused multiply-add into the narrow register, whatever the operand widths:
        float32 operands' 48-bit products included). Overflow, saturation, signed zeros and
        subnormals follow the format exactly as :func:`round` (and ``round_bits``) define them.
        An exact zero sum is -0 only when ``acc`` and ``a_k * b_k`` are both -0. With an inf or
        NaN operand or accumulator the sum follows the extended reals (inf * 0 and inf - inf are
        NaN), then the format's rule for inf/NaN. Supported formats are those whose values and
        rounding boundaries float32 holds with two spare bits: FloatFormat with
        mantissa_bits <= 21, a zero, max < 2**128 and smallest quantum >= 2**-147 (every
        ml_dtypes type but float32 and e8m0); FixedFormat with integer_bits + fraction_bits
        <= 22 (IntFormat: up to 23 bits signed, 22 unsigned); others raise ValueError.
        Cost: one elementwise pass per k; 1.2-1.7x the old float32-add-then-round emulation
        when the operand formats keep everything in float32's normal range (fp8, int, fixed
        operands), 2-4x with float32 operands (TwoProduct), more when tiny or huge values send
        steps down the scaled path.
      accumulate_mode: a rounding mode (``MODES``). ``"stochastic"`` rounds step k up when the
        exact residual in quanta, truncated to ``stochastic_bits`` bits, exceeds the top
        ``stochastic_bits`` bits of the uint32 word ``random_bits[k, ...]`` (shape
        ``(K, *output_shape)``) or of the word hashed from ``key`` and the global index
        ``(k, *output index)`` (the words of ``random_words((K, *output_shape), key, None)``, so
        sharding the output does not change them); the probability of rounding up is the
        truncated residual. Missing both: ValueError naming ``key``.
      stochastic_bits: random bits per stochastic step, 1..kmax: kmax = min(22 - m,
        148 + emin - m) for a FloatFormat (bfloat16 15, float16 12, e5m2 20, e4m3 19) and
        min(23 - integer_bits - fraction_bits, 148 - fraction_bits) for a FixedFormat
        (IntFormat(8): 16), the residual bits float32 keeps exact; None (default) uses kmax.
      preferred_element_type: result dtype. With two IntFormat operands of <= 8 bits (or int8
        inputs) and no accumulator format, the product runs as int8 x int8 -> int32 exactly;
        the result is int32 when ``preferred_element_type`` is int32, else float32.
    Returns: the ``lax.dot_general`` result shape (batch, lhs free, rhs free).
    """
    check_mode(mode)
    check_mode(accumulate_mode)
    dn = _norm_dims(dimension_numbers, lhs, rhs)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    int_in = lhs.dtype == jnp.int8 and rhs.dtype == jnp.int8
    if int_in or (_small_int(lhs_format) and _small_int(rhs_format) and accumulate_format is None):
        if not int_in:
            lq = _quantize(lhs, lhs_format, mode, "lhs_format").astype(jnp.int8)
            rq = _quantize(rhs, rhs_format, mode, "rhs_format").astype(jnp.int8)
        else:
            lq, rq = lhs, rhs
        if accumulate_format is None:
            out = lax.dot_general(lq, rq, dn, preferred_element_type=jnp.int32)
            if preferred_element_type is not None and np.dtype(preferred_element_type) == np.int32:
                return out
            return out.astype(preferred_element_type or jnp.float32)
        lhs, rhs = lq.astype(jnp.float32), rq.astype(jnp.float32)
    check_float_input(lhs, "lhs")
    check_float_input(rhs, "rhs")
    lhs_dt, rhs_dt = lhs.dtype, rhs.dtype
    lq = _quantize(lhs.astype(jnp.float32), lhs_format, mode, "lhs_format")
    rq = _quantize(rhs.astype(jnp.float32), rhs_format, mode, "rhs_format")
    out_dt = preferred_element_type or jnp.result_type(lhs, rhs)
    if accumulate_format is None:
        return lax.dot_general(
            lq, rq, dn, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
        ).astype(out_dt)
    grid = as_grid(accumulate_format, "accumulate_format")
    why, kmax = _accumulator_limits(grid)
    if why is not None:
        raise ValueError(
            f"accumulate_format: exact emulation in float32 needs {why} ({accumulate_format}); "
            "for float32 or int32 accumulation pass accumulate_format=None (<= 8-bit IntFormat "
            "operands then accumulate exactly in int32, others in float32)"
        )
    l3, r3, out_shape = _to_bmkn(lq, rq, dn)
    K = l3.shape[2]
    seeds = rbits = None
    sr_bits = 32
    if accumulate_mode == "stochastic":
        if stochastic_bits is None:
            sr_bits = kmax
        else:
            sr_bits = check_sr_bits(stochastic_bits)
            if sr_bits > kmax:
                raise ValueError(
                    f"stochastic_bits: expected <= {kmax} for accumulate_format={grid} (float32 "
                    f"keeps only that many residual bits exact), got {stochastic_bits}"
                )
        if random_bits is not None:
            rb = jnp.asarray(random_bits)
            want = (K, *out_shape)
            if rb.dtype != jnp.uint32:
                raise TypeError(f"random_bits: expected dtype uint32, got {rb.dtype}")
            if rb.shape != want:
                raise ValueError(f"random_bits: expected shape {want} (K, *output), got {rb.shape}")
            rbits = rb.reshape(K, l3.shape[0], l3.shape[1], r3.shape[2])
        elif key is None:
            raise ValueError(
                "key: accumulate_mode='stochastic' needs key= or random_bits=, got neither"
            )
        else:
            seeds = seeds_from_key(key)
    li = _operand_info(lhs_format, lhs_dt, int_in)
    ri = _operand_info(rhs_format, rhs_dt, int_in)
    acc = _accumulate(l3, r3, grid, accumulate_mode, li, ri, seeds, rbits, sr_bits)
    return acc.reshape(out_shape).astype(out_dt)


# ---- L-Mul ---------------------------------------------------------------------------------------
def _l(m: int) -> int:
    return m if m <= 3 else 3 if m == 4 else 4


def lmul(x: jax.Array, y: jax.Array, mantissa_bits: int) -> jax.Array:
    """L-Mul (Luo & Sun 2024): ``(1 + xm + ym + 2**-l(m)) * 2**(xe + ye)`` with the sign xor.

    x and y (float32, broadcastable) are first rounded to nearest-even onto an 8-bit-exponent
    format with ``mantissa_bits`` bits and no subnormals; the product is formed on the bit fields
    with integer adds (exact in float32 for mantissa_bits <= 22). Zeros give (signed) zero,
    NaN/inf propagate, exponent overflow gives inf and underflow below 2**-126 gives zero.
    """
    if not isinstance(mantissa_bits, int) or not 0 <= mantissa_bits <= 22:
        raise ValueError(f"mantissa_bits: expected an int in 0..22, got {mantissa_bits!r}")
    check_float_input(x, "x")
    check_float_input(y, "y")
    x, y = jnp.broadcast_arrays(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    m = mantissa_bits
    fmt = FloatFormat(8, m, subnormals=False)
    ux = round_bits(to_bits(x, F32), F32, fmt, "nearest_even")
    uy = round_bits(to_bits(y, F32), F32, fmt, "nearest_even")
    sign = (ux ^ uy) & np.uint32(0x80000000)
    ax, ay = ux & np.uint32(0x7FFFFFFF), uy & np.uint32(0x7FFFFFFF)
    ex = (ax >> np.uint32(23)).astype(jnp.int32)
    ey = (ay >> np.uint32(23)).astype(jnp.int32)
    sh = np.uint32(23 - m)
    mx = (ax & np.uint32(0x7FFFFF)) >> sh
    my = (ay & np.uint32(0x7FFFFF)) >> sh
    off = np.uint32(2 ** (m - _l(m)))  # 2**-l(m) in units of 2**-m (l(m) <= m always)
    s = np.uint32(2**m) + mx + my + off  # significand sum in units of 2**-m, < 2**(m+2)
    e = ex + ey - np.int32(127)  # biased exponent of the product
    carry = s >= np.uint32(2 ** (m + 1))
    mant = jnp.where(
        carry, (s - np.uint32(2 ** (m + 1))) << (sh - np.uint32(1)), (s - np.uint32(2**m)) << sh
    )
    e = e + carry.astype(jnp.int32)
    out = (jnp.clip(e, 0, 255).astype(jnp.uint32) << np.uint32(23)) | mant
    out = jnp.where(e >= 255, np.uint32(0x7F800000), out)
    out = jnp.where(e <= 0, np.uint32(0), out)
    zero = (ax == 0) | (ay == 0)
    out = jnp.where(zero, np.uint32(0), out)
    inf = (ax == np.uint32(0x7F800000)) | (ay == np.uint32(0x7F800000))
    out = jnp.where(inf, np.uint32(0x7F800000), out)
    nan = (ax > np.uint32(0x7F800000)) | (ay > np.uint32(0x7F800000)) | (inf & zero)
    out = jnp.where(nan, np.uint32(0x7FC00000), out | sign)
    return from_bits(out, F32)


def lmul_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, *, mantissa_bits: int
) -> jax.Array:
    """``dot_general`` whose products are :func:`lmul` and whose sums are float32.

    Materialises the (B, M, K, N) products in chunks of K; meant for emulation at small sizes.
    """
    dn = _norm_dims(dimension_numbers, lhs, rhs)
    l3, r3, out_shape = _to_bmkn(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), dn)

    def step(acc, lr):
        lk, rk = lr
        return acc + lmul(lk[:, :, None], rk[:, None, :], mantissa_bits), None

    acc0 = jnp.zeros((l3.shape[0], l3.shape[1], r3.shape[2]), jnp.float32)
    acc, _ = lax.scan(step, acc0, (jnp.moveaxis(l3, 2, 0), jnp.moveaxis(r3, 1, 0)))
    return acc.reshape(out_shape)


# ---- bit-serial ----------------------------------------------------------------------------------
class BitSerialResult(NamedTuple):
    """``value``: exact int32 dot products; ``cycles``: int32 cycles per output column."""

    value: jax.Array
    cycles: jax.Array


def bitserial_dot(
    a_codes: jax.Array,
    w_codes: jax.Array,
    bits: int,
    *,
    signed: bool = True,
    skip_zero_planes: bool = False,
) -> BitSerialResult:
    """Bit-serial dot product: weights enter one bit plane per cycle, LSB first.

    Args:
      a_codes: integer activations (..., K).
      w_codes: integer weights (K,) or (K, N) holding ``bits``-bit values (two's complement
        when ``signed``: the MSB plane has weight -2**(bits-1)).
      skip_zero_planes: count only cycles of bit planes with a non-zero bit in that column
        (zero-plane skipping); otherwise every output takes ``bits`` cycles.
    Returns: value (..., N) or (...) int32, exactly ``sum_k a_k * w_k``; cycles (N,) or ().
    """
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits: expected an int in 1..16, got {bits!r}")
    a = jnp.asarray(a_codes)
    w = jnp.asarray(w_codes)
    for n, v in (("a_codes", a), ("w_codes", w)):
        if not jnp.issubdtype(v.dtype, jnp.integer):
            raise TypeError(f"{n}: expected an integer dtype, got {v.dtype}")
    if w.ndim not in (1, 2):
        raise ValueError(f"w_codes: expected rank 1 or 2, got shape {w.shape}")
    if a.ndim < 1 or a.shape[-1] != w.shape[0]:
        raise ValueError(
            f"a_codes: expected last axis {w.shape[0]} (w_codes' K), got shape {a.shape}"
        )
    vec = w.ndim == 1
    w2 = w[:, None] if vec else w
    a32 = a.astype(jnp.int32)
    u = w2.astype(jnp.int32) & np.int32(2**bits - 1)
    total = jnp.zeros((*a.shape[:-1], w2.shape[1]), jnp.int32)
    cycles = jnp.zeros((w2.shape[1],), jnp.int32)
    for b in range(bits):  # one weight bit plane per cycle
        plane = (u >> np.int32(b)) & np.int32(1)
        partial_ = jnp.matmul(a32, plane, preferred_element_type=jnp.int32)
        weight = -(2**b) if (signed and b == bits - 1) else 2**b
        total = total + partial_ * np.int32(weight)
        if skip_zero_planes:
            cycles = cycles + jnp.any(plane != 0, axis=0).astype(jnp.int32)
        else:
            cycles = cycles + np.int32(1)
    if vec:
        return BitSerialResult(total[..., 0], cycles[0])
    return BitSerialResult(total, cycles)
