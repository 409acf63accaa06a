"""The linear-recurrence scan of _tt_scan.py (Triton's tt.scan inside Pallas kernels on GPU,
lax.associative_scan elsewhere) against a loop, inside a Pallas kernel in interpret mode, and
lowered to Triton IR for CUDA on CPU. The "blocked" selective-scan kernel built on it is tested
with the other Pallas scans (test_scan_pallas.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jaxcore.kernels.scan._tt_scan import TRITON_RULE, linear_recurrence


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
