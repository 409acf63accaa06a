"""selective_scan: mamba_ssm semantics against a numpy loop, every implementation, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxcore.kernels.scan import selective_scan, selective_scan_step

from jaxcore.testing import assert_close

BZ, L, DIM, N, G = 2, 11, 4, 3, 2
SEG = np.array([[0] * 4 + [1] * 7, [3] * 11])


def mamba_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None,
               seg=None):  # fmt: skip
    """numpy transcription of mamba_ssm selective_scan_ref, (B, L, D) layout, plus h0/resets."""
    u, delta, A, B, C = (np.asarray(v) for v in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias)
    if softplus:
        delta = np.log1p(np.exp(delta))
    bsz, length, dim = u.shape
    x = np.zeros((bsz, dim, A.shape[1]), np.result_type(A, B, C)) if h0 is None else np.array(h0)
    ys = np.zeros((bsz, length, dim))

    def at(M, t):
        if M.ndim == 2:
            return np.broadcast_to(M, (bsz,) + M.shape)
        if M.ndim == 3:
            return np.broadcast_to(M[:, t][:, None], (bsz, dim, M.shape[-1]))
        return np.repeat(M[:, t], dim // M.shape[2], axis=1)

    for t in range(length):
        if seg is not None and t > 0:
            x = np.where((seg[:, t] != seg[:, t - 1])[:, None, None], 0, x)
        dA = np.exp(delta[:, t, :, None] * A[None])
        x = dA * x + (delta[:, t] * u[:, t])[..., None] * at(B, t)
        y = np.sum(x * at(C, t), -1)
        ys[:, t] = 2 * y.real if np.iscomplexobj(y) else y
    if D is not None:
        ys = ys + u * np.asarray(D)
    if z is not None:
        z = np.asarray(z)
        ys = ys * z / (1 + np.exp(-z))
    return ys, x


def make(complex_a=False, length=L, dtype=jnp.float64, seed=0):
    k = jax.random.split(jax.random.key(seed), 12)
    r = lambda i, s: jax.random.normal(k[i], s, dtype)
    A = -jnp.exp(r(2, (DIM, N)))
    if complex_a:
        A = A + 1j * r(3, (DIM, N))
    bc = {
        "const": (r(4, (DIM, N)), r(5, (DIM, N))),
        "time": (r(4, (BZ, length, N)), r(5, (BZ, length, N))),
        "group": (r(4, (BZ, length, G, N)), r(5, (BZ, length, G, N))),
    }
    h0 = r(9, (BZ, DIM, N)).astype(A.dtype)
    return dict(u=r(0, (BZ, length, DIM)), delta=r(1, (BZ, length, DIM)), A=A, bc=bc,
                D=r(6, (DIM,)), z=r(7, (BZ, length, DIM)), bias=r(8, (DIM,)), h0=h0)  # fmt: skip


CASES = [
    (False, "const", "const"),
    (False, "time", "group"),
    (False, "group", "time"),
    (True, "time", "time"),
    (True, "const", "group"),
]


@pytest.mark.parametrize("complex_a,lb,lc", CASES)
def test_reference_is_mamba(x64, complex_a, lb, lc):
    d = make(complex_a)
    B, C = d["bc"][lb][0], d["bc"][lc][1]
    opts = [dict(), dict(D=d["D"], z=d["z"], delta_bias=d["bias"], delta_softplus=True)]
    for o, (seg, h0) in zip(opts, ((None, None), (SEG, d["h0"]))):
        run = jax.jit(lambda u, dl, A, B, C, h0, seg, o=o: selective_scan(
            u, dl, A, B, C, **o, initial_state=h0, return_final_state=True, segment_ids=seg,
            implementation="reference"))  # fmt: skip
        y, h = run(d["u"], d["delta"], d["A"], B, C, h0, seg)
        ry, rh = mamba_loop(
            d["u"], d["delta"], d["A"], B, C, o.get("D"), o.get("z"), o.get("delta_bias"),
            o.get("delta_softplus", False), h0, seg,
        )  # fmt: skip
        assert_close(y, ry)
        assert_close(np.abs(h), np.abs(rh))


IMPLS = ["chunked", "sequential", "associative", "pallas_interpret"]
_REFERENCE_GRADS: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("complex_a,lb,lc", CASES)
def test_impl_values_and_grads(x64, impl, complex_a, lb, lc):
    if impl.startswith("pallas") and (complex_a or "const" in (lb, lc)):
        pytest.skip("pallas kernel: real A, time-varying/grouped B and C")
    if impl in ("sequential", "associative") and (complex_a, lb, lc) != CASES[1]:
        pytest.skip("materialised paths go through linear_scan (tested there): one case here")
    d = make(complex_a)
    B, C = d["bc"][lb][0], d["bc"][lc][1]

    def run(i):
        def f(u, delta, A, B, C, D, z, bias, h0):
            y, h = selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                  return_final_state=True, segment_ids=SEG, chunk_size=4,
                                  implementation=i)  # fmt: skip
            w = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
            return jnp.sum(w * y) + jnp.sum(jnp.abs(h) ** 2), (y, h)

        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(9)), has_aux=True))

    args = (d["u"], d["delta"], d["A"], B, C, d["D"], d["z"], d["bias"], d["h0"])
    (_, (y, h)), g = run(impl)(*args)
    key = (complex_a, lb, lc)
    if key not in _REFERENCE_GRADS:  # the oracle once per case, shared by the implementations
        _REFERENCE_GRADS[key] = jax.device_get(run("reference")(*args))
    (_, (ry, rh)), rg = _REFERENCE_GRADS[key]
    assert_close(y, ry)
    assert_close(np.abs(h), np.abs(rh))
    names = "u delta A B C D z delta_bias initial_state".split()
    for a, b, name in zip(g, rg, names):
        a, b = np.asarray(a), np.asarray(b)
        assert_close(a.real, b.real, scale=100, err_msg=name)
        assert_close(a.imag, b.imag, scale=100, err_msg=name)


@pytest.mark.parametrize("length", [1, 7])
def test_short_and_ragged_lengths(x64, length):
    d = make(length=length)
    B, C = d["bc"]["time"]
    for chunk in (4, 16):
        run = jax.jit(lambda u, dl, A, B, C, h0, c=chunk: selective_scan(
            u, dl, A, B, C, initial_state=h0, return_final_state=True, chunk_size=c))  # fmt: skip
        y, h = run(d["u"], d["delta"], d["A"], B, C, d["h0"])
        ry, rh = mamba_loop(d["u"], d["delta"], d["A"], B, C, h0=d["h0"])
        assert_close(y, ry)
        assert_close(h, rh)


def test_step_iterated_equals_scan(x64):
    d = make(True)
    for lb, lc in (("time", "group"), ("const", "time")):
        B, C = d["bc"][lb][0], d["bc"][lc][1]
        y, h = selective_scan(d["u"], d["delta"], d["A"], B, C, d["D"], d["z"], d["bias"], True,
                              initial_state=d["h0"], return_final_state=True)  # fmt: skip
        step = jax.jit(selective_scan_step, static_argnames="delta_softplus")
        s = d["h0"]
        for t in range(L):
            bt = B if lb == "const" else B[:, t]
            ct = C if lc == "const" else C[:, t]
            yt, s = step(s, d["u"][:, t], d["delta"][:, t], d["A"], bt, ct, d["D"], d["z"][:, t],
                         d["bias"], delta_softplus=True)  # fmt: skip
            assert_close(yt, y[:, t])
        assert_close(np.abs(s), np.abs(h))


def test_bf16_inputs_f32_state():
    d = make(dtype=jnp.float32)
    B, C = d["bc"]["time"]
    bf = lambda x: x.astype(jnp.bfloat16)
    run = jax.jit(lambda *a: selective_scan(*a, delta_softplus=True, return_final_state=True))
    y, h = run(bf(d["u"]), bf(d["delta"]), d["A"], bf(B), bf(C))
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    ry, _ = mamba_loop(bf(d["u"]).astype(jnp.float32), bf(d["delta"]).astype(jnp.float32),
                       d["A"], bf(B).astype(jnp.float32), bf(C).astype(jnp.float32),
                       softplus=True)  # fmt: skip
    assert_close(y, ry, scale=2)


def test_vmap_shard_map_pmap():
    n = jax.device_count()
    k = jax.random.split(jax.random.key(3), 5)
    u = jax.random.normal(k[0], (n, 6, DIM))
    dl = jax.random.normal(k[1], (n, 6, DIM))
    A = -jnp.exp(jax.random.normal(k[2], (DIM, N)))
    B = jax.random.normal(k[3], (n, 6, N))
    C = jax.random.normal(k[4], (n, 6, N))
    f = lambda u, dl, B, C: selective_scan(u, dl, A, B, C, delta_softplus=True, chunk_size=4)
    want = mamba_loop(u, dl, A, B, C, softplus=True)[0]
    mesh = jax.make_mesh((n,), ("batch",))
    sm = jax.shard_map(f, mesh=mesh, in_specs=(P("batch"),) * 4, out_specs=P("batch"))
    args = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in (u, dl, B, C)]
    assert_close(jax.jit(sm)(*args), want, scale=10)
    loss = lambda g: lambda *a: jnp.sum(g(*a) ** 2)
    gs = jax.jit(jax.grad(loss(sm), (0, 1, 2, 3)))(*args)
    gr = jax.grad(loss(lambda *a: selective_scan(*a[:2], A, *a[2:], delta_softplus=True,
                                                 implementation="reference")), (0, 1, 2, 3))(
        u, dl, B, C)  # fmt: skip
    for a, b in zip(gs, gr):
        assert_close(a, b, scale=100)
    one = lambda u, dl, B, C: f(u[None], dl[None], B[None], C[None])[0]
    assert_close(jax.jit(jax.vmap(one))(u, dl, B, C), want, scale=10)
    assert_close(jax.pmap(one)(u, dl, B, C), want, scale=10)


@pytest.mark.parametrize("lb,lc", [("group", "time"), ("const", "const")])
@pytest.mark.parametrize("impl", ["chunked", "sequential", "associative", "pallas_interpret"])
def test_forward_mode(x64, impl, lb, lc):
    """jvp in every input (complex A, grouped B, time-varying C, D, z, delta_bias, softplus,
    initial and final state, resets) equals the reference's. "chunked": the JVP of its scan over
    chunks (a linear_call whose transpose is the hand backward); the materialised paths:
    linear_scan's primitive, whose tangent is the same recurrence; "pallas_interpret" (real A,
    no constant B/C): the JVP of the chunked scan's XLA twin, a linear_call transposed by the
    Pallas path's backward."""
    pallas = impl == "pallas_interpret"
    if pallas and lb == "const":
        pytest.skip("pallas kernel: time-varying or grouped B and C")
    d = make(complex_a=not pallas)
    t = make(complex_a=not pallas, seed=1)
    B, C = d["bc"][lb][0], d["bc"][lc][1]
    tB, tC = t["bc"][lb][0], t["bc"][lc][1]
    seg = jnp.array([[0] * 5 + [1] * (L - 5)] * BZ)
    names = ("u", "delta", "A", "D", "z", "bias", "h0")

    def f(i):
        def run(u, delta, A, D, z, bias, h0, B, C):
            return selective_scan(
                u, delta, A, B, C, D, z, bias, delta_softplus=True, initial_state=h0,
                return_final_state=True, segment_ids=seg, implementation=i,
            )  # fmt: skip

        return run

    primals = tuple(d[k] for k in names) + (B, C)
    tangents = tuple(t[k] for k in names) + (tB, tC)
    got = jax.jit(lambda *p: jax.jvp(f(impl), p, tangents))(*primals)
    want = jax.jvp(f("reference"), primals, tangents)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        close = np.allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-9)
        assert close, np.max(np.abs(np.asarray(g) - np.asarray(w)))


def _second_order_inputs():
    """Arguments (u, delta, A, D, z, bias, h0, B grouped, C time-varying) and tangents."""
    d, e = make(), make(seed=2)
    names = ("u", "delta", "A", "D", "z", "bias", "h0")
    args = tuple(d[k] for k in names) + (d["bc"]["group"][0], d["bc"]["time"][1])
    vs = tuple(e[k] for k in names) + (e["bc"]["group"][0], e["bc"]["time"][1])
    return args, vs


def _full_scan(i):
    """(y, final state) of every option at once, as a function of the differentiable inputs."""

    def f(u, delta, A, D, z, bias, h0, B, C):
        return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True,
                              initial_state=h0, return_final_state=True, chunk_size=4,
                              implementation=i)  # fmt: skip

    return f


def _scan_loss(i):
    def loss(*a):
        y, h = _full_scan(i)(*a)
        return jnp.sum(jnp.tanh(y)) + jnp.sum(jnp.abs(h) ** 2)

    return loss


def _check_hvp(impl, args, vs):
    argnums = tuple(range(len(args)))
    hvp = lambda i: jax.jvp(jax.grad(_scan_loss(i), argnums), args, vs)[1]  # noqa: E731
    for g, w in zip(jax.jit(lambda: hvp(impl))(), hvp("reference")):
        assert_close(g, w, scale=1e3)


def test_second_order_chunked(x64):
    """Hessian-vector products (forward over reverse) through the default "chunked" path, and
    vmap of jvp, equal the reference's (the hand backward is differentiated in its residuals by
    jaxcore's linear_call)."""
    args, vs = _second_order_inputs()
    _check_hvp("chunked", args, vs)
    ts = jnp.stack([vs[0], -2 * vs[0]])
    vj = lambda i: jax.vmap(
        lambda t: jax.jvp(lambda u: _scan_loss(i)(u, *args[1:]), (args[0],), (t,))[1]
    )  # noqa: E501, E731
    assert_close(jax.jit(vj("chunked"))(ts), vj("reference")(ts))


@pytest.mark.parametrize("kernel", ["chunked", "blocked", "sequential"])
def test_second_order_and_forward_mode_pallas(x64, monkeypatch, kernel):
    """Hessian-vector products and jvp through every Pallas selective kernel (interpreted): the
    forward kernel and the backward kernels get the JVPs of their XLA twins (the chunked scan
    and its reverse), so the rule differentiates again."""
    from jaxcore.kernels.scan import _pallas

    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", kernel)
    if kernel == "blocked":
        monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_CONFIG", (8, 8, 4, 1))
    args, vs = _second_order_inputs()
    got = jax.jit(lambda: jax.jvp(_full_scan("pallas_interpret"), args, vs))()
    want = jax.jvp(_full_scan("reference"), args, vs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, scale=10)
    _check_hvp("pallas_interpret", args, vs)


@pytest.mark.parametrize("impl", ["chunked", "reference", "pallas_interpret"])
def test_nan_propagates(impl):
    d = make(dtype=jnp.float32)
    B, C = d["bc"]["time"]
    u = d["u"].at[0, 3, 1].set(jnp.nan)
    y = np.asarray(selective_scan(u, d["delta"], d["A"], B, C, delta_softplus=True,
                                  implementation=impl, chunk_size=4))  # fmt: skip
    assert np.isnan(y[0, 3:, 1]).all()
    assert not np.isnan(y[0, :3]).any() and not np.isnan(y[1]).any()


def test_bad_shapes():
    d = make(dtype=jnp.float32)
    u, dl, A = d["u"], d["delta"], d["A"]
    B, C = d["bc"]["time"]
    with pytest.raises(ValueError, match="u: expected rank 3"):
        selective_scan(u[0], dl, A, B, C)
    with pytest.raises(ValueError, match="delta: expected shape"):
        selective_scan(u, dl[:, :5], A, B, C)
    with pytest.raises(ValueError, match="A: expected shape"):
        selective_scan(u, dl, A[:2], B, C)
    with pytest.raises(ValueError, match="B: expected shape"):
        selective_scan(u, dl, A, B[:, :5], C)
    with pytest.raises(ValueError, match="C: expected a group count"):
        selective_scan(u, dl, A, B, jnp.ones((BZ, L, 3, N)))
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        selective_scan(u, dl, A, B, C, initial_state=jnp.ones((BZ, DIM)))
    with pytest.raises(ValueError, match="D: expected shape"):
        selective_scan(u, dl, A, B, C, jnp.ones((DIM + 1,)))
    with pytest.raises(ValueError, match="segment_ids: expected shape"):
        selective_scan(u, dl, A, B, C, segment_ids=SEG[:, :3])
    with pytest.raises(ValueError, match="supports real A"):
        selective_scan(u, dl, A, *d["bc"]["const"], implementation="pallas_interpret")


def test_gpu_default_falls_back_for_inputs_pallas_does_not_cover(monkeypatch):
    from jaxcore import backend

    d = make(True, dtype=jnp.float32)
    B, C = d["bc"]["const"]
    want = selective_scan(d["u"], d["delta"], d["A"], B, C, implementation="chunked")
    monkeypatch.setattr(backend, "platform", lambda: "gpu")  # default becomes "pallas"
    assert backend.resolve_implementation("selective_scan", None) == "pallas"
    got = selective_scan(d["u"], d["delta"], d["A"], B, C)  # complex A: falls back to chunked
    assert_close(got, want)


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_shard_map_with_replicated_initial_state(impl):
    """Inputs sharded over the batch, the initial state replicated (not varying over the mesh
    axis): one carry type, and the state's gradient summed over the shards."""
    n = jax.device_count()
    k = jax.random.split(jax.random.key(5), 6)
    u, dl = (jax.random.normal(k[i], (n, 6, DIM)) for i in (0, 1))
    A = -jnp.exp(jax.random.normal(k[2], (DIM, N)))
    B, C = (jax.random.normal(k[i], (n, 6, N)) for i in (3, 4))
    h0 = jax.random.normal(k[5], (1, DIM, N))

    def f(impl):
        return lambda u, dl, B, C, h0: selective_scan(
            u, dl, A, B, C, initial_state=jnp.broadcast_to(h0, (u.shape[0], DIM, N)),
            delta_softplus=True, chunk_size=4, implementation=impl,
        )  # fmt: skip

    mesh = jax.make_mesh((n,), ("batch",))
    sm = jax.shard_map(f(impl), mesh=mesh, in_specs=(P("batch"),) * 4 + (P(),),
                       out_specs=P("batch"))  # fmt: skip
    args = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in (u, dl, B, C)]
    args.append(jax.device_put(h0, NamedSharding(mesh, P())))
    want = f("reference")(u, dl, B, C, h0)
    assert_close(jax.jit(sm)(*args), want, scale=10)
    loss = lambda g: lambda *a: jnp.sum(jnp.sin(g(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(sm), (0, 4)))(*args)
    for g, r in zip(got, jax.grad(loss(f("reference")), (0, 4))(u, dl, B, C, h0)):
        assert_close(g, r, scale=100)
