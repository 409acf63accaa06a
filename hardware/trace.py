"""Workload tracing: any JAX function -> a flat list of costed ops, read from its jaxpr.

``trace(fn, *args, **kwargs)`` walks ``jax.make_jaxpr(fn)(*args, **kwargs)`` recursively through
``jit``/``pjit``, ``custom_jvp``/``custom_vjp``, ``remat``, ``scan`` (ops multiplied by ``length``),
``while`` (static trip counts inferred from ``i < n`` loops), ``cond`` (the most expensive branch),
``shard_map`` (ops multiplied by the mesh size: the workload is the whole program's work) and
``custom_vmap``, ``pallas_call`` and Mosaic GPU kernels (``mpmd_map``) (their ``cost_estimate``
when given: jaxcore's Triton attention and scan kernels carry one). Ops that cannot be costed
are listed in ``Workload.unknown`` and reported with a warning; they are never dropped silently.

Each :class:`Op` carries shapes, dtypes, FLOPs and bytes read/written for ONE execution, and
``count`` (how many times it executes). Matmuls/convs carry (M, N, K, batch): the op computes
``batch`` independent (M, K) @ (K, N) products. Function inputs are named by their pytree path
(``arg0/w1``, ``arg1``, ``x`` for a keyword); an op whose operand is (a reshape/convert of) a named
input records it in ``Op.params`` so per-parameter precision overrides reach it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Op", "Workload", "UnknownOp", "trace", "gemm_workload", "KINDS"]

# Kinds, in the order of the integer codes used by the vectorised cost models.
KINDS: tuple[str, ...] = (
    "matmul",  # dot_general / conv: M, N, K, batch
    "elementwise",  # arithmetic, comparisons, select, casts
    "transcendental",  # exp, log, tanh, sqrt, ...
    "reduction",  # reduce_*, argmax, cumulative ops, sort
    "movement",  # gather/scatter/slice/concat/pad/transpose/broadcast: bytes only
    "collective",  # psum, all_gather, ppermute, ...: bytes over the interconnect
    "view",  # reshape/squeeze/expand_dims: free
    "custom",  # pallas_call with a cost_estimate
)

_ELEMENTWISE = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "abs",
    "max",
    "min",
    "sign",
    "floor",
    "ceil",
    "round",
    "rem",
    "select_n",
    "and",
    "or",
    "not",
    "xor",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "clamp",
    "integer_pow",
    "square",
    "convert_element_type",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "nextafter",
    "is_finite",
    "reduce_precision",
    "bitcast_convert_type",
    "add_any",
    "population_count",
    "clz",
    "copysign",
    "real",
    "imag",
    "conj",
    "complex",
    "random_bits",
    "random_seed",
    "random_wrap",
    "random_unwrap",
    "random_fold_in",
    "random_split",
    "threefry2x32",
    "stop_gradient",
    "optimization_barrier",
}
_TRANSCENDENTAL = {
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "atan2",
    "sqrt",
    "rsqrt",
    "cbrt",
    "pow",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
    "igamma",
    "igammac",
    "bessel_i0e",
    "bessel_i1e",
    "polygamma",
    "zeta",
    "regularized_incomplete_beta",
    "random_gamma_grad",
}
_REDUCTION = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "reduce_xor",
    "argmax",
    "argmin",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "cumlogsumexp",
    "sort",
    "reduce",
    "top_k",
    "reduce_window_sum",
    "reduce_window_max",
    "reduce_window_min",
    "reduce_window",
    "select_and_scatter_add",
    "select_and_gather_add",
    "approx_top_k",
}
_MOVEMENT = {
    "transpose",
    "broadcast_in_dim",
    "slice",
    "dynamic_slice",
    "dynamic_update_slice",
    "gather",
    "scatter",
    "scatter-add",
    "scatter_add",
    "scatter_mul",
    "scatter_min",
    "scatter_max",
    "concatenate",
    "stack",
    "pad",
    "rev",
    "iota",
    "copy",
    "copy_p",
    "device_put",
    "split",
    "tie_in",
    "sharding_constraint",
    "mesh_cast",
    "reshard",
    "pvary",
    "pbroadcast",
    "full_like",
}
_COLLECTIVE = {
    "psum",
    "pmax",
    "pmin",
    "pmean",
    "all_gather",
    "ppermute",
    "all_to_all",
    "reduce_scatter",
    "psum_scatter",
    "psum2",
    "axis_index",
    "pgather",
    "psum_invariant",
}
_VIEW = {"reshape", "squeeze", "expand_dims"}
# Ops through which a named parameter keeps its name (the operand is still "that parameter").
_NAME_PRESERVING = {
    "convert_element_type",
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "reduce_precision",
    "device_put",
    "sharding_constraint",
    "pvary",
    "slice",
    "dynamic_slice",
    "dynamic_update_slice",
}
_STATE_VIEWS = {"transpose", "slice", "dynamic_slice", "squeeze", "reshape", "expand_dims"}
# FLOPs per output element beyond 1 for a few elementwise ops.
_FLOP_WEIGHT = {"threefry2x32": 20.0, "integer_pow": 2.0, "clamp": 2.0, "select_n": 1.0}


@dataclasses.dataclass(frozen=True)
class Op:
    """One costed op (one execution; ``count`` executions in total).

    ``m, n, k, batch`` describe matmuls (``batch`` products of (m, k) @ (k, n)); for other ops
    ``m = n = k = batch = 0``. ``elements`` is the output size, ``flops`` the arithmetic per
    execution (2 per MAC), ``bytes_read``/``bytes_written`` the operand/result sizes at their
    traced dtypes, ``bits`` the traced bit-widths (first operand, second operand).
    """

    name: str
    kind: str
    path: str
    in_shapes: tuple[tuple[int, ...], ...]
    in_dtypes: tuple[str, ...]
    out_shapes: tuple[tuple[int, ...], ...]
    out_dtypes: tuple[str, ...]
    flops: float
    bytes_read: float
    bytes_written: float
    elements: float
    count: float = 1.0
    m: int = 0
    n: int = 0
    k: int = 0
    batch: int = 0
    a_bits: float = 32.0
    w_bits: float = 32.0
    out_bits: float = 32.0
    params: tuple[str, ...] = ()
    transcendentals: float = 0.0
    lhs_params: tuple[str, ...] = ()
    rhs_params: tuple[str, ...] = ()

    @property
    def macs(self) -> float:
        """Multiply-accumulates per execution (matmuls only)."""
        return float(self.m) * self.n * self.k * self.batch


@dataclasses.dataclass(frozen=True)
class UnknownOp:
    """An op the tracer could not cost, with where it was and why."""

    name: str
    path: str
    reason: str
    count: float = 1.0


@dataclasses.dataclass(frozen=True)
class Workload:
    """A traced program: costed ops plus the ones that could not be costed."""

    ops: tuple[Op, ...]
    unknown: tuple[UnknownOp, ...] = ()
    inputs: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def flops(self) -> float:
        """Total FLOPs (all executions)."""
        return float(sum(o.flops * o.count for o in self.ops))

    @property
    def bytes(self) -> float:
        """Total bytes read + written (all executions)."""
        return float(sum((o.bytes_read + o.bytes_written) * o.count for o in self.ops))

    def by_kind(self) -> dict[str, int]:
        """Number of ops of each kind."""
        out: dict[str, int] = {}
        for o in self.ops:
            out[o.kind] = out.get(o.kind, 0) + 1
        return out

    def filter(self, kinds: Sequence[str]) -> Workload:
        """The same workload restricted to ops of the given kinds."""
        return Workload(tuple(o for o in self.ops if o.kind in kinds), self.unknown, self.inputs)

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-op float64 arrays (kind codes, m, n, k, batch, flops, bytes, count, bits, ...)."""
        f = lambda attr: np.array([float(getattr(o, attr)) for o in self.ops], dtype=np.float64)
        d = {
            a: f(a)
            for a in (
                "m",
                "n",
                "k",
                "batch",
                "flops",
                "bytes_read",
                "bytes_written",
                "elements",
                "count",
                "a_bits",
                "w_bits",
                "out_bits",
                "transcendentals",
            )
        }
        d["kind"] = np.array([KINDS.index(o.kind) for o in self.ops], dtype=np.int32)
        return d


def gemm_workload(
    m: int, n: int, k: int, *, batch: int = 1, bits: float = 8.0, out_bits: float | None = None
) -> Workload:
    """A one-op workload: ``batch`` GEMMs (m, k) @ (k, n) at ``bits``-bit operands."""
    for name, v in (("m", m), ("n", n), ("k", k), ("batch", batch)):
        if not (isinstance(v, (int, np.integer)) and v > 0):
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    ob = bits if out_bits is None else out_bits
    op = Op(
        name="dot_general",
        kind="matmul",
        path="gemm",
        in_shapes=((batch, m, k), (batch, k, n)),
        in_dtypes=(f"int{bits}", f"int{bits}"),
        out_shapes=((batch, m, n),),
        out_dtypes=(f"int{ob}",),
        flops=2.0 * batch * m * n * k,
        bytes_read=batch * (m * k + k * n) * bits / 8,
        bytes_written=batch * m * n * ob / 8,
        elements=float(batch * m * n),
        m=m,
        n=n,
        k=k,
        batch=batch,
        a_bits=bits,
        w_bits=bits,
        out_bits=ob,
    )
    return Workload((op,))


# ----------------------------------------------------------------------------------------------
def _bits(dtype: Any) -> float:
    dt = np.dtype(dtype)
    if dt == np.dtype(bool):
        return 1.0
    try:
        return float(dt.itemsize * 8)
    except Exception:  # extended dtypes (PRNG keys)
        return 32.0


def _aval_info(v: Any) -> tuple[tuple[int, ...], str, float]:
    aval = getattr(v, "aval", None)
    shape = tuple(int(s) for s in getattr(aval, "shape", ()))
    dtype = getattr(aval, "dtype", np.float32)
    try:
        bits = _bits(dtype)
        name = str(np.dtype(dtype))
    except TypeError:  # key<fry> and other extended dtypes
        bits, name = 64.0, str(dtype)
    return shape, name, bits


def _size(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape)) if shape else 1


def _is_literal(v: Any) -> bool:
    return isinstance(v, jax.extend.core.Literal) if hasattr(jax, "extend") else hasattr(v, "val")


class _Tracer:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.unknown: list[UnknownOp] = []

    # -- sub-jaxprs -----------------------------------------------------------------------------
    def walk(
        self,
        jaxpr: Any,
        names: Sequence[tuple[str, ...]],
        count: float,
        path: str,
        consts: Mapping[Any, Any] | None = None,
    ) -> None:
        """Walk ``jaxpr`` (open Jaxpr) whose invars carry parameter ``names``."""
        env: dict[Any, tuple[str, ...]] = {}
        for v, nm in zip(jaxpr.invars, names):
            env[v] = tuple(nm)
        for eqn in jaxpr.eqns:
            in_names = [() if _is_literal(v) else env.get(v, ()) for v in eqn.invars]
            out_names = self.eqn(eqn, in_names, count, path)
            for v, nm in zip(eqn.outvars, out_names):
                env[v] = nm

    def eqn(
        self, eqn: Any, in_names: list[tuple[str, ...]], count: float, path: str
    ) -> list[tuple[str, ...]]:
        prim = eqn.primitive.name
        p = eqn.params
        here = f"{path}/{prim}" if path else prim
        no_names: list[tuple[str, ...]] = [() for _ in eqn.outvars]
        if prim in (
            "pjit",
            "jit",
            "closed_call",
            "core_call",
            "remat2",
            "checkpoint",
            "custom_jvp_call",
            "custom_vjp_call",
            "custom_vjp_call_jaxpr",
            "custom_lin",
            "remat",
            "xla_call",
            "named_call",
            "custom_vmap_call",
            "linear_call",
        ):
            sub = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr", p.get("call"))))
            sub = p.get("callee") if sub is None else sub  # linear_call: its forward map
            if sub is None:
                self._unknown(eqn, here, count, "higher-order primitive without a jaxpr param")
                return no_names
            label = p.get("name", prim)
            jx = getattr(sub, "jaxpr", sub)
            self.walk(
                jx,
                in_names[-len(jx.invars) :] if jx.invars else [],
                count,
                f"{path}/{label}" if path else str(label),
            )
            return no_names
        if prim == "scan":
            jx = p["jaxpr"].jaxpr
            self.walk(jx, in_names, count * int(p["length"]), f"{here}[{p['length']}]")
            return no_names
        if prim == "while":
            trips = _while_trip_count(eqn)
            body = p["body_jaxpr"].jaxpr
            cond = p["cond_jaxpr"].jaxpr
            nb, nc = p["body_nconsts"], p["cond_nconsts"]
            carry_names = in_names[nc + nb :]
            if trips is None:
                self._unknown(
                    eqn,
                    here,
                    count,
                    "while loop with a dynamic trip count: body and condition costed "
                    "ONCE (pass a static trip count via lax.scan/fori_loop)",
                )
                trips = 1
            self.walk(cond, in_names[:nc] + carry_names, count * (trips + 1), f"{here}[{trips}]")
            self.walk(body, in_names[nc : nc + nb] + carry_names, count * trips, f"{here}[{trips}]")
            return no_names
        if prim == "cond":
            branches = p["branches"]
            best, best_f = None, -1.0
            for i, br in enumerate(branches):
                t = _Tracer()
                t.walk(br.jaxpr, in_names[1:], count, f"{here}/branch{i}")
                f = sum(
                    (o.flops + 8 * o.transcendentals + o.bytes_read + o.bytes_written) * o.count
                    for o in t.ops
                )
                if f > best_f:
                    best, best_f = t, f
            assert best is not None
            self.ops.extend(best.ops)
            self.unknown.extend(best.unknown)
            return no_names
        if prim == "xla_pmap":
            size = int(p.get("axis_size", 1) or 1)
            jx = p["call_jaxpr"]
            jx = getattr(jx, "jaxpr", jx)
            self.walk(jx, in_names, count * size, f"{here}[x{size}]")
            return no_names
        if prim == "shard_map":
            mesh = p.get("mesh")
            size = int(getattr(mesh, "size", 1) or 1)
            jx = p["jaxpr"]
            jx = getattr(jx, "jaxpr", jx)
            self.walk(jx, in_names, count * size, f"{here}[x{size}]")
            return no_names
        if prim in ("pallas_call", "mpmd_map"):  # mpmd_map: Mosaic GPU plgpu.kernel
            ce = p.get("cost_estimate")
            if ce is None:
                self._unknown(eqn, here, count, f"{prim} without cost_estimate")
                return no_names
            self._add(
                eqn,
                "custom",
                here,
                count,
                flops=float(ce.flops),
                transcendentals=float(ce.transcendentals),
                bytes_override=float(ce.bytes_accessed),
            )
            return no_names
        if prim in ("dot_general", "conv_general_dilated"):
            self._matmul(eqn, prim, here, count, in_names)
            return no_names
        expand = getattr(eqn.primitive, "jaxcore_expand", None)
        if expand is not None:  # a jaxcore primitive: cost the function it lowers to
            avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
            jx = jax.make_jaxpr(functools.partial(expand, **p))(*avals).jaxpr
            self.walk(jx, in_names, count, f"{path}/{prim}" if path else str(prim))
            return no_names
        kind = _kind(prim)
        if kind is None:
            self._unknown(eqn, here, count, f"no cost rule for primitive {prim!r}")
            return no_names
        if prim == "pad" and all(tuple(c) == (0, 0, 0) for c in eqn.params["padding_config"]):
            kind = "view"  # a zero-width pad is the identity: XLA elides it
        elif prim in _STATE_VIEWS and in_names and in_names[0]:
            # a transposed / sliced function input (weights, caches): addressing into stored
            # state, fused into the consumer; its layout is chosen offline
            kind = "view"
        self._add(eqn, kind, here, count)
        if prim in _NAME_PRESERVING and in_names:
            return [in_names[0]] + no_names[1:]
        return no_names

    # -- leaves ---------------------------------------------------------------------------------
    def _unknown(self, eqn: Any, path: str, count: float, reason: str) -> None:
        self.unknown.append(UnknownOp(eqn.primitive.name, path, reason, count))

    def _io(self, eqn: Any):
        ins = [_aval_info(v) for v in eqn.invars if not _is_literal(v)]
        outs = [_aval_info(v) for v in eqn.outvars]
        return ins, outs

    def _add(
        self,
        eqn: Any,
        kind: str,
        path: str,
        count: float,
        *,
        flops: float | None = None,
        transcendentals: float = 0.0,
        bytes_override: float | None = None,
    ) -> None:
        ins, outs = self._io(eqn)
        prim = eqn.primitive.name
        out_el = float(sum(_size(s) for s, _, _ in outs))
        in_el = float(sum(_size(s) for s, _, _ in ins))
        br = float(sum(_size(s) * b / 8 for s, _, b in ins if s is not None))
        bw = float(sum(_size(s) * b / 8 for s, _, b in outs))
        if kind == "view":
            br = bw = 0.0
        elif prim in ("slice", "dynamic_slice", "gather"):
            br = bw  # only the selected window is read
        elif prim == "dynamic_update_slice" and len(ins) > 1:
            br = bw = _size(ins[1][0]) * ins[1][2] / 8  # in place: the window is rewritten
        elif prim.startswith("scatter") and len(ins) > 2:
            br = bw = _size(ins[2][0]) * ins[2][2] / 8
        if flops is None:
            if kind == "elementwise":
                flops = out_el * _FLOP_WEIGHT.get(prim, 1.0)
                if prim in (
                    "convert_element_type",
                    "stop_gradient",
                    "optimization_barrier",
                    "bitcast_convert_type",
                    "random_wrap",
                    "random_unwrap",
                ):
                    flops = 0.0
            elif kind == "transcendental":
                flops = out_el
                transcendentals = out_el
            elif kind == "reduction":
                flops = in_el
                if prim == "sort":
                    n = max(ins[0][0][-1] if ins and ins[0][0] else 1, 2)
                    flops = in_el * math.log2(n)
            else:
                flops = 0.0
        if bytes_override is not None:
            br, bw = bytes_override, 0.0
        a_bits = ins[0][2] if ins else (outs[0][2] if outs else 32.0)
        w_bits = ins[1][2] if len(ins) > 1 else a_bits
        self.ops.append(
            Op(
                name=prim,
                kind=kind,
                path=path,
                in_shapes=tuple(s for s, _, _ in ins),
                in_dtypes=tuple(d for _, d, _ in ins),
                out_shapes=tuple(s for s, _, _ in outs),
                out_dtypes=tuple(d for _, d, _ in outs),
                flops=float(flops),
                bytes_read=br,
                bytes_written=bw,
                elements=out_el,
                count=count,
                a_bits=a_bits,
                w_bits=w_bits,
                out_bits=outs[0][2] if outs else 32.0,
                transcendentals=float(transcendentals),
            )
        )

    def _matmul(
        self, eqn: Any, prim: str, path: str, count: float, in_names: list[tuple[str, ...]]
    ) -> None:
        ins, outs = self._io(eqn)
        (ls, ld, lb), (rs, rd, rb) = ins[0], ins[1]
        os_, od, ob = outs[0]
        if prim == "dot_general":
            (lc, rc), (lbd, rbd) = eqn.params["dimension_numbers"]
            batch = _size(tuple(ls[i] for i in lbd))
            k = _size(tuple(ls[i] for i in lc))
            m = _size(tuple(ls[i] for i in range(len(ls)) if i not in lc and i not in lbd))
            n = _size(tuple(rs[i] for i in range(len(rs)) if i not in rc and i not in rbd))
        else:  # conv: out features N, K = C_in/groups * window, M = out positions x batch
            dn = eqn.params["dimension_numbers"]
            out_feat = rs[dn.rhs_spec[0]]
            groups = int(eqn.params.get("feature_group_count", 1)) * int(
                eqn.params.get("batch_group_count", 1)
            )
            n = out_feat // groups
            k = _size(rs) // out_feat
            m = _size(os_) // out_feat
            batch = groups
        names = tuple(dict.fromkeys(in_names[0] + in_names[1]))
        self.ops.append(
            Op(
                name=prim,
                kind="matmul",
                path=path,
                in_shapes=(ls, rs),
                in_dtypes=(ld, rd),
                out_shapes=(os_,),
                out_dtypes=(od,),
                flops=2.0 * batch * m * n * k,
                bytes_read=(_size(ls) * lb + _size(rs) * rb) / 8,
                bytes_written=_size(os_) * ob / 8,
                elements=float(_size(os_)),
                count=count,
                m=int(m),
                n=int(n),
                k=int(k),
                batch=int(batch),
                a_bits=lb,
                w_bits=rb,
                out_bits=ob,
                params=names,
                lhs_params=tuple(in_names[0]),
                rhs_params=tuple(in_names[1]),
            )
        )


def _kind(prim: str) -> str | None:
    for kind, names in (
        ("elementwise", _ELEMENTWISE),
        ("transcendental", _TRANSCENDENTAL),
        ("reduction", _REDUCTION),
        ("movement", _MOVEMENT),
        ("collective", _COLLECTIVE),
        ("view", _VIEW),
    ):
        if prim in names:
            return kind
    return None


def _literal_value(v: Any) -> Any:
    return getattr(v, "val", None) if _is_literal(v) else None


def _while_trip_count(eqn: Any) -> int | None:
    """Trip count of ``while i < n: i += 1`` style loops with literal bounds, else None."""
    p = eqn.params
    cj, bj = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    if len(cj.eqns) != 1 or cj.eqns[0].primitive.name not in ("lt", "le", "gt", "ge", "ne"):
        return None
    ce = cj.eqns[0]
    a, b = ce.invars
    carry_in = cj.invars[nc:]
    cmp = ce.primitive.name
    if a in carry_in and _is_literal(b):
        idx, bound = carry_in.index(a), _literal_value(b)
    elif b in carry_in and _is_literal(a):
        idx, bound = carry_in.index(b), _literal_value(a)
        cmp = {"lt": "gt", "gt": "lt", "le": "ge", "ge": "le", "ne": "ne"}[cmp]
    else:
        return None
    init = eqn.invars[nc + nb + idx]
    start = _literal_value(init)
    if start is None:
        return None
    # The body must update carry idx as idx + literal step.
    out_v = bj.outvars[idx]
    body_carry = bj.invars[nb:]
    step = None
    for e in bj.eqns:
        if e.outvars and e.outvars[0] is out_v and e.primitive.name in ("add", "sub"):
            x, y = e.invars
            if x is body_carry[idx] and _is_literal(y):
                step = _literal_value(y) * (1 if e.primitive.name == "add" else -1)
    if step is None or step == 0:
        return None
    start, bound, step = float(start), float(bound), float(step)
    if cmp in ("lt", "ne") and step > 0:
        n = math.ceil((bound - start) / step)
    elif cmp == "le" and step > 0:
        n = math.floor((bound - start) / step) + 1
    elif cmp in ("gt", "ne") and step < 0:
        n = math.ceil((start - bound) / -step)
    elif cmp == "ge" and step < 0:
        n = math.floor((start - bound) / -step) + 1
    else:
        return None
    return max(int(n), 0)


def _input_names(args: tuple, kwargs: dict) -> list[tuple[str, ...]]:
    names: list[tuple[str, ...]] = []
    for i, a in enumerate(args):
        for path, _ in jax.tree_util.tree_flatten_with_path(a)[0]:
            names.append((_path_name(f"arg{i}", path),))
    for key in sorted(kwargs):
        for path, _ in jax.tree_util.tree_flatten_with_path(kwargs[key])[0]:
            names.append((_path_name(key, path),))
    return names


def _path_name(prefix: str, path: tuple) -> str:
    parts = [prefix]
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def trace(fn: Callable, *args: Any, warn: bool = True, **kwargs: Any) -> Workload:
    """Trace ``fn(*args, **kwargs)`` into a :class:`Workload` (no FLOPs are executed).

    ``args``/``kwargs`` may be arrays or ``jax.ShapeDtypeStruct``. Ops without a cost rule go to
    ``Workload.unknown`` and (``warn=True``) raise one ``UserWarning`` listing them.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    closed = jax.make_jaxpr(lambda a, k: fn(*a, **k))(args, kwargs)
    # make_jaxpr flattens (args, kwargs) with kwargs sorted by key, as _input_names does.
    names = _input_names(args, kwargs)
    t = _Tracer()
    t.walk(closed.jaxpr, names, 1.0, "")
    wl = Workload(tuple(t.ops), tuple(t.unknown), tuple(n[0] for n in names))
    if wl.unknown and warn:
        listed = ", ".join(f"{u.name} at {u.path} ({u.reason})" for u in wl.unknown[:5])
        more = f" and {len(wl.unknown) - 5} more" if len(wl.unknown) > 5 else ""
        warnings.warn(
            f"trace: {len(wl.unknown)} op(s) could not be costed and are listed in "
            f"Workload.unknown: {listed}{more}",
            UserWarning,
            stacklevel=2,
        )
    return wl


def _dtype_bits(dtype: Any) -> float:
    return _bits(jnp.dtype(dtype))
