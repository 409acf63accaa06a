"""The cost contract shared by every hardware model.

A hardware model is a frozen dataclass registered as a JAX pytree: its float fields are the
continuous (differentiable) parameters, fields marked ``static`` (dataflow, timing style) are
hashable options. ``cost(hw, workload, *, precision=None) -> Cost`` is a pure JAX function of the
model's parameters and of the per-op bit-widths; it runs under ``jit``, ``vmap`` and ``grad``.

Discrete quantities (ceil of tile counts, max of overlapped times) use an EXACT forward value with
a straight-through (ceil, round) or soft (max) derivative: the number printed is the exact
model's answer, the gradient is that of a smooth surrogate.

Bad input: :func:`validate` raises ``ValueError`` naming the parameter for non-positive sizes,
bandwidths or frequencies when the values are concrete (outside ``jit``). Inside an optimisation
loop (traced values) nothing can raise; call :func:`project` after each update: it clips every
parameter to its documented lower bound (``Field.lower``, default ``1e-6``; integer-like counts
such as rows/cols/pes/banks to 1) so the cost stays finite. ``cost`` applies the same projection
to traced parameters, so a cost evaluated inside ``jit`` never sees a zero bandwidth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .trace import KINDS, Workload

__all__ = [
    "Cost",
    "cost",
    "cost_table",
    "hardware_model",
    "param",
    "static",
    "validate",
    "project",
    "ste_ceil",
    "ste_round",
    "soft_max",
    "resolve_precision",
]


# ----------------------------------------------------------------------------------------------
# pytree dataclasses
def param(default: Any, *, lower: float = 1e-6, doc: str = "") -> Any:
    """A continuous, differentiable model parameter with lower bound ``lower`` (for projection)."""
    return dataclasses.field(default=default, metadata={"lower": lower, "doc": doc})


def static(default: Any, *, doc: str = "") -> Any:
    """A static (hashable, non-differentiable) model option."""
    return dataclasses.field(default=default, metadata={"static": True, "doc": doc})


def hardware_model(cls: type) -> type:
    """Decorator: frozen dataclass + pytree (float fields leaves, ``static`` fields metadata)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    return cls


def _data_fields(hw: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(hw) if not f.metadata.get("static")]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate(hw: Any) -> Any:
    """Raise ``ValueError`` (naming the parameter) for concrete values below their bound.

    Traced values are skipped (use :func:`project` inside optimisation). Returns ``hw``.
    """
    for f in _data_fields(hw):
        v = getattr(hw, f.name)
        if v is None:
            continue
        if isinstance(v, (list, tuple, dict)) or dataclasses.is_dataclass(v):
            if dataclasses.is_dataclass(v):
                validate(v)
            continue
        if not _is_concrete(v):
            continue
        arr = np.asarray(v, dtype=np.float64)
        lower = f.metadata.get("lower", 1e-6)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{type(hw).__name__}.{f.name}: expected a finite number, got {v!r}")
        if np.any(arr < lower):
            bad = arr.min()
            raise ValueError(
                f"{type(hw).__name__}.{f.name}: expected a value >= {lower:g}, got {bad:g}"
            )
    return hw


def project(hw: Any) -> Any:
    """Clip every continuous parameter to its lower bound (for use inside optimisation loops)."""
    updates = {}
    for f in _data_fields(hw):
        v = getattr(hw, f.name)
        if dataclasses.is_dataclass(v):
            updates[f.name] = project(v)
        elif not isinstance(v, (list, tuple, dict)) and v is not None:
            updates[f.name] = jnp.maximum(
                jnp.asarray(v, jnp.result_type(float)), f.metadata.get("lower", 1e-6)
            )
    return dataclasses.replace(hw, **updates)


# ----------------------------------------------------------------------------------------------
# exact forward, useful backward
@jax.custom_jvp
def ste_ceil(x: jax.Array) -> jax.Array:
    """``ceil(x)`` forward; straight-through (identity) derivative."""
    return jnp.ceil(x)


@ste_ceil.defjvp
def _ste_ceil_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.ceil(x), t


@jax.custom_jvp
def ste_round(x: jax.Array) -> jax.Array:
    """``round(x)`` forward; straight-through derivative."""
    return jnp.round(x)


@ste_round.defjvp
def _ste_round_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.round(x), t


@jax.custom_jvp
def soft_max(a: jax.Array, b: jax.Array) -> jax.Array:
    """``max(a, b)`` forward; derivative of a softmax-weighted blend (temperature 5 % of scale).

    Where one argument dominates the derivative is that argument's; near a tie both receive
    gradient, so an optimiser sees the bottleneck it is about to create.
    """
    return jnp.maximum(a, b)


@soft_max.defjvp
def _soft_max_jvp(primals, tangents):
    a, b = primals
    ta, tb = tangents
    scale = 0.05 * (jnp.abs(a) + jnp.abs(b)) + 1e-30
    w = jax.nn.sigmoid((a - b) / scale)
    return jnp.maximum(a, b), w * ta + (1 - w) * tb


def ceil_div(a: Any, b: Any) -> jax.Array:
    """``ceil(a / b)`` with a straight-through derivative."""
    return ste_ceil(jnp.asarray(a) / b)


# ----------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cost:
    """Latency (s), energy (J), area (mm^2) and a breakdown dict of named arrays.

    ``breakdown`` holds per-component totals (e.g. ``"energy_dram_j"``), ``"cycles"`` where the
    model has a clock, and per-op vectors under ``"per_op_latency_s"``/``"per_op_energy_j"``.
    """

    latency_s: jax.Array
    energy_j: jax.Array
    area_mm2: jax.Array
    breakdown: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    @property
    def edp(self) -> jax.Array:
        """Energy-delay product (J s)."""
        return self.energy_j * self.latency_s

    @property
    def power_w(self) -> jax.Array:
        """Average power (W)."""
        return self.energy_j / self.latency_s


def _as_bits(v: Any, name: str) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not v > 0:
            raise ValueError(f"precision[{name!r}]: expected a positive bit-width, got {v}")
    return v


def resolve_precision(
    workload: Workload, precision: Any = None
) -> tuple[jax.Array, jax.Array, dict[int, jax.Array]]:
    """Per-op ``(a_bits, w_bits, groups)`` from the traced dtypes and ``precision``.

    ``precision`` may be None (traced dtypes), a number (all operands of all ops), an array of
    shape ``(n_ops,)`` (both operands per op) or a mapping whose keys are op indices (int),
    parameter names (``"arg0/w1"`` or a suffix such as ``"w1"``), op names (``"dot_general"``)
    or kinds (``"matmul"``); values are a number (both operands of the matched op; for a
    parameter name, only the operand that IS that parameter: ``{"w1": 4}`` quantises the weights
    of ``x @ w1``, not x), a pair ``(w_bits, a_bits)`` (both operands), or a 1-D array of
    per-group weight bit-widths (BitMoD-style; ``w_bits`` is their mean and ``groups[i]``
    keeps the array for models that cost groups separately). Later keys win.
    """
    arr = workload.arrays()
    a_bits: Any = jnp.asarray(arr["a_bits"])
    w_bits: Any = jnp.asarray(arr["w_bits"])
    groups: dict[int, jax.Array] = {}
    n = len(workload.ops)
    if precision is None:
        return a_bits, w_bits, groups
    if not isinstance(precision, Mapping):
        p = jnp.asarray(precision, dtype=jnp.result_type(float))
        if isinstance(precision, (int, float)):
            _as_bits(precision, "*")
        if p.ndim == 0:
            return jnp.broadcast_to(p, (n,)), jnp.broadcast_to(p, (n,)), groups
        if p.shape != (n,):
            raise ValueError(f"precision: expected a scalar or shape ({n},), got {p.shape}")
        return p, p, groups
    for key, val in precision.items():
        hits = _match(workload, key)
        if not hits:
            raise ValueError(
                f"precision: key {key!r} matches no op "
                f"(ops: {sorted({o.name for o in workload.ops})}, "
                f"parameters: {list(workload.inputs)[:8]})"
            )
        _as_bits(val, str(key))
        sel_w = np.zeros(n, bool)
        sel_a = np.zeros(n, bool)
        pair = isinstance(val, tuple) and len(val) == 2
        for i, role in hits:
            if pair or role in ("both", "w"):
                sel_w[i] = True
            if pair or role in ("both", "a"):
                sel_a[i] = True
        if pair:
            wv, av = (jnp.asarray(v, jnp.result_type(float)) for v in val)
        else:
            v = jnp.asarray(val, jnp.result_type(float))
            if v.ndim == 1:
                for i, _role in hits:
                    if sel_w[i]:
                        groups[i] = v
                v = jnp.mean(v)
            wv = av = v
        w_bits = jnp.where(jnp.asarray(sel_w), wv, w_bits)
        a_bits = jnp.where(jnp.asarray(sel_a), av, a_bits)
    return a_bits, w_bits, groups


def _match(workload: Workload, key: Any) -> list[tuple[int, str]]:
    """Ops matched by ``key`` with the operand role: "both", "w" (right) or "a" (left)."""
    if isinstance(key, (int, np.integer)):
        if not 0 <= key < len(workload.ops):
            raise ValueError(f"precision: op index {key} out of range [0, {len(workload.ops)})")
        return [(int(key), "both")]
    hit = lambda names: any(p == key or p.endswith("/" + key) for p in names)
    out = []
    for i, o in enumerate(workload.ops):
        if key in (o.name, o.kind):
            out.append((i, "both"))
        elif o.kind == "matmul" and (hit(o.lhs_params) or hit(o.rhs_params)):
            role = (
                "both"
                if hit(o.lhs_params) and hit(o.rhs_params)
                else ("w" if hit(o.rhs_params) else "a")
            )
            out.append((i, role))
        elif hit(o.params):
            out.append((i, "both"))
    return out


def _check_workload(workload: Any) -> None:
    if not isinstance(workload, Workload):
        raise TypeError(f"workload: expected a jaxcore.hardware.Workload, got {type(workload)}")


def cost(hw: Any, workload: Any, *, precision: Any = None) -> Cost:
    """Cost of ``workload`` on hardware ``hw`` (pure JAX; differentiable in ``hw`` and bits).

    Concrete parameters are validated (``ValueError`` on unphysical values); traced ones are
    projected to their lower bounds (see module docstring).
    """
    if not (hasattr(hw, "_cost") or hasattr(hw, "_cost_items")):
        raise TypeError(f"hw: expected a jaxcore.hardware model, got {type(hw).__name__}")
    validate(hw)
    hw = project(hw)
    if hasattr(hw, "_cost_items"):  # models whose workload is not a traced program
        return hw._cost_items(workload)
    _check_workload(workload)
    if len(workload.ops) == 0:
        z = jnp.zeros(())
        return Cost(z, z, hw.area_mm2() if hasattr(hw, "area_mm2") else z, {})
    a_bits, w_bits, groups = resolve_precision(workload, precision)
    return _cost_jit(hw, op_arrays(workload), a_bits, w_bits, groups)


@jax.jit
def _cost_jit(hw: Any, ops: dict, a_bits: Any, w_bits: Any, groups: Any) -> Cost:
    # The workload travels as per-op arrays, so one compilation serves every workload with the
    # same number of ops (and model structure); inside an outer jit/vmap/grad it inlines.
    return hw._cost(ops, a_bits, w_bits, groups)


def cost_table(hw: Any, workload: Workload, *, precision: Any = None, top: int | None = 30) -> str:
    """A human-readable per-op table (latency, energy, share) plus the totals."""
    c = cost(hw, workload, precision=precision)
    lat = np.asarray(c.breakdown.get("per_op_latency_s", np.zeros(len(workload.ops))))
    en = np.asarray(c.breakdown.get("per_op_energy_j", np.zeros(len(workload.ops))))
    tot_l, tot_e = float(c.latency_s), float(c.energy_j)
    order = np.argsort(-lat) if len(lat) else []
    lines = [
        f"{type(hw).__name__}: latency {_si(tot_l, 's')}, energy {_si(tot_e, 'J')}, "
        f"area {float(c.area_mm2):.3g} mm^2, EDP {tot_l * tot_e:.3g} J*s",
        f"{'#':>4} {'op':<22}{'kind':<15}{'count':>7}{'shape':>22}{'latency':>12}"
        f"{'%':>6}{'energy':>12}{'%':>6}",
    ]
    for j, i in enumerate(order):
        if top is not None and j >= top:
            lines.append(f"     ... {len(order) - top} more ops")
            break
        o = workload.ops[i]
        shape = (
            f"{o.m}x{o.n}x{o.k}" + (f"*{o.batch}" if o.batch > 1 else "")
            if o.kind == "matmul"
            else "x".join(map(str, o.out_shapes[0]))
            if o.out_shapes
            else ""
        )
        lines.append(
            f"{i:>4} {o.name[:21]:<22}{o.kind:<15}{o.count:>7.0f}{shape[:21]:>22}"
            f"{_si(lat[i], 's'):>12}{100 * lat[i] / max(tot_l, 1e-300):>6.1f}"
            f"{_si(en[i], 'J'):>12}{100 * en[i] / max(tot_e, 1e-300):>6.1f}"
        )
    comps = {k: float(v) for k, v in c.breakdown.items() if np.ndim(v) == 0}
    if comps:
        lines.append("components: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(comps.items())))
    if workload.unknown:
        lines.append(
            f"NOT COSTED ({len(workload.unknown)}): "
            + "; ".join(f"{u.name} at {u.path}: {u.reason}" for u in workload.unknown)
        )
    return "\n".join(lines)


def _si(x: float, unit: str) -> str:
    x = float(x)
    if x == 0:
        return f"0 {unit}"
    for f, p in ((1e-15, "f"), (1e-12, "p"), (1e-9, "n"), (1e-6, "u"), (1e-3, "m"), (1.0, "")):
        if abs(x) < f * 1000:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


# ----------------------------------------------------------------------------------------------
# shared pieces of the models
def op_arrays(workload: Workload) -> dict[str, jax.Array]:
    """Per-op arrays as float JAX constants (plus boolean masks ``is_<kind>``)."""
    a = workload.arrays()
    out = {k: np.asarray(v, np.dtype(jnp.result_type(float))) for k, v in a.items() if k != "kind"}
    for i, k in enumerate(KINDS):
        out[f"is_{k}"] = np.asarray(a["kind"] == i)
    return out


def vector_unit(
    ops: Mapping[str, jax.Array],
    a_bits: jax.Array,
    *,
    lanes: jax.Array,
    freq_hz: jax.Array,
    e_op_pj: jax.Array,
    onchip_kb: jax.Array,
    onchip_bw: jax.Array,
    e_onchip_pj_per_bit: jax.Array,
    offchip_bw: jax.Array,
    e_offchip_pj_per_bit: jax.Array,
    transcendental_cycles: float = 4.0,
) -> tuple[jax.Array, jax.Array]:
    """Latency (s) and energy (J) per op of non-matmul ops on a ``lanes``-wide vector unit.

    Compute time = ceil(work / lanes) / freq (a transcendental costs ``transcendental_cycles``
    lane-cycles). Operands live on chip (``onchip_bw`` bytes/s, ``e_onchip_pj_per_bit``); the part
    of an op's operands that exceeds ``onchip_kb`` spills off chip (``offchip_bw``,
    ``e_offchip_pj_per_bit``). Bytes scale with ``a_bits`` / traced bits; the op takes the max of
    compute and memory time. Views cost nothing; matmul/custom entries are zero (costed by the
    caller).
    """
    scale = a_bits / jnp.maximum(ops["a_bits"], 1.0)
    work = ops["flops"] + (transcendental_cycles - 1.0) * ops["transcendentals"]
    work = jnp.where(ops["is_movement"] | ops["is_collective"], 0.0, work)
    cycles = ste_ceil(work / lanes)
    t_comp = cycles / freq_hz
    nbytes = (ops["bytes_read"] + ops["bytes_written"]) * scale
    spill = jnp.clip((nbytes - onchip_kb * 1024.0) / jnp.maximum(nbytes, 1.0), 0.0, 1.0)
    t_mem = nbytes / onchip_bw + spill * nbytes / offchip_bw
    lat = soft_max(t_comp, t_mem)
    e_mem = nbytes * 8 * (e_onchip_pj_per_bit + spill * e_offchip_pj_per_bit)
    en = (work * e_op_pj * (a_bits / 16.0) + e_mem) * 1e-12
    skip = ops["is_matmul"] | ops["is_view"] | ops["is_custom"]
    return jnp.where(skip, 0.0, lat), jnp.where(skip, 0.0, en)


def finish(
    per_lat: jax.Array,
    per_en: jax.Array,
    count: jax.Array,
    area: jax.Array,
    **components: jax.Array,
) -> Cost:
    """Sum per-op costs times execution counts into a :class:`Cost`."""
    lat = jnp.sum(per_lat * count)
    en = jnp.sum(per_en * count)
    bd = {"per_op_latency_s": per_lat * count, "per_op_energy_j": per_en * count}
    bd.update(components)
    return Cost(lat, en, area, bd)


def log_interp(x: jax.Array, xs: tuple[float, ...], ys: tuple[float, ...]) -> jax.Array:
    """Piecewise power law through (xs, ys) (log-log linear interpolation, extrapolated)."""
    lx = jnp.log(jnp.maximum(x, 1e-30))
    lxs = [math.log(v) for v in xs]
    lys = [math.log(v) for v in ys]
    out = None
    for i in range(len(xs) - 1):
        slope = (lys[i + 1] - lys[i]) / (lxs[i + 1] - lxs[i])
        seg = lys[i] + slope * (lx - lxs[i])
        if out is None:
            out = seg
        else:
            out = jnp.where(lx >= lxs[i], seg, out)
    return jnp.exp(out)
