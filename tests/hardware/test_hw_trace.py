"""jaxcore.hardware.trace: jaxpr -> Workload through every control-flow construct."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxcore.hardware import Workload, gemm_workload, resolve_precision, trace


def _mm(wl: Workload):
    return [o for o in wl.ops if o.kind == "matmul"]


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


P_MLP = {"w1": jnp.ones((16, 32)), "w2": jnp.ones((32, 8))}


def test_mlp_shapes_flops_bytes():
    wl = trace(mlp, P_MLP, jnp.ones((4, 16)))
    a, b = _mm(wl)
    assert (a.m, a.n, a.k, a.batch) == (4, 32, 16, 1)
    assert (b.m, b.n, b.k) == (4, 8, 32)
    assert a.flops == 2 * 4 * 32 * 16
    assert a.bytes_read == (4 * 16 + 16 * 32) * 4 and a.bytes_written == 4 * 32 * 4
    assert a.rhs_params == ("arg0/w1",) and a.lhs_params == ("arg1",)
    assert b.rhs_params == ("arg0/w2",)
    assert [o.kind for o in wl.ops].count("transcendental") == 1
    assert wl.flops == pytest.approx(sum(o.flops for o in wl.ops))
    assert wl.unknown == ()


def test_batched_dot_and_einsum():
    wl = trace(
        lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k),
        jnp.ones((2, 3, 5, 4)),
        jnp.ones((2, 3, 7, 4)),
    )
    (o,) = _mm(wl)
    assert (o.m, o.n, o.k, o.batch) == (5, 7, 4, 6)


def test_conv():
    x = jnp.ones((2, 3, 8, 8))
    w = jnp.ones((5, 3, 3, 3))
    wl = trace(lambda x, w: jax.lax.conv(x, w, (1, 1), "VALID"), x, w)
    (o,) = _mm(wl)
    assert o.name == "conv_general_dilated"
    assert (o.m, o.n, o.k) == (2 * 6 * 6, 5, 27)
    assert o.flops == 2 * 2 * 6 * 6 * 5 * 27


def test_through_jit_custom_vjp_custom_jvp_remat():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda r, g: (g * jnp.cos(r),))

    @jax.custom_jvp
    def h(x):
        return jnp.tanh(x)

    h.defjvp(lambda p, t: (jnp.tanh(p[0]), t[0]))

    @jax.jit
    def g(x, w):
        y = f(x @ w) + h(x)
        return jax.checkpoint(lambda z: jnp.exp(z) @ w)(y)

    wl = trace(g, jnp.ones((4, 4)), jnp.ones((4, 4)))
    names = {o.name for o in wl.ops}
    assert {"sin", "tanh", "exp", "dot_general", "add"} <= names
    assert len(_mm(wl)) == 2
    assert any("custom_vjp" in o.path for o in wl.ops)
    assert any("remat" in o.path or "checkpoint" in o.path for o in wl.ops)


def test_scan_and_fori_multiply_by_trip_count():
    def f(x, w):
        y, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)
        return jax.lax.fori_loop(0, 7, lambda i, c: c * 2.0, y)

    wl = trace(f, jnp.ones((2, 3)), jnp.ones((3, 3)))
    (mm,) = _mm(wl)
    assert mm.count == 5
    mul = [o for o in wl.ops if o.name == "mul"]
    assert mul and mul[0].count == 7


def test_while_static_trip_count():
    def f(x):
        return jax.lax.while_loop(lambda c: c[0] < 9, lambda c: (c[0] + 1, c[1] * 2.0), (0, x))[1]

    wl = trace(f, jnp.ones(3))
    assert [o.count for o in wl.ops if o.name == "mul"] == [9]
    assert [o.count for o in wl.ops if o.name == "lt"] == [10]
    assert wl.unknown == ()


def test_while_dynamic_trip_count_is_listed_and_warned():
    def f(x, n):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 2.0), (0, x))[1]

    with pytest.warns(UserWarning, match="could not be costed"):
        wl = trace(f, jnp.ones(3), 4)
    assert len(wl.unknown) == 1 and wl.unknown[0].name == "while"
    assert "dynamic trip count" in wl.unknown[0].reason
    assert any(o.name == "mul" for o in wl.ops)  # body still costed once


def test_cond_takes_most_expensive_branch():
    def f(p, x):
        return jax.lax.cond(p, lambda z: jnp.exp(z) @ z, lambda z: z + 1.0, x)

    wl = trace(f, True, jnp.ones((4, 4)))
    assert len(_mm(wl)) == 1 and any(o.name == "exp" for o in wl.ops)


def test_shard_map_multiplies_by_mesh_size():
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))

    def f(x, w):
        body = lambda a, b: jax.lax.psum(a @ b, "d")
        return jax.shard_map(body, mesh=mesh, in_specs=(P(None, "d"), P("d", None)), out_specs=P())(
            x, w
        )

    wl = trace(f, jnp.ones((4, 16)), jnp.ones((16, 4)))
    (mm,) = _mm(wl)
    assert (mm.m, mm.n, mm.k, mm.count) == (4, 4, 2, 8)
    assert any(o.kind == "collective" for o in wl.ops)


def test_pmap_multiplies_by_axis_size():
    f = jax.pmap(lambda a, b: a @ b, in_axes=(0, None))
    wl = trace(f, jnp.ones((4, 2, 3)), jnp.ones((3, 5)))
    (mm,) = _mm(wl)
    assert (mm.m, mm.n, mm.k, mm.count) == (2, 5, 3, 4)


def test_unknown_primitive_listed_and_warned():
    def f(a):
        return jnp.linalg.cholesky(a @ a.T + jnp.eye(3))

    with pytest.warns(UserWarning, match="Workload.unknown"):
        wl = trace(f, jnp.ones((3, 3)))
    assert any(u.name == "cholesky" for u in wl.unknown)
    quiet = trace(f, jnp.ones((3, 3)), warn=False)
    assert quiet.unknown == wl.unknown


def test_grad_trace_has_backward_matmuls():
    loss = lambda p, x: jnp.sum(mlp(p, x) ** 2)
    wl = trace(jax.grad(loss), P_MLP, jnp.ones((4, 16)))
    assert len(_mm(wl)) >= 5


def test_transposed_or_sliced_input_is_a_view():
    wl = trace(lambda w, x: x @ w.T + w[:1, :].sum(), jnp.ones((8, 4)), jnp.ones((2, 4)))
    views = [o for o in wl.ops if o.kind == "view"]
    assert {o.name for o in views} >= {"transpose", "slice"}
    assert all(o.bytes_read == 0 for o in views)


def test_dynamic_update_slice_costs_the_window():
    wl = trace(
        lambda c, u: jax.lax.dynamic_update_slice(c, u, (3, 0)),
        jnp.ones((1024, 8)),
        jnp.ones((1, 8)),
    )
    (o,) = [o for o in wl.ops if o.name == "dynamic_update_slice"]
    assert o.bytes_read == o.bytes_written == 8 * 4


def test_precision_overrides():
    wl = trace(mlp, P_MLP, jnp.ones((4, 16)))
    a, w, g = resolve_precision(wl, {"w1": 4, "w2": (2, 8)})
    i1 = next(i for i, o in enumerate(wl.ops) if "arg0/w1" in o.params)
    i2 = next(i for i, o in enumerate(wl.ops) if "arg0/w2" in o.params)
    assert float(w[i1]) == 4 and float(a[i1]) == 32  # only the weight operand
    assert float(w[i2]) == 2 and float(a[i2]) == 8
    others = [i for i in range(len(wl.ops)) if i not in (i1, i2)]
    assert np.all(np.asarray(a)[others] == 32)
    _, w, g = resolve_precision(wl, {"w1": jnp.array([2.0, 4.0, 6.0])})
    assert float(w[i1]) == 4 and i1 in g
    a, w, _ = resolve_precision(wl, 8)
    assert np.all(np.asarray(w) == 8)
    with pytest.raises(ValueError, match="matches no op"):
        resolve_precision(wl, {"nope": 4})
    with pytest.raises(ValueError, match="positive bit-width"):
        resolve_precision(wl, {"w1": -1})
    with pytest.raises(ValueError, match="shape"):
        resolve_precision(wl, jnp.ones(len(wl.ops) + 2))


def test_gemm_workload_checks():
    wl = gemm_workload(3, 4, 5, batch=2)
    assert wl.ops[0].macs == 120
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        gemm_workload(3, 4, 0)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        trace(3)


def test_zero_width_pad_is_free_and_stack_is_costed():
    import warnings

    def f(x):
        y = jnp.pad(x, ((0, 0), (0, 0)))
        return jnp.stack([y, y]).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left uncosted
        wl = trace(f, jnp.ones((4, 8)))
    kinds = {o.name: (o.kind, o.bytes_read) for o in wl.ops}
    assert kinds["pad"] == ("view", 0.0)
    assert kinds["stack"][0] == "movement" and kinds["stack"][1] == 2 * 4 * 8 * 4
    assert not wl.unknown
