"""linear_scan's reduction hook (``readout``), ``return_final_state``: values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.scan import linear_scan

from jaxcore.testing import assert_close

B, L, D, N = 2, 13, 3, 4
SEG = np.array([[0] * 5 + [1] * 8, [0] * 2 + [4] * 6 + [9] * 5])


def _inputs(dtype=jnp.float64, length=L, matrix=False, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    if matrix:
        a = jax.random.uniform(k[0], (B, length, D, N, N), dtype, 0.1, 1.0) / N
    else:
        a = jax.random.uniform(k[0], (B, length, D, N), dtype, 0.3, 1.0)
    b = jax.random.normal(k[1], (B, length, D, N), dtype)
    h0 = jax.random.normal(k[2], (B, D, N), dtype)
    c = jax.random.normal(k[3], (B, length, N), dtype)
    return a, b, h0, c


def contract(h, c):
    """y_t = <h_t, C_t> over the state axis: (B, T, D, N), (B, T, N) -> (B, T, D)."""
    return jnp.einsum("btdn,btn->btd", h, c)


def two_outputs(h, c):
    return {"y": contract(h, c), "norm": jnp.sum(h * h, axis=(2, 3))}


@pytest.mark.parametrize("impl", ["sequential", "associative", "chunked", "pallas_interpret"])
@pytest.mark.parametrize("matrix", [False, True])
def test_readout_equals_states_then_readout(x64, impl, matrix):
    if matrix and impl == "pallas_interpret":
        pytest.skip("pallas: elementwise a only")
    a, b, h0, c = _inputs(matrix=matrix)
    for reverse in (False, True):
        for seg in (None, SEG):
            kw = dict(initial_state=h0, reverse=reverse, segment_ids=seg, chunk_size=4)
            hs, h_last = linear_scan(
                a, b, implementation="reference", return_final_state=True, **kw
            )
            want = two_outputs(hs, c)
            got, got_last = linear_scan(
                a,
                b,
                implementation=impl,
                readout=two_outputs,
                readout_args=(c,),
                return_final_state=True,
                **kw,
            )
            msg = f"reverse={reverse} segments={seg is not None}"
            assert_close(got["y"], want["y"], err_msg=msg)
            assert_close(got["norm"], want["norm"], err_msg=msg)
            assert_close(got_last, h_last, err_msg=msg)
            # the final state is the state at the last processed step
            assert_close(h_last, hs[:, 0] if reverse else hs[:, -1], err_msg=msg)


@pytest.mark.parametrize("impl", ["sequential", "chunked"])
def test_readout_gradients(x64, impl):
    a, b, h0, c = _inputs()

    def loss(impl, a, b, h0, c):
        y, h_last = linear_scan(
            a,
            b,
            initial_state=h0,
            segment_ids=SEG,
            chunk_size=5,
            implementation=impl,
            readout=contract,
            readout_args=(c,),
            return_final_state=True,
        )
        return jnp.sum(jnp.sin(y)) + jnp.sum(h_last**2)

    want = jax.grad(loss, argnums=(1, 2, 3, 4))("reference", a, b, h0, c)
    got = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)(impl, a, b, h0, c)
    for g, w, name in zip(got, want, "a b h0 c".split()):
        assert_close(g, w, err_msg=name)


def test_final_state_only_and_length_one(x64):
    a, b, h0, _ = _inputs(length=1)
    out, h_last = linear_scan(
        a, b, initial_state=h0, readout=lambda h: (), return_final_state=True, chunk_size=8
    )
    assert out == ()
    assert_close(h_last, a[:, 0] * h0 + b[:, 0])


def test_readout_memory_is_sublinear_in_length():
    """fwd+bwd temp memory: the hook stores chunk-boundary states, not (B, L, D, N)."""
    length, d, n = 4096, 64, 16
    a = jnp.full((1, length, d, n), 0.9, jnp.float32)
    b = jnp.ones((1, length, d, n), jnp.float32)
    c = jnp.ones((1, length, n), jnp.float32)

    def full(a, b, c):
        return jnp.sum(contract(linear_scan(a, b, implementation="chunked"), c))

    def hook(a, b, c):
        y = linear_scan(a, b, implementation="chunked", readout=contract, readout_args=(c,))
        return jnp.sum(y)

    def temp(f, grad):
        f = jax.grad(f, argnums=(0, 1, 2)) if grad else f
        return jax.jit(f).lower(a, b, c).compile().memory_analysis().temp_size_in_bytes

    states = length * d * n * 4
    for grad in (False, True):
        t_full, t_hook = temp(full, grad), temp(hook, grad)
        assert t_full >= states, grad  # the plain path holds all states
        assert t_hook < states / 4, (grad, t_hook, states)
    np.testing.assert_allclose(
        jax.jit(hook)(a[:, :64], b[:, :64], c[:, :64]),
        jax.jit(full)(a[:, :64], b[:, :64], c[:, :64]),
        rtol=1e-5,
    )


def test_readout_jit_vmap_f32():
    a, b, h0, c = _inputs(dtype=jnp.float32)

    def f(a, b, c):
        return linear_scan(a[None], b[None], readout=contract, readout_args=(c[None],))[0]

    got = jax.jit(jax.vmap(f))(a, b, c)
    want = contract(linear_scan(a, b, implementation="reference"), c)
    assert_close(got, want, scale=10)


def test_readout_bad_input():
    a, b, _, c = _inputs(dtype=jnp.float32)
    with pytest.raises(ValueError, match="readout: expected a callable"):
        linear_scan(a, b, readout=3)
    with pytest.raises(ValueError, match=r"readout_args\[0\]"):
        linear_scan(a, b, readout=contract, readout_args=(c[:, :5],))
    with pytest.raises(ValueError, match="readout_args: expected a tuple"):
        linear_scan(a, b, readout=contract, readout_args=c)
    with pytest.raises(ValueError, match="each time step independently"):
        linear_scan(a, b, readout=lambda h: jnp.sum(h, axis=1))
    with pytest.raises(ValueError, match="readout_args: given without a readout"):
        linear_scan(a, b, readout_args=(c,))


@pytest.mark.parametrize("impl", ["chunked", "pallas_interpret"])
def test_readout_forward_mode(x64, impl):
    """jvp through the hook (chunks walked by lax.scan, each under jax.checkpoint) equals the
    reference's, in a, b, initial_state and the readout's own argument."""
    a, b, h0, c = _inputs()
    ta, tb, th, tc = _inputs(seed=1)

    def f(i):
        return lambda a, b, h0, c: linear_scan(
            a, b, initial_state=h0, segment_ids=SEG, readout=two_outputs, readout_args=(c,),
            return_final_state=True, chunk_size=4, implementation=i,
        )  # fmt: skip

    got = jax.jit(lambda *p: jax.jvp(f(impl), p, (ta, tb, th, tc)))(a, b, h0, c)
    want = jax.jvp(f("reference"), (a, b, h0, c), (ta, tb, th, tc))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w)
