"""Paged KV caches: paged_decode_attention vs decode_attention on the gathered cache and the
reference; paged_kv_write round trips; garbage tables; gradients into the pool; transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P
from jaxcore.kernels.attention import (
    decode_attention,
    gather_pages,
    paged_decode_attention,
    paged_kv_write,
)

from jaxcore import backend
from jaxcore.testing import assert_close, attention_loss

_STATIC = (
    "pages_per_split",
    "sequences_per_step",
    "scale",
    "logits_soft_cap",
    "local_window_size",
    "return_lse",
    "implementation",
)
# jitted entry points: one compile per configuration instead of eager op-by-op dispatch
paged = jax.jit(paged_decode_attention, static_argnames=_STATIC)
decode = jax.jit(
    decode_attention,
    static_argnames=(
        "scale",
        "logits_soft_cap",
        "local_window_size",
        "return_lse",
        "implementation",
    ),
)


def _paged(b, tq, n, kh, h, hv, ps, m, dtype=jnp.float32, seed=0, spare=3):
    """Query, contiguous caches (B, m*ps, K, *), and the same caches written into a pool whose
    pages are randomly permuted (sequences interleaved) plus ``spare`` unused pages."""
    rng = np.random.default_rng(seed)
    s = m * ps
    npool = b * m + spare
    q = jnp.asarray(rng.standard_normal((b, tq, n, h)), dtype)
    kc = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
    vc = jnp.asarray(rng.standard_normal((b, s, kh, hv)), dtype)
    tables = jnp.asarray(rng.permutation(npool)[: b * m].reshape(b, m), jnp.int32)
    kp = jnp.asarray(rng.standard_normal((npool, ps, kh, h)), dtype)  # stale junk everywhere
    vp = jnp.asarray(rng.standard_normal((npool, ps, kh, hv)), dtype)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    kp, vp = jax.jit(paged_kv_write)(kp, vp, tables, pos, kc, vc)
    return q, kc, vc, kp, vp, tables


CASES = [
    # page_size, max_pages, tq, n, kh, h, hv, soft_cap, window
    (1, 24, 1, 4, 4, 16, 16, None, None),
    (16, 4, 1, 4, 2, 16, 8, 20.0, None),
    (16, 3, 4, 8, 2, 16, 16, None, 5),
    (4, 7, 4, 4, 1, 8, 12, 3.0, 9),
]


@pytest.mark.parametrize("ps, m, tq, n, kh, h, hv, cap, window", CASES)
def test_paged_equals_decode_and_reference(ps, m, tq, n, kh, h, hv, cap, window):
    b = 4
    q, kc, vc, kp, vp, tables = _paged(b, tq, n, kh, h, hv, ps, m, seed=ps + m)
    s = m * ps
    lengths = jnp.array([0, s, min(2, s), s // 2 + 1], jnp.int32)  # empty, full, < tq, ragged
    kw = dict(logits_soft_cap=cap, local_window_size=window, return_lse=True)
    want, want_lse = decode(q, kc, vc, lengths, implementation="reference", **kw)
    ref, ref_lse = paged(q, kp, vp, tables, lengths, implementation="reference", **kw)
    assert_close(ref, want, scale=3)
    assert_close(ref_lse, want_lse, scale=3)
    for pps, sps in ((None, None), (1, 2), (2, b)):  # CPU default: 1 sequence per step
        got, lse = paged(
            q, kp, vp, tables, lengths, pages_per_split=pps, sequences_per_step=sps, **kw
        )
        msg = f"pages_per_split={pps} sequences_per_step={sps}"
        assert got.shape == (b, tq, n, hv) and lse.shape == (b, tq, n)
        assert_close(got, want, scale=3, err_msg=msg)
        assert_close(lse, want_lse, scale=3, err_msg=msg)
        assert np.all(np.asarray(got[0]) == 0) and np.all(np.asarray(lse[0]) == -np.inf)
        assert not np.any(np.isnan(np.asarray(got)))
    got, lse = paged(
        q, kp, vp, tables, lengths, pages_per_split=2, implementation="pallas_interpret", **kw
    )
    assert_close(got, want, scale=3, err_msg="pallas_interpret")
    assert_close(lse, want_lse, scale=3, err_msg="pallas_interpret")


def test_float64_reference(x64):
    q, kc, vc, kp, vp, tables = _paged(3, 2, 4, 2, 8, 8, 4, 5, dtype=jnp.float64, seed=3)
    lengths = jnp.array([20, 9, 27], jnp.int32)  # 27 > capacity 20: only 20 positions exist
    kw = dict(scale=0.3, local_window_size=4, return_lse=True)
    want, want_lse = decode(q, kc, vc, lengths, implementation="reference", **kw)
    got, lse = paged(q, kp, vp, tables, lengths, pages_per_split=2, **kw)
    assert got.dtype == jnp.float64 and lse.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-12, atol=1e-12)


def test_bfloat16():
    q, kc, vc, kp, vp, tables = _paged(2, 1, 8, 2, 16, 16, 16, 3, dtype=jnp.bfloat16, seed=5)
    lengths = jnp.array([48, 23], jnp.int32)
    got, lse = paged(q, kp, vp, tables, lengths, pages_per_split=1, return_lse=True)
    assert got.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    up = lambda x: x.astype(jnp.float32)
    want, want_lse = decode(
        up(q), up(kc), up(vc), lengths, return_lse=True, implementation="reference"
    )
    assert_close(got, want, dtype=jnp.bfloat16)
    assert_close(lse, want_lse, dtype=jnp.bfloat16)


def test_garbage_tables_and_nonfinite_pool_never_leak():
    b, ps, m = 3, 4, 5
    q, kc, vc, kp, vp, tables = _paged(b, 2, 4, 2, 8, 8, ps, m, seed=7)
    lengths = jnp.array([6, 0, 13], jnp.int32)
    want = paged(q, kp, vp, tables, lengths, implementation="reference")
    pages_used = -(-lengths // ps)
    j = jnp.arange(m)[None, :]
    junk = jnp.array([[-1, 10**6, -7, 99, -1]], jnp.int32)
    bad_tables = jnp.where(j < pages_used[:, None], tables, junk)
    # every pool slot that is not a valid (sequence, position) becomes NaN / inf
    pos = jnp.arange(m * ps)
    valid = pos[None, :] < lengths[:, None]
    used = jnp.zeros(kp.shape[:2], bool)
    used = used.at[tables.reshape(b, m, 1), jnp.arange(ps)[None, None, :]].set(
        valid.reshape(b, m, ps)
    )
    kp_bad = jnp.where(used[..., None, None], kp, jnp.nan)
    vp_bad = jnp.where(used[..., None, None], vp, jnp.inf)
    for impl in ("reference", "xla", "pallas_interpret"):
        got = paged(q, kp_bad, vp_bad, bad_tables, lengths, pages_per_split=2, implementation=impl)
        assert_close(got, want, scale=3, err_msg=impl)
        grads = jax.grad(
            lambda q, k, v, impl=impl: jnp.sum(
                paged(q, k, v, bad_tables, lengths, implementation=impl) ** 2
            ),
            argnums=(0, 1, 2),
        )(q, kp_bad, vp_bad)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))), impl
        for g in grads[1:]:  # nothing flows into slots that are not valid cache positions
            assert np.all(np.asarray(jnp.where(used[..., None, None], 0.0, g)) == 0), impl


@pytest.mark.parametrize("sps", [1, 3])
def test_gradients_scatter_into_pool(sps):
    b, ps, m = 3, 4, 4
    q, kc, vc, kp, vp, tables = _paged(b, 2, 4, 2, 8, 6, ps, m, seed=11)
    tables = tables.at[1, 0].set(tables[0, 0])  # a shared prefix page: gradients add up
    lengths = jnp.array([16, 7, 0], jnp.int32)

    def loss(q, k, v, impl):
        o, lse = paged(
            q,
            k,
            v,
            tables,
            lengths,
            pages_per_split=1,
            sequences_per_step=sps,
            logits_soft_cap=4.0,
            local_window_size=6,
            return_lse=True,
            implementation=impl,
        )
        return attention_loss(o, lse)

    want = jax.grad(loss, argnums=(0, 1, 2))(q, kp, vp, "reference")
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, kp, vp, "xla")
    for name, g, w in zip(("query", "key_pages", "value_pages"), got, want):
        assert_close(g, w, scale=5, err_msg=name)
    assert np.all(np.asarray(got[0][2]) == 0)  # the empty sequence's query
    assert float(jnp.max(jnp.abs(got[1][tables[0, 0]]))) > 0


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_forward_mode_and_hvp(x64, impl):
    """jax.jvp in the query and both page pools (tangents of pages no table points at are
    ignored, shared pages count for every sequence) and a Hessian-vector product, against the
    reference; the Pallas forward's JVP is the XLA loops'."""
    b, ps, m = 2, 16, 3
    q, kc, vc, kp, vp, tables = _paged(b, 2, 4, 2, 16, 16, ps, m, dtype=jnp.float64, seed=4)
    tables = tables.at[1, 0].set(tables[0, 0])
    lengths = jnp.array([48, 20], jnp.int32)
    rng = np.random.default_rng(9)
    tan = tuple(jnp.asarray(rng.standard_normal(x.shape)) for x in (q, kp, vp))
    kw = dict(logits_soft_cap=4.0, local_window_size=30, return_lse=True)

    def f(impl):
        return lambda q, k, v: paged(q, k, v, tables, lengths, implementation=impl, **kw)

    got = jax.jit(lambda p, t: jax.jvp(f(impl), p, t))((q, kp, vp), tan)
    want = jax.jvp(f("reference"), (q, kp, vp), tan)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-9)

    def hvp(impl):
        g = jax.grad(lambda *a: attention_loss(*f(impl)(*a)), argnums=(0, 1, 2))
        return jax.jvp(g, (q, kp, vp), tan)[1]

    for g, w in zip(jax.jit(lambda: hvp(impl))(), hvp("reference")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-8, atol=1e-8)


def test_jit_vmap_and_shard_map():
    b, ps, m = 8, 4, 3
    q, kc, vc, kp, vp, tables = _paged(b, 1, 4, 2, 8, 8, ps, m, seed=13)
    lengths = jnp.array([12, 0, 5, 1, 8, 11, 3, 12], jnp.int32)
    f = lambda q, t, l: paged(q, kp, vp, t, l, pages_per_split=2)
    want = paged(q, kp, vp, tables, lengths, implementation="reference")
    assert_close(jax.jit(f)(q, tables, lengths), want, scale=3)
    # vmap over an extra leading axis of queries, tables and lengths
    qs = jnp.stack([q, -q])
    ts = jnp.stack([tables, tables[::-1]])
    ls = jnp.stack([lengths, lengths[::-1]])
    got = jax.vmap(f)(qs, ts, ls)
    assert_close(got[0], want, scale=3)
    want1 = paged(-q, kp, vp, tables[::-1], lengths[::-1], implementation="reference")
    assert_close(got[1], want1, scale=3)
    # vmap of the gradient (custom_vjp backward, cond -> select under vmap)
    gq = lambda impl: jax.grad(
        lambda q, t, l: jnp.sum(jnp.sin(paged(q, kp, vp, t, l, implementation=impl)))
    )
    got = jax.jit(jax.vmap(gq("xla")))(qs, ts, ls)
    for i in range(2):
        assert_close(got[i], gq("reference")(qs[i], ts[i], ls[i]), scale=5)
    # shard_map over batch: tables, lengths and queries sharded, the pool replicated
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    g = lambda q, k, v, t, l: paged(q, k, v, t, l, pages_per_split=2)
    sharded = jax.jit(
        jax.shard_map(
            g,
            mesh=mesh,
            in_specs=(P("x"), P(), P(), P("x"), P("x")),
            out_specs=P("x"),
        )
    )
    assert_close(sharded(q, kp, vp, tables, lengths), want, scale=3)
    # gradients: the replicated pool's cotangent is summed over the batch shards
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, tables, lengths)))
    ref = lambda q, k, v, t, l: paged(q, k, v, t, l, implementation="reference")
    got = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, kp, vp)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, kp, vp)
    for name, g_, w in zip(("query", "key_pages", "value_pages"), got, want):
        assert_close(g_, w, scale=5, err_msg=name)


def test_kv_write_round_trip_and_decode_step():
    b, ps, m, kh, h = 2, 4, 4, 2, 8
    q, kc, vc, kp, vp, tables = _paged(b, 1, 4, kh, h, h, ps, m, seed=17)
    np.testing.assert_array_equal(np.asarray(gather_pages(kp, tables)), np.asarray(kc))
    np.testing.assert_array_equal(np.asarray(gather_pages(vp, tables)), np.asarray(vc))
    # one decode step: write the new token at position `lengths`, then attend (jit, functional)
    lengths = jnp.array([5, 11], jnp.int32)
    rng = np.random.default_rng(0)
    nk = jnp.asarray(rng.standard_normal((b, 1, kh, h)), jnp.float32)
    nv = jnp.asarray(rng.standard_normal((b, 1, kh, h)), jnp.float32)

    @jax.jit
    def step(kp, vp, q, nk, nv, lengths):
        kp, vp = paged_kv_write(kp, vp, tables, lengths[:, None], nk, nv)
        return kp, vp, paged(q, kp, vp, tables, lengths + 1)

    kp2, vp2, out = step(kp, vp, q, nk, nv, lengths)
    kc2 = kc.at[jnp.arange(b), lengths].set(nk[:, 0])
    vc2 = vc.at[jnp.arange(b), lengths].set(nv[:, 0])
    np.testing.assert_array_equal(np.asarray(gather_pages(kp2, tables)), np.asarray(kc2))
    want = decode(q, kc2, vc2, lengths + 1, implementation="reference")
    assert_close(out, want, scale=3)
    # out-of-range positions and invalid table entries are dropped, other writes land
    bad_tables = tables.at[0, 1].set(-1)
    pos = jnp.array([[-1, 5, m * ps, 2], [0, 1, 2, 3]], jnp.int32)  # row 0: page 1 invalid
    ones_k = jnp.ones((b, 4, kh, h), jnp.float32)
    kp3, _ = paged_kv_write(kp, vp, bad_tables, pos, ones_k, ones_k)
    changed = np.asarray(jnp.any(kp3 != kp, axis=(2, 3)))
    expect = np.zeros_like(changed)
    expect[int(tables[0, 0]), 2] = True
    expect[int(tables[1, 0]), :4] = True
    np.testing.assert_array_equal(changed, expect)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), l0=st.integers(0, 24), l1=st.integers(0, 24))
def test_random_tables_hypothesis(seed, l0, l1):
    b, ps, m = 2, 4, 6
    rng = np.random.default_rng(seed)
    npool = 14
    q = jnp.asarray(rng.standard_normal((b, 2, 4, 8)), jnp.float32)
    kp = jnp.asarray(rng.standard_normal((npool, ps, 2, 8)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((npool, ps, 2, 8)), jnp.float32)
    # random tables: any pool page (pages may repeat across sequences), garbage past the length
    tables = jnp.asarray(rng.integers(-3, npool + 3, (b, m)), jnp.int32)
    lengths = jnp.array([l0, l1], jnp.int32)
    used = -(-lengths // ps)
    safe = jnp.asarray(rng.integers(0, npool, (b, m)), jnp.int32)
    tables = jnp.where(jnp.arange(m)[None, :] < used[:, None], safe, tables)
    got, lse = _jit_paged(q, kp, vp, tables, lengths)
    kc = jnp.take(kp, jnp.clip(tables, 0, npool - 1), axis=0).reshape(b, m * ps, 2, 8)
    vc = jnp.take(vp, jnp.clip(tables, 0, npool - 1), axis=0).reshape(b, m * ps, 2, 8)
    want, want_lse = _jit_decode(q, kc, vc, lengths)
    assert_close(got, want, scale=3)
    assert_close(lse, want_lse, scale=3)


_jit_paged = jax.jit(lambda q, k, v, t, l: paged(q, k, v, t, l, pages_per_split=2, return_lse=True))
_jit_decode = jax.jit(
    lambda q, k, v, l: decode(q, k, v, l, return_lse=True, implementation="reference")
)


def test_bfloat16_pallas_interpret_and_grad():
    q, kc, vc, kp, vp, tables = _paged(2, 1, 8, 2, 16, 16, 16, 3, dtype=jnp.bfloat16, seed=5)
    lengths = jnp.array([48, 23], jnp.int32)
    got = paged(q, kp, vp, tables, lengths, implementation="pallas_interpret")
    up = lambda x: x.astype(jnp.float32)
    want = decode(up(q), up(kc), up(vc), lengths, implementation="reference")
    assert_close(got, want, dtype=jnp.bfloat16)
    # the Pallas forward's backward is the "xla" one (same custom_vjp)
    loss = lambda impl: (
        lambda q: jnp.sum(up(paged(q, kp, vp, tables, lengths, implementation=impl)) ** 2)
    )
    assert_close(jax.grad(loss("pallas_interpret"))(q), jax.grad(loss("xla"))(q), scale=2)


def _pallas_lowered(b, tq, n, kh, h, hv, ps, m, pps, dtype, cap=None, window=None):
    """StableHLO text of the compiled ("pallas", not interpreted) forward lowered for CUDA."""
    from jaxcore.kernels.attention import _paged as impl_mod

    g = n // kh
    cfg = impl_mod._Cfg(
        tq=tq, page_size=ps, capacity=m * ps, cap=cap, window=window, group=b, kernel="pallas"
    )
    sds = jax.ShapeDtypeStruct
    args = (
        sds((b, tq, kh, g, h), jnp.float32),
        sds((b * m, ps, kh, h), dtype),
        sds((b * m, ps, kh, hv), dtype),
        sds((b, m // pps, pps), jnp.int32),  # (B, splits, pages per split)
        sds((b,), jnp.int32),
    )
    f = lambda *a: impl_mod._pallas_fwd(*a, cfg)
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "shape, dtype, cap, window",
    [
        ((8, 1, 32, 8, 128, 128, 16, 512, 32), jnp.bfloat16, None, None),  # benchmark shape
        ((2, 4, 8, 2, 64, 32, 32, 8, 4), jnp.float32, 30.0, 100),
    ],
)
def test_pallas_lowers_for_cuda(shape, dtype, cap, window):
    text = _pallas_lowered(*shape, dtype, cap=cap, window=window)
    assert "triton" in text and "jaxcore_paged_decode_fwd" in text


def test_pallas_refused_off_gpu_or_for_small_tiles():
    q, kc, vc, kp, vp, tables = _paged(1, 1, 2, 1, 8, 8, 4, 2)
    msg = (
        r"implementation='pallas' needs a GPU or TPU"
        if backend.platform() == "cpu"
        else r"key_pages \(page_size\): implementation='pallas' expected a power of two >= 16"
    )
    with pytest.raises(ValueError, match=msg):
        paged_decode_attention(q, kp, vp, tables, jnp.array([3]), implementation="pallas")


def test_registered_family():
    fam = backend.families()["attention_paged_decode"]
    assert fam.implementations == ("reference", "xla", "pallas", "pallas_interpret")
    resolve = backend.resolve_implementation
    assert resolve("attention_paged_decode", None, platform_name="cpu") == "xla"
    assert resolve("attention_paged_decode", None, platform_name="gpu") == "pallas"


def test_gpu_default_falls_back_to_xla_for_shapes_the_triton_tiles_cannot_hold(monkeypatch):
    """On a GPU the default is the Triton kernel; page_size 8 (or H, Hv not a power of two
    >= 16) would be refused by it, so the default (implementation=None) takes "xla" there,
    while an explicit "pallas" still raises."""
    q, kc, vc, kp, vp, tables = _paged(2, 1, 4, 2, 8, 8, 4, 3)
    lengths = jnp.array([5, 12])
    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    got = paged_decode_attention(q, kp, vp, tables, lengths, sequences_per_step=1)
    want = paged_decode_attention(q, kp, vp, tables, lengths, implementation="reference")
    assert_close(got, want, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"key_pages \(page_size\): implementation='pallas'"):
        paged_decode_attention(q, kp, vp, tables, lengths, implementation="pallas")


def test_argument_errors():
    q, kc, vc, kp, vp, tables = _paged(2, 1, 4, 2, 8, 8, 4, 3)
    lengths = jnp.array([3, 4], jnp.int32)
    f = paged_decode_attention
    with pytest.raises(ValueError, match=r"query: expected rank 4"):
        f(q[0], kp, vp, tables, lengths)
    with pytest.raises(ValueError, match=r"key_pages: expected shape \(\*, \*, \*, 8\)"):
        f(q, kp[..., :4], vp, tables, lengths)
    with pytest.raises(ValueError, match=r"value_pages: expected shape \(9, 4, 2, \*\)"):
        f(q, kp, vp[:, :2], tables, lengths)  # page_size mismatch
    with pytest.raises(ValueError, match=r"key_pages: expected a number of heads dividing"):
        f(q[:, :, :3], kp, vp, tables, lengths)
    with pytest.raises(ValueError, match=r"block_tables: expected an integer dtype, got float32"):
        f(q, kp, vp, tables.astype(jnp.float32), lengths)
    with pytest.raises(ValueError, match=r"block_tables: expected shape \(2, \*\)"):
        f(q, kp, vp, tables[:1], lengths)
    with pytest.raises(ValueError, match=r"block_tables: expected rank 2"):
        f(q, kp, vp, tables[0], lengths)
    with pytest.raises(ValueError, match=r"cache_lengths: expected shape \(2\)"):
        f(q, kp, vp, tables, lengths[:1])
    with pytest.raises(ValueError, match=r"cache_lengths: expected an integer dtype"):
        f(q, kp, vp, tables, lengths.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"key_pages: expected the query dtype float32"):
        f(q, kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16), tables, lengths)
    with pytest.raises(ValueError, match=r"value_pages: expected the key_pages dtype"):
        f(q, kp, vp.astype(jnp.bfloat16), tables, lengths)
    with pytest.raises(ValueError, match=r"pages_per_split: expected a positive number, got 0"):
        f(q, kp, vp, tables, lengths, pages_per_split=0)
    with pytest.raises(ValueError, match=r"sequences_per_step: expected a divisor of .* 2, got 3"):
        f(q, kp, vp, tables, lengths, sequences_per_step=3)
    with pytest.raises(ValueError, match=r"local_window_size: expected a non-negative int"):
        f(q, kp, vp, tables, lengths, local_window_size=-1)
    with pytest.raises(ValueError, match=r"logits_soft_cap: expected a positive number"):
        f(q, kp, vp, tables, lengths, logits_soft_cap=0.0)
    with pytest.raises(ValueError, match=r"implementation='mosaic' is not an implementation"):
        f(q, kp, vp, tables, lengths, implementation="mosaic")
    pos = jnp.zeros((2, 1), jnp.int32)
    new = jnp.zeros((2, 1, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"new_values: expected shape \(2, 1, 2, 8\)"):
        paged_kv_write(kp, vp, tables, pos, new, new[..., :4])
    with pytest.raises(ValueError, match=r"positions: expected shape \(2, 1\)"):
        paged_kv_write(kp, vp, tables, pos[:, :0], new, new)
    with pytest.raises(ValueError, match=r"positions: expected an integer dtype"):
        paged_kv_write(kp, vp, tables, pos.astype(jnp.float32), new, new)
    with pytest.raises(ValueError, match=r"new_keys: expected the pool dtype float32"):
        paged_kv_write(kp, vp, tables, pos, new.astype(jnp.bfloat16), new)


@pytest.mark.parametrize("sps", [1, 2])
def test_forward_memory_is_one_split(sps):
    """Compiled temporaries stay far below one gathered cache (only a split is gathered)."""
    b, m, ps, kh, h = 2, 64, 16, 2, 32
    kp = jnp.zeros((b * m, ps, kh, h), jnp.float32)
    q = jnp.zeros((b, 1, 4, h), jnp.float32)
    tables = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
    lengths = jnp.array([1000, 500], jnp.int32)
    gathered = b * m * ps * kh * h * 4  # bytes of one contiguous K cache

    def temp(impl):
        f = lambda q, kp: paged_decode_attention(
            q,
            kp,
            kp,
            tables,
            lengths,
            pages_per_split=4,
            sequences_per_step=sps,
            implementation=impl,
        )
        return jax.jit(f).lower(q, kp).compile().memory_analysis().temp_size_in_bytes

    assert temp("reference") >= gathered  # the measure sees a gathered cache when there is one
    assert temp("xla") < gathered // 4
