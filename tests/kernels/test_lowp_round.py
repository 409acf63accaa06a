"""lowp.round: bit-exact against ml_dtypes and an exact Fraction reference; stochastic rounding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from jaxcore.kernels import lowp


def _same(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Bitwise equal, NaN == NaN."""
    g, w = np.asarray(got), np.asarray(want)
    u = np.uint32 if g.dtype == np.float32 else np.uint64
    return (g.view(u) == w.view(u)) | (np.isnan(g) & np.isnan(w))


def _sweep(dt) -> np.ndarray:
    """Every 4096th float32 pattern (+1), specials, every value of dt, every midpoint +-1 ulp."""
    pats = (np.arange(2**20, dtype=np.uint64) * 4096).astype(np.uint32)
    specials = np.array(
        [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 1, 0x80000001,
         0x7F7FFFFF, 0x807FFFFF, 0x00800000, 0x007FFFFF],
        np.uint32,
    )  # fmt: skip
    nbits = np.dtype(dt).itemsize * 8
    codes = np.arange(2 ** min(nbits, 16), dtype=np.uint16 if nbits == 16 else np.uint8)
    with np.errstate(all="ignore"):
        vals = codes.view(dt).astype(np.float32)
    vals = np.unique(vals[np.isfinite(vals)])
    mids = ((vals[1:].astype(np.float64) + vals[:-1]) / 2).astype(np.float32)
    vb = np.concatenate([vals, mids, -vals, -mids]).view(np.uint32)
    return np.concatenate([pats, pats + 1, specials, vb, vb + 1, vb - 1]).view(np.float32)


_round_jit = jax.jit(lowp.round, static_argnames=("fmt", "mode", "stochastic_bits"))


def R(x, fmt, mode="nearest_even", **kw):  # noqa: N802 - jitted lowp.round, cached per format
    return _round_jit(jnp.asarray(x), fmt=fmt, mode=mode, **kw)


@pytest.mark.parametrize("name", sorted(lowp.PRESETS))
def test_matches_ml_dtypes_bit_for_bit(name):
    fmt = lowp.PRESETS[name]
    dt = lowp.ml_dtype(fmt)
    assert lowp.format_of(dt) == fmt
    x = _sweep(dt)
    with np.errstate(all="ignore"):
        want = x.astype(dt).astype(np.float32)  # numpy/ml_dtypes, never jax astype (float6)
    got = np.asarray(_round_jit(jnp.asarray(x), fmt=fmt))
    fi = ml_dtypes.finfo(dt)
    assert fmt.max == float(fi.max) and fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    nan_in = np.isnan(x)
    # NaN stays NaN for every format (ml_dtypes maps NaN to -0/+0 in float6/float4: we do not).
    assert np.isnan(got[nan_in]).all()
    ok = _same(got, want) | nan_in
    if name == "float8_e8m0fnu":
        # ml_dtypes rounds float32 subnormals in (2**-127, 2**-126) up to 2**-126; the exactly
        # rounded result (checked against the Fraction reference) is 2**-127 below 1.5*2**-127.
        a = x.view(np.uint32)
        quirk = (a > 0x400000) & (a < 0x800000)
        assert (~ok <= quirk).all()
        sample = x[quirk][:: max(1, quirk.sum() // 64)]
        ref = lowp.round_reference(sample, fmt)
        assert _same(np.asarray(R(jnp.asarray(sample), fmt)), ref).all()
        ok = ok | quirk
    bad = np.nonzero(~ok)[0][:5]
    assert ok.all(), [(x[i], got[i], want[i]) for i in bad]


FORMATS = [
    lowp.float8_e4m3fn,
    lowp.float8_e5m2fnuz,
    lowp.float6_e2m3fn,
    lowp.float4_e2m1fn,
    lowp.float8_e8m0fnu,
    lowp.bfloat16,
    lowp.FloatFormat(3, 2),
    lowp.FloatFormat(5, 4),
    lowp.FloatFormat(4, 3, subnormals=False),
    lowp.FloatFormat(9, 10),
    lowp.FloatFormat(11, 23),
    lowp.FloatFormat(2, 0, specials="none"),
    lowp.FloatFormat(5, 2, signed=False),  # a huge negative is NaN, not -inf
    lowp.IntFormat(8),
    lowp.IntFormat(4, signed=False),
    lowp.FixedFormat(3, 4),
    lowp.FixedFormat(-3, 10, narrow=True),
    lowp.IntFormat(32),
]


def _sample(n: int = 160, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pats = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    small = (rng.standard_normal(n) * np.exp2(rng.integers(-24, 24, n))).astype(np.float32)
    ties = (rng.integers(-64, 64, n) / 8.0 + 1 / 16).astype(np.float32)  # midpoints of small grids
    sp = np.array([0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3e38, 448, 464, 465, -2.5],
                  np.float32)  # fmt: skip
    return np.concatenate([pats, small, ties, sp])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_all_modes_match_exact_reference(fmt):
    x = _sample()
    key = jax.random.key(3)

    @jax.jit
    def all_modes(v):
        return [lowp.round(v, fmt, m, key=key if m == "stochastic" else None) for m in lowp.MODES]

    grid = fmt.fixed if isinstance(fmt, lowp.IntFormat) else fmt
    for mode, got in zip(lowp.MODES, all_modes(x)):
        kw = {"key": key} if mode == "stochastic" else {}
        want = lowp.round_reference(x, grid, mode, **kw)
        got = np.asarray(got)
        bad = np.nonzero(~_same(got, want))[0][:4]
        assert not len(bad), (mode, [(x[i], got[i], want[i]) for i in bad])


def test_directed_modes_bracket_and_order():
    x = _sample(seed=5)
    x = x[np.isfinite(x) & (np.abs(x) < 200)]
    f = lowp.FloatFormat(4, 3, specials="fn")
    lo = np.asarray(R(x, f, "down"))
    hi = np.asarray(R(x, f, "up"))
    tz = np.asarray(R(x, f, "toward_zero"))
    assert (lo <= x).all() and (hi >= x).all()
    assert (np.abs(tz) <= np.abs(x)).all()
    for m in ("nearest_even", "nearest_away", "nearest_zero", "odd"):
        r = np.asarray(R(x, f, m))
        assert ((r == lo) | (r == hi)).all(), m


def test_float64_input_matches_reference(x64):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(200) * np.exp2(rng.integers(-60, 60, 200))).astype(np.float64)
    for fmt in (lowp.FloatFormat(11, 40), lowp.float8_e4m3fn, lowp.FixedFormat(40, 12)):
        for mode in ("nearest_even", "odd", "down"):
            got = np.asarray(R(jnp.asarray(x), fmt, mode))
            assert got.dtype == np.float64
            want = lowp.round_reference(x, fmt, mode)
            assert _same(got, want).all(), (fmt, mode)


def test_narrow_input_dtypes():
    x = jnp.asarray(_sample(seed=2)).astype(jnp.bfloat16)
    y = R(x, lowp.float8_e4m3fn)
    assert y.dtype == jnp.bfloat16
    want = np.asarray(x.astype(jnp.float32)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert _same(np.asarray(y.astype(jnp.float32)), want).all()
    h = R(jnp.asarray([1.0, 3.3, -60000.0], jnp.float16), lowp.float8_e5m2)
    assert h.dtype == jnp.float16
    with pytest.raises(ValueError, match="fmt"):
        R(jnp.ones(3, jnp.bfloat16), lowp.float16)  # 10 mantissa bits > bf16's 7


def test_jit_vmap_and_sharding_invariance():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    f = lowp.float8_e5m2
    a = jax.vmap(lambda r: R(r, f, "odd"))(x)
    assert _same(np.asarray(a), np.asarray(R(x, f, "odd"))).all()
    key = jax.random.key(7)
    sr = jax.jit(lambda v: R(v, f, "stochastic", key=key))
    mesh = jax.make_mesh((8,), ("d",))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("d", None)))
    ys = sr(xs)
    assert len(ys.sharding.device_set) == 8
    assert _same(np.asarray(ys), np.asarray(sr(x))).all()
    xs2 = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "d")))
    assert _same(np.asarray(sr(xs2)), np.asarray(sr(x))).all()


def _sr_mean(x0: float, fmt, n: int, bits=None, seed=0) -> tuple[float, float, float, float]:
    x = jnp.full((n,), x0, jnp.float32)
    y = np.asarray(
        R(x, fmt, "stochastic", key=jax.random.key(seed), stochastic_bits=bits),
        np.float64,
    )
    lo = float(R(jnp.float32(x0), fmt, "down"))
    hi = float(R(jnp.float32(x0), fmt, "up"))
    assert set(np.unique(y)) <= {lo, hi}
    return float(y.mean()), lo, hi, float(x0)


@pytest.mark.parametrize(
    "x0,fmt",
    [(1.0 + 0.3 / 8, lowp.float8_e4m3fn), (-3.1e-3, lowp.float8_e5m2), (0.7, lowp.bfloat16),
     (2.3, lowp.IntFormat(8)), (1e-3, lowp.float4_e2m1fn)],
    ids=str,
)  # fmt: skip
def test_stochastic_rounding_is_unbiased(x0, fmt):
    n = 1 << 17
    x0 = float(np.float32(x0))
    mean, lo, hi, x = _sr_mean(x0, fmt, n)
    p = (x - lo) / (hi - lo)
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / n)
    # 6 sigma: a false failure has probability ~2e-9.
    assert abs(mean - x) <= 6 * sigma + 1e-300
    # and the bound is tight enough that a deterministic rounding would fail it
    for mode in ("nearest_even", "toward_zero", "up"):
        r = float(R(jnp.float32(x0), fmt, mode))
        assert abs(r - x) > 6 * sigma


def test_stochastic_bits_truncate_probability():
    # with 2 random bits the up-probability is floor(4 * frac) / 4
    n = 1 << 16
    x0 = float(np.float32(1.0 + 0.7 / 8))  # frac = 0.7 of an e4m3 ulp (1/8)
    mean, lo, hi, x = _sr_mean(x0, lowp.float8_e4m3fn, n, bits=2)
    p = 0.5
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(mean - (lo + p * (hi - lo))) <= 6 * sigma
    assert abs(x - (lo + p * (hi - lo))) > 6 * sigma


def test_stochastic_reproducible_and_random_bits():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(4096).astype(np.float32))
    f = lowp.float8_e4m3fn
    a = R(x, f, "stochastic", key=jax.random.key(1))
    b = R(x, f, "stochastic", key=jax.random.key(1))
    c = R(x, f, "stochastic", key=jax.random.key(2))
    assert _same(np.asarray(a), np.asarray(b)).all()
    assert not _same(np.asarray(a), np.asarray(c)).all()
    raw = jax.random.key_data(jax.random.key(1))
    assert _same(np.asarray(R(x, f, "stochastic", key=raw)), np.asarray(a)).all()
    zeros = jnp.zeros(x.shape, jnp.uint32)  # random word 0: away from zero iff inexact
    away = np.where(np.asarray(x) > 0, np.asarray(R(x, f, "up")), np.asarray(R(x, f, "down")))
    assert _same(np.asarray(R(x, f, "stochastic", random_bits=zeros)), away).all()


def test_bad_inputs():
    x = jnp.ones(4, jnp.float32)
    with pytest.raises(ValueError, match="exponent_bits"):
        lowp.FloatFormat(0, 3, subnormals=False)
    with pytest.raises(ValueError, match="exponent_bits"):
        lowp.FloatFormat(12, 3)
    with pytest.raises(ValueError, match="mantissa_bits"):
        lowp.round(x, lowp.FloatFormat(8, 30))
    with pytest.raises(ValueError, match="specials"):
        lowp.FloatFormat(4, 3, specials="weird")
    with pytest.raises(ValueError, match="overflow"):
        lowp.FloatFormat(4, 3, specials="fn", overflow="inf")
    with pytest.raises(ValueError, match="bits"):
        lowp.IntFormat(1)
    with pytest.raises(ValueError, match="mode"):
        lowp.round(x, lowp.bfloat16, "nearest")
    with pytest.raises(ValueError, match="key"):
        lowp.round(x, lowp.bfloat16, "stochastic")
    with pytest.raises(ValueError, match="stochastic_bits"):
        lowp.round(x, lowp.bfloat16, "stochastic", key=jax.random.key(0), stochastic_bits=0)
    with pytest.raises(ValueError, match="random_bits"):
        lowp.round(x, lowp.bfloat16, "stochastic", random_bits=jnp.zeros(3, jnp.uint32))
    with pytest.raises(TypeError, match="x"):
        lowp.round(jnp.ones(4, jnp.int32), lowp.bfloat16)
    with pytest.raises(ValueError, match="fmt"):
        lowp.round(x, "not a format")
    with pytest.raises(ValueError, match="dtype"):
        lowp.format_of(np.int8)
    with pytest.raises(ValueError, match="implementation"):
        lowp.round(x, lowp.bfloat16, implementation="pallas_gpu")


def test_format_properties_and_hashable():
    f = lowp.FloatFormat(4, 3, specials="fn")
    assert f == lowp.float8_e4m3fn and hash(f) == hash(lowp.float8_e4m3fn)
    assert f.max == 448.0 and f.bits == 8
    assert lowp.float8_e4m3.max == 240.0  # IEEE-like e4m3 (pychop's "fp8-e4m3")
    assert lowp.IntFormat(8).min == -128 and lowp.IntFormat(8, narrow=True).min == -127
    assert lowp.FixedFormat(3, 4).max == 8 - 1 / 16


def test_reference_implementation_and_family():
    from jaxcore import backend

    assert backend.families()["lowp.round"].implementations == ("reference", "xla")
    x = _sample(20, seed=9)
    got = lowp.round(x, lowp.float8_e5m2, "odd", implementation="reference")
    assert _same(got, np.asarray(R(x, lowp.float8_e5m2, "odd"))).all()


def test_hash_generator_bits_are_balanced():
    # every bit of the per-element words is 1 with probability 1/2 (8 sigma bound), and
    # neighbouring elements are uncorrelated
    from jaxcore.kernels.lowp._bits import hash_bits, seeds_from_key

    w = np.asarray(jax.jit(lambda k: hash_bits(seeds_from_key(k), (1 << 16,)))(jax.random.key(5)))
    bits = (w[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    n = w.size
    assert np.abs(bits.mean(0) - 0.5).max() < 8 * 0.5 / np.sqrt(n)
    u = w.astype(np.float64) / 2**32 - 0.5
    corr = np.mean(u[1:] * u[:-1]) / np.var(u)
    assert abs(corr) < 8 / np.sqrt(n)
