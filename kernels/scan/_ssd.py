"""Mamba-2 state-space duality (SSD): scalar A per head, chunked matmul form.

    h_t = exp(dt_t * A) h_t-1 + dt_t * x_t B_t^T      h: (batch, H, P, N) per head
    y_t = h_t C_t + D * x_t

"chunked" (default) is the matmul form of the Mamba-2 paper (``ssd_minimal_discrete``): within a
chunk, a masked (l, l) decay matrix times C B^T times x (the quadratic, attention-like part); the
state each chunk leaves; a recurrence over chunk states (a ``lax.scan``, so compile time does not
depend on L); the carried state read out by C. "reference" is the obvious ``lax.scan`` over steps.
L need not be a multiple of the chunk (padded with dt = 0, which leaves the state unchanged).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcore import backend, checks

from ._common import check_segment_ids, pad_time, reset_mask

Array = Any

FAMILY = "ssd"

backend.register_family(
    FAMILY,
    ("reference", "sequential", "chunked"),
    {"*": "chunked"},
    doc="Mamba-2 SSD (scalar A per head): chunked matmul form and a sequential reference.",
)


def _group(v: Array, heads: int) -> Array:
    """(B, L, G, N) -> (B, L, H, N) (head h uses group h // (H / G))."""
    return jnp.repeat(v, heads // v.shape[2], axis=2)


def _sequential(x, dt, A, Bh, Ch, h0, keep):
    """lax.scan over steps; x (B, L, H, P), dt/keep (B, L, H)/(B, L), B/C (B, L, H, N)."""

    def step(h, s):
        x_t, dt_t, b_t, c_t, k_t = s
        da = jnp.exp(dt_t * A[None]) * k_t[:, None]  # (B, H)
        h = da[..., None, None] * h + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :]
        y = jnp.einsum("bhpn,bhn->bhp", h, c_t)
        return h, y

    tm = lambda v: jnp.moveaxis(v, 1, 0)
    h_t, ys = lax.scan(step, h0, (tm(x), tm(dt), tm(Bh), tm(Ch), tm(keep)))
    return tm(ys), h_t


def _chunked(x, dt, A, Bg, Cg, h0, sidx, chunk):
    """Matmul form. Bg/Cg: (B, L, G, N); sidx: (B, L) monotone segment index (resets on change).

    Internally (chunk, batch, group, head-in-group, step, ...) so every matmul has its batch axes
    leading, C B^T is computed once per group (not per head), and the chunk recurrence scans the
    leading axis of the per-chunk states as they come out of their matmul (no transposes of the
    large (chunks, batch, H, P, N) tensors, forward or backward).
    """
    bsz, length, heads, p = x.shape
    g = Bg.shape[2]
    r = heads // g
    t = min(chunk, length)
    nc = -(-length // t)
    lp = nc * t
    x, dt, Bg, Cg = (pad_time(v, lp) for v in (x, dt, Bg, Cg))
    sidx = pad_time(sidx, lp, value=0)
    if lp != length:  # padded steps belong to the last segment (dt = 0 keeps the state)
        last = sidx[:, length - 1 : length]
        pos = jnp.arange(lp)[None, :]
        sidx = jnp.where(pos >= length, last, sidx)
    n = Bg.shape[-1]
    xc = x.reshape(bsz, nc, t, g, r, p).transpose(1, 0, 3, 4, 2, 5)  # (nc, B, G, R, T, P)
    dtc = dt.reshape(bsz, nc, t, g, r).transpose(1, 0, 3, 4, 2)  # (nc, B, G, R, T)
    bc = Bg.reshape(bsz, nc, t, g, n).transpose(1, 0, 3, 2, 4)  # (nc, B, G, T, N)
    cc = Cg.reshape(bsz, nc, t, g, n).transpose(1, 0, 3, 2, 4)
    sc = sidx.reshape(bsz, nc, t).transpose(1, 0, 2).reshape(nc, bsz, 1, 1, t)  # (nc, B, 1, 1, T)
    acum = jnp.cumsum(dtc * A.reshape(1, 1, g, r, 1), axis=-1)  # (nc, B, G, R, T) log-decay
    xdt = xc * dtc[..., None]  # (nc, B, G, R, T, P)

    # 1. intra-chunk: y[l] = sum_{s<=l, same segment} C_l.B_s exp(acum_l - acum_s) x_s dt_s
    causal = jnp.tril(jnp.ones((t, t), bool)).reshape(1, 1, 1, 1, t, t)
    mask = (sc[..., :, None] == sc[..., None, :]) & causal  # (nc, B, 1, 1, T, T)
    diff = acum[..., :, None] - acum[..., None, :]  # (nc, B, G, R, T(l), T(s))
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))
    cb = jnp.einsum("bcgln,bcgsn->bcgls", cc, bc)  # once per group
    y = jnp.einsum("bcgrls,bcgrsp->bcgrlp", cb[:, :, :, None] * decay, xdt)

    # 2. the state each chunk leaves (from its own steps, in the chunk's last segment)
    in_last = sc == sc[..., -1:]  # (nc, B, 1, 1, T)
    w = jnp.exp(jnp.where(in_last, acum[..., -1:] - acum, -jnp.inf))  # (nc, B, G, R, T)
    states = jnp.einsum("bcgrlp,bcgln->bcgrpn", xdt * w[..., None], bc)  # (nc, B, G, R, P, N)

    # 3. recurrence over chunks: s_in[c+1] = decay_c * keep_c * s_in[c] + states_c
    end = sidx.reshape(bsz, nc, t)[:, :, -1]  # (B, nc)
    prev_end = jnp.concatenate([jnp.zeros_like(end[:, :1]), end[:, :-1]], axis=1)
    keep_c = (end == prev_end).astype(x.dtype).T.reshape(nc, bsz, 1, 1)  # no reset inside chunk
    chunk_decay = jnp.exp(acum[..., -1]) * keep_c  # (nc, B, G, R)

    s_in, h_t = _chunk_recurrence(chunk_decay, states, h0.reshape(bsz, g, r, p, n))
    # s_in: (nc, B, G, R, P, N), the state entering each chunk

    # 4. carried state read out: y[l] += exp(acum_l) C_l s_in (if l is in the carried segment)
    carried = sc == prev_end.T.reshape(nc, bsz, 1, 1, 1)  # (nc, B, 1, 1, T)
    out_decay = jnp.exp(jnp.where(carried, acum, -jnp.inf))  # (nc, B, G, R, T)
    y = y + jnp.einsum("bcgln,bcgrpn->bcgrlp", cc, s_in) * out_decay[..., None]
    y = y.transpose(1, 0, 4, 2, 3, 5).reshape(bsz, lp, heads, p)[:, :length]
    return y, h_t.reshape(bsz, heads, p, n)


@jax.custom_vjp
def _chunk_recurrence(decay, states, h0):
    """s_in[c + 1] = decay[c] s_in[c] + states[c], s_in[0] = h0, over the leading (chunk) axis.

    decay: (nc, B, G, R); states: (nc, B, G, R, P, N); h0: (B, G, R, P, N). Returns s_in (the
    state entering each chunk) and the final state. Its VJP is the reverse recurrence of the
    cotangents (one ``lax.scan`` that carries only the adjoint), with the decay cotangent taken
    afterwards in one reduction, instead of the generic scan transpose.
    """

    def carry(s, inp):
        d, st = inp
        return d[..., None, None] * s + st, s

    h_t, s_in = lax.scan(carry, h0, (decay, states))
    return s_in, h_t


def _chunk_recurrence_fwd(decay, states, h0):
    s_in, h_t = _chunk_recurrence(decay, states, h0)
    return (s_in, h_t), (decay, s_in)


def _chunk_recurrence_bwd(res, cts):
    decay, s_in = res
    g_in, g_t = cts

    def back(lam, inp):  # lam: cotangent of s_in[c + 1]
        d, g = inp
        return g + d[..., None, None] * lam, lam

    g_h0, g_states = lax.scan(back, g_t, (decay, g_in), reverse=True)
    g_decay = jnp.einsum("cbgrpn,cbgrpn->cbgr", g_states, s_in)
    return g_decay, g_states, g_h0


_chunk_recurrence.defvjp(_chunk_recurrence_fwd, _chunk_recurrence_bwd)


def ssd(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    chunk_size: int = 64,
    D: Array | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Mamba-2 SSD scan.

    Args:
      x: (batch, length, H, P) inputs per head.
      dt: (batch, length, H) step sizes (already positive: apply softplus/bias before).
      A: (H,) scalar decay rate per head (negative for a stable scan).
      B, C: (batch, length, G, N) with G dividing H (head h uses group h // (H / G)), or
        (batch, length, N) shared by all heads.
      chunk_size: chunk length of the matmul form (L is padded internally).
      D: (H,) or (H, P) skip connection.
      initial_state: (batch, H, P, N); return_final_state: also return the state after step L-1.
      segment_ids: (batch, length) ints; the state resets where the id changes.
      implementation: None (default "chunked"), "chunked", "reference" or "sequential".

    Returns:
      y (batch, length, H, P) in x's dtype (accumulated in float32 or wider), and with
      ``return_final_state`` the (batch, H, P, N) final state.
    """
    impl = backend.resolve_implementation(FAMILY, implementation)
    x, dt, A, B, C = (jnp.asarray(v) for v in (x, dt, A, B, C))
    checks.check_rank(x, 4, "x")
    bsz, length, heads, p = x.shape
    if length == 0:
        raise ValueError(f"x: expected length >= 1 along axis 1, got shape {x.shape}")
    checks.check_shape(dt, (bsz, length, heads), "dt")
    checks.check_shape(A, (heads,), "A")
    checks.check_rank(B, (3, 4), "B")
    n = B.shape[-1]
    for name, v in (("B", B), ("C", C)):
        if v.ndim == 3:
            checks.check_shape(v, (bsz, length, n), name)
        else:
            checks.check_shape(v, (bsz, length, None, n), name)
            if heads % v.shape[2]:
                raise ValueError(
                    f"{name}: expected a group count dividing H={heads}, got {v.shape[2]}"
                )
    if D is not None:
        D = jnp.asarray(D)
        if D.shape not in ((heads,), (heads, p)):
            raise ValueError(f"D: expected shape ({heads},) or ({heads}, {p}), got {D.shape}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    check_segment_ids(segment_ids, bsz, length)

    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf, dtf, Af = x.astype(acc), dt.astype(acc), A.astype(acc)
    Bg = (B[:, :, None] if B.ndim == 3 else B).astype(acc)  # (B, L, G, N)
    Cg = (C[:, :, None] if C.ndim == 3 else C).astype(acc)
    if initial_state is None:
        h0 = jnp.zeros_like(xf, shape=(bsz, heads, p, n))
    else:
        initial_state = jnp.asarray(initial_state)
        checks.check_shape(initial_state, (bsz, heads, p, n), "initial_state")
        h0 = initial_state.astype(acc)
    if segment_ids is None:
        resets = jnp.zeros((bsz, length), bool)
    else:
        resets = reset_mask(segment_ids)

    if impl in ("reference", "sequential"):
        keep = 1.0 - resets.astype(acc)
        y, h_t = _sequential(xf, dtf, Af, _group(Bg, heads), _group(Cg, heads), h0, keep)
    else:
        sidx = jnp.cumsum(resets.astype(jnp.int32), axis=1)
        y, h_t = _chunked(xf, dtf, Af, Bg, Cg, h0, sidx, chunk_size)
    if D is not None:
        d = D.astype(acc)
        d = d[None, None, :, None] if d.ndim == 1 else d[None, None]
        y = y + xf * d
    y = y.astype(x.dtype)
    return (y, h_t) if return_final_state else y


def ssd_reference(x, dt, A, B, C, **kwargs):  # fmt: skip
    """The sequential ``lax.scan`` oracle for :func:`ssd` (same arguments)."""
    kwargs.pop("implementation", None)
    return ssd(x, dt, A, B, C, implementation="reference", **kwargs)
