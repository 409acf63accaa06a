"""Mamba (selective scan and SSD) and Hybrid: shapes, decode == forward, quant, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxcore.models import Hybrid, Mamba, QuantConfig, build_model, pure

V = 11
TOKS = jax.random.randint(jax.random.key(1), (2, 10), 0, V)


def _model(name, **kw):
    base = dict(d_model=16, num_layers=2, d_state=4, head_dim=8, chunk_size=4)
    base.update(kw)
    if name == "hybrid":
        return Hybrid(V, num_heads=2, rngs=nnx.Rngs(0), **base)
    return Mamba(V, variant=name, rngs=nnx.Rngs(0), **base)


def _fwd(model):
    fn, state = pure(model)
    return jax.jit(fn)(state, TOKS)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "hybrid"])
def test_decode_step_equals_full_forward(name):
    kw = {"variant": "mamba2", "window": 4} if name == "hybrid" else {}
    model = _model(name, **kw)
    full = _fwd(model)
    assert full.shape == (2, 10, V) and full.dtype == jnp.float32
    fn, state = pure(model, "decode_step")
    step = jax.jit(fn)
    cache = model.init_cache(2, 12)
    outs = []
    for t in range(TOKS.shape[1]):
        logits, cache = step(state, TOKS[:, t], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.stack(outs, 1), full, rtol=2e-5, atol=2e-5)


def test_float32_formats_equal_float_model():
    f = _model("mamba")
    q = _model("mamba", quant=QuantConfig(weight_format="float32", act_format="float32"))
    np.testing.assert_array_equal(np.asarray(_fwd(f)), np.asarray(_fwd(q)))


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_remat_does_not_change_gradients(name):
    def grads(model):
        gd, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(gd, p, rest)(TOKS) ** 2)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    ref = grads(_model(name, remat="none", num_layers=1))
    for policy in ("full", "selective"):
        for a, b in zip(ref, grads(_model(name, remat=policy, num_layers=1))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_build_and_bad_arguments():
    m = build_model("mamba2", V, d_model=16, num_layers=1, num_heads=4, head_dim=8)
    assert isinstance(m, Mamba) and m.variant == "mamba2"
    h = build_model("hybrid", V, d_model=16, num_layers=3, num_heads=2)
    assert h.kinds == ("M", "A", "M")
    with pytest.raises(ValueError, match="variant: expected one of"):
        _model("mamba3")
    with pytest.raises(ValueError, match="head_dim: expected a divisor of expand"):
        _model("mamba2", head_dim=5)
    with pytest.raises(ValueError, match="pattern: expected a non-empty string"):
        _model("hybrid", pattern="AX")
