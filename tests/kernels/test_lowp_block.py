"""Block formats (MX, NVFP4, BFP), quantize_int and BitMoD against independent numpy /
ml_dtypes references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels import lowp

_br = jax.jit(lowp.block_round, static_argnames=("fmt", "mode"))
_bq = jax.jit(lowp.block_quantize, static_argnames=("fmt", "mode"))
_bd = jax.jit(lowp.block_dequantize, static_argnames=("fmt",))
_qi = jax.jit(
    lowp.quantize_int, static_argnames=("fmt", "axis", "granularity", "group_size", "symmetric")
)


def _same(g, w):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    return (g.view(np.uint32) == w.view(np.uint32)) | (np.isnan(g) & np.isnan(w))


def mx_reference(x: np.ndarray, bf: lowp.BlockFormat) -> np.ndarray:
    """OCP MX v1.0 from ml_dtypes casts: shared_exp = floor(log2 amax) - emax_elem, clamp to
    E8M0, elements = saturate(x / 2**shared_exp) cast with round-to-nearest-even."""
    xb = np.moveaxis(x, bf.axis, -1)
    shp = xb.shape
    xb = xb.reshape(-1, bf.block_size).astype(np.float64)
    amax = np.max(np.abs(xb), axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        _, ex = np.frexp(amax)
    se = np.clip(ex - 1 - bf.emax_elem, -127, 127)
    se = np.where(amax == 0, -127, se)
    scale = np.ldexp(1.0, se)
    e = xb / scale
    el = bf.element
    if isinstance(el, lowp.FloatFormat):
        m = el.max
        q = np.clip(e, -m, m).astype(lowp.ml_dtype(el)).astype(np.float64)
    else:
        f, m = el.fraction_bits, el.max
        q = np.clip(np.round(e * 2.0**f) / 2.0**f, -m, m) + 0.0  # two's complement: no -0
    y = np.where(np.isfinite(amax), q * scale, np.nan).astype(np.float32)
    return np.moveaxis(y.reshape(shp), -1, bf.axis)


def _data(seed=0, shape=(16, 128)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, (shape[0], 1)))
    x = x.astype(np.float32)
    x[0, :32] = 0
    x[1, 3] = np.inf
    x[2, 5] = np.nan
    x[3] *= np.float32(2.0**-100)  # blocks with float32-subnormal scaled elements
    x[4] = x[4] / np.abs(x[4]).max() * np.float32(3e38)
    x[5, 7] = 1e-42
    x[6, 32:64] = -np.abs(x[6, 32:64])
    return x


MX = [
    lowp.MXFP8_E4M3,
    lowp.MXFP8_E5M2,
    lowp.MXFP6_E3M2,
    lowp.MXFP6_E2M3,
    lowp.MXFP4,
    lowp.MXINT8,
    lowp.BFP(4, 16),
]


@pytest.mark.parametrize("bf", MX, ids=str)
def test_mx_matches_ml_dtypes_reference(bf):
    x = _data()
    y = np.asarray(_br(x, bf))
    assert _same(y, mx_reference(x, bf)).all()
    q = _bq(x, bf)
    assert q.codes.shape == x.shape and q.scales.shape == (16, 128 // bf.block_size)
    assert q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.uint8
    assert _same(_bd(q, bf), y).all()
    if isinstance(bf.element, lowp.FloatFormat):  # element codes are ml_dtypes codes
        se = np.asarray(q.scales, np.int32) - 127
        finite = np.isfinite(y)
        e = (y / np.repeat(np.exp2(se.astype(np.float64)), bf.block_size, 1))[finite]
        dt = lowp.ml_dtype(bf.element)
        want = e.astype(dt).view(np.uint8)
        np.testing.assert_array_equal(np.asarray(q.codes)[finite], want)


def test_mx_axis_and_errors():
    bf = lowp.BlockFormat(lowp.float8_e4m3fn, 8, axis=0)
    x = _data(1, (32, 8))
    x = x[np.isfinite(x).all(1)]
    x = x[:16]
    y = _br(jnp.asarray(x), bf)
    assert _same(y, mx_reference(x, bf)).all()
    with pytest.raises(ValueError, match="block_size"):
        lowp.block_round(jnp.ones((4, 30)), lowp.MXFP4)
    with pytest.raises(ValueError, match="block_size"):
        lowp.BlockFormat(lowp.float4_e2m1fn, 0)
    with pytest.raises(ValueError, match="fmt"):
        lowp.block_round(jnp.ones((4, 32)), lowp.float4_e2m1fn)
    with pytest.raises(ValueError, match="mantissa_bits"):
        lowp.BFP(0, 16)


def test_mx_special_blocks():
    x = np.zeros((2, 32), np.float32)
    x[1, 0] = np.nan
    q = _bq(x, lowp.MXFP4)
    assert int(q.scales[0, 0]) == 0 and int(q.scales[1, 0]) == 0xFF
    y = np.asarray(_bd(q, lowp.MXFP4))
    assert (y[0] == 0).all() and np.isnan(y[1]).all()


def nvfp4_reference(x: np.ndarray) -> np.ndarray:
    """NVFP4 from ml_dtypes: tensor scale amax/(6*448), E4M3 block scales, E2M1 elements."""
    x = x.astype(np.float32)
    ts = np.float32(np.abs(x).max()) / (np.float32(6.0) * np.float32(448.0))
    ts = ts if ts > 0 else np.float32(1.0)
    xb = x.reshape(-1, 16)
    amax = np.abs(xb).max(1, keepdims=True)
    s = (amax / np.float32(6.0) / ts).astype(lowp.ml_dtype(lowp.float8_e4m3fn)).astype(np.float32)
    d = s * ts
    e = np.clip(xb / np.where(d > 0, d, 1), -6, 6)
    e = e.astype(lowp.ml_dtype(lowp.float4_e2m1fn)).astype(np.float32)
    return np.where(d > 0, e * d, 0).astype(np.float32).reshape(x.shape)


def test_nvfp4_matches_reference():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 64)) * np.exp2(rng.integers(-3, 3, (8, 1)))).astype(np.float32)
    x[0, :16] = 0
    y = np.asarray(_br(x, lowp.NVFP4))
    assert _same(y, nvfp4_reference(x)).all()
    q = _bq(x, lowp.NVFP4)
    assert q.tensor_scale is not None and q.scales.shape == (8, 4)
    assert _same(_bd(q, lowp.NVFP4), y).all()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_int_matches_numpy(granularity, symmetric):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 32)) + 0.5).astype(np.float32)
    x[2] = 0
    fmt = lowp.IntFormat(8)
    q = _qi(
        x, fmt, axis=0 if granularity == "channel" else -1, granularity=granularity,
        group_size=8 if granularity == "group" else None, symmetric=symmetric,
    )  # fmt: skip
    if granularity == "group":
        xg = x.reshape(6, 4, 8)
        red = (2,)
    elif granularity == "channel":
        xg, red = x, (1,)
    else:
        xg, red = x, (0, 1)
    if symmetric:
        scale = np.abs(xg).max(red, keepdims=True) / np.float32(127)
        scale = np.where(scale > 0, scale, np.float32(1))
        zp = 0
    else:
        hi = np.maximum(xg.max(red, keepdims=True), 0)
        lo = np.minimum(xg.min(red, keepdims=True), 0)
        scale = (hi - lo) / np.float32(255)
        scale = np.where(scale > 0, scale, np.float32(1))
    # XLA may divide by a constant as a multiply by its reciprocal: scales agree to 1 ulp, and
    # the codes are checked exactly against the returned scales.
    np.testing.assert_allclose(np.asarray(q.scale), scale.astype(np.float32), rtol=2e-7)
    scale = np.asarray(q.scale)
    if not symmetric:
        zp = np.clip(np.round(np.float32(-128) - lo / scale), -128, 127)
    want = np.clip(np.round(xg / scale + np.float32(zp)), -128, 127)
    np.testing.assert_array_equal(np.asarray(q.codes), want.reshape(x.shape).astype(np.int8))
    np.testing.assert_array_equal(np.asarray(q.zero_point), np.broadcast_to(zp, scale.shape))
    deq = lowp.dequantize_int(q, 8 if granularity == "group" else None)
    assert np.abs(np.asarray(deq) - x).max() <= np.asarray(q.scale).max() * 0.5 + 1e-6


def bitmod_reference(w: np.ndarray, bits: int, g: int, rule: str = "absmax"):
    tabs = lowp.bitmod_tables(bits).astype(np.float64)
    out = np.zeros_like(w, dtype=np.float64)
    variants = []
    for r in range(w.shape[0]):
        row_v = []
        for j in range(0, w.shape[1], g):
            grp = w[r, j : j + g].astype(np.float64)
            best = None
            for v, t in enumerate(tabs):
                if rule == "absmax":  # the authors' code: absmax / max |table|
                    s = np.abs(grp).max() / np.abs(t).max()
                else:
                    s = max(max(grp.max(), 0) / t.max(), max(-grp.min(), 0) / -t.min())
                s = s if s > 0 else 1.0
                st = np.sort(t)
                idx = np.argmin(np.abs(grp[:, None] / s - st[None, :]), axis=1)
                dq = st[idx] * s
                err = ((grp - dq) ** 2).sum()
                if best is None or err < best[0]:
                    best = (err, v, dq)
            out[r, j : j + g] = best[2]
            row_v.append(best[1])
        variants.append(row_v)
    return out, np.array(variants)


def test_bitmod_tables_are_the_papers():
    """The value sets of the authors' released code (BitMoD-HPCA-25 quant_weight.py: FP3_ER_POS,
    FP3_ER_NEG, FP3_EA_POS, FP3_EA_NEG and the FP4 ones, whose values are 2x ours), in their
    search order."""
    fp3 = [0, 1, 2, 4, -1, -2, -4]
    want3 = [fp3 + [3], fp3 + [-3], fp3 + [6], fp3 + [-6]]
    fp4 = [0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12]
    want4 = [fp4 + [10], fp4 + [-10], fp4 + [16], fp4 + [-16]]
    for bits, want, unit in ((3, want3, 1.0), (4, want4, 0.5)):
        tabs = lowp.bitmod_tables(bits)
        assert tabs.shape == (4, 2**bits)
        for row, w in zip(tabs, want, strict=True):
            assert sorted(row.tolist()) == sorted(v * unit for v in w)


@pytest.mark.parametrize("bits,rule", [(3, "absmax"), (4, "absmax"), (4, "fit")])
def test_bitmod_matches_reference(bits, rule):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    w[1, :128] = np.abs(w[1, :128])  # a one-sided group favours an asymmetric variant
    w[2, :128] = -np.abs(w[2, :128])
    r = jax.jit(lambda v: lowp.bitmod_quantize(v, bits, 128, scale=rule))(w)
    want, var = bitmod_reference(w, bits, 128, rule)
    np.testing.assert_array_equal(np.asarray(r.variant), var)
    np.testing.assert_allclose(np.asarray(r.values), want, rtol=1e-6, atol=1e-7)
    tabs = lowp.bitmod_tables(bits)
    # codes index the chosen variant's table: value = table[variant][code] * scale
    v = np.repeat(np.asarray(r.variant), 128, axis=1)
    s = np.repeat(np.asarray(r.scale), 128, axis=1)
    np.testing.assert_allclose(tabs[v, np.asarray(r.codes)] * s, np.asarray(r.values), rtol=1e-6)
    assert int(np.asarray(r.codes).max()) < 2**bits
    with pytest.raises(ValueError, match="scale"):
        lowp.bitmod_quantize(w, bits, scale="minmax")
    with pytest.raises(ValueError, match="bits"):
        lowp.bitmod_quantize(w, 5)
    with pytest.raises(ValueError, match="w"):
        lowp.bitmod_quantize(w[:, :100], 4, 128)


def test_bitmod_scale_rules_differ_where_the_far_end_saturates():
    # One group, max |w| on the negative side: in the +8 (EA+) variant, "absmax" maps -8 onto
    # the table's -8 slot that does not exist (nearest -6: saturates); "fit" scales by 8/6.
    w = np.array([[-8.0, 8.0 * 5 / 6, 1.0, 0.5]], np.float32)
    a = lowp.bitmod_quantize(w, 4, 4, scale="absmax", special_values=(8.0,))
    f = lowp.bitmod_quantize(w, 4, 4, scale="fit", special_values=(8.0,))
    np.testing.assert_allclose(np.asarray(a.scale), [[1.0]])
    np.testing.assert_allclose(np.asarray(a.values)[0, 0], -6.0)  # saturated
    np.testing.assert_allclose(np.asarray(f.scale), [[8.0 / 6.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f.values)[0, 0], -8.0, rtol=1e-6)


def test_block_rank3_and_quantize_int_errors():
    x = np.random.default_rng(3).standard_normal((2, 8, 64)).astype(np.float32)
    bf = lowp.BlockFormat(lowp.float8_e5m2, 4, axis=1)
    y = _br(x, bf)
    want = np.stack([mx_reference(x[i], lowp.BlockFormat(lowp.float8_e5m2, 4, axis=0))
                     for i in range(2)])  # fmt: skip
    assert _same(y, want).all()
    with pytest.raises(ValueError, match="granularity"):
        lowp.quantize_int(x, lowp.IntFormat(8), granularity="row")
    with pytest.raises(ValueError, match="group_size"):
        lowp.quantize_int(x, lowp.IntFormat(8), granularity="group", group_size=7)
    with pytest.raises(ValueError, match="fmt"):
        lowp.quantize_int(x, lowp.float8_e4m3fn)
