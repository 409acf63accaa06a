"""Narrow accumulators in ``lowp.dot_general``: every step is the exact ``acc + a*b`` rounded once.

The oracle accumulates step by step with :class:`fractions.Fraction` and rounds each exact sum
with the exact rounding reference (``lowp.reference.round_fraction``, the function behind
``lowp.round(..., implementation="reference")``).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxcore.kernels import lowp
from jaxcore.kernels.lowp.arith import _accumulator_limits
from jaxcore.kernels.lowp.reference import _to_float, round_fraction
from jaxcore.kernels.lowp.rounding import as_grid, random_words

DN = (((1,), (0,)), ((), ()))
MODES = lowp.MODES

ACC_FORMATS = {
    "bf16": lowp.bfloat16,
    "f16": lowp.float16,
    "e5m2": lowp.float8_e5m2,
    "e4m3_nosub": lowp.FloatFormat(4, 3, subnormals=False),
    "e3m2_sat": lowp.float6_e3m2fn,  # saturating, no inf/NaN codes
    "e5m3_fn_sat": lowp.FloatFormat(5, 3, specials="fn", overflow="saturate"),
    "fix4.6": lowp.FixedFormat(4, 6),
    "int8": lowp.IntFormat(8),
}
OPERANDS = {"fp8": lowp.float8_e4m3fn, "bf16": lowp.bfloat16, "f32": None}


def kmax(fmt) -> int:
    return _accumulator_limits(as_grid(fmt))[1]


def _neg_zero_product(a: float, b: float) -> bool:
    return math.copysign(1.0, a) * math.copysign(1.0, b) < 0


def _extended_sum(A: float, a: float, b: float) -> np.float32:
    """acc + a*b with an inf or NaN input: inf * 0 and inf - inf are NaN, else the signed inf
    (a finite product is never rounded, so it cannot overflow)."""
    if math.isnan(A) or math.isnan(a) or math.isnan(b):
        return np.float32(np.nan)
    if (math.isinf(a) and b == 0) or (math.isinf(b) and a == 0):
        return np.float32(np.nan)
    p_inf = math.isinf(a) or math.isinf(b)
    p_sign = math.copysign(1.0, a) * math.copysign(1.0, b)
    if math.isinf(A):
        if p_inf and p_sign != math.copysign(1.0, A):
            return np.float32(np.nan)
        return np.float32(A)
    return np.float32(p_sign * math.inf)


def reference_accumulate(aq, bq, fmt, mode, rand=None, sr_bits=32) -> np.ndarray:
    """acc (M, N) float32 after K exact steps; aq (M, K), bq (K, N) hold the quantized operands;
    rand (K, M, N) uint32 for stochastic rounding."""
    grid = as_grid(fmt)
    M, K = aq.shape
    N = bq.shape[1]
    acc = np.zeros((M, N), np.float32)
    for k in range(K):
        for i in range(M):
            for j in range(N):
                A, a, b = float(acc[i, j]), float(aq[i, k]), float(bq[k, j])
                r = 0 if rand is None else int(rand[k, i, j])
                if not (math.isfinite(A) and math.isfinite(a) and math.isfinite(b)):
                    s = _extended_sum(A, a, b)  # inf/NaN: extended reals, then the format
                    acc[i, j] = lowp.round(
                        np.array([s]),
                        grid,
                        mode,
                        random_bits=np.array([r], np.uint32),
                        stochastic_bits=sr_bits,
                        implementation="reference",
                    )[0]
                    continue
                v = Fraction(A) + Fraction(a) * Fraction(b)
                if v == 0:  # an exact zero is -0 only when both terms are -0
                    neg = math.copysign(1.0, A) < 0 and a * b == 0 and _neg_zero_product(a, b)
                else:
                    neg = v < 0
                acc[i, j] = _to_float(
                    round_fraction(abs(v), neg, grid, mode, r, sr_bits), np.float32
                )
    return acc


def assert_same_bits(got, want):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    g, w = got.view(np.uint32)[~nan], want.view(np.uint32)[~nan]
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (
        f"{bad.size} mismatches, e.g. got {got[~nan][bad[:4]]} want {want[~nan][bad[:4]]}"
    )


def run(a, b, fmt, mode, lhs_format=None, rhs_format=None, **kw):
    """lowp.dot_general under jit (formats, modes and the keyword arguments are closed over)."""
    f = jax.jit(
        lambda x, y: lowp.dot_general(
            x, y, DN, lhs_format=lhs_format, rhs_format=rhs_format,
            accumulate_format=fmt, accumulate_mode=mode, **kw,
        )
    )  # fmt: skip
    return f(a, b)


def _operands(seed, m, k, n, span, scale=1.0):
    """Signed values 2**e * (1 + random fraction) with e spread over ``span`` binades, a few
    exact zeros, both signs of zero, and powers of two (grid points, midpoints)."""
    rng = np.random.default_rng(seed)

    def draw(shape):
        e = rng.integers(-span, span // 2 + 1, shape)
        frac = rng.random(shape)
        frac = np.where(rng.random(shape) < 0.3, 0.0, frac)  # exact powers of two
        v = np.sign(rng.standard_normal(shape)) * np.ldexp(1.0 + frac, e) * scale
        v[rng.random(shape) < 0.06] = 0.0
        v[rng.random(shape) < 0.03] = -0.0
        return v.astype(np.float32)

    return draw((m, k)), draw((k, n))


@functools.cache
def _rounder(fmt):
    return jax.jit(lambda v: lowp.round(v, fmt))


def _quant(x, fmt):
    return x if fmt is None else np.asarray(_rounder(fmt)(x))


@pytest.mark.parametrize("acc_name", list(ACC_FORMATS))
@pytest.mark.parametrize("mode", MODES)
def test_matches_exact_reference(acc_name, mode):
    fmt = ACC_FORMATS[acc_name]
    # the operand formats cycle so that every accumulator meets fp8, bf16 and float32 operands
    names = list(OPERANDS)
    i = (list(ACC_FORMATS).index(acc_name) + MODES.index(mode)) % 3
    lf, rf = OPERANDS[names[i]], OPERANDS[names[(i + 1) % 3]]
    small = isinstance(fmt, lowp.FixedFormat | lowp.IntFormat)
    a, b = _operands(MODES.index(mode) * 31 + i, 3, 24, 4, span=10, scale=0.25 if small else 1.0)
    if not small and acc_name != "e3m2_sat":
        b[5, :2] = [3e4, -6e4]  # overflow (and saturation) of the narrow formats
    if i != 0:
        # a float32-subnormal operand at step 0 (fp8 rounds it to 0): with bf16 / f32 operands
        # every later step takes the scaled path, on ordinary values
        a[0, 0] = 2.0**-130
    aq, bq = _quant(a, lf), _quant(b, rf)
    kw, rand, k = {}, None, 32
    if mode == "stochastic":
        rand = np.random.default_rng(7).integers(0, 2**32, (24, 3, 4), dtype=np.uint32)
        kw = {"random_bits": rand}
        k = kmax(fmt)
    got = run(a, b, fmt, mode, lf, rf, **kw)
    assert_same_bits(got, reference_accumulate(aq, bq, fmt, mode, rand, k))


# ---- constructed cases where float32-add-then-round is wrong ---------------------------------
def old_semantics(aq, bq, fmt, mode):
    """The previous emulation: acc = round(fl32(acc + fl32(a*b))) step by step."""
    acc = np.zeros((aq.shape[0], bq.shape[1]), np.float32)
    for k in range(aq.shape[1]):
        s = (acc + aq[:, k : k + 1] * bq[k : k + 1, :]).astype(np.float32)
        acc = np.asarray(lowp.round(s, fmt, mode, implementation="reference"))
    return acc


ADVERSARIAL = [
    # acc = 1 (a bfloat16 grid point) plus a tiny negative product: float32 rounds the sum back
    # to 1, so a directed rounding sees an exact grid point and keeps 1.
    ("toward_zero", [1.0, 2.0**-15], [1.0, -(2.0**-15)], 1 - 2.0**-8),
    ("down", [1.0, 2.0**-15], [1.0, -(2.0**-15)], 1 - 2.0**-8),
    ("up", [-1.0, 2.0**-15], [1.0, 2.0**-15], -1 + 2.0**-8),
    ("odd", [1.0, 2.0**-15], [1.0, 2.0**-15], 1 + 2.0**-7),
    # acc = 1 plus 2**-8 + 2**-30: float32 drops the 2**-30 and lands on the bfloat16 midpoint
    # between 1 and 1 + 2**-7, which ties to even (1); the exact sum is above the midpoint.
    ("nearest_even", [1.0, 1 + 2.0**-22], [1.0, 2.0**-8], 1 + 2.0**-7),
    ("nearest_zero", [1.0, 1 + 2.0**-22], [1.0, 2.0**-8], 1 + 2.0**-7),
    # ... and just below the midpoint: float32 rounds up onto it, ties away gives 1 + 2**-7
    ("nearest_away", [1.0, 1 - 2.0**-23], [1.0, 2.0**-8], 1.0),
    # an inexact float32 product: (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24 rounds (a tie, to even)
    # to 1 + 2**-11; after -1 the float32 sum 2**-11 is a grid point and "up" keeps it
    ("up", [1.0, 1 + 2.0**-12], [-1.0, 1 + 2.0**-12], 2.0**-11 + 2.0**-18),
]


@pytest.mark.parametrize("case", range(len(ADVERSARIAL)))
def test_double_rounding_cases(case):
    mode, a, b, want = ADVERSARIAL[case]
    aq = np.array([a], np.float32)
    bq = np.array(b, np.float32)[:, None]
    fmt = lowp.bfloat16
    exact = reference_accumulate(aq, bq, fmt, mode)
    assert float(exact[0, 0]) == want
    assert float(old_semantics(aq, bq, fmt, mode)[0, 0]) != want  # the old emulation is wrong
    assert float(run(aq, bq, fmt, mode)[0, 0]) == want


def test_stochastic_residual_is_exact():
    # acc = 1, product 2**-8 - 2**-30: float32 rounds the sum up to the midpoint (fraction
    # exactly 1/2); the exact fraction is 1/2 - 2**-23, so with the 15 random bits 2**14 - 1
    # the exact rule keeps 1 while the rounded sum would round up.
    aq = np.array([[1.0, 1 - 2.0**-22]], np.float32)
    bq = np.array([[1.0], [2.0**-8]], np.float32)
    rand = np.zeros((2, 1, 1), np.uint32)
    rand[1] = (2**14 - 1) << 17
    got = run(aq, bq, lowp.bfloat16, "stochastic", random_bits=rand)
    assert kmax(lowp.bfloat16) == 15
    assert float(got[0, 0]) == 1.0
    rand[1] = (2**14 - 2) << 17
    assert float(run(aq, bq, lowp.bfloat16, "stochastic", random_bits=rand)[0, 0]) == 1 + 2.0**-7
    want = reference_accumulate(aq, bq, lowp.bfloat16, "stochastic", rand, 15)
    assert_same_bits(run(aq, bq, lowp.bfloat16, "stochastic", random_bits=rand), want)


@pytest.mark.parametrize("mode", ["nearest_even", "up", "down", "toward_zero", "stochastic"])
def test_extreme_ranges(mode):
    """bfloat16 subnormals (float32 subnormals, which XLA flushes), products far below and far
    above float32's range, and overflow to inf vs saturation at max by mode."""
    t = 2.0**-70
    a = np.array(
        [
            [t, t, -t, t, 2.0**-60],  # sums in bfloat16's subnormal range
            [1.0, 2.0**-100, 2.0**-100, -(2.0**-100), 1.0],  # products of 2**-200 against 1
            [2.0**100, 2.0**100, -(2.0**100), 1.0, 2.0**-149],  # beyond 2**128, then back
            [3.0e38, 2.0**-75, 2.0**-75, 2.0**-75, -(2.0**-75)],
        ],
        np.float32,
    )
    b = np.array([2.0**-65, 2.0**-64, 2.0**-66, 2.0**-67, 2.0**-70], np.float32)[:, None]
    b = np.concatenate(
        [b, np.array([[1.0], [2.0**-100], [2.0**100], [1.0], [2.0**-50]], np.float32)], 1
    )
    b = np.concatenate(
        [b, np.array([[2.0**100], [2.0**100], [2.0**28], [-1.0], [1.0]], np.float32)], 1
    )
    rand, kw, k = None, {}, 32
    if mode == "stochastic":
        rand = np.random.default_rng(3).integers(0, 2**32, (5, 4, 3), dtype=np.uint32)
        kw, k = {"random_bits": rand}, 15
    for fmt in (
        lowp.bfloat16,
        lowp.FloatFormat(8, 7, bias=128, specials="fn", overflow="saturate"),
    ):
        got = run(a, b, fmt, mode, **kw)
        assert_same_bits(got, reference_accumulate(a, b, fmt, mode, rand, k))
    if mode != "stochastic":
        assert np.any(np.asarray(got) != 0) and np.any(np.abs(np.asarray(got)) < 2.0**-126)


def test_special_values_propagate():
    a = np.array([[np.inf, 1.0, 2.0], [np.nan, 1.0, 1.0], [0.0, 1.0, -1.0]], np.float32)
    b = np.array([[1.0, 0.0], [-np.inf, 2.0], [1.0, -0.0]], np.float32)
    for fmt in (lowp.bfloat16, lowp.float6_e3m2fn, lowp.IntFormat(8), lowp.float8_e4m3fn):
        for mode in ("nearest_even", "toward_zero"):
            assert_same_bits(run(a, b, fmt, mode), reference_accumulate(a, b, fmt, mode))
    # signed zeros: 1 + (-1) is +0 even rounding down; -tiny rounds toward zero to -0, and
    # -0 + (-0) stays -0 while -0 + (+0) is +0
    one = np.array([[1.0, 1.0]], np.float32)
    z = run(one, np.array([[1.0], [-1.0]], np.float32), lowp.bfloat16, "down")
    assert float(z[0, 0]) == 0 and not np.signbit(np.asarray(z)[0, 0])
    for of in (None, lowp.float8_e4m3fn):  # K = 1: +0 + (-0) is +0 (XLA must not fold it)
        z = np.asarray(run(np.array([[-0.0]], np.float32), one[:, :1].T, lowp.bfloat16,
                           "nearest_even", of, of))  # fmt: skip
        assert z[0, 0] == 0 and not np.signbit(z[0, 0])
    tiny = np.array([[-(2.0**-70), -0.0]], np.float32)
    for last, neg in ((1.0, True), (-1.0, False)):
        z = np.asarray(
            run(tiny, np.array([[2.0**-70], [last]], np.float32), lowp.bfloat16, "toward_zero")
        )
        assert z[0, 0] == 0 and np.signbit(z[0, 0]) == neg


# ---- stochastic accumulation -------------------------------------------------------------------
def test_stochastic_key_is_unbiased_and_reproducible():
    rng = np.random.default_rng(11)
    K, n = 8, 4096
    # products are multiples of 2**-16 and sums stay in [1, 2.75): the 15-bit residual is exact, so
    # the expected result is exactly the float64 sum
    bcol = (rng.integers(2**13, 2**14, (K, 1)) * 2.0**-16).astype(np.float32)
    a = np.ones((n, K), np.float32)
    bcol[0] = 1.0
    exact = float(bcol.astype(np.float64).sum())
    key = jax.random.key(5)
    f = jax.jit(
        lambda x, y, k: lowp.dot_general(
            x, y, DN, accumulate_format=lowp.bfloat16, accumulate_mode="stochastic", key=k
        )
    )
    out = np.asarray(f(a, bcol, key), np.float64)[:, 0]
    assert len(np.unique(out)) > 1  # it is random
    # per step the variance is <= q**2/4 with q <= 2**-6 here, so sd(mean) <= sqrt(K/n)*2**-7
    bound = 6 * math.sqrt(K / n) * 2.0**-7
    assert abs(out.mean() - exact) < bound
    for det in ("toward_zero", "up"):  # the test can fail: directed rounding is biased
        d = float(run(a[:1], bcol, lowp.bfloat16, det)[0, 0])
        assert abs(d - exact) > 2 * bound
    np.testing.assert_array_equal(np.asarray(f(a, bcol, key))[:, 0], out)  # same key
    assert not np.array_equal(np.asarray(f(a, bcol, jax.random.key(6)))[:, 0], out)
    # the key's words are random_words((K, *out_shape), key): the global element index
    rb = random_words((K, n, 1), key, None)
    assert_same_bits(
        run(a, bcol, lowp.bfloat16, "stochastic", random_bits=rb), out.astype(np.float32)[:, None]
    )


def test_stochastic_sharding_and_vmap_invariant():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal((16, 4)).astype(np.float32)
    key = jax.random.key(0)

    def f(x, y):
        return lowp.dot_general(
            x, y, DN, lhs_format=lowp.float8_e4m3fn, rhs_format=lowp.float8_e4m3fn,
            accumulate_format=lowp.float16, accumulate_mode="stochastic", key=key,
        )  # fmt: skip

    want = np.asarray(jax.jit(f)(a, b))
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    sa = jax.device_put(a, NamedSharding(mesh, PartitionSpec("d", None)))
    sb = jax.device_put(b, NamedSharding(mesh, PartitionSpec(None, None)))
    assert_same_bits(jax.jit(f)(sa, sb), want)
    batched = jax.jit(jax.vmap(f, in_axes=(0, None)))(np.stack([a, a[::-1]]), b)
    assert_same_bits(batched[0], want)
    assert_same_bits(batched[1], jax.jit(f)(a[::-1], b))


def test_argument_errors():
    a = np.ones((2, 3), np.float32)
    b = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="key"):
        run(a, b, lowp.bfloat16, "stochastic")
    with pytest.raises(ValueError, match="stochastic_bits"):
        run(a, b, lowp.bfloat16, "stochastic", key=jax.random.key(0), stochastic_bits=16)
    with pytest.raises(ValueError, match="random_bits"):
        run(a, b, lowp.bfloat16, "stochastic", random_bits=np.zeros((2, 2, 2), np.uint32))
    with pytest.raises(TypeError, match="random_bits"):
        run(a, b, lowp.bfloat16, "stochastic", random_bits=np.zeros((3, 2, 2), np.int32))
    for bad in (lowp.FloatFormat(8, 23), lowp.IntFormat(32), lowp.float8_e8m0fnu):
        with pytest.raises(ValueError, match="accumulate_format"):
            run(a, b, bad, "nearest_even")
    # fewer random bits than the maximum: the residual is truncated as lowp.round does
    rand = np.random.default_rng(0).integers(0, 2**32, (3, 2, 2), dtype=np.uint32)
    aq = np.full((2, 3), 1 + 2.0**-20, np.float32)
    got = run(aq, aq.T.copy(), lowp.bfloat16, "stochastic", random_bits=rand, stochastic_bits=3)
    assert_same_bits(got, reference_accumulate(aq, aq.T, lowp.bfloat16, "stochastic", rand, 3))


@pytest.mark.parametrize("mode", ["nearest_even", "toward_zero", "odd", "stochastic"])
def test_wide_integer_operands(mode):
    """IntFormat(16) x IntFormat(16): products have 30 significand bits, so the fast path needs
    TwoProduct; the accumulators are bfloat16 and a 22-bit FixedFormat."""
    rng = np.random.default_rng(9)
    a = rng.integers(-(2**15), 2**15, (3, 12)).astype(np.float32)
    b = rng.integers(-(2**15), 2**15, (12, 4)).astype(np.float32)
    a[0, :4] = [2**15 - 1, 1, -1, 3]
    b[:4, 0] = [2**15 - 1, -1, 2**14 + 1, 5]
    i16 = lowp.IntFormat(16)
    for fmt in (lowp.bfloat16, lowp.FixedFormat(21, 1)):
        kw, rand, k = {}, None, 32
        if mode == "stochastic":
            rand = np.random.default_rng(1).integers(0, 2**32, (12, 3, 4), dtype=np.uint32)
            kw, k = {"random_bits": rand}, kmax(fmt)
        got = run(a, b, fmt, mode, i16, i16, **kw)
        assert_same_bits(got, reference_accumulate(a, b, fmt, mode, rand, k))


def test_batch_dims_and_zero_k():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 3, 5)).astype(np.float32)
    b = rng.standard_normal((2, 5, 4)).astype(np.float32)
    dn = (((2,), (1,)), ((0,), (0,)))
    got = jax.jit(
        lambda x, y: lowp.dot_general(
            x, y, dn, accumulate_format=lowp.float16, accumulate_mode="up"
        )
    )(a, b)
    for i in range(2):
        assert_same_bits(got[i], reference_accumulate(a[i], b[i], lowp.float16, "up"))
    # vmap over examples that take different paths (the second has a float32-subnormal operand)
    a2 = np.stack([a[0], a[1]])
    a2[1, 0, 0] = 2.0**-140
    f = jax.vmap(
        lambda x, y: lowp.dot_general(
            x, y, DN, accumulate_format=lowp.bfloat16, accumulate_mode="up"
        )
    )
    got = jax.jit(f)(a2, b)
    for i in range(2):
        assert_same_bits(got[i], reference_accumulate(a2[i], b[i], lowp.bfloat16, "up"))
    empty = run(np.ones((2, 0), np.float32), np.ones((0, 3), np.float32), lowp.float16, "up")
    assert empty.shape == (2, 3) and not np.any(np.asarray(empty))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 3),
    k=st.integers(1, 9),
    n=st.integers(1, 3),
    acc=st.sampled_from(list(ACC_FORMATS)),
    mode=st.sampled_from(MODES),
    ops=st.sampled_from(list(OPERANDS)),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(m, k, n, acc, mode, ops, seed):
    fmt = ACC_FORMATS[acc]
    small = isinstance(fmt, lowp.FixedFormat | lowp.IntFormat)
    a, b = _operands(seed, m, k, n, span=8, scale=0.25 if small else 1.0)
    of = OPERANDS[ops]
    kw, rand, bits = {}, None, 32
    if mode == "stochastic":
        rand = np.random.default_rng(seed).integers(0, 2**32, (k, m, n), dtype=np.uint32)
        kw, bits = {"random_bits": rand}, kmax(fmt)
    got = run(a, b, fmt, mode, of, of, **kw)
    assert_same_bits(got, reference_accumulate(_quant(a, of), _quant(b, of), fmt, mode, rand, bits))
