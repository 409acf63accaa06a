"""A linear-recurrence scan for use inside Pallas kernels: Triton's ``tt.scan`` on GPU.

``linear_recurrence(a, b, axis)`` returns (prod_{s<=t} a_s, h_t) along ``axis`` of two equally
shaped float arrays, h_t = a_t h_{t-1} + b_t from h_{-1} = 0: the associative scan of the pairs
(a, b) under (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2) (the earlier pair first). Inside a Pallas
kernel lowered through Triton it becomes one ``tt.scan`` with that combine region (in-thread
sequential, then warp shuffles: the time-parallel block scan of mamba_ssm's CUDA kernel); Pallas
lowers only cumsum to ``tt.scan`` itself. Everywhere else (XLA, the Pallas interpreter) it is
``lax.associative_scan`` on the same pairs.

The Triton rule builds the scan with the MLIR Python bindings that JAX's own cumsum rule uses
(``tt_dialect.ScanOp``, ``scan_return``, ``arith``) and is registered in JAX's (private) table of
Pallas Triton lowering rules; where that table or those bindings are missing (another JAX
version), :data:`TRITON_RULE` is False and the kernels that need it are not offered.
"""

from __future__ import annotations

from typing import Any

from jax import lax
from jax.interpreters import mlir

try:  # jax.extend.core.Primitive (JAX >= 0.4.36); jax.core.Primitive before
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive  # type: ignore[no-redef]

Array = Any

linear_recurrence_p = Primitive("jaxcore_linear_recurrence")
linear_recurrence_p.multiple_results = True


def _combine(x, y):
    (a1, b1), (a2, b2) = x, y
    return a1 * a2, a2 * b1 + b2


def _scan(a, b, *, axis: int):
    return lax.associative_scan(_combine, (a, b), axis=axis)


def _abstract(a, b, *, axis: int):
    if a.shape != b.shape or a.dtype != b.dtype:
        raise TypeError(f"linear_recurrence: a and b must match, got {a} and {b}")
    return (a, b)


linear_recurrence_p.def_impl(_scan)
linear_recurrence_p.def_abstract_eval(lambda a, b, *, axis: _abstract(a, b, axis=axis))
mlir.register_lowering(linear_recurrence_p, mlir.lower_fun(_scan, multiple_results=True))


def linear_recurrence(a: Array, b: Array, axis: int = -1) -> tuple[Array, Array]:
    """(prod_{s<=t} a_s, h_t) along ``axis``: h_t = a_t h_{t-1} + b_t, h_{-1} = 0; a, b of one
    shape and float dtype. For Pallas kernels (one ``tt.scan`` under Triton); outside a kernel
    it evaluates as ``lax.associative_scan`` (jit only: no vmap or autodiff rules, the kernels
    that use it are differentiated by their own custom VJPs)."""
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected one shape, got {a.shape} and {b.shape}")
    return tuple(linear_recurrence_p.bind(a, b, axis=axis % a.ndim))


def _triton_rule(ctx, a, b, *, axis: int):
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax._src.lib.triton import dialect as tt

    def is_tensor(t) -> bool:  # MLIR bindings: isinstance (newer) or the static check (older)
        check = getattr(ir.RankedTensorType, "isinstance", None)
        return isinstance(t, ir.RankedTensorType) or bool(check and check(t))

    if not (is_tensor(a.type) and is_tensor(b.type)):
        raise NotImplementedError("linear_recurrence: a and b must be tensors in the kernel")
    elt = ir.RankedTensorType(a.type).element_type
    op = tt.ScanOp([a, b], axis)
    entry = op.regions[0].blocks.append(elt, elt, elt, elt)  # (a1, b1, a2, b2)
    with ir.InsertionPoint.at_block_begin(entry):
        a1, b1, a2, b2 = entry.arguments
        tt.scan_return([arith.mulf(a1, a2), arith.addf(arith.mulf(a2, b1), b2)])
    op.verify()
    return list(op.result)


def _register() -> bool:
    try:
        from jax._src.pallas.triton import lowering as tl

        tl.triton_lowering_rules[linear_recurrence_p] = _triton_rule
        return True
    except Exception:  # pragma: no cover - another JAX's private layout
        return False


TRITON_RULE: bool = _register()

__all__ = ["TRITON_RULE", "linear_recurrence", "linear_recurrence_p"]
