"""linear_scan: every implementation against an independent float64 loop, gradients, transforms."""

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxcore.kernels.scan import linear_scan

from jaxcore.testing import assert_close

IMPLS = ["sequential", "associative", "chunked", "pallas_interpret"]
_REFERENCE_GRADS: dict = {}
B, L, D = 2, 11, 3
SEG = np.array([[0] * 4 + [1] * 7, [0] * 2 + [5] * 6 + [7] * 3])


def loop_reference(a, b, h0, reverse=False, segment_ids=None):
    """h_t = a_t h_{t-1} + b_t with plain numpy loops (matrix a when a.ndim == b.ndim + 1)."""
    a, b, h0 = np.asarray(a), np.asarray(b), np.asarray(h0)
    matrix = a.ndim == b.ndim + 1
    if not matrix:
        a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
    out = np.zeros(np.broadcast_shapes(b.shape), np.result_type(a, b, h0))
    order = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    for i in range(b.shape[0]):
        h = h0[i]
        prev = None
        for t in order:
            if segment_ids is not None and prev is not None and segment_ids[i, t] != prev:
                h = np.zeros_like(h)
            prev = None if segment_ids is None else segment_ids[i, t]
            h = (a[i, t] @ h[..., None])[..., 0] if matrix else a[i, t] * h
            h = h + b[i, t]
            out[i, t] = h
    return out


def close_c(x, y, scale=1.0):
    """assert_close on real and imaginary parts."""
    x, y = np.asarray(x), np.asarray(y)
    assert_close(x.real, y.real, scale=scale)
    assert_close(x.imag, y.imag, scale=scale)


def make(kind, dtype=jnp.float64, length=L, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    shapes = {
        "scalar": ((B, length), (B, length, D)),
        "diag": ((B, length, D), (B, length, D)),
        "broadcast": ((B, length, D), (B, length, D, 2)),
        "matrix": ((B, length, D, D), (B, length, D)),
    }
    ashape, bshape = shapes[kind]
    a = jax.random.uniform(k[0], ashape, dtype, 0.3, 1.0)
    if kind == "matrix":
        a = a / D
    b = jax.random.normal(k[1], bshape, dtype)
    h0 = jax.random.normal(k[2], (B,) + bshape[2:], dtype)
    return a.astype(dtype), b.astype(dtype), h0.astype(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["scalar", "diag", "broadcast", "matrix"])
def test_matches_loop(x64, impl, kind):
    if impl.startswith("pallas") and kind == "matrix":
        pytest.skip("pallas: elementwise a only")
    if impl in ("associative", "pallas_interpret") and kind == "diag":
        pytest.skip("diag is the broadcast case without trailing axes")
    a, b, h0 = make(kind)
    cases = [(r, s) for r in (False, True) for s in (None, SEG)]

    @jax.jit
    def f(a, b, h0):
        return [
            linear_scan(
                a, b, initial_state=h0, reverse=r, segment_ids=s, chunk_size=4, implementation=impl
            )
            for r, s in cases
        ]

    for got, (r, s) in zip(f(a, b, h0), cases):
        assert_close(got, loop_reference(a, b, h0, r, s), err_msg=f"reverse={r} segments={s}")


@pytest.mark.parametrize("impl", ["sequential", "associative", "chunked"])
def test_complex(x64, impl):
    a, b, h0 = make("diag")
    ac = a * jnp.exp(1j * b)
    bc = b + 1j * jnp.cos(b)
    got = jax.jit(lambda a, b, h: linear_scan(a, b, initial_state=h, implementation=impl))(
        ac, bc, h0.astype(jnp.complex128)
    )
    close_c(got, loop_reference(ac, bc, h0))
    # gradient of a real loss w.r.t. complex inputs equals autodiff of the reference
    f = lambda i: lambda a, b: jnp.sum(jnp.abs(linear_scan(a, b, implementation=i)) ** 2)
    grads = [jax.jit(jax.grad(f(i), (0, 1)))(ac, bc) for i in (impl, "reference")]
    for g, r in zip(*grads):
        close_c(g, r, scale=1e3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["scalar", "broadcast", "matrix"])
def test_gradients(x64, impl, kind):
    if impl.startswith("pallas") and kind == "matrix":
        pytest.skip("pallas: elementwise a only")
    if impl == "sequential" and kind == "scalar":
        pytest.skip("the adjoint is shared by all implementations; covered by the others")
    a, b, h0 = make(kind)
    w = jnp.cos(jnp.arange(b.size, dtype=b.dtype).reshape(b.shape))

    def loss(i):
        def f(a, b, h0):
            total = 0.0
            for reverse in (False, True):
                hs = linear_scan(
                    a,
                    b,
                    initial_state=h0,
                    reverse=reverse,
                    segment_ids=SEG,
                    chunk_size=4,
                    implementation=i,
                )
                total = total + jnp.sum(w * jnp.tanh(hs)) + jnp.sum(hs[:, -1] ** 2)
            return total

        return jax.jit(jax.grad(f, (0, 1, 2)))

    got = loss(impl)(a, b, h0)
    if kind not in _REFERENCE_GRADS:  # the oracle once per kind, shared by the implementations
        _REFERENCE_GRADS[kind] = jax.device_get(loss("reference")(a, b, h0))
    want = _REFERENCE_GRADS[kind]
    for g, r, name in zip(got, want, "a b h0".split()):
        assert_close(g, r, scale=1e3, err_msg=name)


def test_reference_grad_finite_differences(x64):
    a, b, h0 = make("diag", length=5)
    f = jax.jit(
        lambda a, b, h0: linear_scan(a, b, initial_state=h0, implementation="chunked", chunk_size=2)
    )
    jax.test_util.check_grads(f, (a, b, h0), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("impl", IMPLS)
def test_length_one_and_chunk_bigger_than_length(x64, impl):
    a, b, h0 = make("diag", length=1)
    got = linear_scan(a, b, initial_state=h0, chunk_size=8, implementation=impl)
    assert_close(got, loop_reference(a, b, h0))


def test_float32_default_and_dtypes():
    a, b, h0 = make("diag", dtype=jnp.float32)
    got = jax.jit(lambda a, b, h: linear_scan(a, b, initial_state=h))(a, b, h0)
    assert got.dtype == jnp.float32
    assert_close(got, loop_reference(a, b, h0), scale=10)
    bf = jax.jit(linear_scan)(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert bf.dtype == jnp.bfloat16


def test_compile_time_structure_independent_of_length():
    """'chunked' is lax.scan over chunks: the jaxpr has the same size for any length."""
    sizes = []
    for length in (64, 4096):
        a = jnp.ones((1, length, 4))
        jaxpr = jax.make_jaxpr(
            lambda a: linear_scan(a, a, implementation="chunked", chunk_size=16)
        )(a)
        sizes.append([e.primitive.name for e in jaxpr.eqns])
    assert sizes[0] == sizes[1]


def test_jit_vmap():
    a, b, h0 = make("diag", dtype=jnp.float32)
    f = jax.jit(lambda a, b: linear_scan(a, b, implementation="chunked", chunk_size=4))
    v = jax.vmap(lambda a, b: f(a[None], b[None])[0])(a, b)
    assert_close(v, loop_reference(a, b, jnp.zeros_like(h0)), scale=10)


def test_shard_map_and_pmap():
    n = jax.device_count()
    k = jax.random.split(jax.random.key(1), 2)
    a = jax.random.uniform(k[0], (n, 9, 4), jnp.float32, 0.5, 1.0)
    b = jax.random.normal(k[1], (n, 9, 4), jnp.float32)
    want = loop_reference(a, b, np.zeros((n, 4), np.float32))
    mesh = jax.make_mesh((n,), ("batch",))
    f = jax.shard_map(
        lambda a, b: linear_scan(a, b, implementation="chunked", chunk_size=4),
        mesh=mesh,
        in_specs=(P("batch"), P("batch")),
        out_specs=P("batch"),
    )
    sh = NamedSharding(mesh, P("batch"))
    a_s, b_s = jax.device_put(a, sh), jax.device_put(b, sh)
    got = jax.jit(f)(a_s, b_s)
    assert_close(got, want, scale=10)
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) ** 2)))(a_s, b_s)
    r = jax.grad(lambda a, b: jnp.sum(linear_scan(a, b, implementation="reference") ** 2))(a, b)
    assert_close(g, r, scale=10)
    pm = jax.pmap(lambda a, b: linear_scan(a[None], b[None], implementation="associative")[0])
    assert_close(pm(a, b), want, scale=10)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates(impl):
    a, b, h0 = make("diag", dtype=jnp.float32)
    b = b.at[0, 3, 1].set(jnp.nan)
    got = np.asarray(linear_scan(a, b, implementation=impl, chunk_size=4))
    assert np.isnan(got[0, 3:, 1]).all()
    assert not np.isnan(got[0, :3]).any() and not np.isnan(got[1]).any()
    assert not np.isnan(got[0, :, [0, 2]]).any()


def test_bad_shapes():
    a, b, h0 = make("diag", dtype=jnp.float32)
    with pytest.raises(ValueError, match="a: expected"):
        linear_scan(a[:, :5], b)
    with pytest.raises(ValueError, match="b: expected rank"):
        linear_scan(a[0, 0], b[0, 0])
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        linear_scan(a, b, initial_state=h0[:, :2])
    with pytest.raises(ValueError, match="segment_ids: expected shape"):
        linear_scan(a, b, segment_ids=SEG[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_scan(a, b, chunk_size=0)
    with pytest.raises(ValueError, match="implementation="):
        linear_scan(a, b, implementation="nope")
    with pytest.raises(ValueError, match="elementwise a only"):
        am, bm, _ = make("matrix", dtype=jnp.float32)
        linear_scan(am, bm, implementation="pallas_interpret")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["scalar", "broadcast", "matrix"])
def test_forward_mode(x64, impl, kind):
    """jvp in all of a, b, initial_state (reverse, resets) equals the reference's, and jacfwd
    equals jacrev: the tangent of a linear recurrence is the same recurrence, run by ``impl``."""
    if impl.startswith("pallas") and kind == "matrix":
        pytest.skip("pallas: elementwise a only")
    a, b, h0 = make(kind)
    ta, tb, th = make(kind, seed=1)

    def f(i, reverse):
        return lambda a, b, h0: linear_scan(
            a, b, initial_state=h0, reverse=reverse, segment_ids=SEG, chunk_size=4,
            implementation=i,
        )  # fmt: skip

    for reverse in (False, True):
        got = jax.jit(lambda *p, r=reverse: jax.jvp(f(impl, r), p, (ta, tb, th)))(a, b, h0)
        want = jax.jvp(f("reference", reverse), (a, b, h0), (ta, tb, th))
        for g, w in zip(got, want):
            assert_close(g, w, err_msg=f"reverse={reverse}")
    # jacfwd (one jvp per input element) equals jacrev, on a short piece
    piece = (
        lambda i: (
            lambda b0: linear_scan(  # noqa: E731
                a[:1, :5], b0, initial_state=h0[:1], chunk_size=2, implementation=i
            )
        )
    )
    assert_close(
        jax.jit(jax.jacfwd(piece(impl)))(b[:1, :5]), jax.jacrev(piece("reference"))(b[:1, :5])
    )


@pytest.mark.parametrize("impl", ["chunked", "pallas_interpret"])
def test_hessian_vmap_of_jvp_and_forward_over_reverse(x64, impl):
    """Second order through the scan (forward over reverse: jax.hessian, Hessian-vector products)
    and vmap of jvp, against the reference."""
    a, b, h0 = make("broadcast")
    a, b, h0 = a[:, :5], b[:, :5], h0

    def loss(i):
        return lambda a, b: jnp.sum(jnp.sin(linear_scan(a, b, initial_state=h0, implementation=i)))

    ha = jax.jit(jax.hessian(loss(impl)))(a, b)
    hr = jax.hessian(loss("reference"))(a, b)
    assert_close(ha, hr, scale=10)
    hvp = lambda i: jax.jvp(jax.grad(loss(i), (0, 1)), (a, b), (b[..., 0], a[..., None] + b))  # noqa: E731
    for g, w in zip(
        jax.tree.leaves(jax.jit(lambda: hvp(impl))()), jax.tree.leaves(hvp("reference"))
    ):
        assert_close(g, w, scale=10)
    tb = jnp.stack([b, 2 * b, -b])
    jv = lambda i: jax.vmap(lambda t: jax.jvp(lambda b: loss(i)(a, b), (b,), (t,))[1])(tb)  # noqa: E731
    assert_close(jax.jit(lambda: jv(impl))(), jv("reference"))


@pytest.mark.parametrize("impl", ["sequential", "chunked", "associative"])
def test_shard_map_with_replicated_b_and_state(impl):
    """Inside shard_map, a sharded over the batch, b and the initial state replicated (not
    varying over the mesh axis): one carry type for every implementation, and the replicated
    inputs' gradients summed over the shards."""
    n = jax.device_count()
    k = jax.random.split(jax.random.key(2), 3)
    a = jax.random.uniform(k[0], (n, 9, 4), jnp.float32, 0.5, 1.0)
    b = jax.random.normal(k[1], (1, 9, 4), jnp.float32)
    h0 = jax.random.normal(k[2], (1, 4), jnp.float32)
    mesh = jax.make_mesh((n,), ("batch",))
    f = jax.shard_map(
        lambda a, b, h0: linear_scan(a, b, initial_state=h0, implementation=impl, chunk_size=4),
        mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=P("batch"),
    )  # fmt: skip
    a_s = jax.device_put(a, NamedSharding(mesh, P("batch")))
    b_s, h_s = (jax.device_put(x, NamedSharding(mesh, P())) for x in (b, h0))
    ref = lambda a, b, h0: linear_scan(  # noqa: E731
        a, jnp.broadcast_to(b, a.shape), initial_state=jnp.broadcast_to(h0, (n, 4)),
        implementation="reference",
    )  # fmt: skip
    assert_close(jax.jit(f)(a_s, b_s, h_s), ref(a, b, h0), scale=10)
    loss = lambda g: lambda *x: jnp.sum(jnp.sin(g(*x)))  # noqa: E731
    got = jax.jit(jax.grad(loss(f), (0, 1, 2)))(a_s, b_s, h_s)
    for g, r in zip(got, jax.grad(loss(ref), (0, 1, 2))(a, b, h0)):
        assert_close(g, r, scale=10)
