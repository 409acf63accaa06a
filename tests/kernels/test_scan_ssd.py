"""ssd: chunked matmul form == sequential reference == selective_scan (the duality)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P_
from jaxcore.kernels.scan import selective_scan, ssd
from jaxcore.kernels.scan._ssd import default_chunk_size

from jaxcore import backend
from jaxcore.testing import assert_close

BZ, L, H, P, N, G = 2, 13, 4, 3, 5, 2
SEG = np.array([[0] * 5 + [1] * 8, [2] * 3 + [0] * 10])


def make(dtype=jnp.float64, grouped=True):
    k = jax.random.split(jax.random.key(0), 8)
    r = lambda i, s: jax.random.normal(k[i], s, dtype)
    bc_shape = (BZ, L, G, N) if grouped else (BZ, L, N)
    return dict(
        x=r(0, (BZ, L, H, P)),
        dt=jax.nn.softplus(r(1, (BZ, L, H))),
        A=-jnp.exp(r(2, (H,))),
        B=r(3, bc_shape),
        C=r(4, bc_shape),
        h0=r(5, (BZ, H, P, N)),
        D=r(6, (H,)),
    )


def loop(x, dt, A, B, C, h0, D, seg):
    """numpy loop over steps."""
    x, dt, A, B, C, h = (np.asarray(v) for v in (x, dt, A, B, C, h0))
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    B, C = np.repeat(B, H // B.shape[2], 2), np.repeat(C, H // C.shape[2], 2)
    ys = np.zeros(x.shape)
    for t in range(x.shape[1]):
        if seg is not None and t > 0:
            h = np.where((seg[:, t] != seg[:, t - 1])[:, None, None, None], 0, h)
        da = np.exp(dt[:, t] * A)[..., None, None]
        h = da * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys[:, t] = np.einsum("bhpn,bhn->bhp", h, C[:, t]) + x[:, t] * np.asarray(D)[:, None]
    return ys, h


@pytest.mark.parametrize("grouped, chunk", [(True, 4), (False, 16), (True, 1)])
def test_chunked_matches_loop_and_reference(x64, grouped, chunk):
    d = make(grouped=grouped)
    for seg in (None, SEG):

        @jax.jit
        def both(x, dt, A, B, C, h0, D, seg=seg):
            kw = dict(D=D, initial_state=h0, return_final_state=True, segment_ids=seg)
            return (
                ssd(x, dt, A, B, C, chunk_size=chunk, implementation="chunked", **kw),
                ssd(x, dt, A, B, C, chunk_size=chunk, implementation="matmul", **kw),
                ssd(x, dt, A, B, C, implementation="reference", **kw),
            )

        outs = both(d["x"], d["dt"], d["A"], d["B"], d["C"], d["h0"], d["D"])
        ly, lh = loop(d["x"], d["dt"], d["A"], d["B"], d["C"], d["h0"], d["D"], seg)
        for y, h in outs:
            assert_close(y, ly)
            assert_close(h, lh)


def test_gradients_match_reference(x64):
    d = make()

    def run(impl):
        def f(x, dt, A, B, C, h0, D):
            y, h = ssd(x, dt, A, B, C, D=D, initial_state=h0, return_final_state=True,
                       segment_ids=SEG, chunk_size=4, implementation=impl)  # fmt: skip
            return jnp.sum(jnp.sin(y)) + jnp.sum(h**2)

        return jax.jit(jax.grad(f, argnums=tuple(range(7))))

    args = (d["x"], d["dt"], d["A"], d["B"], d["C"], d["h0"], d["D"])
    want = run("reference")(*args)
    for impl in ("chunked", "matmul"):
        for a, b, name in zip(run(impl)(*args), want, "x dt A B C h0 D".split()):
            assert_close(a, b, scale=100, err_msg=f"{impl} {name}")


def test_duality_with_selective_scan(x64):
    d = make()
    y, h = ssd(d["x"], d["dt"], d["A"], d["B"], d["C"], D=d["D"], initial_state=d["h0"],
               return_final_state=True, chunk_size=4)  # fmt: skip
    u = d["x"].reshape(BZ, L, H * P)
    delta = jnp.repeat(d["dt"], P, axis=2)
    a = jnp.repeat(d["A"], P)[:, None] * jnp.ones((1, N), jnp.float64)
    ys, hs = selective_scan(u, delta, a, d["B"], d["C"], jnp.repeat(d["D"], P),
                            initial_state=d["h0"].reshape(BZ, H * P, N),
                            return_final_state=True)  # fmt: skip
    assert_close(y, ys.reshape(y.shape))
    assert_close(h, hs.reshape(h.shape))


def test_length_one_bf16_and_nan():
    d = make(jnp.float32)
    jssd = jax.jit(ssd, static_argnames=("chunk_size",))
    y = jssd(d["x"][:, :1], d["dt"][:, :1], d["A"], d["B"][:, :1], d["C"][:, :1])
    ly, _ = loop(d["x"][:, :1], d["dt"][:, :1], d["A"], d["B"][:, :1], d["C"][:, :1],
                 np.zeros((BZ, H, P, N)), np.zeros(H), None)  # fmt: skip
    assert_close(y, ly, scale=10)
    yb = jssd(*(d[k].astype(jnp.bfloat16) for k in ("x", "dt")), d["A"], d["B"], d["C"])
    assert yb.dtype == jnp.bfloat16
    x = d["x"].at[0, 6, 1, 0].set(jnp.nan)
    y = np.asarray(jssd(x, d["dt"], d["A"], d["B"], d["C"], chunk_size=4))
    assert np.isnan(y[0, 6:, 1, 0]).all()
    # the matmul form spreads a NaN over its chunk (positions 4..7), never to earlier chunks
    assert not np.isnan(y[0, :4]).any() and not np.isnan(y[1]).any()
    assert not np.isnan(y[0, :, 0]).any() and not np.isnan(y[0, :, 1, 1:]).any()


def test_bad_shapes():
    d = make(jnp.float32)
    x, dt, A, B, C = d["x"], d["dt"], d["A"], d["B"], d["C"]
    with pytest.raises(ValueError, match="x: expected rank 4"):
        ssd(x[0], dt, A, B, C)
    with pytest.raises(ValueError, match="dt: expected shape"):
        ssd(x, dt[:, :3], A, B, C)
    with pytest.raises(ValueError, match="A: expected shape"):
        ssd(x, dt, A[:2], B, C)
    with pytest.raises(ValueError, match="C: expected a group count"):
        ssd(x, dt, A, B, jnp.ones((BZ, L, 3, N)))
    with pytest.raises(ValueError, match="D: expected shape"):
        ssd(x, dt, A, B, C, D=jnp.ones((H + 1,)))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            ssd(x, dt, A, B, C, chunk_size=bad)


def _fn(impl, chunk=4, seg=SEG):
    """(x, dt, A, B, C, h0) -> (y, final state) with resets; L=13 is not a multiple of 4."""
    return lambda x, dt, A, B, C, h0: ssd(x, dt, A, B, C, initial_state=h0, chunk_size=chunk,
                                          return_final_state=True, segment_ids=seg,
                                          implementation=impl)  # fmt: skip


def test_jvp_and_jacfwd_match_reference(x64):
    d = make()
    args = tuple(d[k] for k in ("x", "dt", "A", "B", "C", "h0"))
    ks = jax.random.split(jax.random.key(7), len(args))
    tans = tuple(jax.random.normal(k, a.shape, a.dtype) for k, a in zip(ks, args))
    (yr, hr), (tyr, thr) = jax.jvp(_fn("reference"), args, tans)
    for impl in ("chunked", "matmul"):
        (y, h), (ty, th) = jax.jit(lambda *a, i=impl: jax.jvp(_fn(i), a, tans))(*args)
        for a, b, name in ((y, yr, "y"), (h, hr, "h"), (ty, tyr, "ty"), (th, thr, "th")):
            assert_close(a, b, scale=100, err_msg=f"{impl} {name}")
    # one tangent at a time (the others symbolic zeros) and jacfwd
    jf = lambda impl: jax.jacfwd(lambda A: _fn(impl)(args[0], args[1], A, *args[3:])[1])
    assert_close(jax.jit(jf("chunked"))(args[2]), jf("reference")(args[2]), scale=100)


def loss(impl):
    """sum(sin(y)) + |final state|^2 of :func:`_fn` (a scalar of every output)."""

    def f(*a):
        y, h = _fn(impl)(*a)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)

    return f


def test_custom_backward_subsets_remat_vmap(x64):
    """The hand backward (transpose of the linear_call) vs autodiff of the reference, float64:
    gradients of a subset of the inputs, under jax.checkpoint, and vmap of grad and of jvp."""
    d = make()
    args = tuple(d[k] for k in ("x", "dt", "A", "B", "C", "h0"))

    for argnums in ((1, 2, 5),):  # a subset: the other cotangents are symbolic zeros
        got = jax.jit(jax.grad(jax.checkpoint(loss("chunked")), argnums))(*args)
        want = jax.grad(loss("reference"), argnums)(*args)
        for a, b in zip(got, want):
            assert_close(a, b, scale=100, err_msg=str(argnums))
    xs = jnp.stack([args[0], 2 * args[0]])
    vg = lambda impl: jax.vmap(jax.grad(loss(impl)), in_axes=(0,) + (None,) * 5)
    assert_close(jax.jit(vg("chunked"))(xs, *args[1:]), vg("reference")(xs, *args[1:]), scale=100)
    vj = lambda impl: jax.vmap(
        lambda x: jax.jvp(
            lambda a: _fn(impl)(x, *args[1:2], a, *args[3:])[0],
            (args[2],),
            (jnp.ones_like(args[2]),),
        )[1]  # fmt: skip
    )
    assert_close(jax.jit(vj("chunked"))(xs), vj("reference")(xs), scale=100)


def test_second_order_matches_reference(x64):
    """Forward over reverse (Hessian-vector products) and reverse over forward through the
    chunked core: jaxcore's linear_call differentiates in its residuals too."""
    d = make()
    args = tuple(d[k] for k in ("x", "dt", "A", "B", "C", "h0"))
    ks = jax.random.split(jax.random.key(9), len(args))
    vs = tuple(jax.random.normal(k, a.shape, a.dtype) for k, a in zip(ks, args))

    argnums = tuple(range(len(args)))
    hvp = lambda i: jax.jvp(jax.grad(loss(i), argnums), args, vs)[1]  # noqa: E731
    for a, b in zip(jax.jit(lambda: hvp("chunked"))(), hvp("reference")):
        assert_close(a, b, scale=1e3)
    rof = lambda i: jax.grad(lambda *a: jax.jvp(loss(i), a, vs)[1], argnums)(*args)  # noqa: E731
    for a, b in zip(jax.jit(lambda: rof("chunked"))(), rof("reference")):
        assert_close(a, b, scale=1e3)


def _per_device_inputs(n: int, seed: int):
    """x, dt, A, B, C with batch n (one example per device), L=6, and a (1, H, P, N) state."""
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (n, 6, H, P))
    dt = jax.nn.softplus(jax.random.normal(k[1], (n, 6, H)))
    A = -jnp.exp(jax.random.normal(k[2], (H,)))
    B, C = jax.random.normal(k[3], (n, 6, N)), jax.random.normal(k[4], (n, 6, N))
    return x, dt, A, B, C, jax.random.normal(k[5], (1, H, P, N))


def test_vmap_and_shard_map_match_reference():
    n = jax.device_count()
    x, dt, A, B, C, _ = _per_device_inputs(n, seed=4)
    ref = lambda x, dt, A, B, C: ssd(x, dt, A, B, C, implementation="reference")
    want = ref(x, dt, A, B, C)
    one = lambda x, dt, A, B, C: ssd(x[None], dt[None], A, B[None], C[None], chunk_size=4)[0]
    assert_close(jax.jit(jax.vmap(one, (0, 0, None, 0, 0)))(x, dt, A, B, C), want, scale=10)
    mesh = jax.make_mesh((n,), ("batch",))
    f = lambda x, dt, A, B, C: ssd(x, dt, A, B, C, chunk_size=4)
    specs = (P_("batch"), P_("batch"), P_(), P_("batch"), P_("batch"))
    sm = jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P_("batch"))
    put = lambda v, s: jax.device_put(v, NamedSharding(mesh, s))
    sharded = [put(v, s) for v, s in zip((x, dt, A, B, C), specs)]
    assert_close(jax.jit(sm)(*sharded), want, scale=10)
    loss = lambda g: lambda *a: jnp.sum(g(*a) ** 2)
    got = jax.jit(jax.grad(loss(sm), (0, 1, 2, 3, 4)))(*sharded)  # dA: summed over shards
    for a, b, name in zip(got, jax.grad(loss(ref), (0, 1, 2, 3, 4))(x, dt, A, B, C), "xdtABC"):
        assert_close(a, b, scale=100, err_msg=name)


def test_defaults():
    assert default_chunk_size("cpu") == 32 and default_chunk_size("gpu") == 256
    assert default_chunk_size("tpu") == 64
    fam = backend.families()["ssd"]
    assert fam.default("cpu") == "chunked" and fam.default("gpu") == "pallas"
    assert fam.default("tpu") == "matmul"
    d = make(jnp.float32)
    a = (d["x"], d["dt"], d["A"], d["B"], d["C"])
    assert_close(ssd(*a), ssd(*a, chunk_size=default_chunk_size()), scale=10)


def test_gpu_default_falls_back_to_matmul_where_the_pallas_kernels_do_not_apply(monkeypatch):
    """On a GPU the default is "pallas"; a chunk_size that is not a power of two >= 16 (or
    float64 inputs) takes "matmul" instead of raising, while an explicit "pallas" raises."""
    d = make(jnp.float32)
    a = (d["x"], d["dt"], d["A"], d["B"], d["C"])
    want = ssd(*a, implementation="reference")
    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    assert_close(ssd(*a, chunk_size=24), want, scale=10)
    with pytest.raises(ValueError, match="chunk_size: implementation='pallas' needs a power"):
        ssd(*a, chunk_size=24, implementation="pallas")


def test_shard_map_with_replicated_initial_state():
    """Inputs sharded over the batch, the initial state replicated: one carry type for the
    chunked core, and the state's gradient summed over the shards."""
    n = jax.device_count()
    x, dt, A, B, C, h0 = _per_device_inputs(n, seed=6)

    def f(impl):
        return lambda x, dt, B, C, h0: ssd(
            x, dt, A, B, C, initial_state=jnp.broadcast_to(h0, (x.shape[0], H, P, N)),
            chunk_size=4, implementation=impl,
        )  # fmt: skip

    mesh = jax.make_mesh((n,), ("batch",))
    sm = jax.shard_map(f("chunked"), mesh=mesh, in_specs=(P_("batch"),) * 4 + (P_(),),
                       out_specs=P_("batch"))  # fmt: skip
    args = [jax.device_put(v, NamedSharding(mesh, P_("batch"))) for v in (x, dt, B, C)]
    args.append(jax.device_put(h0, NamedSharding(mesh, P_())))
    assert_close(jax.jit(sm)(*args), f("reference")(x, dt, B, C, h0), scale=10)
    loss = lambda g: lambda *a: jnp.sum(jnp.sin(g(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(sm), (0, 4)))(*args)
    for g, r in zip(got, jax.grad(loss(f("reference")), (0, 4))(x, dt, B, C, h0)):
        assert_close(g, r, scale=100)
