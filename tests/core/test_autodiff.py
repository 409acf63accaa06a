"""jaxcore/autodiff.py: linear_call, a map linear in ``lin`` with a hand transpose, under
every transformation, against the same map written in plain JAX (float64)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcore.autodiff import linear_call
from jaxcore.testing import assert_close


def fun(res, lin):  # linear in lin: (sin(r) * x, sum(r * x))
    (r,), (x,) = res, lin
    return jnp.sin(r) * x, jnp.sum(r**2 * x, axis=-1)


def fun_t(res, cts):  # its transpose, written by hand
    (r,) = res
    c1, c2 = cts
    return [jnp.sin(r) * c1 + r**2 * c2[..., None]]


def called(r, x):
    return linear_call(fun, fun_t, [r], [x])


def plain(r, x):
    return fun([r], [x])


def data(seed=0, shape=(3, 4)):
    k = jax.random.split(jax.random.key(seed), 2)
    return (
        jax.random.normal(k[0], shape, jnp.float64),
        jax.random.normal(k[1], shape, jnp.float64),
    )


def check(f, g, *args):
    for a, b in zip(jax.tree.leaves(f(*args)), jax.tree.leaves(g(*args))):
        assert_close(a, b)


def test_values_jvp_and_transpose(x64):
    r, x = data()
    dr, dx = data(1)
    check(called, plain, r, x)
    # jvp in both operands (the residual's through the second-order term)
    check(lambda *a: jax.jvp(called, (r, x), a), lambda *a: jax.jvp(plain, (r, x), a), dr, dx)
    # grad in lin: the hand transpose
    loss = lambda f: lambda r, x: jnp.sum(jnp.cos(f(r, x)[0])) + jnp.sum(f(r, x)[1] ** 2)  # noqa: E731
    check(jax.grad(loss(called), (0, 1)), jax.grad(loss(plain), (0, 1)), r, x)


def test_second_and_third_order(x64):
    r, x = data()
    dr, dx = data(1)
    ct = (jnp.cos(r), jnp.arange(3.0))

    def loss(f):
        return lambda r, x: jnp.sum(jnp.cos(f(r, x)[0])) + jnp.sum(f(r, x)[1] ** 2)

    # forward over reverse, reverse over forward, forward over forward
    for order in (
        lambda f: jax.jvp(jax.grad(loss(f), (0, 1)), (r, x), (dr, dx)),
        lambda f: jax.grad(lambda r, x: jax.jvp(loss(f), (r, x), (dr, dx))[1], (0, 1))(r, x),
        lambda f: jax.jvp(lambda r: jax.jvp(lambda s: f(s, x), (r,), (dr,))[1], (r,), (dr,)),
    ):
        check(lambda o=order: o(called), lambda o=order: o(plain))
    # transposed in lin after a derivative in the residual: the second-order term's own
    # transpose (d/dres of the hand transpose)
    tr = lambda f: jax.linear_transpose(  # noqa: E731
        lambda x: jax.jvp(lambda s: f(s, x), (r,), (dr,))[1], x
    )(ct)
    check(lambda: tr(called), lambda: tr(plain))
    # and a third derivative through that term
    third = lambda f: jax.jvp(  # noqa: E731
        lambda s: jax.jvp(lambda q: jax.jvp(lambda p: f(p, x), (q,), (dr,))[1], (s,), (dr,))[1],
        (r,), (dr,),
    )  # fmt: skip
    check(lambda: third(called), lambda: third(plain))


def test_vmap_jit(x64):
    r, x = data(shape=(5, 3, 4))
    dr, dx = data(1, shape=(5, 3, 4))
    check(jax.jit(jax.vmap(called)), jax.vmap(plain), r, x)
    check(jax.vmap(called, in_axes=(None, 0)), jax.vmap(plain, in_axes=(None, 0)), r[0], x)
    g = lambda f: jax.vmap(jax.grad(lambda r, x: jnp.sum(f(r, x)[0] ** 3), (0, 1)))  # noqa: E731
    check(jax.jit(g(called)), g(plain), r, x)
    h = lambda f: jax.vmap(
        lambda *a: jax.jvp(jax.grad(lambda r, x: jnp.sum(f(r, x)[1] ** 2)), a[:2], a[2:])
    )  # noqa: E501, E731
    check(h(called), h(plain), r, x, dr, dx)
    assert np.isfinite(np.asarray(jax.jit(jax.vmap(called))(r, x)[0])).all()
