"""The "blocked" selective-scan kernel (SELECTIVE_KERNEL="blocked") and the linear-recurrence
scan it is built on (_tt_scan.linear_recurrence: Triton's tt.scan on GPU), in interpret mode
against the references, and lowered to Triton IR for CUDA on CPU.

SELECTIVE_BLOCKED_CONFIG is lowered to 8 channels and 8 steps per block so that the small shapes
run several channel blocks and several time blocks, the last one ragged (L = 37).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jaxcore.kernels.scan import _pallas, selective_scan
from jaxcore.kernels.scan._tt_scan import TRITON_RULE, linear_recurrence

from jaxcore import backend
from jaxcore.testing import assert_close

PI = "pallas_interpret"


@pytest.fixture(autouse=True)
def blocked(monkeypatch):
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", "blocked")
    monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_CONFIG", (8, 8, 4, 1))
    monkeypatch.setattr(_pallas, "CHUNKED_CONFIG", (10**6, 4))


def sequential(a, b, axis):
    a, b = np.moveaxis(np.asarray(a), axis, 0), np.moveaxis(np.asarray(b), axis, 0)
    p, h = np.ones_like(a[0]), np.zeros_like(b[0])
    ps, hs = [], []
    for t in range(a.shape[0]):
        p, h = p * a[t], a[t] * h + b[t]
        ps.append(p)
        hs.append(h)
    return np.moveaxis(np.stack(ps), 0, axis), np.moveaxis(np.stack(hs), 0, axis)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_linear_recurrence_matches_a_loop(x64, axis):
    k = jax.random.split(jax.random.key(0), 2)
    a = jax.random.uniform(k[0], (5, 6, 7), jnp.float64, -1.2, 1.2)
    b = jax.random.normal(k[1], (5, 6, 7), jnp.float64)
    p, h = jax.jit(functools.partial(linear_recurrence, axis=axis))(a, b)
    p_ref, h_ref = sequential(a, b, axis)
    np.testing.assert_allclose(p, p_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        linear_recurrence(a, b[:1])


def _kernel(a_ref, b_ref, p_ref, h_ref):
    p_ref[...], h_ref[...] = linear_recurrence(a_ref[...], b_ref[...], axis=1)


def _call(a, b, interpret: bool):
    from jax.experimental.pallas import triton as plgpu

    params = None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=1)
    out = (jax.ShapeDtypeStruct(a.shape, a.dtype),) * 2
    return pl.pallas_call(_kernel, out_shape=out, interpret=interpret, compiler_params=params)(a, b)


def test_linear_recurrence_in_a_pallas_kernel():
    a = jax.random.uniform(jax.random.key(1), (8, 16), jnp.float32, 0.5, 1.0)
    b = jax.random.normal(jax.random.key(2), (8, 16), jnp.float32)
    p, h = jax.jit(functools.partial(_call, interpret=True))(a, b)
    p_ref, h_ref = sequential(a, b, 1)
    np.testing.assert_allclose(p, p_ref, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)


def _lower_for_cuda(f, *args) -> str:
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)
    return exp(*args).mlir_module()


def test_linear_recurrence_lowers_to_triton_ir():
    """The Triton rule (one tt.scan with a two-operand combine region) is registered and the
    kernel lowers for CUDA; without the rule Pallas would refuse the primitive."""
    pytest.importorskip("jax._src.lib.triton")
    assert TRITON_RULE
    a = jnp.ones((8, 16), jnp.float32)
    text = _lower_for_cuda(functools.partial(_call, interpret=False), a, a)
    assert text.count("xla.gpu.triton") == 1


# ----------------------------------------------------------------------------------------------
# selective_scan with the blocked kernel


def selective_inputs(lb, lc, dtype, seed=0, bsz=2, length=37, dim=16, n=3, groups=2):
    k = jax.random.split(jax.random.key(seed), 10)
    r = lambda i, s: jax.random.normal(k[i], s)  # noqa: E731
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


def run(d, impl, chunk_size=4, **kw):
    d = dict(d)
    args = [d.pop(k) for k in ("u", "delta", "A", "B", "C")]
    f = functools.partial(selective_scan, delta_softplus=True, return_final_state=True,
                          chunk_size=chunk_size, implementation=impl, **kw)  # fmt: skip
    return jax.jit(f)(*args, **d)


@pytest.mark.parametrize(
    "lb, lc, dtype", [("time", "group", jnp.float32), ("group", "time", jnp.bfloat16)]
)
def test_selective_blocked_matches_reference(lb, lc, dtype):
    d = selective_inputs(lb, lc, dtype)
    y, h = run(d, PI)
    jaxpr = str(jax.make_jaxpr(lambda d: run(d, PI))(d))
    assert "jaxcore_selective_scan_blocked" in jaxpr and "chunk_ends" not in jaxpr
    f32 = {k: (v.astype(jnp.float32) if k != "segment_ids" else v) for k, v in d.items()}
    y_ref, h_ref = run(f32, "reference")
    assert y.dtype == dtype and h.dtype == jnp.float32
    scale = 10 if dtype == jnp.bfloat16 else 20
    assert_close(y, y_ref, dtype=dtype, scale=scale)
    assert_close(h, h_ref, scale=scale)


def test_selective_blocked_f64_minimal_arguments_and_nan(x64):
    """No D/z/bias/softplus/state (compiled out), N = 4, f64 state; a NaN input stays in its
    channel from its step on, exactly where the reference has it."""
    d = selective_inputs("time", "time", jnp.float64, length=13, n=4)
    args = [d[k] for k in ("u", "delta", "A", "B", "C")]
    seg = d["segment_ids"]
    f = jax.jit(functools.partial(selective_scan, chunk_size=2, implementation=PI))
    ref = jax.jit(functools.partial(selective_scan, implementation="reference"))
    got, want = f(*args, segment_ids=seg), ref(*args, segment_ids=seg)
    assert got.dtype == jnp.float64
    assert_close(got, want, scale=10)
    args[0] = args[0].at[0, 6, 2].set(jnp.nan)
    y, y_ref = (np.asarray(g(*args, segment_ids=seg)) for g in (f, ref))
    assert np.isnan(y[0, 6:10, 2]).all() and not np.isnan(y[0, :6]).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))


@pytest.mark.parametrize("backward", ["pallas", "xla"])
def test_selective_blocked_gradients(monkeypatch, backward):
    """The blocked forward saves the states every chunk_size steps (blocks of 4 steps here, as
    chunk_size = 4 forces) for either backward; L = 18: the saved intervals run past L."""
    monkeypatch.setattr(_pallas, "SELECTIVE_BACKWARD", backward)
    d = selective_inputs("group", "time", jnp.float32, seed=1, length=18)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    seg = d.pop("segment_ids")

    def grads(impl):
        def loss(*vals):
            y, h = run(dict(zip(names, vals)), impl, segment_ids=seg)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(h))

        return jax.jit(jax.grad(loss, tuple(range(len(names)))))(*(d[k] for k in names))

    for name, g, g_ref in zip(names, grads(PI), grads("reference")):
        assert_close(g, g_ref, scale=50, err_msg=name)


def test_selective_blocked_lowers_to_triton_ir(monkeypatch):
    """At the benchmark's tiles (16 channels, 16 steps, N = 16, bf16): the blocked forward and
    (compiled, SELECTIVE_BACKWARD="auto") the two Pallas backward kernels."""
    pytest.importorskip("jax._src.lib.triton")
    monkeypatch.setattr(backend, "platform", lambda: "gpu")  # allow implementation="pallas"
    monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_CONFIG", (16, 16, 4, 1))
    d = selective_inputs("time", "group", jnp.bfloat16, dim=64, n=16)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def loss(*vals):
        kw = dict(zip(names[5:], vals[5:]))
        y, h = selective_scan(*vals[:5], **kw, delta_softplus=True, return_final_state=True,
                              segment_ids=d["segment_ids"], implementation="pallas")  # fmt: skip
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    text = _lower_for_cuda(jax.grad(loss, (0, 1, 2)), *(d[k] for k in names))
    assert text.count("xla.gpu.triton") == 3
    assert "jaxcore_selective_scan_blocked" in text
    text = _lower_for_cuda(loss, *(d[k] for k in names))  # forward only: one kernel
    assert text.count("xla.gpu.triton") == 1


def test_bad_kernel_name(monkeypatch):
    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", "blocky")
    with pytest.raises(ValueError, match="SELECTIVE_KERNEL: expected one of.*blocked"):
        run(selective_inputs("time", "time", jnp.float32, length=4), PI)
