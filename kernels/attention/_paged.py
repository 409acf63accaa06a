"""Paged KV caches: decode attention through block tables into one shared page pool, and writes.

Layout (vLLM PagedAttention / FlashInfer / JAX ragged paged attention): every sequence's cache
lives in fixed-size pages of one pool, ``key_pages`` (P, page_size, K, H) and ``value_pages``
(P, page_size, K, Hv); ``block_tables[b, j]`` is the pool index of sequence b's logical page j,
so cache position ``p`` of sequence b is ``pool[block_tables[b, p // page_size], p % page_size]``.
Table entries at or past a sequence's length are never used (they may hold garbage or -1: they
are clamped into the pool and masked), and pool entries at positions >= ``cache_lengths[b]``
never influence sequence b's result, not even when they hold inf or NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcore import backend, checks
from jaxcore.autodiff import tangent_call

from ._common import compute_dtype, soft_cap
from ._decode import decode_attention

FAMILY = "attention_paged_decode"
backend.register_family(
    FAMILY,
    ("reference", "xla", "pallas", "pallas_interpret"),
    # GPU: the Triton kernel (on an H200, session 5: bf16 1.7x faster than gathering the pages
    # for decode_attention, f32 0.8x of it but 1.5x faster than "xla"; see BENCHMARKS.md)
    {"gpu": "pallas", "*": "xla"},
    doc="paged_decode_attention: flash decoding through block tables into a page pool",
)

# Default split: about this many cache positions per loop step.
_SPLIT_POSITIONS = 512


def _is_int(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.integer)


def _check_pool(key_pages, value_pages, block_tables, b: int, h: int) -> None:
    checks.check_rank(key_pages, 4, "key_pages")
    checks.check_rank(value_pages, 4, "value_pages")
    checks.check_shape(key_pages, (None, None, None, h), "key_pages")
    p, ps, kh, _ = key_pages.shape
    checks.check_shape(value_pages, (p, ps, kh, None), "value_pages")
    if p == 0 or ps == 0 or kh == 0:
        raise ValueError(
            f"key_pages: expected at least one page, page slot and head (P, page_size, K > 0), "
            f"got shape {key_pages.shape}"
        )
    checks.check_rank(block_tables, 2, "block_tables")
    checks.check_shape(block_tables, (b, None), "block_tables")
    if block_tables.shape[1] == 0:
        raise ValueError(
            f"block_tables: expected at least one page per sequence (B, max_pages > 0), got shape "
            f"{block_tables.shape}"
        )
    if not _is_int(block_tables):
        raise ValueError(f"block_tables: expected an integer dtype, got {block_tables.dtype}")
    for nm, x in (("key_pages", key_pages), ("value_pages", value_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{nm}: expected a floating dtype, got {x.dtype}")
    if key_pages.dtype != value_pages.dtype:
        raise ValueError(
            f"value_pages: expected the key_pages dtype {key_pages.dtype}, got {value_pages.dtype}"
        )


def _check(query, key_pages, value_pages, block_tables, cache_lengths) -> None:
    checks.check_rank(query, 4, "query")
    b, _, n, h = query.shape
    if not jnp.issubdtype(query.dtype, jnp.floating):
        raise ValueError(f"query: expected a floating dtype, got {query.dtype}")
    _check_pool(key_pages, value_pages, block_tables, b, h)
    kh = key_pages.shape[2]
    if n % kh:
        raise ValueError(
            f"key_pages: expected a number of heads dividing the query's {n} heads, got shape "
            f"{key_pages.shape} ({kh} heads)"
        )
    if key_pages.dtype != query.dtype:
        raise ValueError(
            f"key_pages: expected the query dtype {query.dtype}, got {key_pages.dtype}"
        )
    checks.check_shape(cache_lengths, (b,), "cache_lengths")
    if not _is_int(cache_lengths):
        raise ValueError(f"cache_lengths: expected an integer dtype, got {cache_lengths.dtype}")


def gather_pages(pages: Any, block_tables: Any) -> jax.Array:
    """The contiguous cache (B, max_pages * page_size, K, D) of a pool (P, page_size, K, D).

    Table entries outside [0, P) are clamped (their positions must be masked by the caller).
    """
    pages, block_tables = jnp.asarray(pages), jnp.asarray(block_tables)
    checks.check_rank(pages, 4, "pages")
    checks.check_rank(block_tables, 2, "block_tables")
    if not _is_int(block_tables):
        raise ValueError(f"block_tables: expected an integer dtype, got {block_tables.dtype}")
    p, ps, kh, d = pages.shape
    b, m = block_tables.shape
    idx = jnp.clip(block_tables.astype(jnp.int32), 0, p - 1)
    return jnp.take(pages, idx, axis=0, mode="clip").reshape(b, m * ps, kh, d)


def _mask_positions(cache: jax.Array, lengths: jax.Array) -> jax.Array:
    """Zero cache entries at positions >= lengths (so garbage, even NaN, never leaks)."""
    pos = jnp.arange(cache.shape[1], dtype=jnp.int32)
    valid = pos[None, :] < lengths[:, None]
    return jnp.where(valid[:, :, None, None], cache, jnp.zeros((), cache.dtype))


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration of the "xla" loops (hashable: a custom_jvp nondiff argument)."""

    tq: int
    page_size: int
    capacity: int  # max_pages * page_size: positions past it (padded pages) are masked
    cap: float | None
    window: int | None
    group: int  # sequences per loop step
    kernel: str = "xla"  # forward: "xla" (scan), "pallas" or "pallas_interpret"


def _vzero(dtype, *xs):
    """A zero of ``dtype`` that varies over every shard_map axis any of ``xs`` varies over, so
    loop carries and cond branches have the type of the loop body's output."""
    return sum(jnp.zeros_like(x.reshape(-1)[0]).astype(dtype) for x in xs)


def _needed(start, c, lengths, cfg: _Cfg):
    """Whether any sequence of the group can see a position of the split [start, start + c)."""
    valid_len = jnp.minimum(lengths, cfg.capacity)
    if cfg.window is None:
        return jnp.any(start < valid_len)
    first = lengths - cfg.tq - cfg.window  # the first position any of the queries can see
    return jnp.any((start < valid_len) & (start + c > first))


def _split(q, key_pages, value_pages, tab, start, lengths, cfg: _Cfg):
    """Gather one split (pages ``tab`` (Bg, pps)) and score it.

    Returns k (Bg, c, K, H), v (Bg, c, K, Hv) in q's dtype, zeroed at positions >= the length,
    capped logits s (Bg, K, G, Tq, c) and the visibility mask of the same shape.
    """
    bg, _, kh, _, h = q.shape
    hv = value_pages.shape[-1]
    c = tab.shape[1] * cfg.page_size
    cdt = q.dtype
    kpos = start + jnp.arange(c, dtype=jnp.int32)  # (c,)
    valid = kpos[None, :] < jnp.minimum(lengths, cfg.capacity)[:, None]  # (Bg, c)
    k = jnp.take(key_pages, tab, axis=0, mode="clip").reshape(bg, c, kh, h)
    v = jnp.take(value_pages, tab, axis=0, mode="clip").reshape(bg, c, kh, hv)
    zero = jnp.zeros((), cdt)
    k = jnp.where(valid[:, :, None, None], k.astype(cdt), zero)
    v = jnp.where(valid[:, :, None, None], v.astype(cdt), zero)
    s = soft_cap(jnp.einsum("btkgh,bckh->bkgtc", q, k), cfg.cap)
    qpos = lengths[:, None] - cfg.tq + jnp.arange(cfg.tq, dtype=jnp.int32)[None, :]
    qp = qpos[:, None, None, :, None]
    kp = kpos[None, None, None, None, :]
    vis = valid[:, None, None, None, :] & (kp <= qp)
    if cfg.window is not None:
        vis = vis & (kp >= qp - cfg.window)
    return k, v, s, vis


def _fwd_group(q, key_pages, value_pages, tables, lengths, cfg: _Cfg):
    """Online-softmax loop over splits for one group of sequences.

    q (Bg, Tq, K, G, H) scaled, compute dtype; tables (Bg, ns, pps) clamped; lengths (Bg,).
    Returns o (Bg, K, G, Tq, Hv) normalised and lse (Bg, K, G, Tq), both in q's dtype.
    """
    bg, tq, kh, g, _ = q.shape
    hv = value_pages.shape[-1]
    ns, pps = tables.shape[1], tables.shape[2]
    c = pps * cfg.page_size
    cdt = q.dtype

    def attend(carry, start, tab):
        mx, l, acc = carry
        _, v, s, vis = _split(q, key_pages, value_pages, tab, start, lengths, cfg)
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(mx, jnp.max(s, -1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(mx - m_safe)  # mx = -inf (nothing seen yet) gives 0
        p = jnp.exp(s - m_safe[..., None])
        l = l * alpha + jnp.sum(p, -1)
        acc = acc * alpha[..., None] + jnp.einsum("bkgtc,bckh->bkgth", p, v)
        return m_new, l, acc

    def step(carry, xs):
        j, tab = xs  # tab (Bg, pps)
        start = j * c
        # skip the split when no sequence of the group can see any of its positions
        need = _needed(start, c, lengths, cfg)
        carry = jax.lax.cond(need, lambda cr: attend(cr, start, tab), lambda cr: cr, carry)
        return carry, None

    zero = _vzero(cdt, q, key_pages, value_pages, tables, lengths)
    init = (
        jnp.full((bg, kh, g, tq), -jnp.inf, cdt) + zero,
        jnp.zeros((bg, kh, g, tq), cdt) + zero,
        jnp.zeros((bg, kh, g, tq, hv), cdt) + zero,
    )
    xs = (jnp.arange(ns, dtype=jnp.int32), jnp.moveaxis(tables, 1, 0))
    (mx, l, acc), _ = jax.lax.scan(step, init, xs)
    ok = l > 0
    safe = jnp.where(ok, l, 1.0)
    o = jnp.where(ok[..., None], acc / safe[..., None], 0.0)
    m_safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    lse = jnp.where(ok, m_safe + jnp.log(safe), -jnp.inf)
    return o, lse


def _bwd_group(q, key_pages, value_pages, tables, lengths, o, lse, do, dlse, cfg: _Cfg):
    """FlashAttention-2 backward over the splits of one group (scores recomputed per split).

    Returns dq (Bg, Tq, K, G, H) (w.r.t. the scaled q) and per-split page gradients
    dk (ns, Bg, pps, page_size, K, H), dv (ns, Bg, pps, page_size, K, Hv), zero where skipped.
    """
    bg, tq, kh, g, h = q.shape
    hv = value_pages.shape[-1]
    ns, pps = tables.shape[1], tables.shape[2]
    ps = cfg.page_size
    c = pps * ps
    cdt = q.dtype
    dvec = jnp.sum(do * o, -1)  # (Bg, K, G, Tq)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # lse = -inf: nothing visible, p = 0
    zero = _vzero(cdt, q, key_pages, value_pages, tables, lengths, o, do, dlse)

    def compute(dq, start, tab):
        k, v, s, vis = _split(q, key_pages, value_pages, tab, start, lengths, cfg)
        p = jnp.where(vis, jnp.exp(s - lse_safe[..., None]), 0.0)
        dp = jnp.einsum("bkgth,bckh->bkgtc", do, v)
        ds = p * (dp - dvec[..., None] + dlse[..., None])
        if cfg.cap is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
            ds = ds * (1.0 - jnp.square(s / cfg.cap))
        dq = dq + jnp.einsum("bkgtc,bckh->btkgh", ds, k)
        dk = jnp.einsum("bkgtc,btkgh->bckh", ds, q).reshape(bg, pps, ps, kh, h)
        dv = jnp.einsum("bkgtc,bkgth->bckh", p, do).reshape(bg, pps, ps, kh, hv)
        return dq, dk, dv

    def skip(dq):
        return (
            dq,
            jnp.zeros((bg, pps, ps, kh, h), cdt) + zero,
            jnp.zeros((bg, pps, ps, kh, hv), cdt) + zero,
        )

    def step(dq, xs):
        j, tab = xs
        start = j * c
        need = _needed(start, c, lengths, cfg)
        dq, dk, dv = jax.lax.cond(need, lambda d: compute(d, start, tab), skip, dq)
        return dq, (dk, dv)

    xs = (jnp.arange(ns, dtype=jnp.int32), jnp.moveaxis(tables, 1, 0))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, cdt) + zero, xs)
    return dq, dk, dv


_BIG = 1e30  # finite "minus infinity" for running maxima (Triton-safe)


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


def _pallas_kernel(len_ref, tab_ref, q_ref, kp_ref, vp_ref, o_ref, lse_ref, *, cfg, g, pps, npool):
    """One (sequence, KV head, split) program: walk the split's pages through the block table
    (flash decoding: the splits' partial outputs and lse's are merged afterwards).

    q_ref (R, H): rows r = t * G + g (padded rows have t >= Tq and see nothing); the pool refs
    are whole (P, page_size, K, *) arrays read one page at a time.
    """
    from jax.experimental import pallas as pl

    b, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ps = cfg.page_size
    length = len_ref[b]
    valid_len = jnp.minimum(length, cfg.capacity)
    q = q_ref[...]
    rows = q.shape[0]
    t = jax.lax.div(jnp.arange(rows, dtype=jnp.int32), np.int32(g))
    qpos = jnp.where(t < cfg.tq, length - cfg.tq + t, -(2**30))
    acc_dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    hi = jax.lax.div(valid_len + (ps - 1), np.int32(ps))
    lo = 0
    if cfg.window is not None:
        lo = jax.lax.div(jnp.maximum(length - cfg.tq - cfg.window, 0), np.int32(ps))
    # this program's split of the table: pages [split * pps, (split + 1) * pps)
    lo = jnp.maximum(lo, split * pps)
    hi = jnp.minimum(hi, (split + 1) * pps)

    def dot(a, bb, dims):
        prec = jax.lax.Precision.HIGHEST if a.dtype != jnp.bfloat16 else None
        return jax.lax.dot_general(
            a, bb, (dims, ((), ())), preferred_element_type=acc_dt, precision=prec
        )

    def body(j, carry):
        acc, mx, l = carry
        page = jnp.clip(tab_ref[b, j], 0, npool - 1)
        kpos = j * ps + jnp.arange(ps, dtype=jnp.int32)
        valid = kpos < valid_len
        k = kp_ref[page, :, kh, :]  # (page_size, H)
        v = jnp.where(valid[:, None], vp_ref[page, :, kh, :], 0)  # garbage (NaN) never leaks
        s = soft_cap(dot(q, k, ((1,), (1,))), cfg.cap)  # (R, page_size)
        vis = valid[None, :] & (kpos[None, :] <= qpos[:, None])
        if cfg.window is not None:
            vis = vis & (kpos[None, :] >= qpos[:, None] - cfg.window)
        s = jnp.where(vis, s, -_BIG)
        m_new = jnp.maximum(mx, jnp.max(s, axis=1))
        p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(mx - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, ((1,), (0,)))
        return acc, m_new, l

    hv = o_ref.shape[-1]
    init = (
        jnp.zeros((rows, hv), acc_dt),
        jnp.full((rows,), -_BIG, acc_dt),
        jnp.zeros((rows,), acc_dt),
    )
    acc, mx, l = jax.lax.fori_loop(lo, hi, body, init)
    ok = l > 0
    o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, mx + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf).astype(
        lse_ref.dtype
    )


def _pallas_fwd(q, key_pages, value_pages, tables, lengths, cfg: _Cfg):
    """The Pallas forward: o (B, K, G, Tq, Hv), lse (B, K, G, Tq) in q's dtype (compute dtype).

    q (B, Tq, K, G, H) scaled; the pages are read in their own dtype (bf16 dots accumulate in
    float32); tables (B, ns, pps) clamped (the padding past max_pages is never visited).
    """
    from jax.experimental import pallas as pl

    b, tq, kh, g, h = q.shape
    npool, ps, _, hv = value_pages.shape
    interpret = cfg.kernel == "pallas_interpret"
    rows = _pow2_at_least(tq * g)
    qr = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(b, kh, tq * g, h)
    qr = jnp.pad(qr.astype(key_pages.dtype), ((0, 0), (0, 0), (0, rows - tq * g), (0, 0)))
    tab = tables.reshape(b, -1)
    full = pl.BlockSpec()
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    ns, pps = tables.shape[1], tables.shape[2]
    kernel = functools.partial(_pallas_kernel, cfg=cfg, g=g, pps=pps, npool=npool)
    o, lse = backend.pallas_call(
        kernel,
        grid=(b, kh, ns),
        in_specs=[
            full,
            full,
            pl.BlockSpec((None, None, rows, h), lambda i, j, _: (i, j, 0, 0)),
            full,
            full,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, hv), lambda i, j, sp: (i, j, sp, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, sp: (i, j, sp, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, ns, rows, hv), q.dtype),
            jax.ShapeDtypeStruct((b, kh, ns, rows), q.dtype),
        ],
        compiler_params=params,
        interpret=interpret,
        name="jaxcore_paged_decode_fwd",
    )(lengths, tab, qr, key_pages, value_pages)
    # merge the splits (exact log-sum-exp; empty splits have lse -inf and o 0)
    mx = jnp.max(lse, axis=2)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.exp(lse - mx[:, :, None])
    tot = jnp.sum(w, axis=2)
    ok = tot > 0
    safe = jnp.where(ok, tot, 1.0)
    o = jnp.sum(w[..., None] * o, axis=2) / safe[..., None]
    lse = jnp.where(ok, mx + jnp.log(safe), -jnp.inf)
    o = o[:, :, : tq * g].reshape(b, kh, tq, g, hv).transpose(0, 1, 3, 2, 4)
    lse = lse[:, :, : tq * g].reshape(b, kh, tq, g).transpose(0, 1, 3, 2)
    return o, lse


def _over_groups(fn, cfg: _Cfg, batched, shared):
    """``fn(*batched, *shared)`` for groups of ``cfg.group`` sequences (``lax.map`` over groups;
    a single call when the group is the whole batch). Outputs keep a leading group axis."""
    b = batched[0].shape[0]
    if cfg.group == b:
        return jax.tree.map(lambda x: x[None], fn(*batched, *shared))
    ng = b // cfg.group
    grouped = tuple(x.reshape(ng, cfg.group, *x.shape[1:]) for x in batched)
    return jax.lax.map(lambda xs: fn(*xs, *shared), grouped)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _paged_xla(q, key_pages, value_pages, tables, lengths, cfg: _Cfg):
    """o (B, K, G, Tq, Hv), lse (B, K, G, Tq) of scaled q (B, Tq, K, G, H) (compute dtype).

    A custom JVP whose tangent map is a ``linear_call`` (:func:`jaxcore.autodiff.tangent_call`):
    forward mode evaluates the JVP of the XLA loops, reverse mode transposes it with
    :func:`_paged_xla_bwd` (a scatter-add into the page pool)."""
    return _paged_fwd(q, key_pages, value_pages, tables, lengths, cfg)


def _ungroup(x):
    return x.reshape(-1, *x.shape[2:])


def _paged_fwd(q, key_pages, value_pages, tables, lengths, cfg: _Cfg):
    def fn(q, tables, lengths, key_pages, value_pages):
        return _fwd_group(q, key_pages, value_pages, tables, lengths, cfg)

    if cfg.kernel == "xla":
        o, lse = _over_groups(fn, cfg, (q, tables, lengths), (key_pages, value_pages))
        return _ungroup(o), _ungroup(lse)
    return _pallas_fwd(q, key_pages, value_pages, tables, lengths, cfg)


@functools.partial(_paged_xla.defjvp, symbolic_zeros=True)
def _paged_jvp(cfg, primals, tangents):
    q, key_pages, value_pages, tables, lengths = primals
    out = _paged_xla(*primals, cfg)  # itself: differentiable again

    xla = dataclasses.replace(cfg, kernel="xla")

    def fun(consts, q, key_pages, value_pages):  # the XLA loops (a Pallas kernel has no JVP)
        return _paged_fwd(q, key_pages, value_pages, *consts, xla)

    def backward(prim, consts, saved, cts):
        return _paged_xla_bwd(cfg, (*prim, *consts, *saved), cts)[:3]

    prim = (q, key_pages, value_pages)
    tan = tangent_call(fun, backward, prim, tangents[:3], (tables, lengths), out, out)
    return out, tuple(tan)


def _paged_xla_bwd(cfg: _Cfg, res, cts):
    q, key_pages, value_pages, tables, lengths, o, lse = res
    do, dlse = (x.astype(q.dtype) for x in cts)

    def fn(q, tables, lengths, o, lse, do, dlse, key_pages, value_pages):
        return _bwd_group(q, key_pages, value_pages, tables, lengths, o, lse, do, dlse, cfg)

    batched = (q, tables, lengths, o, lse, do, dlse)
    dq, dk, dv = _over_groups(fn, cfg, batched, (key_pages, value_pages))
    # dk: (groups, ns, group, pps, page_size, K, H); page indices laid out alike
    b, ns, pps = tables.shape
    idx = tables.reshape(b // cfg.group, cfg.group, ns, pps).transpose(0, 2, 1, 3).reshape(-1)
    ps, kh = key_pages.shape[1], key_pages.shape[2]
    # the transpose of the gather: one scatter-add into the pool (shared pages accumulate;
    # clamped garbage entries carry zero gradients)
    dkp = jnp.zeros(key_pages.shape, q.dtype).at[idx].add(dk.reshape(-1, ps, kh, dk.shape[-1]))
    dvp = jnp.zeros(value_pages.shape, q.dtype).at[idx].add(dv.reshape(-1, ps, kh, dv.shape[-1]))
    dkp = backend.vary_as(dkp.astype(key_pages.dtype), key_pages)
    dvp = backend.vary_as(dvp.astype(value_pages.dtype), value_pages)
    return backend.vary_as(_ungroup(dq), q), dkp, dvp, None, None


def paged_decode_attention(
    query: Any,
    key_pages: Any,
    value_pages: Any,
    block_tables: Any,
    cache_lengths: Any,
    *,
    pages_per_split: int | None = None,
    sequences_per_step: int | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of Tq new tokens against a paged KV cache (flash decoding through block tables).

    Same semantics as :func:`decode_attention` on the gathered contiguous cache
    ``gather_pages(key_pages, block_tables)`` (positions >= ``cache_lengths`` zeroed).

    Args:
      query: (B, Tq, N, H): token t sits at position ``cache_lengths - Tq + t`` and sees cache
        positions up to its own (causal); its key/value are already written to the pool.
      key_pages: (P, page_size, K, H) pool shared by all sequences, N % K == 0, query dtype.
      value_pages: (P, page_size, K, Hv).
      block_tables: int (B, max_pages): pool index of each sequence's logical page j; entries
        at or past the sequence's length are ignored (clamped into [0, P) and masked).
      cache_lengths: int (B,): valid cache positions per sequence (<= max_pages * page_size;
        positions past the table's capacity do not exist).
      pages_per_split: logical pages gathered and attended per loop step (default: about 512
        positions). Only one split's pages are gathered at a time.
      sequences_per_step: "xla": sequences attended together in one loop step; the loop also
        runs over groups of this many sequences and skips each group's splits that none of its
        sequences can see (1: exact per-sequence skipping). Must divide B. Default: 1 on CPU
        (fastest measured there), B elsewhere (one wide step per split).
      scale: logit scale (default 1/sqrt(H)).
      logits_soft_cap: optional ``cap * tanh(logits / cap)``.
      local_window_size: optional left window w: position p sees [p - w, p].
      return_lse: also return the float32 (float64 under x64 inputs) log-sum-exp (B, Tq, N).
      implementation: None (the platform default: "pallas" on GPU where the shapes allow
        it, else "xla"), "reference", "xla", "pallas" (a
        Triton Pallas forward, one program per (sequence, KV head) walking its block table;
        page_size, H and Hv powers of two >= 16; backward as "xla") or "pallas_interpret"
        (the same kernel in the Pallas interpreter, any shapes).

    Returns:
      (B, Tq, N, Hv) in the query dtype (and lse); a row with no visible key gives zeros
      (lse -inf).
    """
    query, key_pages, value_pages = (jnp.asarray(x) for x in (query, key_pages, value_pages))
    block_tables, cache_lengths = jnp.asarray(block_tables), jnp.asarray(cache_lengths)
    _check(query, key_pages, value_pages, block_tables, cache_lengths)
    impl = backend.resolve_implementation(FAMILY, implementation)
    b, tq, n, h = query.shape
    npool, ps, kh, hv = value_pages.shape
    # Triton tiles: every dot dimension a power of two >= 16
    dims = (("key_pages (page_size)", ps), ("key_pages (H)", h), ("value_pages", hv))
    untileable = [(nm, size) for nm, size in dims if not checks.is_tile_size(size)]
    if implementation is None and impl == "pallas" and untileable:
        impl = "xla"  # the default falls back where the Triton tiles cannot hold the shapes
    m = block_tables.shape[1]
    g = n // kh
    if local_window_size is not None:
        if not isinstance(local_window_size, int | np.integer) or local_window_size < 0:
            raise ValueError(
                f"local_window_size: expected a non-negative int (left window), got "
                f"{local_window_size!r}"
            )
        local_window_size = int(local_window_size)
    if logits_soft_cap is not None:
        checks.check_positive(logits_soft_cap, "logits_soft_cap")
        logits_soft_cap = float(logits_soft_cap)
    if pages_per_split is None:
        pages_per_split = max(1, _SPLIT_POSITIONS // ps)
    checks.check_positive(pages_per_split, "pages_per_split")
    pages_per_split = min(int(pages_per_split), m)
    if sequences_per_step is None:  # CPU: one sequence per step (measured fastest); else all
        sequences_per_step = 1 if backend.platform() == "cpu" else b
    checks.check_positive(sequences_per_step, "sequences_per_step")
    if b % sequences_per_step:
        raise ValueError(
            f"sequences_per_step: expected a divisor of the batch size {b}, "
            f"got {sequences_per_step}"
        )
    lengths = cache_lengths.astype(jnp.int32)
    scale = float(1.0 / np.sqrt(h)) if scale is None else float(scale)

    if impl == "reference":
        kc = _mask_positions(gather_pages(key_pages, block_tables), lengths)
        vc = _mask_positions(gather_pages(value_pages, block_tables), lengths)
        return decode_attention(
            query,
            kc,
            vc,
            lengths,
            scale=scale,
            logits_soft_cap=logits_soft_cap,
            local_window_size=local_window_size,
            return_lse=return_lse,
            implementation="reference",
        )

    if impl == "pallas" and untileable:
        nm, size = untileable[0]
        raise ValueError(
            f"{nm}: implementation='pallas' expected a power of two >= 16, got {size}; "
            "use implementation='xla'"
        )
    cdt = compute_dtype(query.dtype)
    ns = -(-m // pages_per_split)
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, npool - 1)
    tables = jnp.pad(tables, ((0, 0), (0, ns * pages_per_split - m)))
    tables = tables.reshape(b, ns, pages_per_split)
    q = (query.astype(cdt) * jnp.asarray(scale, cdt)).reshape(b, tq, kh, g, h)
    cfg = _Cfg(
        tq=tq,
        page_size=ps,
        capacity=m * ps,
        cap=logits_soft_cap,
        window=local_window_size,
        group=sequences_per_step,
        kernel=impl,
    )
    o, lse = _paged_xla(q, key_pages, value_pages, tables, lengths, cfg)
    o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, tq, n, hv).astype(query.dtype)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, tq, n)
    return (o, lse) if return_lse else o


def paged_kv_write(
    key_pages: Any,
    value_pages: Any,
    block_tables: Any,
    positions: Any,
    new_keys: Any,
    new_values: Any,
) -> tuple[jax.Array, jax.Array]:
    """Write new keys/values at logical cache positions through the block tables (functional).

    Args:
      key_pages: (P, page_size, K, H) pool; value_pages: (P, page_size, K, Hv).
      block_tables: int (B, max_pages).
      positions: int (B, Tn): logical cache position of each new token.
      new_keys: (B, Tn, K, H), new_values: (B, Tn, K, Hv), in the pools' dtype.

    Returns:
      The updated (key_pages, value_pages). Writes whose position is outside
      [0, max_pages * page_size) or whose table entry is outside [0, P) are dropped. Two writes to
      the same pool slot (within the call) leave one of them, unspecified which.
    """
    key_pages, value_pages = jnp.asarray(key_pages), jnp.asarray(value_pages)
    block_tables, positions = jnp.asarray(block_tables), jnp.asarray(positions)
    new_keys, new_values = jnp.asarray(new_keys), jnp.asarray(new_values)
    checks.check_rank(new_keys, 4, "new_keys")
    b, tn, kh, h = new_keys.shape
    _check_pool(key_pages, value_pages, block_tables, b, h)
    npool, ps, _, hv = value_pages.shape
    checks.check_shape(new_keys, (b, tn, key_pages.shape[2], h), "new_keys")
    checks.check_shape(new_values, (b, tn, kh, hv), "new_values")
    checks.check_shape(positions, (b, tn), "positions")
    if not _is_int(positions):
        raise ValueError(f"positions: expected an integer dtype, got {positions.dtype}")
    for nm, x in (("new_keys", new_keys), ("new_values", new_values)):
        if x.dtype != key_pages.dtype:
            raise ValueError(f"{nm}: expected the pool dtype {key_pages.dtype}, got {x.dtype}")
    m = block_tables.shape[1]
    pos = positions.astype(jnp.int32)
    logical = pos // ps
    ok = (pos >= 0) & (logical < m)
    page = jnp.take_along_axis(
        block_tables.astype(jnp.int32), jnp.clip(logical, 0, m - 1), axis=1, mode="clip"
    )
    ok = ok & (page >= 0) & (page < npool)
    page = jnp.where(ok, page, npool)  # out of bounds: dropped by the scatter
    slot = jnp.where(ok, pos % ps, 0)
    key_pages = key_pages.at[page, slot].set(new_keys, mode="drop")
    value_pages = value_pages.at[page, slot].set(new_values, mode="drop")
    return key_pages, value_pages
