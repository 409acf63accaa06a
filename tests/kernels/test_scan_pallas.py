"""Pallas scan kernels in interpret mode: chunked (three-phase), sequential and (selective scan)
blocked vs the references.

CHUNKED_CONFIG is lowered so that tiny shapes still run several chunks (asserted), with L not a
multiple of the chunk and channel counts that leave a ragged (masked) block;
SELECTIVE_BLOCKED_CONFIG to 8 channels and 8 steps per block, so that they run several channel
blocks and time blocks, the last one ragged.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.scan import _pallas, linear_scan, selective_scan

from jaxcore.testing import assert_close

PI = "pallas_interpret"


def jitted(fn, **static):
    """A fresh jit of fn with static keyword arguments (fresh: the kernel knobs that the tests
    monkeypatch are read at trace time, so no trace may be shared between tests)."""
    return jax.jit(functools.partial(fn, **static))


def lscan(a, b, **kw):
    static = {k: kw.pop(k) for k in ("implementation", "reverse") if k in kw}
    return jitted(linear_scan, **static)(a, b, **kw)


def sscan(*args, **kw):
    names = ("implementation", "chunk_size", "delta_softplus", "return_final_state")
    static = {k: kw.pop(k) for k in names if k in kw}
    return jitted(selective_scan, **static)(*args, **kw)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of >= 4 steps and as many as L allows (tiny shapes still run several chunks)."""
    monkeypatch.setattr(_pallas, "CHUNKED_CONFIG", (10**6, 4))


def use_kernel(monkeypatch, kernel):
    """ "blocked_chunked": the blocked kernel split into chunks (about 12 programs: B=2 x 2
    channel blocks x 3 chunks at D=16)."""
    if kernel.startswith("blocked"):  # selective scan only
        monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_CONFIG", (8, 8, 4, 1))
        monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_PROGRAMS", 12 if "chunked" in kernel else 0)
        kernel = "blocked"
    else:
        monkeypatch.setattr(_pallas, "LINEAR_KERNEL", kernel)
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", kernel)


KERNEL_NAMES = {  # the forward pallas_calls of each selective kernel (several chunks)
    "chunked": {"jaxcore_selective_scan_chunked", "jaxcore_selective_scan_chunk_ends"},
    "sequential": {"jaxcore_selective_scan"},
    "blocked": {"jaxcore_selective_scan_blocked"},
    "blocked_chunked": {
        "jaxcore_selective_scan_blocked",
        "jaxcore_selective_scan_blocked_chunk_ends",
    },
}


def test_plan_chunks(small_chunks, monkeypatch):
    for length, unit in [(37, 1), (37, 4), (64, 8), (5, 4), (1, 1), (1000, 3)]:
        tc, nc = _pallas._plan_chunks(programs=2, length=length, unit=unit)
        assert tc % unit == 0 and nc * tc >= length and (nc - 1) * tc < length
    assert _pallas._plan_chunks(2, 37, 4) == (8, 5)  # several chunks, the last one ragged
    assert _pallas._plan_chunks(2, 16, 4) == (4, 4)  # whole chunks (test_selective_gradients)
    assert _pallas._plan_chunks(2, 20, 1) == (4, 5)  # whole chunks (linear gradients)
    monkeypatch.setattr(_pallas, "CHUNKED_CONFIG", (1024, 128))
    assert _pallas._plan_chunks(128, 8192, 64) == (1024, 8)  # B=2, D=1024 / 16 channels
    assert _pallas._plan_chunks(1024, 8192, 64)[1] == 1  # the grid is full: one pass
    assert _pallas._plan_chunks(2, 100, 4)[1] == 1  # L below the fewest steps per chunk


# ----------------------------------------------------------------------------------------------
# linear_scan


@pytest.mark.parametrize(
    "kernel,dtype",
    [("chunked", jnp.float32), ("chunked", jnp.bfloat16), ("sequential", jnp.float32)],
)
def test_linear_matches_reference(small_chunks, monkeypatch, kernel, dtype):
    use_kernel(monkeypatch, kernel)
    k = jax.random.split(jax.random.key(0), 4)
    bsz, length, state = 2, 37, (5, 7)  # 35 channels: one masked block of 64
    a = jax.random.uniform(k[0], (bsz, length) + state, minval=0.5, maxval=1.0).astype(dtype)
    b = jax.random.normal(k[1], (bsz, length) + state).astype(dtype)
    h0 = jax.random.normal(k[2], (bsz,) + state).astype(dtype)
    seg = jnp.array([[0] * 9 + [1] * 28, [4] * 20 + [5] * 17])
    kw = dict(initial_state=h0, segment_ids=seg)
    got = lscan(a, b, implementation=PI, **kw)
    f32 = lambda v: v.astype(jnp.float32)
    want = lscan(f32(a), f32(b), initial_state=f32(h0), segment_ids=seg,
                 implementation="reference")  # fmt: skip
    assert got.dtype == dtype
    assert_close(got, want, scale=4)
    if dtype != jnp.float32:
        return
    # reverse and a scalar coefficient per step (broadcast over the state axes)
    got_r = lscan(a[:, :, 0, 0], b, reverse=True, implementation=PI)
    want_r = lscan(f32(a[:, :, 0, 0]), f32(b), reverse=True, implementation="reference")
    assert_close(got_r, want_r, scale=4)


def test_linear_gradients_and_ragged_channel_blocks(small_chunks):
    k = jax.random.split(jax.random.key(1), 3)
    bsz, length, s = 1, 20, 200  # two channel blocks of 128, the second ragged; L = 5 chunks of 4
    a = jax.random.uniform(k[0], (bsz, length, s), minval=-1.0, maxval=1.0)
    b = jax.random.normal(k[1], (bsz, length, s))
    h0 = jax.random.normal(k[2], (bsz, s))

    def loss(impl):
        f = lambda a, b, h0: jnp.sum(jnp.sin(linear_scan(a, b, initial_state=h0,
                                                         implementation=impl)))  # fmt: skip
        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(a, b, h0)

    (v, g), (v_ref, g_ref) = loss(PI), loss("reference")
    assert_close(v, v_ref, scale=10)
    for x, y in zip(g, g_ref):
        assert_close(x, y, scale=10)


# ----------------------------------------------------------------------------------------------
# selective_scan


def selective_inputs(lb, lc, dtype, seed=0, bsz=2, length=37, dim=16, n=3, groups=2):
    k = jax.random.split(jax.random.key(seed), 10)
    r = lambda i, s: jax.random.normal(k[i], s)
    shape = {"time": (bsz, length, n), "group": (bsz, length, groups, n)}
    return dict(
        u=r(0, (bsz, length, dim)).astype(dtype),
        delta=(r(1, (bsz, length, dim)) * 0.5 - 0.5).astype(dtype),
        A=-jnp.exp(r(2, (dim, n))),
        B=r(3, shape[lb]).astype(dtype),
        C=r(4, shape[lc]).astype(dtype),
        D=r(5, (dim,)),
        z=r(6, (bsz, length, dim)).astype(dtype),
        delta_bias=r(7, (dim,)) * 0.3,
        initial_state=r(8, (bsz, dim, n)),
        segment_ids=jnp.array([[0] * min(10, length) + [1] * max(0, length - 10), [3] * length]),
    )


def as_f32(d):
    return {k: (v.astype(jnp.float32) if k != "segment_ids" else v) for k, v in d.items()}


def run(d, impl, chunk_size=4, **kw):
    d = dict(d)
    args = [d.pop(k) for k in ("u", "delta", "A", "B", "C")]
    return sscan(*args, **d, delta_softplus=True, return_final_state=True,
                 chunk_size=chunk_size, implementation=impl, **kw)  # fmt: skip


@pytest.mark.parametrize(
    "kernel,lb,lc,dtype",
    [
        ("chunked", "time", "group", jnp.float32),
        ("chunked", "group", "time", jnp.bfloat16),
        ("sequential", "group", "time", jnp.bfloat16),
        ("blocked", "time", "group", jnp.float32),
        ("blocked", "group", "time", jnp.bfloat16),
        ("blocked_chunked", "group", "time", jnp.float32),  # 3 chunks of 2 blocks of 8 steps
    ],
)
def test_selective_matches_reference(small_chunks, monkeypatch, kernel, lb, lc, dtype):
    use_kernel(monkeypatch, kernel)
    d = selective_inputs(lb, lc, dtype)
    y, h = run(d, PI)
    names = set(re.findall(r"name=(jaxcore_\w+)", str(jax.make_jaxpr(lambda d: run(d, PI))(d))))
    assert names == KERNEL_NAMES[kernel]
    y_ref, h_ref = run(as_f32(d), "reference")
    assert y.dtype == dtype and h.dtype == jnp.float32
    scale = 10 if dtype == jnp.bfloat16 else 20
    assert_close(y, y_ref, dtype=dtype, scale=scale)
    assert_close(h, h_ref, scale=scale)


@pytest.mark.parametrize("kernel", ["chunked", "blocked", "blocked_chunked"])
def test_selective_minimal_arguments_pow2_state_and_nan(small_chunks, monkeypatch, kernel):
    """No D/z/bias/softplus/state (those branches compiled out), N = 4; a NaN input stays in its
    channel, from its step on, exactly where the reference has it."""
    use_kernel(monkeypatch, kernel)
    d = selective_inputs("time", "time", jnp.float32, length=13, n=4)
    args = [d[k] for k in ("u", "delta", "A", "B", "C")]
    seg = d["segment_ids"]
    f = jitted(selective_scan, chunk_size=2, implementation=PI)
    ref = jitted(selective_scan, implementation="reference")
    got = f(*args, segment_ids=seg)
    want = ref(*args, segment_ids=seg)
    assert_close(got, want, scale=10)
    args[0] = args[0].at[0, 6, 2].set(jnp.nan)
    y = np.asarray(f(*args, segment_ids=seg))
    assert np.isnan(y[0, 6:10, 2]).all()
    assert not np.isnan(y[0, :6]).any()
    assert not np.isnan(np.delete(y[0], 2, axis=1)).any() and not np.isnan(y[1]).any()
    # a reset multiplies the state by 0 (as the reference does), so NaN goes on past it
    y_ref = np.asarray(ref(*args, segment_ids=seg))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))


@pytest.mark.parametrize(
    "kernel, backward, length",
    [
        ("chunked", "auto", 16),
        ("blocked", "pallas", 18),
        ("blocked", "xla", 18),
        ("blocked_chunked", "pallas", 18),
    ],
)
def test_selective_gradients(small_chunks, monkeypatch, kernel, backward, length):
    """chunked: 4 chunks of 4 steps ("auto" in interpret mode: the XLA backward; the Pallas one:
    test_scan_pallas_bwd.py); blocked: 4-step blocks (chunk_size = 4 forces them), the states
    saved for either backward, the last saved interval running past L."""
    use_kernel(monkeypatch, kernel)
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", backward)
    d = selective_inputs("group", "time", jnp.float32, seed=1, length=length)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    seg = d.pop("segment_ids")

    def grads(impl):
        def loss(*vals):
            y, h = run(dict(zip(names, vals)), impl, segment_ids=seg)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(h))

        return jax.jit(jax.grad(loss, tuple(range(len(names)))))(*(d[k] for k in names))

    for name, g, g_ref in zip(names, grads(PI), grads("reference")):
        assert_close(g, g_ref, scale=50, err_msg=name)


@pytest.mark.parametrize("kernel", ["chunked", "blocked"])
def test_selective_jit_vmap(small_chunks, monkeypatch, kernel):
    use_kernel(monkeypatch, kernel)
    d = selective_inputs("time", "group", jnp.float32, length=9)
    args = [d[k] for k in ("u", "delta", "A", "B", "C")]

    def one(u, dl, B, C):
        return selective_scan(u[None], dl[None], args[2], B[None], C[None], d["D"],
                              delta_softplus=True, chunk_size=2, implementation=PI)[0]  # fmt: skip

    got = jax.jit(jax.vmap(one))(args[0], args[1], args[3], args[4])
    want = sscan(*args, d["D"], delta_softplus=True, implementation="reference")
    assert_close(got, want, scale=10)


def test_bad_kernel_name(monkeypatch):
    d = selective_inputs("time", "time", jnp.float32, length=4)
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", "fast")
    with pytest.raises(ValueError, match="SELECTIVE_KERNEL: expected one of.*blocked"):
        run(d, PI)
    monkeypatch.setattr(_pallas, "LINEAR_KERNEL", "fast")
    with pytest.raises(ValueError, match="LINEAR_KERNEL: expected one of"):
        linear_scan(jnp.ones((1, 3, 2)), jnp.ones((1, 3, 2)), implementation=PI)


# ----------------------------------------------------------------------------------------------
# the GPU lowering, checked without a GPU: export for CUDA runs the Pallas -> Triton IR lowering
# (the power-of-two load/store shapes, the supported primitives and loops), not Triton's compiler


def _lower_for_cuda(f, *args) -> str:
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
        *args
    ).mlir_module()


@pytest.mark.parametrize(
    "kernel,knobs",
    [
        ("chunked", {"PREFETCH": 3, "SELECTIVE_CHUNKED_CONFIG": (32, 1, 1)}),
        ("sequential", {}),
        ("blocked", {"SELECTIVE_BLOCKED_CONFIG": (16, 16, 4, 2)}),  # uses tt.scan (_tt_scan.py)
        ("blocked_chunked", {"SELECTIVE_BLOCKED_CONFIG": (16, 16, 4, 2)}),
    ],
)
def test_kernels_lower_to_triton_ir(small_chunks, monkeypatch, kernel, knobs):
    pytest.importorskip("jax._src.lib.triton")
    from jaxcore import backend

    monkeypatch.setattr(backend, "platform", lambda: "gpu")  # allow implementation="pallas"
    use_kernel(monkeypatch, kernel)
    for k, v in knobs.items():
        monkeypatch.setattr(_pallas, k, v)
    d = selective_inputs("time", "group", jnp.bfloat16, dim=64, n=16)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def loss(*vals):
        kw = dict(zip(names[5:], vals[5:]))
        y, h = selective_scan(*vals[:5], **kw, delta_softplus=True, return_final_state=True,
                              segment_ids=d["segment_ids"], implementation="pallas")  # fmt: skip
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    text = _lower_for_cuda(jax.grad(loss, (0, 1, 2)), *(d[k] for k in names))
    # chunked: two forward kernels and (compiled, SELECTIVE_BACKWARD="auto") the two Pallas
    # backward kernels; blocked: one forward kernel and those two; sequential: one kernel, the
    # XLA backward
    forward = len(KERNEL_NAMES[kernel])
    assert text.count("xla.gpu.triton") == forward + 2 * (kernel != "sequential")
    assert all(name in text for name in KERNEL_NAMES[kernel])
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", "xla")
    text = _lower_for_cuda(jax.grad(loss, (0, 1, 2)), *(d[k] for k in names))
    assert text.count("xla.gpu.triton") == forward
    a = jnp.full((2, 37, 200), 0.9, jnp.bfloat16)
    lin = lambda a, b: jnp.sum(linear_scan(a, b, implementation="pallas").astype(jnp.float32))
    text = _lower_for_cuda(jax.grad(lin, (0, 1)), a, a)
    # fwd + adjoint (the linear scan has no blocked kernel: "auto" = chunked)
    assert text.count("xla.gpu.triton") == (2 if kernel == "sequential" else 4)


@pytest.mark.parametrize(
    "config, programs",
    [((32, 4, 1, 2), 16), ((64, 8, 4, 2), 16), ((8, 16, 4, 2), 0), ((8, 32, 8, 2), 64)],
)
def test_selective_blocked_tilings(small_chunks, monkeypatch, config, programs):
    """Tilings like those benchmarks/gpu_scan.py sweeps on a GPU (channels 8-64, T 4-32, one
    pass or chunks), at D=64 and a ragged L = 45 (T = 32 > the 16-step saved interval falls
    back to 16 for the gradients' forward), forward and gradients against the reference."""
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", "blocked")
    monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_CONFIG", config)
    monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_PROGRAMS", programs)
    d = selective_inputs("time", "group", jnp.float32, length=45, dim=64, n=16, groups=2)
    seg = d.pop("segment_ids")
    y, h = run(d, PI, segment_ids=seg)
    y_ref, h_ref = run(d, "reference", segment_ids=seg)
    assert_close(y, y_ref, scale=20)
    assert_close(h, h_ref, scale=20)
    names = ("u", "delta", "B", "C", "initial_state")

    def grads(impl):
        def loss(*vals):
            yy, hh = run({**d, **dict(zip(names, vals))}, impl, chunk_size=16, segment_ids=seg)
            return jnp.sum(jnp.sin(yy)) + jnp.sum(hh**2)

        return jax.jit(jax.grad(loss, tuple(range(len(names)))))(*(d[k] for k in names))

    for name, g, g_ref in zip(names, grads(PI), grads("reference")):
        assert_close(g, g_ref, scale=50, err_msg=name)
