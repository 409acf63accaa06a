"""The Pallas selective-scan backward (kernels/scan/_pallas_bwd.py) in interpret mode.

Gradients w.r.t. every input and of the final state against ``jax.grad`` of the reference
(float64 where the interpreter allows), with CHUNKED_CONFIG / SELECTIVE_BWD_CONFIG lowered so
that tiny shapes run several chunks, several saved sub-chunks per chunk, several unrolled blocks
per sub-chunk (the recompute from the saved state) and a ragged last chunk; plus the Triton-IR
lowering for 'cuda' at the benchmark's shape family.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.scan import _pallas, _pallas_bwd, selective_scan

from jaxcore.testing import assert_close

PI = "pallas_interpret"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture
def pallas_bwd(monkeypatch):
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", "chunked")
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", "pallas")


def knobs(monkeypatch, target=10**6, steps=2, channels=16):
    """target programs (few: several sub-chunks per chunk), block steps S (< sub: recompute)."""
    monkeypatch.setattr(_pallas, "CHUNKED_CONFIG", (target, 4))
    monkeypatch.setattr(_pallas, "SELECTIVE_BWD_CONFIG", (channels, 4, steps))


def inputs(lb, lc, dtype, *, seed=0, bsz=2, length=37, dim=8, n=3, groups=2, resets=True):
    k = jax.random.split(jax.random.key(seed), 10)
    r = lambda i, s: jax.random.normal(k[i], s, jnp.float32)
    shape = {"time": (bsz, length, n), "group": (bsz, length, groups, n)}
    d = dict(
        u=r(0, (bsz, length, dim)),
        delta=r(1, (bsz, length, dim)) * 0.5 - 0.5,
        A=-jnp.exp(r(2, (dim, n))),
        B=r(3, shape[lb]),
        C=r(4, shape[lc]),
        D=r(5, (dim,)),
        z=r(6, (bsz, length, dim)),
        delta_bias=r(7, (dim,)) * 0.3,
        initial_state=r(8, (bsz, dim, n)),
    )
    d = {name: v.astype(dtype) for name, v in d.items()}
    seg = None
    if resets:
        cut = min(10, length)
        seg = jnp.array([[0] * cut + [1] * (length - cut), [3] * (length - 1) + [4]])
    return d, seg


def grads(d, seg, impl, *, use=NAMES, softplus=True, chunk=None, linear=False):
    """jax.grad of sum(sin(y)) + sum(cos(final state)) w.r.t. the inputs named in ``use``
    (``linear``: of sum(y w) + sum(final state v), fixed w and v)."""
    names = [k for k in NAMES if k in use]

    def loss(*vals):
        kw = dict(zip(names, vals))
        args = [kw.pop(k) for k in NAMES[:5]]
        y, h = selective_scan(*args, **kw, delta_softplus=softplus, return_final_state=True,
                              segment_ids=seg, chunk_size=chunk, implementation=impl)  # fmt: skip
        y = y.astype(h.dtype)
        if linear:
            w = jnp.cos(jnp.arange(y.size, dtype=h.dtype)).reshape(y.shape)
            return jnp.sum(y * w) + jnp.sum(
                h * jnp.sin(jnp.arange(h.size, dtype=h.dtype)).reshape(h.shape)
            )
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(h))

    g = jax.jit(jax.grad(loss, tuple(range(len(names)))))(*(d[k] for k in names))
    return dict(zip(names, g))


def check(got, want, scale, dtype=None):
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert_close(got[name], want[name], dtype=dtype, scale=scale, err_msg=name)


def test_block_steps():
    assert _pallas_bwd._block_steps(64, 16) == 16
    assert _pallas_bwd._block_steps(8, 2) == 2
    assert _pallas_bwd._block_steps(12, 16) == 4
    assert _pallas_bwd._block_steps(37, 16) == 1


@pytest.mark.parametrize(
    "lb,lc,softplus,length,target",
    [
        # several chunks of 3 sub-chunks of 8 steps (4 blocks of 2 each), the last chunk ragged
        ("group", "time", True, 37, 8),
        # one chunk per sub-chunk, L a multiple of it (no masking)
        ("time", "group", False, 32, 10**6),
    ],
)
def test_gradients_float64(x64, pallas_bwd, monkeypatch, lb, lc, softplus, length, target):
    knobs(monkeypatch, target=target)
    d, seg = inputs(lb, lc, jnp.float64, length=length)
    if not softplus:  # positive steps (negative ones grow the state without bound)
        d["delta"] = jax.nn.softplus(d["delta"]) + 1.0
    tc, nc = _pallas._plan_chunks(2 * 2, length, unit=8)  # bsz x channel blocks (4 of 8)
    assert nc > 1 and (target == 10**6 or tc == 24)
    got = grads(d, seg, PI, softplus=softplus, chunk=8)
    want = grads(d, seg, "reference", softplus=softplus)
    check(got, want, scale=100)  # float64: 1e-10


def test_gradients_minimal_arguments_and_bad_switch(pallas_bwd, monkeypatch):
    """No D/z/bias/initial state/resets (those branches compiled out), N = 4; a bad
    SELECTIVE_BACKWARD is named."""
    knobs(monkeypatch, steps=4)
    d, _ = inputs("time", "time", jnp.float32, length=19, n=4, resets=False)
    use = NAMES[:5]
    got = grads(d, None, PI, use=use, chunk=4)
    want = grads(d, None, "reference", use=use)
    check(got, want, scale=20)
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", "fast")
    with pytest.raises(ValueError, match="SELECTIVE_BACKWARD: expected one of"):
        grads(d, None, PI, use=use, chunk=4)


def test_gradients_length_one(x64, pallas_bwd, monkeypatch):
    """L = 1 (one chunk of one step), the gate without D."""
    knobs(monkeypatch)
    d, seg = inputs("group", "group", jnp.float64, length=1, resets=False)
    use = tuple(k for k in NAMES if k != "D")  # z without D
    check(grads(d, seg, PI, use=use), grads(d, seg, "reference", use=use), scale=100)


def test_gradients_bfloat16(pallas_bwd, monkeypatch):
    """bf16 inputs, gradients in the inputs' dtypes: against the f32 reference on the same
    (bf16-valued) inputs within 4% of each gradient's largest entry (y is rounded to bf16 in the
    forward, so the cotangent of sin(y) differs by that much), and against the XLA backward
    (the same forward) at bf16's own tolerance."""
    knobs(monkeypatch, target=8, channels=2)  # 2 channels per program: 4 dB/dC partials
    d, seg = inputs("group", "time", jnp.bfloat16, length=37)
    got = grads(d, seg, PI, chunk=8)
    want = grads({k: v.astype(jnp.float32) for k, v in d.items()}, seg, "reference")
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", "xla")
    xla = grads(d, seg, PI, chunk=8)
    for name in want:
        assert got[name].dtype == jnp.bfloat16, name
        scale = 4.0 * max(1.0, float(jnp.max(jnp.abs(want[name]))))
        assert_close(got[name].astype(jnp.float32), want[name], dtype=jnp.bfloat16,
                     scale=scale, err_msg=name)  # fmt: skip
        assert_close(got[name], xla[name], err_msg=name)


def test_nan_in_late_input(pallas_bwd, monkeypatch):
    """With finite cotangents (a linear loss), a NaN in u at step s (batch 0, channel 2) leaves du
    and d delta before s finite (the adjoint does not depend on the states); a NaN in delta
    reaches every earlier step of its channel (through the decay). NaN exactly where the
    reference has it, elsewhere equal."""
    knobs(monkeypatch, target=8)
    d, seg = inputs("time", "time", jnp.float32, length=37, resets=False)
    for name, s in (("delta", 30), ("u", 36)):  # u at the last step: the ragged tail masked
        bad = dict(d)
        bad[name] = d[name].at[0, s, 2].set(jnp.nan)
        got = grads(bad, seg, PI, chunk=8, linear=True)
        want = grads(bad, seg, "reference", linear=True)
        for k in NAMES:
            g, w = np.asarray(got[k]), np.asarray(want[k])
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{name} {s} {k}")
            ok = ~np.isnan(w)
            np.testing.assert_allclose(g[ok], w[ok], rtol=1e-4, atol=1e-4, err_msg=k)
        gu, gdl = np.asarray(got["u"]), np.asarray(got["delta"])
        assert not np.isnan(gu[1]).any() and not np.isnan(gdl[1]).any()  # the other batch row
        if name == "u":
            assert not np.isnan(gu).any() and not np.isnan(gdl[0, :s]).any()
            assert not np.isnan(got["initial_state"]).any()
        else:
            assert np.isnan(gdl[0, :s, 2]).all() and not np.isnan(np.delete(gdl[0], 2, 1)).any()


def test_grad_under_vmap(pallas_bwd, monkeypatch):
    knobs(monkeypatch, target=8)
    d, _ = inputs("time", "group", jnp.float32, length=13, resets=False)

    def loss(impl, u, dl, B, C):
        y = selective_scan(u[None], dl[None], d["A"], B[None], C[None], d["D"],
                           delta_softplus=True, chunk_size=4, implementation=impl)  # fmt: skip
        return jnp.sum(jnp.sin(y))

    args = (d["u"], d["delta"], d["B"], d["C"])
    g = lambda impl: jax.jit(jax.vmap(jax.grad(functools.partial(loss, impl), (0, 1, 2, 3))))
    for x, y in zip(g(PI)(*args), g("reference")(*args)):
        assert_close(x, y, scale=20)


@pytest.mark.parametrize("kernel", ["chunked", "blocked"])
def test_shard_map_over_batch(pallas_bwd, monkeypatch, kernel):
    """Batch-sharded under shard_map (interpret mode: check_vma=False, as JAX's Pallas
    interpreter needs): the gradient of the replicated A is summed over the shards. The
    forward is the chunked or the blocked kernel (8 channels x 4 steps per block)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Ps

    knobs(monkeypatch, target=8)
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", kernel)
    monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_CONFIG", (8, 4, 4, 1))
    d, _ = inputs("time", "time", jnp.float32, length=13, resets=False)
    names = NAMES[:5]
    args = [d[k] for k in names]
    mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])
    specs = (Ps("batch"), Ps("batch"), Ps(), Ps("batch"), Ps("batch"))
    f = lambda impl: lambda *a: selective_scan(*a, delta_softplus=True, chunk_size=4,
                                               implementation=impl)  # fmt: skip
    sm = jax.shard_map(f(PI), mesh=mesh, in_specs=specs, out_specs=Ps("batch"), check_vma=False)
    sharded = [jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip(args, specs)]
    loss = lambda g: lambda *a: jnp.sum(jnp.sin(g(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(sm), tuple(range(5))))(*sharded)
    want = jax.grad(loss(f("reference")), tuple(range(5)))(*args)
    for a, b, name in zip(got, want, names):
        assert_close(a, b, scale=20, err_msg=name)


def test_backward_lowers_to_triton_ir(monkeypatch):
    """The forward and backward kernels lower for 'cuda' (bf16 inputs, N=16, D/z/bias, resets,
    ragged L, several chunks and blocks): Pallas -> Triton IR, not Triton's own compiler."""
    pytest.importorskip("jax._src.lib.triton")
    from jax import export

    from jaxcore import backend

    monkeypatch.setattr(backend, "platform", lambda: "gpu")  # allow implementation="pallas"
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", "pallas")  # "auto" = "xla" until measured
    knobs(monkeypatch, target=32, steps=4)  # 3 chunks of 2 sub-chunks of 16 steps (4 blocks)
    assert _pallas._plan_chunks(2 * 4, 75, unit=16) == (32, 3)
    d, seg = inputs("time", "group", jnp.bfloat16, length=75, dim=64, n=16, groups=4)
    names = NAMES[:8]

    def loss(*vals):
        kw = dict(zip(names[5:], vals[5:]))
        y, h = selective_scan(*vals[:5], **kw, delta_softplus=True, return_final_state=True,
                              segment_ids=seg, chunk_size=16, implementation="pallas")  # fmt: skip
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    f = jax.jit(jax.grad(loss, tuple(range(8))))
    text = export.export(f, platforms=["cuda"], disabled_checks=checks)(
        *(d[k] for k in names)
    ).mlir_module()
    assert text.count("xla.gpu.triton") == 4  # forward 2 phases, backward 2
    assert "jaxcore_selective_scan_bwd" in text


@pytest.mark.parametrize("kernel", ["chunked", "blocked"])
def test_compiled_kernels_lower_inside_shard_map_with_check_vma(monkeypatch, kernel):
    """On a GPU the compiled forward (chunked or blocked) and backward kernels run inside
    jax.shard_map with check_vma=True (their output types take the inputs' varying mesh axes);
    lowered for 'cuda' here. Only JAX's Pallas interpreter needs check_vma=False."""
    import re

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Ps

    from jaxcore import backend

    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", "pallas")
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", kernel)
    d, _ = inputs("time", "time", jnp.bfloat16, length=64, dim=64, n=16, resets=False)
    names = NAMES[:5]
    mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])
    specs = (Ps("batch"), Ps("batch"), Ps(), Ps("batch"), Ps("batch"))

    def local(*a):
        return selective_scan(*a, delta_softplus=True, chunk_size=16, implementation="pallas")

    sm = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=Ps("batch"))
    loss = lambda *a: jnp.sum(sm(*a).astype(jnp.float32))  # noqa: E731
    args = [
        jax.ShapeDtypeStruct(d[k].shape, d[k].dtype, sharding=NamedSharding(mesh, sp))
        for k, sp in zip(names, specs)
    ]
    lowered = jax.jit(jax.grad(loss, tuple(range(5)))).trace(*args)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    # a forward and a backward Triton kernel (one chunk: the one-phase forms)
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) >= 2
    assert "jaxcore_selective_scan_bwd" in text
    assert ("jaxcore_selective_scan_blocked" in text) == (kernel == "blocked")
