"""LSTM / GRU language models: shapes, decode == forward, quantized 32-bit == float, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxcore.models import GRULM, LSTMLM, QuantConfig, build_model, pure

V = 11
TOKS = jax.random.randint(jax.random.key(1), (2, 7), 0, V)


def _model(cls, **kw):
    base = dict(d_model=16, num_layers=2, num_heads=2)
    base.update(kw)
    return cls(V, rngs=nnx.Rngs(0), **base)


def _fwd(model):
    fn, state = pure(model)
    return jax.jit(fn)(state, TOKS)


@pytest.mark.parametrize("cls", [LSTMLM, GRULM])
def test_decode_step_equals_full_forward(cls):
    model = _model(cls)
    full = _fwd(model)
    assert full.shape == (2, 7, V) and full.dtype == jnp.float32
    fn, state = pure(model, "decode_step")
    step = jax.jit(fn)
    cache = model.init_cache(2)
    outs = []
    for t in range(TOKS.shape[1]):
        logits, cache = step(state, TOKS[:, t], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.stack(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_float32_formats_equal_float_model():
    f = _model(LSTMLM)
    q = _model(LSTMLM, quant=QuantConfig(weight_format="float32", act_format="float32"))
    np.testing.assert_array_equal(np.asarray(_fwd(f)), np.asarray(_fwd(q)))


def test_remat_does_not_change_gradients():
    def grads(model):
        gd, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(gd, p, rest)(TOKS) ** 2)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    ref = grads(_model(GRULM, remat="none", num_layers=1))
    for policy in ("full", "selective"):
        for a, b in zip(ref, grads(_model(GRULM, remat=policy, num_layers=1))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_build_and_bad_arguments():
    assert isinstance(build_model("gru", V, d_model=8, num_layers=1, window=3), GRULM)
    with pytest.raises(ValueError, match="num_heads: expected a divisor of hidden_size=16"):
        _model(LSTMLM, num_heads=3)
    with pytest.raises(ValueError, match="remat: expected one of"):
        _model(LSTMLM, remat="all")
