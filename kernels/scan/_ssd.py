"""Mamba-2 state-space duality (SSD): scalar A per head, chunked matmul form.

    h_t = exp(dt_t * A) h_t-1 + dt_t * x_t B_t^T      h: (batch, H, P, N) per head
    y_t = h_t C_t + D * x_t

"chunked" (default) is the matmul form of the Mamba-2 paper (``ssd_minimal_discrete``) run as one
``lax.scan`` over chunks (compile time independent of L): per chunk, a masked (T, T) decay matrix
times C B^T times x (the quadratic, attention-like part), the carried state read out by C, and the
state the chunk leaves. Its derivative is a custom JVP whose tangent map is a ``linear_call``:
``jvp`` runs the JVP of that scan; ``grad`` transposes it with a hand-written reverse scan over
chunks that recomputes the decay matrices, so reverse mode stores only the inputs and the state
entering each chunk. "matmul" (the XLA default off CPU, where a loop of small kernels would be
latency bound; on GPU the default is the Pallas forward of ``_ssd_pallas``) computes all chunks
at once (masked (T, T) matrices for every chunk, then a ``lax.scan`` over the chunk states only)
and is differentiated by JAX. "reference" is the obvious ``lax.scan``
over steps, differentiated by JAX.
L need not be a multiple of the chunk (padded with dt = 0, which leaves the state unchanged).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcore import backend, checks
from jaxcore.autodiff import tangent_call

from ._common import check_segment_ids, pad_time, reset_mask

Array = Any

FAMILY = "ssd"

backend.register_family(
    FAMILY,
    ("reference", "sequential", "chunked", "matmul", "pallas", "pallas_interpret"),
    # GPU: the Pallas forward (10x "matmul"'s on an H200, session 5; differentiated calls run
    # "matmul" forward and backward, see _ssd_pallas)
    {"cpu": "chunked", "gpu": "pallas", "*": "matmul"},
    doc="Mamba-2 SSD (scalar A per head): chunked matmul form, Pallas kernels (forward) and a "
    "sequential reference.",
)


def default_chunk_size(platform: str | None = None) -> int:
    """Chunk length of the XLA forms when ``chunk_size=None``: 32 on CPU (fastest of 32/64/128
    for fwd and fwd+bwd at Mamba-2 shapes, benchmarks/bench_scan.py), 256 on GPU (an H200,
    session 5, "matmul" at B=2 L=8192 H=16 P=64 N=64 bf16: forward 1.32 / 1.80 / 2.58 ms and
    forward+backward 1.87 / 2.13 / 3.23 ms at 256 / 128 / 64), 64 elsewhere."""
    return {"cpu": 32, "gpu": 256}.get(platform or backend.platform(), 64)


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
    """Matmul form. x (B, L, H, P); Bg/Cg (B, L, G, N); sidx (B, L) segment index.

    Pads L up to a multiple of the chunk (dt = 0 keeps the state; the padded steps join the last
    segment) and runs :func:`_core` on the padded arrays.
    """
    bsz, length, heads, p = x.shape
    t = min(chunk, length)
    lp = -(-length // t) * t
    if lp != length:
        x, dt, Bg, Cg = (pad_time(v, lp) for v in (x, dt, Bg, Cg))
        last = sidx[:, length - 1 : length]
        sidx = jnp.concatenate([sidx, jnp.broadcast_to(last, (bsz, lp - length))], axis=1)
    y, h_t = _core(t, x, dt, A, Bg, Cg, h0, sidx)
    return y[:, :length], h_t


def _matmul(x, dt, A, Bg, Cg, h0, sidx, chunk):
    """All chunks at once (``ssd_minimal_discrete``), differentiated by JAX; the GPU default.

    Bg/Cg: (B, L, G, N); sidx: (B, L) monotone segment index (resets on change).

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

    def carry(s, inp):
        d, st = inp
        return d[..., None, None] * s + st, s

    h_t, s_in = lax.scan(carry, h0.reshape(bsz, g, r, p, n), (chunk_decay, states))
    # s_in: (nc, B, G, R, P, N), the state entering each chunk

    # 4. carried state read out: y[l] += exp(acum_l) C_l s_in (if l is in the carried segment)
    carried = sc == prev_end.T.reshape(nc, bsz, 1, 1, 1)  # (nc, B, 1, 1, T)
    out_decay = jnp.exp(jnp.where(carried, acum, -jnp.inf))  # (nc, B, G, R, T)
    y = y + jnp.einsum("bcgln,bcgrpn->bcgrlp", cc, s_in) * out_decay[..., None]
    y = y.transpose(1, 0, 4, 2, 3, 5).reshape(bsz, lp, heads, p)[:, :length]
    return y, h_t.reshape(bsz, heads, p, n)


def _chunk_major(t, x, dt, Bg, Cg, g):
    """Chunk-major, head-major copies for ``lax.scan``: x (B, L, H, P) -> (nc, B, G, R, T, P),
    dt (B, L, H) -> (nc, B, G, R, T), B/C (B, L, G, N) -> (nc, B, G, T, N)."""
    bsz, lp, heads = dt.shape
    r, nc = heads // g, lp // t
    xh = x.reshape(bsz, nc, t, g, r, -1).transpose(1, 0, 3, 4, 2, 5)
    dth = dt.reshape(bsz, nc, t, g, r).transpose(1, 0, 3, 4, 2)
    bc, cc = (v.reshape(bsz, nc, t, g, -1).transpose(1, 0, 3, 2, 4) for v in (Bg, Cg))
    return xh, dth, bc, cc


def _from_chunk_major(v):
    """(nc, B, G, R, T, ...) -> (B, L, H, ...)."""
    nc, bsz, g, r, t = v.shape[:5]
    perm = (1, 0, 4, 2, 3) + tuple(range(5, v.ndim))
    return v.transpose(perm).reshape(bsz, nc * t, g * r, *v.shape[5:])


def _chunk_consts(dth, A, sidx):
    """Per-chunk quantities that only need dt, A and the segments, chunk-major for ``lax.scan``.

    Returns (acum, in_last, carried, keep, seg): the in-chunk cumulative log-decay (nc, B, G, R, T);
    whether a step is in its chunk's last segment (nc, B, T) (its input reaches the chunk state);
    whether it is in the segment carried in from the previous chunk (nc, B, T) (it reads the
    carried state); whether the carried state survives the chunk (nc, B); the segment index
    (nc, B, T).
    """
    nc, bsz, g, r, t = dth.shape
    acum = jnp.cumsum(dth * A.reshape(1, 1, g, r, 1), axis=-1)
    seg = jnp.moveaxis(sidx.reshape(bsz, nc, t), 1, 0)  # (nc, B, T)
    end = seg[:, :, -1]
    prev_end = jnp.concatenate([jnp.zeros_like(end[:1]), end[:-1]], axis=0)
    in_last = seg == end[..., None]
    carried = seg == prev_end[..., None]
    keep = end == prev_end  # no reset inside the chunk
    return acum, in_last, carried, keep, seg


def _chunk_terms(a, in_last, carried, keep, seg, xc, dtc, bc, cc):
    """Recomputed per chunk (forward and backward), head-major: a (B, G, R, T), xc (B, G, R, T, P),
    bc/cc (B, G, T, N); in_last/carried/seg (B, T), keep (B,)."""
    t = a.shape[-1]
    xdt = xc * dtc[..., None]
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & causal[None]  # (B, T(l), T(s))
    diff = a[..., :, None] - a[..., None, :]
    lmat = jnp.exp(jnp.where(mask[:, None, None], diff, -jnp.inf))  # (B, G, R, T, T)
    cb = jnp.einsum("bgln,bgsn->bgls", cc, bc)  # once per group
    m = cb[:, :, None] * lmat
    od = jnp.exp(jnp.where(carried[:, None, None], a, -jnp.inf))  # reads the carried state
    w = jnp.exp(jnp.where(in_last[:, None, None], a[..., -1:] - a, -jnp.inf))  # to chunk state
    cd = jnp.exp(a[..., -1]) * keep[:, None, None].astype(a.dtype)  # (B, G, R) carried decay
    return xdt, lmat, m, od, w, cd


def _core_fwd_impl(t, x, dt, A, Bg, Cg, h0, sidx):
    """One ``lax.scan`` over chunks; returns y (B, L, H, P), the final state, and the residuals
    of the backward (chunk-major inputs and s_in (nc, B, G, R, P, N), the state entering each
    chunk).
    """
    bsz, lp, heads, p = x.shape
    g, n = Bg.shape[2], Bg.shape[3]
    xh, dth, bh, ch = _chunk_major(t, x, dt, Bg, Cg, g)

    def body(s, inp):
        xc, dtc, bc, cc, a, in_last, carried, keep, seg = inp
        xdt, _, m, od, w, cd = _chunk_terms(a, in_last, carried, keep, seg, xc, dtc, bc, cc)
        y = jnp.einsum("bgrls,bgrsp->bgrlp", m, xdt)
        y = y + jnp.einsum("bgln,bgrpn->bgrlp", cc, s) * od[..., None]
        st = jnp.einsum("bgrsp,bgsn->bgrpn", xdt * w[..., None], bc)
        return cd[..., None, None] * s + st, (y, s)

    s0 = h0.reshape(bsz, g, heads // g, p, n)
    consts = _chunk_consts(dth, A, sidx)
    h_t, (y, s_in) = lax.scan(body, s0, (xh, dth, bh, ch, *consts))
    res = (xh, dth, A, bh, ch, sidx, s_in)
    return _from_chunk_major(y), h_t.reshape(bsz, heads, p, n), res


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _core(t, x, dt, A, Bg, Cg, h0, sidx):
    """y, final state of the chunked SSD on padded inputs (L a multiple of t).

    Differentiated by a custom JVP whose tangent map is a ``linear_call``: forward mode runs the
    JVP of the scan over chunks; reverse mode transposes that call with :func:`_core_bwd`, one
    reverse ``lax.scan`` over chunks that recomputes each chunk's decay matrices from the inputs
    and the saved state entering the chunk, and carries the state cotangent. So ``grad`` keeps
    only the inputs and the chunk-entry states, and ``jvp``/``jacfwd`` work too.
    """
    y, h_t, _ = _core_fwd_impl(t, x, dt, A, Bg, Cg, h0, sidx)
    return y, h_t


@partial(_core.defjvp, symbolic_zeros=True)
def _core_jvp(t, primals, tangents):
    y, h_t, res = _core_fwd_impl(t, *primals)
    fun = lambda sidx, *p: _core_fwd_impl(t, *p, sidx)[:2]  # noqa: E731
    backward = lambda p, sidx, res, cts: _core_bwd(t, res, cts)  # noqa: E731
    out_t = tangent_call(fun, backward, primals[:6], tangents[:6], primals[6], res, (y, h_t))
    return (y, h_t), tuple(out_t)


def _rowdot(a: Array, b: Array) -> Array:
    """sum(a * b, -1) as a contraction (XLA:CPU's reductions are several times slower)."""
    return jnp.einsum("...p,...p->...", a, b)


def _ones_dot(v: Array, spec: str) -> Array:
    """Sum of ``v`` over the axis the second operand of ``spec`` names, as a contraction."""
    ax = spec.split(",")[0].index(spec.split(",")[1].split("-")[0])
    return jnp.einsum(spec, v, jnp.ones((v.shape[ax],), v.dtype))


def _core_bwd(t, res, cts):
    xh, dth, A, bh, ch, sidx, s_in = res
    gy, g_t = cts
    nc, bsz, g, r, _, p = xh.shape
    n = bh.shape[-1]
    heads = g * r
    gyh = gy.reshape(bsz, nc, t, g, r, p).transpose(1, 0, 3, 4, 2, 5)

    def body(lam, inp):  # lam: cotangent of the state leaving chunk c
        xc, dtc, bc, cc, gyc, a, in_last, carried, keep, seg, s = inp
        xdt, lmat, m, od, w, cd = _chunk_terms(a, in_last, carried, keep, seg, xc, dtc, bc, cc)
        # read-out of the carried state: y += od * (C s)
        gz = gyc * od[..., None]
        z = jnp.einsum("bgln,bgrpn->bgrlp", cc, s)
        ga = _rowdot(gyc, z) * od  # (B, G, R, T)
        gc = jnp.einsum("bgrlp,bgrpn->bgln", gz, s)
        g_s = jnp.einsum("bgrlp,bgln->bgrpn", gz, cc)
        # recurrence: s_next = cd * s + st
        ga_last = jnp.einsum("bgrpn,bgrpn->bgr", lam, s) * cd  # (B, G, R)
        lam_new = g_s + cd[..., None, None] * lam
        # chunk state: st = (xdt * w)^T B
        g_u = jnp.einsum("bgsn,bgrpn->bgrsp", bc, lam)
        gb = jnp.einsum("bgrsp,bgrpn->bgsn", xdt * w[..., None], lam)
        g_xdt = g_u * w[..., None]
        gw = _rowdot(g_u, xdt) * w
        ga = ga - gw
        ga_last = ga_last + _ones_dot(gw, "bgrt,t->bgr")
        # intra-chunk: y += (CB * L) @ xdt
        gm = jnp.einsum("bgrlp,bgrsp->bgrls", gyc, xdt)
        g_xdt = g_xdt + jnp.einsum("bgrls,bgrlp->bgrsp", m, gyc)
        gcb = _ones_dot(gm * lmat, "bgrls,r->bgls")  # (B, G, T, T)
        ge = gm * m
        ga = ga + _ones_dot(ge, "bgrls,s->bgrl") - _ones_dot(ge, "bgrls,l->bgrs")
        ga = ga.at[..., -1].add(ga_last)
        gc = gc + jnp.einsum("bgls,bgsn->bgln", gcb, bc)
        gb = gb + jnp.einsum("bgls,bgln->bgsn", gcb, cc)
        gdt = _rowdot(g_xdt, xc)
        return lam_new, (g_xdt * dtc[..., None], gdt, ga, gb, gc)

    consts = _chunk_consts(dth, A, sidx)
    g_h0, (gx, gdt, ga, gb, gc) = lax.scan(
        body, g_t.reshape(bsz, g, r, p, n), (xh, dth, bh, ch, gyh, *consts, s_in), reverse=True
    )
    # acum = in-chunk cumsum of dt * A: its cotangent is the reverse in-chunk cumsum of ga
    g_da = jnp.flip(jnp.cumsum(jnp.flip(ga, -1), axis=-1), -1)  # (nc, B, G, R, T)
    gdt = gdt + g_da * A.reshape(1, 1, g, r, 1)
    g_a = jnp.sum(g_da * dth, axis=(0, 1, 4)).reshape(heads)
    gb, gc = (v.transpose(1, 0, 3, 2, 4).reshape(bsz, nc * t, g, n) for v in (gb, gc))
    return (_from_chunk_major(gx), _from_chunk_major(gdt), g_a, gb, gc,
            g_h0.reshape(bsz, heads, p, n), None)  # fmt: skip


def ssd(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    chunk_size: int | None = None,
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
      chunk_size: chunk length of the matmul form (L is padded internally); None picks
        ``default_chunk_size()`` (32 on CPU, 256 on GPU, 64 elsewhere).
      D: (H,) or (H, P) skip connection.
      initial_state: (batch, H, P, N); return_final_state: also return the state after step L-1.
      segment_ids: (batch, length) ints; the state resets where the id changes.
      implementation: None (the platform default: "chunked" on CPU, "pallas" on GPU where
        it applies (chunk_size None or a power of two >= 16, not float64; else "matmul"),
        "matmul" elsewhere), "chunked", "matmul", "reference", "sequential", "pallas" (GPU
        only: the Triton kernels of ``_ssd_pallas``, chunk_size a power of two >= 16 or None
        for ``_ssd_pallas.SSD_CONFIG[0]``; differentiated calls run the platform's XLA
        implementation forward and backward) or
        "pallas_interpret" (the same kernels run by the Pallas interpreter, any backend).

    Returns:
      y (batch, length, H, P) in x's dtype (accumulated in float32 or wider), and with
      ``return_final_state`` the (batch, H, P, N) final state.
    """
    impl = backend.resolve_implementation(FAMILY, implementation)
    x, dt, A, B, C = (jnp.asarray(v) for v in (x, dt, A, B, C))
    if implementation is None and impl == "pallas":  # the GPU default, where the kernels apply
        chunk_ok = chunk_size is None or checks.is_tile_size(chunk_size)
        if not chunk_ok or x.dtype == jnp.float64:
            impl = "matmul"
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
    pallas_chunk = chunk_size
    if chunk_size is None:
        chunk_size = default_chunk_size()
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
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
    # inside shard_map: the state varies over the mesh axes the inputs vary over (one carry type)
    h0 = backend.vary_together(h0, xf, Bg, Cg)[0]
    if impl in ("pallas", "pallas_interpret"):
        h0 = None if initial_state is None else h0  # zeros inside the kernel
        y, h_t = _run_pallas(x, dt, A, B, C, D, h0, pallas_chunk, segment_ids, impl)
        return (y, h_t) if return_final_state else y
    if segment_ids is None:
        resets = jnp.zeros((bsz, length), bool)
    else:
        resets = reset_mask(segment_ids)

    if impl in ("reference", "sequential"):
        keep = 1.0 - resets.astype(acc)
        y, h_t = _sequential(xf, dtf, Af, _group(Bg, heads), _group(Cg, heads), h0, keep)
    else:
        sidx = jnp.cumsum(resets.astype(jnp.int32), axis=1)
        run = _chunked if impl == "chunked" else _matmul
        y, h_t = run(xf, dtf, Af, Bg, Cg, h0, sidx, chunk_size)
    if D is not None:
        d = D.astype(acc)
        d = d[None, None, :, None] if d.ndim == 1 else d[None, None]
        y = y + xf * d
    y = y.astype(x.dtype)
    return (y, h_t) if return_final_state else y


def _run_pallas(x, dt, A, B, C, D, h0, chunk_size, segment_ids, impl):
    """The Pallas forward kernels (``_ssd_pallas``) on the inputs as given (bf16 stays bf16)."""
    if impl == "pallas" and backend.platform() != "gpu":
        raise ValueError(
            f"implementation='pallas': the ssd kernels lower through Triton (GPU only), the "
            f"default backend is {backend.platform()!r}; use 'matmul' or 'pallas_interpret'"
        )
    from ._ssd_pallas import ssd_pallas  # lazy: imports jax.experimental.pallas

    xla_impl = backend.resolve_implementation(FAMILY, None)
    if xla_impl not in ("chunked", "matmul"):  # the backward never recurses into Pallas
        xla_impl = "matmul"
    return ssd_pallas(x, dt, A, B, C, D, h0, segment_ids, chunk_size=chunk_size,
                      interpret=impl == "pallas_interpret", xla_impl=xla_impl)  # fmt: skip


def ssd_reference(x, dt, A, B, C, **kwargs):  # fmt: skip
    """The sequential ``lax.scan`` oracle for :func:`ssd` (same arguments)."""
    kwargs.pop("implementation", None)
    return ssd(x, dt, A, B, C, implementation="reference", **kwargs)
