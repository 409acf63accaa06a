"""LSTM / GRU: fused sequence runs against the unfused loop, block-diagonal heads, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels import rnn

from jaxcore.testing import assert_close

B, L, NIN, H = 2, 4, 3, 8


def _data(dtype, num_heads, kind):
    k = jax.random.split(jax.random.key(0), 4)
    init = rnn.lstm_init if kind == "lstm" else rnn.gru_init
    params = init(k[0], NIN, H, num_heads=num_heads, dtype=dtype)
    xs = jax.random.normal(k[1], (B, L, NIN), dtype)
    h0 = jax.random.normal(k[2], (B, H), dtype)
    c0 = jax.random.normal(k[3], (B, H), dtype)
    return params, xs, h0, c0


@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_reference_with_grads(x64, kind, num_heads):
    params, xs, h0, c0 = _data(jnp.float64, num_heads, kind)
    if kind == "lstm":
        state = (h0, c0)
        fast = lambda p, x, s, remat: rnn.lstm(p, x, s, remat=remat)
        ref = rnn.lstm_reference
    else:
        state = h0
        fast = lambda p, x, s, remat: rnn.gru(p, x, s, remat=remat)
        ref = rnn.gru_reference

    def loss(f):
        def g(p, x, s):
            hs, final = f(p, x, s)
            w = jnp.cos(jnp.arange(hs.size, dtype=hs.dtype)).reshape(hs.shape)
            fin = sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(final))
            return jnp.sum(w * hs) + fin

        return jax.jit(jax.value_and_grad(g, (0, 1, 2)))

    v_ref, g_ref = loss(ref)(params, xs, state)
    remat = num_heads == 2  # the remat path is checked once per cell kind
    v, g = loss(lambda p, x, s: fast(p, x, s, remat))(params, xs, state)
    assert_close(v, v_ref)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert_close(a, b, scale=10)


def test_cells_iterate_to_sequence(x64):
    params, xs, h0, c0 = _data(jnp.float64, 2, "lstm")
    s = (h0, c0)
    for t in range(L):
        s = rnn.lstm_cell(params, s, xs[:, t])
    _, (hT, cT) = rnn.lstm(params, xs, (h0, c0))
    assert_close(s[0], hT)
    assert_close(s[1], cT)
    gp, xs, h0, _ = _data(jnp.float64, 1, "gru")
    h = h0
    for t in range(L):
        h = rnn.gru_cell(gp, h, xs[:, t])
    assert_close(h, rnn.gru(gp, xs, h0)[1])
    # a cell accepts any leading axes
    assert rnn.gru_cell(gp, h0[None], xs[None, :, 0]).shape == (1, B, H)


def test_reverse_and_vmap():
    params, xs, h0, _ = _data(jnp.float32, 1, "gru")
    run = jax.jit(rnn.gru, static_argnames="reverse")
    hs_rev, h_rev = run(params, xs, h0, reverse=True)
    hs_fl, h_fl = run(params, jnp.flip(xs, 1), h0)
    assert_close(hs_rev, jnp.flip(hs_fl, 1), scale=10)
    assert_close(h_rev, h_fl, scale=10)
    v = jax.jit(jax.vmap(lambda x, h: rnn.gru(params, x[None], h[None])[0][0]))(xs, h0)
    assert_close(v, rnn.gru(params, xs, h0)[0], scale=10)


def test_default_state_and_nan():
    params, xs, _, _ = _data(jnp.float32, 1, "lstm")
    hs, (h, c) = rnn.lstm(params, xs)
    assert hs.shape == (B, L, H) and h.shape == c.shape == (B, H)
    hs = np.asarray(rnn.lstm(params, xs.at[0, 2, 0].set(jnp.nan))[0])
    assert np.isnan(hs[0, 2:]).all() and not np.isnan(hs[0, :2]).any() and not np.isnan(hs[1]).any()


def test_bad_inputs():
    params, xs, h0, c0 = _data(jnp.float32, 1, "lstm")
    with pytest.raises(ValueError, match="xs: expected rank 3"):
        rnn.lstm(params, xs[0])
    with pytest.raises(ValueError, match="xs: expected shape"):
        rnn.lstm(params, xs[..., :2])
    with pytest.raises(ValueError, match=r"initial_state\[1\] \(c\): expected shape"):
        rnn.lstm(params, xs, (h0, c0[:, :3]))
    with pytest.raises(ValueError, match="number of gates"):
        rnn.gru(params, xs)
    with pytest.raises(ValueError, match="num_heads"):
        rnn.gru_init(jax.random.key(0), 3, 8, num_heads=3)
