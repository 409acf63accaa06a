"""Transformer: shapes, decode == forward, quantized 32-bit == float, remat keeps gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxcore.models import QuantConfig, Transformer, build_model, pure

V = 13


def _model(**kw):
    base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)
    base.update(kw)
    return Transformer(V, rngs=nnx.Rngs(0), **base)


TOKS = jax.random.randint(jax.random.key(1), (2, 9), 0, V)


def _fwd(model, toks=TOKS):
    fn, state = pure(model)
    return jax.jit(fn)(state, toks)


def _decode_all(model, toks):
    cache = model.init_cache(toks.shape[0], toks.shape[1] + 2)
    fn, state = pure(model, "decode_step")
    step = jax.jit(fn)
    outs = []
    for t in range(toks.shape[1]):
        logits, cache = step(state, toks[:, t], cache)
        outs.append(logits)
    return jnp.stack(outs, 1)


def test_shapes_and_dtype():
    out = _fwd(_model())
    assert out.shape == (2, 9, V) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("window", [None, 3])
def test_decode_step_equals_full_forward(window):
    model = _model(window=window)
    np.testing.assert_allclose(_decode_all(model, TOKS), _fwd(model), rtol=1e-5, atol=1e-5)


def test_window_changes_far_context_only():
    a, b = _model(window=None), _model(window=2)
    la, lb = _fwd(a), _fwd(b)
    np.testing.assert_allclose(la[:, :3], lb[:, :3], rtol=1e-5, atol=1e-6)  # t <= 2 sees all
    assert not np.allclose(la[:, 5:], lb[:, 5:], atol=1e-4)


def test_float32_formats_equal_float_model():
    f = _model()
    q = _model(quant=QuantConfig(weight_format="float32", act_format="float32"))
    np.testing.assert_array_equal(np.asarray(_fwd(f)), np.asarray(_fwd(q)))
    lo = _model(quant=QuantConfig(weight_format="float8_e4m3fn", act_format="int8"))
    d = np.abs(np.asarray(_fwd(lo)) - np.asarray(_fwd(f))).max()
    assert 0 < d < 0.5


def _grads(model):
    gd, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.mean(nnx.merge(gd, p, rest)(TOKS) ** 2)

    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))


def test_remat_does_not_change_gradients():
    ref = _grads(_model(remat="none", num_layers=1))
    for policy in ("full", "selective"):
        for a, b in zip(ref, _grads(_model(remat=policy, num_layers=1))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_is_in_the_program():
    model = _model(remat="full", num_layers=1)
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(gd, p, rest)(TOKS).sum()))(params)
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_kv_heads=3), "num_kv_heads: expected a divisor of num_heads=4"),
        (dict(remat="some"), "remat: expected one of"),
        (dict(head_dim=3), "head_dim: expected an even size"),
        (dict(window=0), "window: expected None or a positive integer"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _model(**kw)


def test_build_model_by_name():
    m = build_model("transformer", V, d_model=16, num_layers=1, num_heads=2, hidden=5)
    assert isinstance(m, Transformer) and m.head.kernel.shape == (16, V)
    with pytest.raises(ValueError, match="model: expected one of"):
        build_model("gpt5", V)
