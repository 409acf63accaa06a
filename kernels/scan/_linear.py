"""Linear recurrences h_t = a_t * h_{t-1} + b_t (elementwise or matrix a) along axis 1.

Implementations (all but "reference" run as the primitive ``linear_scan_p`` (:func:`_scan`),
linear in (b, h0): its tangent is the same recurrence and its transpose the adjoint recurrence,
a reverse linear scan, both run by the same implementation; so jvp, grad, jacfwd, hessian and
vmap of any of them work on every implementation):

- "reference": ``lax.scan``, differentiated by JAX (the oracle).
- "sequential": ``lax.scan``.
- "associative": ``lax.associative_scan`` (log-depth tree).
- "chunked": chunks of ``chunk_size`` steps, three passes of ``lax.scan``: over the steps inside a
  chunk for all chunks at once (each chunk's end state and coefficient product, nothing stored per
  step), over the chunks (the state entering each chunk), and over the steps again from the true
  start states (the outputs). Sequential depth T + L/T, no (L, ...) temporaries besides the
  output; compile time does not depend on L.
- "pallas" / "pallas_interpret": a Pallas kernel (diagonal a only); see ``_pallas.py``.

With a ``readout`` (the reduction hook), no implementation returns the (batch, length, *state)
states: :func:`_readout_scan` walks chunks of steps, runs the implementation on one chunk at a time
from the carried state, applies ``readout`` to that chunk's states and keeps only the end state;
the backward recomputes each chunk (``jax.checkpoint``), so memory is O(L/T + T) states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir

try:  # jax.extend.core.Primitive (JAX >= 0.4.36); jax.core.Primitive before
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover
    from jax.core import Primitive  # type: ignore[no-redef]

from jaxcore import backend, checks
from jaxcore.autodiff import aval_like

from ._common import (
    SCAN_IMPLEMENTATIONS,
    check_chunk,
    check_segment_ids,
    expand_to,
    pad_time,
    reset_mask,
)

Array = Any

FAMILY = "linear_scan"

backend.register_family(
    FAMILY,
    SCAN_IMPLEMENTATIONS,
    {"*": "chunked"},
    doc="h_t = a_t * h_{t-1} + b_t along axis 1 (scalar, diagonal or matrix a).",
)


# ----------------------------------------------------------------------------------------------
# forward implementations on (batch, length, ...) arrays; mode "diag" (a broadcast to b's rank
# with size-1 axes) or "matrix" (a has one more trailing axis: h_t = A_t @ h_{t-1} + b_t)


def _apply(a: Array, h: Array, mode: str) -> Array:
    if mode == "matrix":
        return jnp.einsum("...ij,...j->...i", a, h)
    return a * h


def _compose(a2: Array, a1: Array, mode: str) -> Array:
    """The coefficient of two steps: first a1, then a2."""
    if mode == "matrix":
        return jnp.einsum("...ij,...jk->...ik", a2, a1)
    return a2 * a1


def _sequential(a: Array, b: Array, h0: Array, mode: str) -> Array:
    def step(h, ab):
        a_t, b_t = ab
        h = _apply(a_t, h, mode) + b_t
        return h, h

    _, hs = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(hs, 0, 1)


def _associative(a: Array, b: Array, h0: Array, mode: str) -> Array:
    b = b.at[:, 0].add(_apply(a[:, 0], h0, mode))

    def combine(x, y):
        a1, b1 = x
        a2, b2 = y
        return _compose(a2, a1, mode), _apply(a2, b1, mode) + b2

    _, hs = lax.associative_scan(combine, (a, b), axis=1)
    return hs


def _identity_like(a: Array, mode: str) -> Array:
    if mode == "matrix":
        n = a.shape[-1]
        # zeros_like keeps a's varying-manual-axes type (inside shard_map).
        return jnp.zeros_like(a) + jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
    return jnp.ones_like(a)


def _chunked(a: Array, b: Array, h0: Array, mode: str, chunk: int) -> Array:
    bsz, length = b.shape[:2]
    t = min(chunk, length)
    nc = -(-length // t)
    lp = nc * t
    # Padding at the end never changes earlier states; padded outputs are dropped.
    a_p = pad_time(a, lp)
    b_p = pad_time(b, lp)
    # (B, nc, T, ...) -> (T, B, nc, ...): scan over the steps of all chunks at once.
    a_r = jnp.moveaxis(a_p.reshape((bsz, nc, t) + a.shape[2:]), 2, 0)
    b_r = jnp.moveaxis(b_p.reshape((bsz, nc, t) + b.shape[2:]), 2, 0)

    def local(carry, ab):  # pass 1: each chunk's own end state and coefficient product
        hl, p = carry
        a_t, b_t = ab
        return (_apply(a_t, hl, mode) + b_t, _compose(a_t, p, mode)), None

    init = (jnp.zeros_like(b_r[0]), _identity_like(a_r[0], mode))
    (hl_last, p_last), _ = lax.scan(local, init, (a_r, b_r))  # (B, nc, ...)

    def carry_step(h, xs):  # pass 2: the state entering each chunk
        p_c, hl_c = xs
        return _apply(p_c, h, mode) + hl_c, h

    _, h_start = lax.scan(
        carry_step, h0, (jnp.moveaxis(p_last, 1, 0), jnp.moveaxis(hl_last, 1, 0))
    )  # (nc, B, ...)

    def rerun(h, ab):  # pass 3: every chunk again, from its true start state
        a_t, b_t = ab
        h = _apply(a_t, h, mode) + b_t
        return h, h

    _, hs = lax.scan(rerun, jnp.moveaxis(h_start, 0, 1), (a_r, b_r))  # (T, B, nc, ...)
    hs = jnp.moveaxis(hs, 0, 2).reshape((bsz, lp) + b.shape[2:])
    return hs[:, :length]


def _forward(a: Array, b: Array, h0: Array, mode: str, impl: str, chunk: int) -> Array:
    if impl in ("sequential", "reference"):
        return _sequential(a, b, h0, mode)
    if impl == "associative":
        return _associative(a, b, h0, mode)
    if impl == "chunked":
        return _chunked(a, b, h0, mode, chunk)
    if impl in ("pallas", "pallas_interpret"):
        from ._pallas import linear_scan_pallas

        return linear_scan_pallas(a, b, h0, interpret=impl == "pallas_interpret")
    raise AssertionError(impl)


# The fast implementations run as one primitive, linear in (b, h0) for a given a, with the
# rules JAX needs for every transformation: forward mode (the tangent of a linear recurrence is
# the same recurrence: dh_t = a_t dh_{t-1} + (da_t h_{t-1} + db_t)), the transpose in (b, h0)
# (the adjoint recurrence, a reverse linear scan run by the same implementation), so that
# reverse mode is forward mode transposed, and batching (vmapped axes folded into the batch
# axis). jvp, jacfwd, hessian and forward-over-reverse work on every implementation, the
# Pallas kernels included, and the gradient of a is JAX's transpose of da_t h_{t-1}.
linear_scan_p = Primitive("jaxcore_linear_scan")


def _scan(a: Array, b: Array, h0: Array, mode: str, impl: str, chunk: int) -> Array:
    """All states (batch, length, *state) of h_t = a_t h_{t-1} + b_t from h0, by ``impl``."""
    return linear_scan_p.bind(a, b, h0, mode=mode, impl=impl, chunk=chunk)


def _abstract(a, b, h0, *, mode, impl, chunk):
    return aval_like((a, b, h0), b.shape, b.dtype)


linear_scan_p.def_impl(jax.jit(_forward, static_argnames=("mode", "impl", "chunk")))
linear_scan_p.def_abstract_eval(_abstract)
mlir.register_lowering(linear_scan_p, mlir.lower_fun(_forward, multiple_results=False))
linear_scan_p.jaxcore_expand = _forward  # what jaxcore.hardware.trace costs in its place


def _shifted(hs: Array, h0: Array) -> Array:
    """h_{t-1} for every t: h0, then the states but the last."""
    return jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)


def _jvp(primals, tangents, *, mode, impl, chunk):
    a, b, h0 = primals
    da, db, dh0 = tangents
    hs = _scan(a, b, h0, mode, impl, chunk)
    rhs = jnp.zeros_like(b) if type(db) is ad.Zero else db
    if type(da) is not ad.Zero:
        rhs = rhs + _apply(da, _shifted(hs, h0), mode).astype(b.dtype)
    dh0 = jnp.zeros_like(h0) if type(dh0) is ad.Zero else dh0
    return hs, _scan(a, rhs, dh0, mode, impl, chunk)


def _transpose(g, a, b, h0, *, mode, impl, chunk):
    if ad.is_undefined_primal(a):
        raise NotImplementedError("linear_scan is linear in b and initial_state, not in a")
    lin_b, lin_h0 = ad.is_undefined_primal(b), ad.is_undefined_primal(h0)
    if type(g) is ad.Zero:
        return None, (ad.Zero(b.aval) if lin_b else None), (ad.Zero(h0.aval) if lin_h0 else None)
    # Adjoint: lam_t = a_{t+1}^T lam_{t+1} + g_t (a reverse linear scan), lam_L = 0.
    at = jnp.swapaxes(a, -1, -2) if mode == "matrix" else a
    a_next = jnp.concatenate([at[:, 1:], jnp.zeros_like(at[:, :1])], axis=1)
    zero = jnp.zeros_like(g[:, 0])  # zeros_like keeps g's varying-manual-axes type
    lam = jnp.flip(_scan(jnp.flip(a_next, 1), jnp.flip(g, 1), zero, mode, impl, chunk), 1)
    ct_h0 = None
    if lin_h0:
        if mode == "matrix":
            ct_h0 = jnp.einsum("...ji,...j->...i", a[:, 0], lam[:, 0])
        else:
            ct_h0 = jnp.broadcast_to(a[:, 0] * lam[:, 0], lam.shape[:1] + lam.shape[2:])
    return None, (lam if lin_b else None), ct_h0


def _batch(args, dims, *, mode, impl, chunk):
    """vmapped axes folded into the batch axis (0): (V, B, ...) -> (V B, ...)."""
    moved = [x if d is None else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims)]
    size = next(x.shape[0] for x, d in zip(moved, dims) if d is not None)
    bsz = moved[1].shape[0 if dims[1] is None else 1]
    folded = []
    for x, d in zip(moved, dims):
        x = jnp.broadcast_to(x, (size, *x.shape[1 if d is not None else 0 :]))
        x = jnp.broadcast_to(x, (size, bsz, *x.shape[2:]))
        folded.append(x.reshape((size * bsz, *x.shape[2:])))
    out = _scan(*folded, mode=mode, impl=impl, chunk=chunk)
    return out.reshape((size, bsz, *out.shape[1:])), 0


ad.primitive_jvps[linear_scan_p] = _jvp
ad.primitive_transposes[linear_scan_p] = _transpose
batching.primitive_batchers[linear_scan_p] = _batch


def _readout_scan(
    a: Array,
    b: Array,
    h0: Array,
    args: Sequence[Array],
    readout: Callable[..., Any],
    mode: str,
    impl: str,
    chunk: int,
) -> tuple[Any, Array]:
    """``readout(states, *args)`` chunk by chunk, carrying only the state between chunks.

    Returns (readout outputs over the whole length, the last state). Each chunk's states come from
    the implementation's differentiable scan (:func:`_scan`) and are recomputed in the
    backward pass (``jax.checkpoint``), so only the chunk-boundary states are stored.
    """
    bsz, length = b.shape[:2]
    t = min(chunk, length)
    nc = -(-length // t)
    lp = nc * t
    inner = check_chunk(None, t)
    # Identity steps at the end (a = 1, b = 0) leave the final state unchanged.
    if mode == "matrix":
        eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape[:1] + a.shape[2:])
        pad = jnp.broadcast_to(eye[:, None], (bsz, lp - length) + a.shape[2:])
        a_p = jnp.concatenate([a, pad], axis=1) if lp > length else a
    else:
        a_p = pad_time(a, lp, value=1.0)
    b_p = pad_time(b, lp)
    args_p = [pad_time(x, lp) for x in args]

    def body(h, i):
        # Slice the chunk in place (no transposed copy of the inputs); recomputed in backward.
        def sl(x: Array) -> Array:
            return lax.dynamic_slice_in_dim(x, i * t, t, axis=1)

        hs = _scan(sl(a_p), sl(b_p), h, mode, impl, inner)
        return hs[:, -1], readout(hs, *[sl(x) for x in args_p])

    h_last, ys = lax.scan(jax.checkpoint(body, prevent_cse=False), h0, jnp.arange(nc))

    def from_chunks(y: Array) -> Array:  # (nc, B, T, ...) -> (B, length, ...)
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((bsz, lp) + y.shape[3:])[:, :length]

    return jax.tree.map(from_chunks, ys), h_last


def _check_readout(readout: Any, readout_args: Any, b: Array, dtype: Any) -> list[Array]:
    if not callable(readout):
        raise ValueError(
            f"readout: expected a callable (states, *readout_args) -> outputs, got {readout!r}"
        )
    if not isinstance(readout_args, (tuple, list)):
        raise ValueError(
            "readout_args: expected a tuple of (batch, length, ...) arrays, got "
            f"{type(readout_args).__name__}"
        )
    args = [jnp.asarray(x) for x in readout_args]
    for i, x in enumerate(args):
        if x.ndim < 2 or x.shape[:2] != b.shape[:2]:
            raise ValueError(
                f"readout_args[{i}]: expected shape (batch, length, ...) = {b.shape[:2]} + (...), "
                f"got {x.shape}"
            )
    # The hook must map (batch, T, *state) states to (batch, T, ...) outputs, step by step.
    t = min(2, b.shape[1])
    probe = jax.eval_shape(
        readout,
        jax.ShapeDtypeStruct((b.shape[0], t) + b.shape[2:], dtype),
        *[jax.ShapeDtypeStruct((x.shape[0], t) + x.shape[2:], x.dtype) for x in args],
    )
    for leaf in jax.tree.leaves(probe):
        if leaf.shape[:2] != (b.shape[0], t):
            raise ValueError(
                "readout: expected every output to have leading axes (batch, steps) = "
                f"{(b.shape[0], t)} for states of shape {(b.shape[0], t) + b.shape[2:]}, got "
                f"{leaf.shape}; it must act on each time step independently"
            )
    return args


def _mode(a: Array, b: Array) -> str:
    checks.check_rank(b, tuple(range(2, 16)), "b")
    if a.ndim == b.ndim + 1 and b.ndim >= 3:
        if a.shape[:-1] != b.shape:
            raise ValueError(
                f"a: expected a dense matrix of shape {b.shape + (b.shape[-1],)} for b of shape "
                f"{b.shape}, got {a.shape}"
            )
        return "matrix"
    if 2 <= a.ndim <= b.ndim and a.shape == b.shape[: a.ndim]:
        return "diag"
    raise ValueError(
        f"a: expected shape {b.shape[:2]} (scalar per step), a prefix of b's shape {b.shape} "
        f"(elementwise), or {b.shape + (b.shape[-1],)} (matrix), got {a.shape}"
    )


def linear_scan(
    a: Array,
    b: Array,
    *,
    initial_state: Array | None = None,
    reverse: bool = False,
    segment_ids: Array | None = None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    readout: Callable[..., Any] | None = None,
    readout_args: Sequence[Array] = (),
    return_final_state: bool = False,
) -> Any:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` along axis 1, or only what ``readout`` needs.

    Args:
      b: (batch, length, *state) inputs.
      a: coefficients, one of: (batch, length) a scalar per step; any prefix of b's shape of rank
        >= 2, broadcast over the remaining trailing axes (b's shape itself: elementwise/diagonal);
        (batch, length, *state, n) with n = state[-1]: a dense matrix per step acting on the last
        axis, ``h_t = A_t @ h_{t-1} + b_t`` (leading state axes make it block-diagonal).
      initial_state: (batch, *state) h_{-1} (zeros if None).
      reverse: run from the end: ``h_t = a_t * h_{t+1} + b_t`` (initial_state is h_L).
      segment_ids: (batch, length) ints; the state resets (a_t treated as 0) where the id changes,
        for packed variable-length batches. The initial state feeds the first segment only.
      chunk_size: steps per chunk for "chunked" (default near sqrt(length)).
      implementation: None (platform default), "reference", "sequential", "associative",
        "chunked", "pallas" or "pallas_interpret" (the last two: elementwise a only).
      readout: the reduction hook: ``readout(states, *readout_args) -> outputs`` maps states of
        shape (batch, T, *state) and the matching (batch, T, ...) slices of ``readout_args`` to
        a pytree of (batch, T, ...) arrays, acting on each step independently (e.g.
        ``lambda h, c: jnp.einsum("btdn,btn->btd", h, c)``). The scan then returns the outputs
        over the whole length and never holds all states: chunks of ``chunk_size`` steps, only
        the state between chunks is kept, and the backward pass recomputes each chunk.
        ``lambda h: ()`` with ``return_final_state=True`` keeps only the final state.
      readout_args: (batch, length, ...) arrays sliced along time with the states.
      return_final_state: also return the last state (h_{L-1}; h_0 when ``reverse``).

    Returns:
      (batch, length, *state) states (or the readout's outputs), dtype
      ``result_type(a, b, initial_state)``; a pair (that, final state) if ``return_final_state``.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    impl = backend.resolve_implementation(FAMILY, implementation)
    mode = _mode(a, b)
    bsz, length = b.shape[:2]
    if length == 0:
        raise ValueError(f"b: expected length >= 1 along axis 1, got shape {b.shape}")
    state_shape = (bsz,) + b.shape[2:]
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
        checks.check_shape(initial_state, state_shape, "initial_state")
    check_segment_ids(segment_ids, bsz, length)
    chunk = check_chunk(chunk_size, length)
    if impl in ("pallas", "pallas_interpret") and mode == "matrix":
        raise ValueError(
            f"implementation={impl!r} supports elementwise a only, got a dense matrix a of shape "
            f"{a.shape}; use 'chunked'"
        )
    dtypes = [a.dtype, b.dtype] + ([initial_state.dtype] if initial_state is not None else [])
    dtype = jnp.result_type(*dtypes)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
        dtype = jnp.result_type(dtype, jnp.float32)
    a = a.astype(dtype)
    b = b.astype(dtype)
    h0 = jnp.zeros_like(b[:, 0]) if initial_state is None else initial_state.astype(dtype)
    # inside shard_map: a, b and the state vary over the same mesh axes (one loop carry type)
    a, b, h0 = backend.vary_together(a, b, h0)
    if mode == "diag":
        a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
    if reverse:
        a, b = jnp.flip(a, 1), jnp.flip(b, 1)
    if segment_ids is not None:
        seg = jnp.flip(segment_ids, 1) if reverse else segment_ids
        reset = reset_mask(seg)
        a = jnp.where(expand_to(reset, a.ndim), jnp.zeros((), dtype), a)
    if readout is None and len(readout_args):
        raise ValueError(
            f"readout_args: given without a readout ({len(readout_args)} arrays); pass readout="
        )
    if readout is not None:
        args = _check_readout(readout, readout_args, b, dtype)
        if reverse:
            args = [jnp.flip(x, 1) for x in args]
        if impl == "reference":  # the oracle: all states, then the hook
            hs = _sequential(a, b, h0, mode)
            ys, h_last = readout(hs, *args), hs[:, -1]
        else:
            ys, h_last = _readout_scan(a, b, h0, args, readout, mode, impl, chunk)
        if reverse:
            ys = jax.tree.map(lambda y: jnp.flip(y, 1), ys)
        return (ys, h_last) if return_final_state else ys
    if impl == "reference":
        hs = _sequential(a, b, h0, mode)
    else:
        hs = _scan(a, b, h0, mode, impl, chunk)
    h_last = hs[:, -1]
    if reverse:
        hs = jnp.flip(hs, 1)
    return (hs, h_last) if return_final_state else hs


def linear_scan_reference(
    a: Array,
    b: Array,
    *,
    initial_state: Array | None = None,
    reverse: bool = False,
    segment_ids: Array | None = None,
) -> Array:
    """The obvious ``lax.scan`` oracle for :func:`linear_scan` (same arguments)."""
    return linear_scan(
        a,
        b,
        initial_state=initial_state,
        reverse=reverse,
        segment_ids=segment_ids,
        implementation="reference",
    )
