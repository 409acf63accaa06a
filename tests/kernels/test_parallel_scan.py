"""Sequence-parallel LASP-2 linear attention and linear scan == the single-device kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxcore.kernels import attention, scan
from jaxcore.kernels import parallel as par

from jaxcore.testing import assert_close

AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit


def _mesh(p, axis_type, name="seq"):
    return jax.make_mesh((p,), (name,), (axis_type,), devices=jax.devices()[:p])


def _out_and_grads(fn, *args):
    """(output, grads...) of sum(sin(fn)) in one jitted program."""

    def both(*args):
        out, pull = jax.vjp(fn, *args)
        return (out, *pull(jnp.cos(out)))

    return jax.jit(both)(*args)


def _assert_all_close(got, want, names, scale=20):
    for name, g, w in zip(names, got, want):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert_close(g, w, scale=scale, err_msg=name)


@pytest.mark.parametrize(
    "p, with_decay, axis_type", [(2, False, AUTO), (4, True, EXPLICIT), (8, True, AUTO)]
)
def test_lasp2_matches_single_device(p, with_decay, axis_type):
    rng = np.random.default_rng(p)
    b, t, n, h = 2, 8 * p, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)) * 0.5, jnp.float32) for _ in "qkv")
    # decay in [0.6, 1] with a few exact zeros (a hard reset of the state)
    d = rng.uniform(0.6, 1.0, (b, t, n))
    d[:, t // 3] = 0.0
    decay = jnp.asarray(d, jnp.float32) if with_decay else None
    mesh = _mesh(p, axis_type)

    def fn(q, k, v):
        return par.sharded_linear_attention(mesh, q, k, v, decay=decay, chunk_size=4)

    def ref(q, k, v):
        return attention.linear_attention(q, k, v, decay=decay, implementation="reference")

    _assert_all_close(
        _out_and_grads(fn, q, k, v), _out_and_grads(ref, q, k, v), ("out", "dq", "dk", "dv")
    )


def test_lasp2_initial_and_final_state():
    p = 4
    rng = np.random.default_rng(1)
    b, t, n, h, hv = 1, 16, 2, 4, 3
    q, k = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in "qk")
    v = jnp.asarray(rng.standard_normal((b, t, n, hv)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, n, h, hv)), jnp.float32)
    decay = jnp.asarray(rng.uniform(0.8, 1.0, (b, t, n)), jnp.float32)
    mesh = _mesh(p, AUTO)
    spec = P(None, "seq")

    @jax.shard_map(mesh=mesh, in_specs=(spec, spec, spec, spec, P()), out_specs=(spec, P()))
    def fn(q, k, v, d, s0):
        out, final = par.sequence_parallel_linear_attention(
            q, k, v, axis_name="seq", decay=d, initial_state=s0, return_final_state=True
        )
        return out, final  # the final state is device-invariant

    out, final = jax.jit(fn)(q, k, v, decay, s0)
    want, want_final = attention.linear_attention(
        q,
        k,
        v,
        decay=decay,
        initial_state=s0,
        return_final_state=True,
        implementation="reference",
    )
    assert_close(out, want, scale=20)
    assert_close(final, want_final, scale=20)


@pytest.mark.parametrize(
    "p, reverse, segments, a_kind, axis_type",
    [
        (2, False, False, "scalar", AUTO),
        (4, True, True, "elementwise", EXPLICIT),
        (8, False, True, "prefix", AUTO),
    ],
)
def test_scan_matches_single_device(p, reverse, segments, a_kind, axis_type):
    rng = np.random.default_rng(10 + p)
    b, t, d, s = 2, 4 * p, 3, 2
    x = jnp.asarray(rng.standard_normal((b, t, d, s)), jnp.float32)
    a_shape = {"scalar": (b, t), "prefix": (b, t, d), "elementwise": (b, t, d, s)}[a_kind]
    a = jnp.asarray(rng.uniform(0.5, 1.0, a_shape), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((b, d, s)), jnp.float32)
    seg = None
    if segments:  # boundaries inside shards and exactly on a shard boundary
        ids = np.sort(rng.integers(0, 3, (b, t)), axis=1)
        ids[:, t // 2 :] += 5
        seg = jnp.asarray(ids, jnp.int32)
    mesh = _mesh(p, axis_type)

    def fn(a, x, h0):
        return par.sharded_scan(
            mesh, a, x, initial_state=h0, reverse=reverse, segment_ids=seg, chunk_size=2
        )

    def ref(a, x, h0):
        return scan.linear_scan(
            a, x, initial_state=h0, reverse=reverse, segment_ids=seg, implementation="reference"
        )

    _assert_all_close(
        _out_and_grads(fn, a, x, h0), _out_and_grads(ref, a, x, h0), ("h", "da", "db", "dh0")
    )


def test_under_pmap():
    p = 4
    rng = np.random.default_rng(3)
    b, t, n, h = 1, 16, 2, 4
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in "qkv")
    a = jnp.asarray(rng.uniform(0.5, 1.0, (b, t, n)), jnp.float32)

    def split(x):
        return jnp.moveaxis(x.reshape((x.shape[0], p, -1) + x.shape[2:]), 1, 0)

    def merge(x):
        return jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:])

    lasp = jax.pmap(
        lambda q, k, v, d: par.sequence_parallel_linear_attention(q, k, v, axis_name="i", decay=d),
        axis_name="i",
        devices=jax.devices()[:p],
    )
    out = merge(lasp(split(q), split(k), split(v), split(a)))
    want = attention.linear_attention(q, k, v, decay=a, implementation="reference")
    assert_close(out, want, scale=20)

    sp = jax.pmap(
        lambda a, x: par.sequence_parallel_scan(a, x, axis_name="i"),
        axis_name="i",
        devices=jax.devices()[:p],
    )
    out = merge(sp(split(a), split(q[..., 0])))
    assert_close(out, scan.linear_scan(a, q[..., 0], implementation="reference"), scale=20)


def test_hostile_inputs():
    """inf in the inputs propagates like the single-device kernel; a zero decay resets."""
    p = 4
    mesh = _mesh(p, AUTO)
    a = jnp.zeros((1, 8), jnp.float32)  # every step resets: h_t = b_t exactly
    x = jnp.arange(8.0, dtype=jnp.float32).reshape(1, 8, 1)
    sharded = jax.jit(lambda a, x: par.sharded_scan(mesh, a, x))
    np.testing.assert_array_equal(sharded(a, x), x)
    x_inf = x.at[0, 1, 0].set(jnp.inf)
    a1 = jnp.ones((1, 8), jnp.float32)
    got = sharded(a1, x_inf)
    want = scan.linear_scan(a1, x_inf, implementation="reference")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_argument_errors_name_the_argument():
    mesh = _mesh(4, AUTO)
    x = jnp.ones((1, 8, 2), jnp.float32)
    with pytest.raises(ValueError, match="dense matrix coefficients are not supported"):
        par.sharded_scan(mesh, jnp.ones((1, 8, 2, 2), jnp.float32), x)
    with pytest.raises(ValueError, match="b: expected a sequence length"):
        par.sharded_scan(mesh, jnp.ones((1, 6)), jnp.ones((1, 6, 2)))
    q = jnp.ones((1, 8, 2, 4), jnp.float32)
    with pytest.raises(ValueError, match="key: expected shape"):
        par.sharded_linear_attention(mesh, q, q[..., :3], q)


def _shard_map_fn(mesh, fn, n_seq, n_rep):
    """shard_map over "seq": the first n_seq args sharded on axis 1, the next n_rep replicated."""
    spec = P(None, "seq")
    specs = (spec,) * n_seq + (P(),) * n_rep
    body = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=(spec, P()))
    if mesh.axis_types[0] != EXPLICIT:
        return body

    def resharded(*args):  # Explicit mode: arguments must already carry the specs
        return body(*[jax.reshard(x, NamedSharding(mesh, sp)) for x, sp in zip(args, specs)])

    return resharded


@pytest.mark.parametrize("p, segments, axis_type", [(4, True, AUTO), (2, False, EXPLICIT)])
def test_selective_scan_matches_single_device(p, segments, axis_type):
    rng = np.random.default_rng(30 + p)
    b, t, d, n = 2, 8 * p, 3, 4
    u, delta, z = (jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32) for _ in "udz")
    bm, cm = (jnp.asarray(rng.standard_normal((b, t, n)), jnp.float32) for _ in "bc")
    a = -jnp.asarray(rng.uniform(0.5, 2.0, (d, n)), jnp.float32)
    dskip = jnp.asarray(rng.standard_normal((d,)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((d,)) * 0.1, jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((b, d, n)), jnp.float32)
    seg = None
    if segments:
        ids = np.sort(rng.integers(0, 3, (b, t)), axis=1)
        ids[:, t // 2 :] += 5  # a boundary exactly between shards
        seg = jnp.asarray(ids, jnp.int32)
    mesh = _mesh(p, axis_type)
    kw = dict(D=dskip, delta_bias=bias, delta_softplus=True)

    def fn(u, delta, bm, cm, z, a, h0):
        body = _shard_map_fn(
            mesh,
            lambda u, dl, bb, cc, zz, s, a_, h: par.sequence_parallel_selective_scan(
                u,
                dl,
                a_,
                bb,
                cc,
                z=zz,
                axis_name="seq",
                initial_state=h,
                segment_ids=s,
                return_final_state=True,
                chunk_size=4,
                **kw,
            ),
            6,
            2,
        )
        y, _ = body(u, delta, bm, cm, z, seg, a, h0)
        return y

    def ref(u, delta, bm, cm, z, a, h0):
        return scan.selective_scan(
            u,
            delta,
            a,
            bm,
            cm,
            z=z,
            initial_state=h0,
            segment_ids=seg,
            implementation="reference",
            **kw,
        )

    args = (u, delta, bm, cm, z, a, h0)
    names = ("y", "du", "ddelta", "dB", "dC", "dz", "dA", "dh0")
    _assert_all_close(_out_and_grads(fn, *args), _out_and_grads(ref, *args), names, scale=50)


def test_ssd_matches_single_device():
    p = 4
    rng = np.random.default_rng(40)
    b, t, h, hp, n = 1, 32, 2, 3, 4
    x = jnp.asarray(rng.standard_normal((b, t, h, hp)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.05, 0.5, (b, t, h)), jnp.float32)
    a = -jnp.asarray(rng.uniform(0.5, 2.0, (h,)), jnp.float32)
    bm, cm = (jnp.asarray(rng.standard_normal((b, t, 1, n)), jnp.float32) for _ in "bc")
    ids = np.zeros((b, t), np.int64)
    ids[:, 13:] = 1
    seg = jnp.asarray(ids, jnp.int32)
    mesh = _mesh(p, AUTO)

    def fn(x, dt, bm, cm, a):
        body = _shard_map_fn(
            mesh,
            lambda x, dt, bb, cc, s, a_: par.sequence_parallel_ssd(
                x,
                dt,
                a_,
                bb,
                cc,
                axis_name="seq",
                segment_ids=s,
                chunk_size=4,
                return_final_state=True,
            ),
            5,
            1,
        )
        y, _ = body(x, dt, bm, cm, seg, a)
        return y

    def ref(x, dt, bm, cm, a):
        return scan.ssd(x, dt, a, bm, cm, segment_ids=seg, implementation="reference")

    args = (x, dt, bm, cm, a)
    names = ("y", "dx", "ddt", "dB", "dC", "dA")
    _assert_all_close(_out_and_grads(fn, *args), _out_and_grads(ref, *args), names, scale=50)
