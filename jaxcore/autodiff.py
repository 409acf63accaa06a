"""Custom derivatives shared by the kernel families.

``linear_call(fun, fun_t, res, lin)`` returns ``fun(res, lin)``, linear in the pytree ``lin``
for fixed ``res``; ``fun_t(res, cts)`` is its transpose (the cotangents of ``lin``). It is what
``jax.custom_derivatives.linear_call`` does, plus the two rules that one lacks:

- JVP in the residuals too (forward over reverse, e.g. Hessian-vector products through a custom
  JVP whose tangent map is this call): the tangent of ``fun(res, lin)`` in ``res`` is again
  linear in ``lin``, ``jvp_res(fun)``, and its transpose is ``jvp_res(fun_t)``; both become
  another ``linear_call``, so any order works.
- batching: ``fun`` and ``fun_t`` vmapped, the vmapped call still linear.

``tangent_call`` builds the tangent of a custom JVP rule from it: forward mode evaluates the JVP
of a differentiable twin of the kernel (plain JAX, e.g. the chunked XLA scan or flash attention),
reverse mode transposes it with the kernel's own hand backward (Pallas kernels, or an XLA
recompute from saved states), so training costs what a ``custom_vjp`` costs. ``with_jvp_of``
gives a function with no JVP of its own (a ``pallas_call``) the JVP of a twin, so that rules
built this way can be differentiated again (Hessian-vector products through Pallas kernels).

Users: ``selective_scan`` (the chunked core and every Pallas kernel), ``ssd`` (chunked core),
``dot_product_attention`` (XLA, Pallas, Mosaic), ``paged_decode_attention``, ring attention,
and ``solve_recurrence``'s implicit adjoint (``linear_call`` directly); ``linear_scan``'s
primitive shares ``aval_like``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.dtypes import float0
from jax.interpreters import ad, batching, mlir

try:  # jax.extend.core.Primitive (JAX >= 0.4.36); jax.core.Primitive before
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive  # type: ignore[no-redef]

from jaxcore import backend

Array = Any

linear_call_p = Primitive("jaxcore_linear_call")
linear_call_p.multiple_results = True


class _Spec:
    """The flat form of (fun, fun_t): hashable by identity, a primitive parameter.

    ``bilinear``: the second-order term of :func:`_jvp`, ``fun`` differentiated in the
    residuals along ``dres``; its operands are (res, dres + lin) and it is linear in dres and
    in lin separately: transposed in lin by ``call_t``, in dres by ``jax.vjp``.
    """

    def __init__(self, call, call_t, out_avals, n_res: int, bilinear: int = 0):
        self.call = call  # (res list, lin list) -> out list
        self.call_t = call_t  # (res list, lin list, ct list) -> lin ct list
        self.out_avals = tuple(out_avals)  # ShapeDtypeStructs
        self.n_res = n_res
        self.bilinear = bilinear  # number of dres operands leading ``lin`` (0: linear)


def tangent_call(fun, backward, primals, tangents, consts, saved, out) -> Any:
    """The tangent of a custom JVP rule whose primal output is ``out = fun(consts, *primals)``,
    as a :func:`linear_call`: forward mode evaluates ``jax.jvp`` of ``fun``; reverse mode
    transposes it with ``backward(primals, consts, saved, cts)``, the cotangents of every
    primal (typed like it under shard_map here). ``primals`` may hold None (absent operands);
    those and symbolic-zero tangents are left out of the linear operands; ``consts`` (not
    differentiated) and ``saved`` (the forward's residuals) are residual operands."""
    nz = tuple(
        p is not None and t is not None and not isinstance(t, SymbolicZero)
        for p, t in zip(primals, tangents)
    )
    if not any(nz):
        return jax.tree.map(jnp.zeros_like, out)

    def lin_fn(res, lin):
        prim, c, _ = res
        it = iter(lin)
        full = [
            next(it) if z else None if p is None else jnp.zeros_like(p) for z, p in zip(nz, prim)
        ]
        return jax.jvp(lambda *p: fun(c, *p), tuple(prim), tuple(full))[1]

    def slow_backward(prim, c, sv, cts):  # the twin's: differentiable in prim (sv unused)
        del sv
        _, vjp = jax.vjp(lambda *p: fun(c, *p), *prim)
        return vjp(cts)

    def fast_backward(prim, c, sv, cts):
        return tuple(backward(prim, c, sv, cts))[: len(prim)]

    diff_backward = with_jvp_of(fast_backward, slow_backward)

    def lin_t(res, cts):
        prim, c, sv = res
        grads = diff_backward(prim, c, sv, cts)
        return [backend.vary_as(g, p) for z, g, p in zip(nz, grads, prim) if z]

    lin = [t for z, t in zip(nz, tangents) if z]
    shape = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), out)  # the tangent's
    return linear_call(lin_fn, lin_t, (tuple(primals), consts, saved), lin, shape)


def with_jvp_of(fast: Callable, slow: Callable) -> Callable:
    """``fast`` (e.g. Pallas kernels, which have no JVP) with the JVP of ``slow``, a function of
    the same arguments that computes the same values in differentiable JAX. Both return the same
    pytree; the tangents are cast to ``fast``'s output dtypes. Differentiable to any order
    (the rule calls the wrapped function again for its primal output).

    Arguments are pytrees of arrays (or None); integer arrays get float0 tangents. Arguments
    whose values ``slow`` ignores (e.g. states a backward kernel reads, computed from the
    others) contribute no tangent: correct where they are functions of the other arguments
    and ``slow`` recomputes them."""
    wrapped = jax.custom_jvp(fast)

    @wrapped.defjvp
    def _rule(primals, tangents):
        out = wrapped(*primals)
        t = jax.jvp(slow, primals, tangents)[1]
        t = jax.tree.map(_typed_like, t, out)
        return out, t

    return wrapped


def with_saved(fast: Callable, twin: Callable) -> Callable:
    """A forward ``fast(*args) -> (outs, saved)`` that also returns the states its backward
    reads, with the JVP of ``twin(*args) -> outs`` (differentiable JAX) for ``outs`` and zero
    tangents for ``saved`` (only the backward reads them, and :func:`tangent_call`
    differentiates the backward through its twin, which recomputes them)."""

    def slow(*args):
        saved = jax.eval_shape(fast, *args)[1]
        return twin(*args), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), saved)

    return with_jvp_of(fast, slow)


def _typed_like(d, o):
    """Tangent ``d`` in the dtype of ``o`` and, inside shard_map, varying over (at least) the
    mesh axes ``o`` varies over (a constant such as a zero tangent is invariant)."""
    return d if d.dtype == float0 else backend.vary_over(d.astype(o.dtype), backend.vma(o))


def aval_like(avals, shape, dtype):
    """An output aval of ``shape`` and ``dtype`` varying (inside shard_map) over the mesh axes of
    the most varying of ``avals``."""
    like = max(avals, key=lambda a: len(backend.aval_vma(a)))
    return like.update(shape=shape, dtype=dtype, weak_type=False)


def linear_call(fun: Callable, fun_t: Callable, res: Any, lin: Any, out_shape: Any = None) -> Any:
    """``fun(res, lin)``, linear in ``lin``; ``fun_t(res, cts)`` its transpose (a list or tuple
    of ``lin``'s leaves' cotangents, or ``lin``'s structure). ``out_shape``: the output's
    ShapeDtypeStructs if known (else ``fun`` is traced once to find them; reverse mode never
    traces it otherwise)."""
    res_flat, res_tree = jax.tree.flatten(res)
    lin_flat, lin_tree = jax.tree.flatten(lin)
    if out_shape is None:
        out_shape = jax.eval_shape(fun, res, lin)
    out_avals, out_tree = jax.tree.flatten(out_shape)

    def call(r, x):
        out = fun(jax.tree.unflatten(res_tree, r), jax.tree.unflatten(lin_tree, x))
        return jax.tree.leaves(out)

    def call_t(r, _, cts):
        got = fun_t(jax.tree.unflatten(res_tree, r), jax.tree.unflatten(out_tree, cts))
        return jax.tree.leaves(got)

    spec = _Spec(call, call_t, out_avals, len(res_flat))
    outs = linear_call_p.bind(*res_flat, *lin_flat, spec=spec)
    return jax.tree.unflatten(out_tree, outs)


def _abstract(*avals, spec: _Spec):
    return [aval_like(avals, o.shape, o.dtype) for o in spec.out_avals]


def _impl(*args, spec: _Spec):
    return spec.call(list(args[: spec.n_res]), list(args[spec.n_res :]))


linear_call_p.def_impl(_impl)
linear_call_p.def_abstract_eval(_abstract)
mlir.register_lowering(linear_call_p, mlir.lower_fun(_impl, multiple_results=True))
linear_call_p.jaxcore_expand = _impl  # what jaxcore.hardware.trace costs in its place


def _bind(spec: _Spec, res, lin) -> list:
    return linear_call_p.bind(*res, *lin, spec=spec)


def _jvp(primals, tangents, *, spec: _Spec):
    n = spec.n_res
    if spec.bilinear:  # third order: plain autodiff of the second-order term
        f = lambda *ops: spec.call(list(ops[:n]), list(ops[n:]))  # noqa: E731
        out, t = jax.jvp(f, tuple(primals), tuple(ad.instantiate_zeros(t) for t in tangents))
        return list(out), list(t)
    res, lin = list(primals[:n]), list(primals[n:])
    dres, dlin = tangents[:n], tangents[n:]
    out = _bind(spec, res, lin)
    parts = []
    if any(type(t) is not ad.Zero for t in dlin):
        parts.append(_bind(spec, res, [ad.instantiate_zeros(t) for t in dlin]))
    if any(type(t) is not ad.Zero for t in dres):
        dr = [ad.instantiate_zeros(t) for t in dres]

        def call2(r, x):  # d/dres fun(res, lin) . dres, x = dres + lin: linear in each
            d, lx = x[:n], x[n:]
            return jax.jvp(lambda r: spec.call(list(r), lx), (tuple(r),), (tuple(d),))[1]

        def call2_t(r, x, cts):  # its transpose in lin: d/dres fun_t(res, cts) . dres
            d = x[:n]
            f = lambda r: spec.call_t(list(r), None, cts)  # noqa: E731
            return jax.jvp(f, (tuple(r),), (tuple(d),))[1]

        spec2 = _Spec(call2, call2_t, spec.out_avals, n, bilinear=n)
        parts.append(_bind(spec2, res, dr + lin))
    if not parts:
        return out, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]
    tangent = parts[0] if len(parts) == 1 else [a + b for a, b in zip(*parts)]
    return out, list(tangent)


def _transpose(cts, *args, spec: _Spec):
    n = spec.n_res
    res, lin = list(args[:n]), list(args[n:])
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError("linear_call: transposed in its residual operands")
    cts = [ad.instantiate_zeros(c) for c in cts]
    undefined = [ad.is_undefined_primal(x) for x in lin]
    k = spec.bilinear
    if k and any(undefined[:k]):  # the second-order term, transposed in dres: lin is known
        if any(undefined[k:]):
            raise NotImplementedError("linear_call: transposed in dres and lin at once")
        zeros = [jnp.zeros(x.aval.shape, x.aval.dtype) for x in lin[:k]]
        _, vjp = jax.vjp(lambda d: spec.call(res, list(d) + lin[k:]), zeros)
        (got,) = vjp(cts)
        return [None] * n + [
            g if u else None for g, u in zip(list(got) + [None] * len(lin[k:]), undefined)
        ]
    known = [None if u else x for x, u in zip(lin, undefined)]
    got = spec.call_t(res, known, cts)
    return [None] * n + [None] * k + [g if u else None for g, u in zip(got, undefined[k:])]


def _batch(args, dims, *, spec: _Spec):
    n = spec.n_res
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    res_axes = [None if d is None else 0 for d in dims[:n]]
    lin = [x if d is not None else jnp.broadcast_to(x, (size, *x.shape))
           for x, d in zip(moved[n:], dims[n:])]  # fmt: skip

    def call(r, x):
        return jax.vmap(lambda r, x: spec.call(list(r), list(x)), in_axes=(res_axes, 0))(r, x)

    def call_t(r, x, cts):
        x_axes = None if x is None else [None if v is None else 0 for v in x]
        f = lambda r, x, c: spec.call_t(list(r), x, list(c))  # noqa: E731
        return jax.vmap(f, in_axes=(res_axes, x_axes, 0))(r, x, cts)

    out_avals = [jax.ShapeDtypeStruct((size, *o.shape), o.dtype) for o in spec.out_avals]
    spec_b = _Spec(call, call_t, out_avals, n, spec.bilinear)
    outs = _bind(spec_b, moved[:n], lin)
    return outs, [0] * len(outs)


ad.primitive_jvps[linear_call_p] = _jvp
ad.primitive_transposes[linear_call_p] = _transpose
batching.primitive_batchers[linear_call_p] = _batch

__all__ = ["linear_call", "linear_call_p"]
