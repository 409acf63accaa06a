"""Test utilities shared by jaxcore's tests (and usable by downstream kernels' tests)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Tolerances keyed by dtype (after jax/_src/public_test_util.py).
TOLERANCE = {
    "float8": 1e-1,
    "bfloat16": 1e-2,
    "float16": 1e-3,
    "float32": 1e-5,
    "float64": 1e-12,
}


def tol(dtype: Any) -> float:
    """Relative/absolute tolerance for results computed in ``dtype``."""
    name = jnp.dtype(dtype).name
    if name in TOLERANCE:
        return TOLERANCE[name]
    if name.startswith(("float8_", "float6_", "float4_")):  # narrow ml_dtypes floats
        return TOLERANCE["float8"]
    return TOLERANCE["float32"]


def assert_close(
    actual: Any, expected: Any, *, dtype: Any = None, scale: float = 1.0, err_msg: str = ""
) -> None:
    """``assert_allclose`` with rtol = atol = scale * tol(dtype) (dtype defaults to actual's)."""
    dt = dtype if dtype is not None else jnp.result_type(actual)
    t = scale * tol(dt)
    np.testing.assert_allclose(
        np.asarray(
            jnp.asarray(actual, jnp.float32) if jnp.dtype(dt).itemsize < 4 else actual,
            dtype=np.float64,
        ),
        np.asarray(expected, dtype=np.float64),
        rtol=t,
        atol=t,
        err_msg=err_msg,
    )


def attention_inputs(
    b: int,
    t: int,
    s: int,
    n: int,
    k: int,
    h: int,
    hv: int,
    dtype: Any = jnp.bfloat16,
    seed: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Standard-normal query (b, t, n, h), key (b, s, k, h), value (b, s, k, hv) in ``dtype``."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return arr(b, t, n, h), arr(b, s, k, h), arr(b, s, k, hv)


def attention_loss(out: jax.Array, lse: jax.Array) -> jax.Array:
    """A fixed scalar of attention output and lse (finite entries) whose gradient checks both."""
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
    fin = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w) + 0.3 * jnp.sum(fin * jnp.sin(fin))
