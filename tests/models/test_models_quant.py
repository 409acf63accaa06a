"""QDense / QEinsum: formats, straight-through gradients, learnable bit-widths, export codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxcore.kernels import lowp
from jaxcore.kernels.lowp import codes
from jaxcore.models import (
    BitWidth,
    QDense,
    QEinsum,
    QuantConfig,
    Transformer,
    bit_widths,
    export_quantized,
    pure,
    resolve_format,
)
from jaxcore.models.quant import float_grid_max, relaxed_float_quantize, relaxed_int_quantize

X = jax.random.normal(jax.random.key(0), (3, 8))
_call = nnx.jit(lambda m, x: m(x))


def test_resolve_format_names():
    assert resolve_format("int4") == lowp.IntFormat(4)
    assert resolve_format("uint8") == lowp.IntFormat(8, signed=False)
    assert resolve_format("float8_e4m3fn") == lowp.float8_e4m3fn
    assert resolve_format(jnp.bfloat16) == lowp.bfloat16
    assert resolve_format(None) is None
    with pytest.raises(ValueError, match="weight_format: expected a format name"):
        QuantConfig(weight_format="fp7")
    with pytest.raises(ValueError, match="init_bits: expected a value in"):
        QuantConfig(learn_bits=True, init_bits=40.0)


def test_float32_format_is_exact_and_lower_formats_round():
    f = QDense(8, 5, rngs=nnx.Rngs(0))
    q = QDense(
        8, 5, quant=QuantConfig(weight_format="float32", act_format="float32"), rngs=nnx.Rngs(0)
    )
    np.testing.assert_array_equal(_call(f, X), _call(q, X))
    q8 = QDense(8, 5, quant=QuantConfig(weight_format="int8"), rngs=nnx.Rngs(0))
    w = np.asarray(f.kernel[...])
    scale = np.abs(w).max(0) / 127
    wq = np.round(w / scale) * scale
    np.testing.assert_allclose(_call(q8, X), np.asarray(X) @ wq, rtol=1e-5, atol=1e-6)


def test_straight_through_gradient_and_export_roundtrip():
    q = QDense(
        8, 5, quant=QuantConfig(weight_format="int4", act_format="float8_e4m3fn"), rngs=nnx.Rngs(0)
    )
    g = nnx.jit(lambda m, x: jax.grad(lambda v: jnp.sum(m(v)))(x))(q, X)
    # straight through the activation quantizer: d/dx sum(x @ Wq) = Wq summed over outputs
    e = q.export()
    wq = codes.decode(e["codes"], lowp.IntFormat(4)) * e["scale"]
    np.testing.assert_allclose(g, np.broadcast_to(np.sum(wq, 1), X.shape), rtol=1e-5, atol=1e-6)
    assert e["codes"].dtype == jnp.uint8 and e["format"] == "int4"


def test_qeinsum_matches_qdense_per_channel():
    e = QEinsum("bd,dk->bk", (8, 5), quant=QuantConfig(weight_format="int8"), rngs=nnx.Rngs(1))
    d = QDense(8, 5, quant=QuantConfig(weight_format="int8"), rngs=nnx.Rngs(0))
    d.kernel[...] = e.kernel[...]
    np.testing.assert_allclose(e(X), d(X), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="weight_shape: expected 3 dimensions"):
        QEinsum("btd,dnh->btnh", (8, 5), rngs=nnx.Rngs(0))


def test_relaxed_bits_interpolate_and_have_gradients():
    x = jnp.linspace(-1.0, 1.0, 41)
    q4 = relaxed_int_quantize(x, 4.0, (0,))
    s = np.float32(1.0) / np.float32(7.0)  # absmax 1 over 7 levels
    np.testing.assert_allclose(q4, np.round(np.asarray(x) / s) * s, atol=1e-6)
    q45 = relaxed_int_quantize(x, 4.5, (0,))
    np.testing.assert_allclose(q45, 0.5 * q4 + 0.5 * relaxed_int_quantize(x, 5.0, (0,)), atol=1e-6)
    gb = jax.grad(lambda b: jnp.sum((relaxed_int_quantize(x, b, (0,)) - x) ** 2))(4.5)
    assert gb < 0  # one more bit lowers the quantization error
    gx = jax.grad(lambda v: jnp.sum(relaxed_int_quantize(v, 4.5, (0,))))(x)
    np.testing.assert_array_equal(gx, np.ones(41))


def test_learnable_bit_widths_in_a_model():
    m = Transformer(
        7,
        d_model=16,
        num_layers=1,
        num_heads=2,
        quant=QuantConfig(learn_bits=True, init_bits=6.0),
        rngs=nnx.Rngs(0),
    )
    bw = bit_widths(m)
    assert "head" in bw and len(bw) == 1 + 4 + 3  # head, q/k/v/o, gate/up/down
    gd, bits, rest = nnx.split(m, BitWidth, ...)
    toks = jnp.arange(10).reshape(2, 5) % 7
    g = jax.jit(jax.grad(lambda b: jnp.mean(nnx.merge(gd, b, rest)(toks) ** 2)))(bits)
    assert all(np.isfinite(v) and v != 0 for v in jax.tree.leaves(g))
    # BitWidth is not a Param: ordinary training leaves it alone.
    assert not jax.tree.leaves(nnx.state(m, nnx.Param).filter(BitWidth))
    assert m.head.export()["format"] == "int6"
    q = QDense(8, 4, quant=QuantConfig(weight_format="int4"), rngs=nnx.Rngs(0))
    assert set(export_quantized(q)) == {""} and export_quantized(q)[""]["format"] == "int4"


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxint8", "bitmod4"])
def test_block_and_bitmod_weight_formats(fmt):
    x = jax.random.normal(jax.random.key(2), (4, 64))
    f = QDense(64, 8, rngs=nnx.Rngs(0))
    q = QDense(64, 8, quant=QuantConfig(weight_format=fmt), rngs=nnx.Rngs(0))
    fn, state = pure(q)
    yf, yq = np.asarray(f(x)), np.asarray(jax.jit(fn)(state, x))
    rel = np.linalg.norm(yq - yf) / np.linalg.norm(yf)
    assert 0 < rel < 0.3, rel
    g = jax.jit(jax.grad(lambda v: jnp.sum(fn(state, v))))(x)
    assert np.isfinite(np.asarray(g)).all()
    e = q.export()
    assert e["codes"].shape == (64, 8) and e["codes"].dtype == jnp.uint8


def test_block_format_needs_a_divisible_contraction():
    with pytest.raises(ValueError, match="weight_format: MXFP4 groups 32 elements"):
        QDense(40, 8, quant=QuantConfig(weight_format="mxfp4"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="act_format: bitmod4 is a weight-only format"):
        QuantConfig(act_format="bitmod4")


def test_bias_under_strict_rank_promotion():
    """QDense(use_bias=True) on (batch, seq, in) inputs: the conftest sets rank promotion to
    "raise", so an implicit (N,) + (..., N) broadcast would fail here."""
    q = QDense(8, 5, use_bias=True, quant=QuantConfig(weight_format="int8"), rngs=nnx.Rngs(0))
    q.bias[...] = jnp.arange(5, dtype=jnp.float32)
    x3 = jnp.stack([X, 2 * X])
    nobias = QDense(8, 5, quant=QuantConfig(weight_format="int8"), rngs=nnx.Rngs(0))
    want = np.asarray(_call(nobias, x3)) + np.arange(5)
    np.testing.assert_allclose(_call(q, x3), want, rtol=1e-6)


@pytest.mark.parametrize("e", [2, 3, 4, 5])
def test_relaxed_float_at_integer_widths_is_the_lowp_format(e):
    """At integer mantissa widths the learnable float quantizer is exactly lowp's rounding onto
    FloatFormat(e, m, specials="none") after absmax scaling (subnormals, ties, saturation)."""
    rng = np.random.default_rng(e)
    x = jnp.asarray(
        rng.standard_normal((3, 257)) * np.exp(rng.uniform(-9, 3, (3, 257))), jnp.float32
    )
    x = x.at[0, :4].set(jnp.array([0.0, -0.0, 1e-30, -3e-38]))
    for m in range(0, 6):
        got = relaxed_float_quantize(x, float(1 + e + m), e, (1,))
        fmt = lowp.FloatFormat(e, m, specials="none")
        s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / float(fmt.max)
        want = lowp.fake_quant(x / s, fmt, "nearest_even") * s
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"e{e}m{m}")
        assert float(float_grid_max(e, m)) == float(fmt.max)


def test_relaxed_float_interpolates_and_has_gradients():
    x = jnp.linspace(-3.0, 3.0, 61)
    lo, hi = relaxed_float_quantize(x, 7.0, 4, (0,)), relaxed_float_quantize(x, 8.0, 4, (0,))
    np.testing.assert_allclose(
        relaxed_float_quantize(x, 7.25, 4, (0,)), 0.75 * lo + 0.25 * hi, atol=1e-6
    )
    gb = jax.grad(lambda b: jnp.sum((relaxed_float_quantize(x, b, 4, (0,)) - x) ** 2))(6.5)
    assert gb < 0  # one more mantissa bit lowers the error
    gx = jax.grad(lambda v: jnp.sum(relaxed_float_quantize(v, 6.5, 4, (0,))))(x)
    np.testing.assert_array_equal(gx, np.ones(61))
    assert np.isnan(relaxed_float_quantize(jnp.array([1.0, jnp.nan]), 7.0, 4, (0,))[1])


def test_learnable_float_widths_in_a_layer_and_export():
    cfg = QuantConfig(learn_bits=True, learn_kind="float", exponent_bits=4, init_bits=8.0,
                      bits_range=(5.0, 12.0))  # fmt: skip
    d = QDense(8, 5, quant=cfg, rngs=nnx.Rngs(0))
    gd, bits, rest = nnx.split(d, BitWidth, ...)
    g = jax.grad(lambda b: jnp.mean(nnx.merge(gd, b, rest)(X) ** 2))(bits)
    assert all(np.isfinite(v) and v != 0 for v in jax.tree.leaves(g))
    e = d.export()
    assert e["format"] == str(lowp.FloatFormat(4, 3, specials="none"))
    w = lowp.decode(e["codes"], lowp.FloatFormat(4, 3, specials="none")) * e["scale"]
    np.testing.assert_allclose(w, relaxed_float_quantize(d.kernel[...], 8.0, 4, (0,)), atol=1e-7)
    with pytest.raises(ValueError, match="learn_kind: expected 'int' or 'float'"):
        QuantConfig(learn_bits=True, learn_kind="posit")
    with pytest.raises(ValueError, match="bits_range: expected 5 <= low"):
        QuantConfig(learn_bits=True, learn_kind="float", bits_range=(2.0, 8.0))
