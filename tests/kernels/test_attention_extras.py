"""Attention under transformations; merge, decode_attention, linear_attention; O(T) memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jaxcore.kernels.attention import (
    decode_attention,
    dot_product_attention,
    linear_attention,
    merge,
)

from jaxcore.testing import assert_close


def _qkv(b, t, s, n, k, h, hv=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    kk = jnp.asarray(rng.standard_normal((b, s, k, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, k, hv or h)), dtype)
    return q, kk, v


def _close64(a, b, err_msg=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-9, err_msg=err_msg)


# ----------------------------------------------------------------------------- transformations


def test_vmap_grad_checkpoint_jit():
    q, k, v = _qkv(3, 24, 24, 4, 2, 16)
    x = jnp.stack([q, q * 0.5])  # extra leading axis for vmap

    def f(q, impl):
        return dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    got = jax.jit(jax.vmap(lambda q: f(q, "xla")))(x)
    want = jax.vmap(lambda q: f(q, "reference"))(x)
    assert_close(got, want, scale=10.0)

    loss = lambda q, impl: jnp.sum(jnp.sin(jax.checkpoint(lambda q: f(q, impl))(q)))
    g = jax.jit(jax.grad(lambda q: loss(q, "xla")))(q)
    gr = jax.grad(lambda q: loss(q, "reference"))(q)
    assert_close(g, gr, scale=10.0)
    gv = jax.jit(jax.vmap(jax.grad(lambda q: loss(q, "xla"))))(x)
    assert_close(gv[0], gr, scale=10.0)


@pytest.mark.parametrize("axis", ["batch", "heads"])
def test_shard_map(axis):
    n_dev = len(jax.devices())
    assert n_dev == 8
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    if axis == "batch":
        q, k, v = _qkv(8, 16, 16, 2, 1, 16)
        spec = P("x", None, None, None)
    else:
        q, k, v = _qkv(1, 16, 16, 8, 8, 16)
        spec = P(None, None, "x", None)

    def f(q, k, v):
        return dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    q, k, v = put(q), put(k), put(v)
    sharded = jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    got = jax.jit(sharded)(q, k, v)
    want = dot_product_attention(q, k, v, is_causal=True, implementation="reference")
    assert_close(got, want, scale=10.0)
    g = jax.jit(jax.grad(lambda q: jnp.sum(sharded(q, k, v) ** 2)))(q)
    gr = jax.grad(
        lambda q: jnp.sum(
            dot_product_attention(q, k, v, is_causal=True, implementation="reference") ** 2
        )
    )(q)
    assert_close(g, gr, scale=10.0)


def test_pmap():
    q, k, v = _qkv(8, 12, 12, 2, 2, 16)
    f = lambda q, k, v: dot_product_attention(
        q[None], k[None], v[None], local_window_size=(3, 1), implementation="xla"
    )[0]
    got = jax.pmap(f)(q, k, v)
    want = dot_product_attention(q, k, v, local_window_size=(3, 1), implementation="reference")
    assert_close(got, want, scale=10.0)


# ----------------------------------------------------------------------------- merge


def test_merge_of_halves_equals_whole_values_and_grads(x64):
    q, k, v = _qkv(2, 10, 30, 4, 2, 16, 8, dtype=jnp.float64)

    def halves(q, k, v):
        o1, l1 = dot_product_attention(
            q, k[:, :13], v[:, :13], return_lse=True, implementation="xla"
        )
        o2, l2 = dot_product_attention(
            q, k[:, 13:], v[:, 13:], return_lse=True, implementation="xla"
        )
        return merge([o1, o2], [l1, l2])

    def whole(q, k, v):
        return dot_product_attention(q, k, v, return_lse=True, implementation="reference")

    (o, l), (ow, lw) = halves(q, k, v), whole(q, k, v)
    _close64(o, ow)
    _close64(l, lw)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0])) + jnp.sum(fn(*a)[1] ** 2)
    g = jax.grad(loss(halves), argnums=(0, 1, 2))(q, k, v)
    gw = jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, gw):
        _close64(a, b)


def test_merge_empty_parts_and_errors():
    o = jnp.ones((2, 3, 4))
    l = jnp.zeros((2, 3))
    empty = jnp.full((2, 3), -jnp.inf)
    out, lse = merge([o, 5 * o], [l, empty])
    np.testing.assert_allclose(np.asarray(out), 1.0)
    np.testing.assert_allclose(np.asarray(lse), 0.0)
    out, lse = merge([o, o], [empty, empty])
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == -np.inf)
    g = jax.grad(lambda x: jnp.sum(merge([x, x], [empty, empty])[0]))(o)
    assert np.all(np.asarray(g) == 0)
    with pytest.raises(ValueError, match=r"lses\[1\]: expected shape \(2, 3\)"):
        merge([o, o], [l, jnp.zeros((2, 4))])
    with pytest.raises(ValueError, match="outputs/lses"):
        merge([o], [])


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("tq, num_splits, window", [(1, None, None), (3, 4, None), (2, 7, 5)])
def test_decode_equals_full_attention_last_rows(x64, tq, num_splits, window):
    b, s, n, kh, h, hv = 2, 40, 8, 2, 16, 8
    q, k, v = _qkv(b, s, s, n, kh, h, hv, dtype=jnp.float64, seed=1)
    lengths = jnp.array([40, 27], jnp.int32)
    lw = None if window is None else (window, 0)
    for impl in ("reference", "xla"):
        qd = jnp.stack([q[i, int(lengths[i]) - tq : int(lengths[i])] for i in range(b)])
        got = decode_attention(
            qd, k, v, lengths, num_splits=num_splits, local_window_size=window, implementation=impl
        )
        for i in range(b):
            li = int(lengths[i])
            full = dot_product_attention(
                q[i : i + 1, :li],
                k[i : i + 1, :li],
                v[i : i + 1, :li],
                is_causal=True,
                local_window_size=lw,
                implementation="reference",
            )
            _close64(got[i], full[0, li - tq :], err_msg=impl)


def test_decode_grad_and_errors():
    q, k, v = _qkv(2, 1, 20, 4, 2, 16)
    lengths = jnp.array([20, 0], jnp.int32)  # second sequence has an empty cache
    out = decode_attention(q, k, v, lengths, num_splits=3)
    assert np.all(np.asarray(out[1]) == 0)
    g = jax.grad(lambda k: jnp.sum(decode_attention(q, k, v, lengths, num_splits=3) ** 2))(k)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match=r"cache_lengths: expected shape \(2\)"):
        decode_attention(q, k, v, jnp.array([3], jnp.int32))
    with pytest.raises(ValueError, match=r"key_cache: expected shape \(2, \*, \*, 16\)"):
        decode_attention(q, k[..., :8], v, lengths)


# ----------------------------------------------------------------------------- linear


@pytest.mark.parametrize("decay_kind", ["none", "gated", "per_head", "zero"])
def test_linear_chunked_equals_recurrence(x64, decay_kind):
    b, t, n, h, hv = 2, 37, 3, 8, 5
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.standard_normal((b, t, n, h))) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, n, hv)))
    s0 = jnp.asarray(rng.standard_normal((b, n, h, hv)))
    decay = {
        "none": None,
        "gated": jnp.asarray(rng.uniform(0.3, 1.0, (b, t, n))),
        "per_head": jnp.asarray([0.9, 0.5, 1.0])[None, None, :],
        "zero": jnp.zeros((b, t, n)),
    }[decay_kind]

    def run(impl, q, k, v, s0, decay):
        return linear_attention(
            q,
            k,
            v,
            decay=decay,
            chunk_size=8,
            initial_state=s0,
            return_final_state=True,
            implementation=impl,
        )

    (o, f), (orf, fr) = run("xla", q, k, v, s0, decay), run("reference", q, k, v, s0, decay)
    _close64(o, orf)
    _close64(f, fr)
    argnums = (0, 1, 2, 3) if decay is None or decay_kind == "zero" else (0, 1, 2, 3, 4)
    loss = lambda impl: lambda *a: jnp.sum(jnp.sin(run(impl, *a)[0])) + jnp.sum(run(impl, *a)[1])
    g = jax.grad(loss("xla"), argnums=argnums)(q, k, v, s0, decay)
    gr = jax.grad(loss("reference"), argnums=argnums)(q, k, v, s0, decay)
    for a, c in zip(g, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-8, atol=1e-8)


def test_linear_attention_errors_and_dtype():
    q = jnp.ones((1, 8, 2, 4), jnp.bfloat16)
    out = linear_attention(q, q, q)
    assert out.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"key: expected shape \(1, 8, 2, 4\)"):
        linear_attention(q, q[:, :4], q)
    with pytest.raises(ValueError, match="decay: expected shape broadcastable"):
        linear_attention(q, q, q, decay=jnp.ones((3,)))


# ----------------------------------------------------------------------------- memory


def test_xla_memory_is_linear_in_sequence_length():
    """Forward+backward temp memory of the chunked kernel stays far below one T x S logits."""
    t, n, h = 8192, 1, 32
    q, k, v = _qkv(1, t, t, n, n, h)

    def fb(impl):
        return jax.jit(
            jax.grad(
                lambda q, k, v: jnp.sum(
                    dot_product_attention(q, k, v, is_causal=True, implementation=impl)
                ),
                argnums=(0, 1, 2),
            )
        )

    ours = fb("xla").lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = n * t * t * 4
    assert ours < logits_bytes / 20, (ours, logits_bytes)
