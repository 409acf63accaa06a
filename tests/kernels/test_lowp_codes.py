"""lowp.encode / decode / pack / unpack against ml_dtypes bit layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels import lowp


def enc(x, fmt, mode="nearest_even"):
    return jax.jit(lambda v: lowp.encode(v, fmt, mode))(x)


def dec(c, fmt):
    return jax.jit(lambda v: lowp.decode(v, fmt))(c)


def _x() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3000) * np.exp2(rng.integers(-20, 20, 3000))
    sp = [0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30, 1e30, -1e30, 0.75, 3.0]
    return np.concatenate([x, sp]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(lowp.PRESETS))
def test_encode_decode_match_ml_dtypes(name):
    fmt = lowp.PRESETS[name]
    dt = lowp.ml_dtype(fmt)
    x = _x()
    codes = np.asarray(jax.jit(lambda v: lowp.encode(v, fmt))(x))
    with np.errstate(all="ignore"):
        want = x.astype(dt).view(np.uint8 if dt.itemsize == 1 else np.uint16)
    assert codes.dtype == want.dtype
    np.testing.assert_array_equal(codes, want)
    allc = np.arange(2**fmt.bits).astype(codes.dtype)
    got = np.asarray(jax.jit(lambda c: lowp.decode(c, fmt))(allc))
    ref = allc.view(dt).astype(np.float32)
    same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
    assert same.all()


def test_nan_codes():
    nan = jnp.asarray([np.nan], jnp.float32)
    assert int(enc(nan, lowp.float8_e4m3fn)[0]) & 0x7F == 0x7F
    assert int(enc(nan, lowp.float8_e4m3fnuz)[0]) == 0x80
    assert int(enc(nan, lowp.float8_e8m0fnu)[0]) == 0xFF
    # formats without a NaN code: code 0 (documented; round() keeps NaN)
    assert int(enc(nan, lowp.float4_e2m1fn)[0]) == 0
    assert np.isnan(float(jax.jit(lambda v: lowp.round(v, lowp.float4_e2m1fn))(nan)[0]))


@pytest.mark.parametrize(
    "fmt", [lowp.IntFormat(8), lowp.IntFormat(4, signed=False), lowp.FixedFormat(3, 4)], ids=str
)
def test_integer_codes_round_trip(fmt):
    x = jnp.asarray(np.linspace(-20, 20, 301, dtype=np.float32))
    c = enc(x, fmt, "nearest_away")
    y = dec(c, fmt)
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(jax.jit(lambda v: lowp.round(v, fmt, "nearest_away"))(x))
    )
    if isinstance(fmt, lowp.IntFormat) and fmt.signed:
        np.testing.assert_array_equal(
            np.asarray(c).view(np.int8), np.clip(np.round(np.asarray(x)), -128, 127)
        )


@pytest.mark.parametrize("bits", [1, 3, 4, 6, 8, 12])
@pytest.mark.parametrize("word", [jnp.uint8, jnp.uint32])
def test_pack_unpack_round_trip(bits, word):
    wb = np.dtype(word).itemsize * 8
    g = np.lcm(bits, wb) // bits
    c = np.random.default_rng(bits).integers(0, 2**bits, (3, 4 * g)).astype(np.uint16)
    p = lowp.pack(c, bits, word)
    assert p.dtype == word and p.shape == (3, 4 * g * bits // wb)
    np.testing.assert_array_equal(np.asarray(lowp.unpack(p, bits)), c)


def test_pack_layout():
    # 4-bit: two per byte, first code in the low nibble; 6-bit: four per three bytes
    np.testing.assert_array_equal(np.asarray(lowp.pack(np.array([1, 2, 3, 4]), 4)), [0x21, 0x43])
    bits = sum(v << (6 * i) for i, v in enumerate([1, 2, 3, 4]))
    want = [(bits >> (8 * j)) & 0xFF for j in range(3)]
    np.testing.assert_array_equal(np.asarray(lowp.pack(np.array([1, 2, 3, 4]), 6)), want)
    e2m1 = enc(jnp.asarray([0.5, -6.0], jnp.float32), lowp.float4_e2m1fn)
    assert int(lowp.pack(e2m1, 4)[0]) == 0x1 | (0xF << 4)


def test_code_errors():
    with pytest.raises(ValueError, match="codes"):
        lowp.pack(np.arange(3), 4)
    with pytest.raises(ValueError, match="bits"):
        lowp.pack(np.arange(4), 0)
    with pytest.raises(TypeError, match="codes"):
        lowp.decode(jnp.ones(3), lowp.float8_e4m3fn)
    with pytest.raises(ValueError, match="fmt"):
        lowp.encode(jnp.ones(3), lowp.FloatFormat(9, 3))
