"""Quantized dot_general, int8 path, narrow accumulators, L-Mul and bit-serial dot products."""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jaxcore.kernels import lowp

DN = (((1,), (0,)), ((), ()))


def dot(lhs, rhs, dn, **kw):
    """lowp.dot_general under jit (formats are static)."""
    return jax.jit(lambda a, b: lowp.dot_general(a, b, dn, **kw))(lhs, rhs)


def _ab(seed=0, m=5, k=48, n=6):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    return a, b


def test_quantized_operands_match_ml_dtypes():
    a, b = _ab()
    e4 = ml_dtypes.float8_e4m3fn
    got = dot(a, b, DN, lhs_format=lowp.float8_e4m3fn, rhs_format=lowp.float8_e5m2)
    aq = a.astype(e4).astype(np.float64)
    bq = b.astype(ml_dtypes.float8_e5m2).astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), aq @ bq, rtol=1e-5, atol=1e-5)
    # batch dims and a block-format operand
    a3 = np.stack([a, -a]).astype(np.float32)[:, :, :32]
    b3 = np.stack([b, b]).astype(np.float32)[:, :32]
    dn = (((2,), (1,)), ((0,), (0,)))
    out = dot(a3, b3, dn, lhs_format=lowp.MXFP4)
    want = np.einsum(
        "bmk,bkn->bmn", np.asarray(jax.jit(lambda v: lowp.block_round(v, lowp.MXFP4))(a3)), b3
    )
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_int8_path_is_exact():
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (7, 300)).astype(np.int8)
    b = rng.integers(-128, 128, (300, 9)).astype(np.int8)
    out = dot(a, b, DN, preferred_element_type=jnp.int32)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), a.astype(np.int64) @ b.astype(np.int64))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda u, v: lowp.int8_dot_general(u, v, DN))(a, b)),
        a.astype(np.int64) @ b.astype(np.int64),
    )
    fa, fb = a.astype(np.float32) * 1.2, b.astype(np.float32) * 0.7
    q = dot(
        fa, fb, DN, lhs_format=lowp.IntFormat(8), rhs_format=lowp.IntFormat(8),
        preferred_element_type=jnp.int32,
    )  # fmt: skip
    qa = np.clip(np.round(fa), -128, 127).astype(np.int64)
    qb = np.clip(np.round(fb), -128, 127).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(q), qa @ qb)
    with pytest.raises(TypeError, match="lhs"):
        lowp.int8_dot_general(a.astype(np.int16), b, DN)


def test_narrow_accumulator_matches_sequential_reference():
    from jaxcore.kernels.lowp.reference import _to_float, round_fraction

    a, b = _ab(2, m=3, k=64, n=4)
    fmt = lowp.bfloat16
    got = dot(
        a, b, DN, lhs_format=lowp.float8_e4m3fn, rhs_format=lowp.float8_e4m3fn,
        accumulate_format=fmt,
    )  # fmt: skip
    aq = a.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    bq = b.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    acc = np.zeros((3, 4), np.float32)
    for k in range(64):  # the exact acc + a*b, rounded once onto bfloat16, step by step
        for i in range(3):
            for j in range(4):
                v = Fraction(float(acc[i, j])) + Fraction(float(aq[i, k])) * Fraction(
                    float(bq[k, j])
                )
                r = round_fraction(abs(v), v < 0, fmt, "nearest_even")
                acc[i, j] = _to_float(r, np.float32)
    np.testing.assert_array_equal(np.asarray(got), acc)
    wide = dot(a, b, DN, lhs_format=lowp.float8_e4m3fn, rhs_format=lowp.float8_e4m3fn)
    assert np.abs(np.asarray(wide) - acc).max() > 0  # the narrow accumulator is visible
    with pytest.raises(ValueError, match="dimension_numbers"):
        dot(a, b[:10], DN)


def _lmul_ref(x: float, y: float, m: int) -> float:
    l = m if m <= 3 else 3 if m == 4 else 4
    fx = Fraction(float(x))
    fy = Fraction(float(y))
    if fx == 0 or fy == 0:
        return 0.0
    sign = -1 if (fx < 0) != (fy < 0) else 1
    out = Fraction(1)
    exps = []
    mants = []
    for v in (abs(fx), abs(fy)):
        e = v.numerator.bit_length() - v.denominator.bit_length()
        if Fraction(2) ** e > v:
            e -= 1
        exps.append(e)
        mants.append(v / Fraction(2) ** e - 1)
    out = (1 + mants[0] + mants[1] + Fraction(1, 2**l)) * Fraction(2) ** (exps[0] + exps[1])
    return float(sign * out)


@pytest.mark.parametrize("m", [0, 2, 3, 4, 7])
def test_lmul_matches_formula(m):
    rng = np.random.default_rng(m)
    x = (rng.standard_normal(300) * 4).astype(np.float32)
    y = (rng.standard_normal(300) * 4).astype(np.float32)
    x[:3] = [0.0, 1.5, -2.0]
    fmt = lowp.FloatFormat(8, m, subnormals=False)
    rj = jax.jit(lambda v: lowp.round(v, fmt))
    xq, yq = np.asarray(rj(x)), np.asarray(rj(y))
    got = np.asarray(jax.jit(lambda u, v: lowp.lmul(u, v, m))(x, y))
    want = np.array([_lmul_ref(u, v, m) for u, v in zip(xq, yq)], np.float32)
    np.testing.assert_array_equal(got, want)
    sp = np.asarray(
        jax.jit(lambda u, v: lowp.lmul(u, v, m))(
            np.array([np.nan, np.inf, np.inf], np.float32), np.array([1.0, 2.0, 0.0], np.float32)
        )
    )
    assert np.isnan(sp[0]) and sp[1] == np.inf and np.isnan(sp[2])


def test_lmul_dot_general():
    a, b = _ab(3, m=4, k=8, n=3)
    got = np.asarray(jax.jit(lambda u, v: lowp.lmul_dot_general(u, v, DN, mantissa_bits=3))(a, b))
    prods = np.asarray(jax.jit(lambda u, v: lowp.lmul(u, v, 3))(a[:, :, None], b[None, :, :]))
    np.testing.assert_allclose(got, prods.sum(1), rtol=1e-6, atol=1e-6)
    exact = a.astype(np.float64) @ b
    assert np.abs(got - exact).max() < 0.2 * np.abs(exact).max()


@pytest.mark.parametrize("signed", [True, False])
def test_bitserial_dot_exact_and_cycles(signed):
    rng = np.random.default_rng(4)
    bits = 4
    lo, hi = (-8, 8) if signed else (0, 16)
    a = rng.integers(-128, 128, (3, 40)).astype(np.int8)
    w = rng.integers(lo, hi, (40, 5)).astype(np.int8)
    w[:, 2] = 0  # a zero column: every plane is zero
    r = jax.jit(lambda a, w: lowp.bitserial_dot(a, w, bits, signed=signed))(a, w)
    np.testing.assert_array_equal(np.asarray(r.value), a.astype(np.int64) @ w.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(r.cycles), [bits] * 5)
    s = jax.jit(lambda a, w: lowp.bitserial_dot(a, w, bits, signed=signed, skip_zero_planes=True))(
        a, w
    )
    assert int(s.cycles[2]) == 0 and int(s.cycles.max()) <= bits
    v = jax.jit(lambda a, w: lowp.bitserial_dot(a, w, bits, signed=signed))(a[0], w[:, 0])
    assert int(v.value) == int(a[0].astype(np.int64) @ w[:, 0]) and int(v.cycles) == bits
    with pytest.raises(ValueError, match="a_codes"):
        lowp.bitserial_dot(a[:, :10], w, bits)
    with pytest.raises(TypeError, match="w_codes"):
        lowp.bitserial_dot(a, w.astype(np.float32), bits)
