"""Linear recurrences h_t = a_t * h_{t-1} + b_t (elementwise or matrix a) along axis 1.

Implementations (all but "reference" differentiate through :func:`_scan_vjp`, whose backward pass
is the adjoint recurrence -- itself a reverse linear scan run by the same implementation):

- "reference": ``lax.scan``, differentiated by JAX (the oracle).
- "sequential": ``lax.scan``.
- "associative": ``lax.associative_scan`` (log-depth tree).
- "chunked": chunks of ``chunk_size`` steps, three passes of ``lax.scan``: over the steps inside a
  chunk for all chunks at once (each chunk's end state and coefficient product, nothing stored per
  step), over the chunks (the state entering each chunk), and over the steps again from the true
  start states (the outputs). Sequential depth T + L/T, no (L, ...) temporaries besides the
  output; compile time does not depend on L.
- "pallas" / "pallas_interpret": a Pallas kernel (diagonal a only); see ``_pallas.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcore import backend, checks

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan_vjp(a: Array, b: Array, h0: Array, mode: str, impl: str, chunk: int) -> Array:
    return _forward(a, b, h0, mode, impl, chunk)


def _scan_vjp_fwd(a, b, h0, mode, impl, chunk):
    hs = _forward(a, b, h0, mode, impl, chunk)
    return hs, (a, hs, h0)


def _scan_vjp_bwd(mode, impl, chunk, res, g):
    a, hs, h0 = res
    # Adjoint: lam_t = a_{t+1}^T lam_{t+1} + g_t (a reverse linear scan), lam_L = 0.
    at = jnp.swapaxes(a, -1, -2) if mode == "matrix" else a
    a_next = jnp.concatenate([at[:, 1:], jnp.zeros_like(at[:, :1])], axis=1)
    g = g.astype(hs.dtype)
    lam = jnp.flip(
        _forward(jnp.flip(a_next, 1), jnp.flip(g, 1), jnp.zeros_like(h0), mode, impl, chunk),
        1,
    )
    h_prev = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)
    if mode == "matrix":
        da = lam[..., :, None] * h_prev[..., None, :]
        dh0 = jnp.einsum("...ji,...j->...i", a[:, 0], lam[:, 0])
    else:
        da = lam * h_prev
        axes = tuple(i for i in range(a.ndim) if a.shape[i] == 1 and da.shape[i] != 1)
        if axes:
            da = jnp.sum(da, axis=axes, keepdims=True)
        dh0 = a[:, 0] * lam[:, 0]
    return da.astype(a.dtype), lam.astype(hs.dtype), dh0.astype(h0.dtype)


_scan_vjp.defvjp(_scan_vjp_fwd, _scan_vjp_bwd)


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
) -> Array:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` along axis 1.

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

    Returns:
      (batch, length, *state) states, dtype ``result_type(a, b, initial_state)``.
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
    if mode == "diag":
        a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
    if reverse:
        a, b = jnp.flip(a, 1), jnp.flip(b, 1)
    if segment_ids is not None:
        seg = jnp.flip(segment_ids, 1) if reverse else segment_ids
        reset = reset_mask(seg)
        a = jnp.where(expand_to(reset, a.ndim), jnp.zeros((), dtype), a)
    if impl == "reference":
        hs = _sequential(a, b, h0, mode)
    else:
        hs = _scan_vjp(a, b, h0, mode, impl, chunk)
    return jnp.flip(hs, 1) if reverse else hs


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
