"""Co-design objective: one scalar from (hardware parameters, per-op bit-widths).

``objective(hw, workload, precision, metric="edp", area_budget_mm2=..., power_budget_w=...)``
returns ``log(metric) + penalty * (relu(area / budget - 1)^2 + relu(power / budget - 1)^2)``:
log-scale so EDP (~1e-9 J s) and latency (~1e-5 s) give O(1) gradients, quadratic penalties so
constraints bite smoothly. It is a pure function: ``jax.jit``, ``jax.grad`` and ``jax.vmap`` over
a batch of hardware pytrees (see :func:`batch_designs`) all work, so 10^4 design points evaluate
in one call (``evaluate_designs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .cost import cost
from .trace import Workload

__all__ = ["objective", "batch_designs", "evaluate_designs", "METRICS"]

METRICS = ("edp", "latency", "energy")


def objective(
    hw: Any,
    workload: Workload,
    precision: Any = None,
    *,
    metric: str = "edp",
    area_budget_mm2: float | None = None,
    power_budget_w: float | None = None,
    penalty: float = 10.0,
) -> jax.Array:
    """Scalar co-design objective (lower is better); see the module docstring."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    for name, v in (("area_budget_mm2", area_budget_mm2), ("power_budget_w", power_budget_w)):
        if v is not None and not v > 0:
            raise ValueError(f"{name}: expected a positive number or None, got {v}")
    c = cost(hw, workload, precision=precision)
    val = {"edp": c.energy_j * c.latency_s, "latency": c.latency_s, "energy": c.energy_j}[metric]
    out = jnp.log(jnp.maximum(val, 1e-300))
    if area_budget_mm2 is not None:
        out = out + penalty * jax.nn.relu(c.area_mm2 / area_budget_mm2 - 1.0) ** 2
    if power_budget_w is not None:
        out = out + penalty * jax.nn.relu(c.power_w / power_budget_w - 1.0) ** 2
    return out


def batch_designs(base: Any, **ranges: Any) -> Any:
    """A batched pytree of designs: ``base`` with the named fields replaced by 1-D arrays.

    All arrays must have the same length B; other leaves are broadcast to (B,).
    """
    if not ranges:
        raise ValueError("ranges: expected at least one field=array")
    arrs = {k: jnp.asarray(v, jnp.result_type(float)) for k, v in ranges.items()}
    sizes = {k: v.shape for k, v in arrs.items()}
    if len({s for s in sizes.values()}) != 1 or any(len(s) != 1 for s in sizes.values()):
        raise ValueError(f"ranges: expected 1-D arrays of one length, got shapes {sizes}")
    b = next(iter(arrs.values())).shape[0]
    import dataclasses

    hw = dataclasses.replace(base, **arrs)

    def bcast(x):
        x = jnp.asarray(x, jnp.result_type(float))
        return x if x.shape == (b,) else jnp.broadcast_to(x, (b,) + x.shape)

    return jax.tree_util.tree_map(bcast, hw)


def evaluate_designs(
    designs: Any, workload: Workload, precision: Any = None, *, fn: Callable | None = None,
    **kw: Any,
) -> np.ndarray:  # fmt: skip
    """``jit(vmap(objective))`` over a batch of designs (leading axis); returns a numpy array."""
    f = fn or (lambda h: objective(h, workload, precision, **kw))
    return np.asarray(jax.jit(jax.vmap(f))(designs))
