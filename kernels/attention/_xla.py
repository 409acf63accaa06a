"""Chunked (flash) attention in plain JAX: O(T) memory forward and backward.

Forward: online softmax with deferred normalisation over (query block, key block) pairs. The
pairs are classified at trace time from the static mask (causal, window, key padding):

* skipped: no visible entry; never computed;
* full: every entry visible; computed with no mask at all;
* partial: computed with the mask (and, when a dynamic mask is present: segment ids, key/value
  lengths or a boolean ``mask``, skipped at run time with ``lax.cond`` when it hides the block).

Each class runs as one ``lax.scan`` over its static list of pairs; the running max, sum and
accumulator of every query block live in O(T) buffers updated in place. The backward pass is the
FlashAttention-2 one, recomputing the probabilities per block from the saved output and float32
log-sum-exp, so nothing of size T x S is ever stored.

Internal layout: query (Z, T*G, H) with Z = B*K and the G query heads of one key/value head
folded into the rows (GQA without repeating K/V); key (Z, S, H); value (Z, S, Hv).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcore import checks
from jaxcore.autodiff import tangent_call

from ._common import Inputs, MaskSpec, compute_dtype, normalize

_INF = float("inf")
_Z = np.int32(0)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of one chunked attention call (hashable)."""

    spec: MaskSpec
    block_q: int
    block_k: int
    groups: int  # G = N // K
    bias_bcast: tuple[bool, ...] | None  # for (B, K, T, G, S): True where bias has size 1
    mask_bcast: tuple[bool, ...] | None
    has_kvlen: bool
    has_segments: bool


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def default_blocks(t: int, s: int, groups: int) -> tuple[int, int]:
    """Block sizes: about 256 query rows (tokens x grouped heads) and 512 keys.

    The logits block (B*K, 256, 512) f32 stays cache-sized; measured best of 512x512, 256x512,
    128x512, 128x256 for forward+backward at T=4096 here.
    """
    bq = max(1, min(_next_pow2(t), max(16, 256 // groups)))
    bk = max(1, min(_next_pow2(s), 512))
    return bq, bk


def _bounds(spec: MaskSpec) -> tuple[float, float]:
    """Static mask as k in [q - L, q + R] (L, R may be inf)."""
    left, right = _INF, _INF
    if spec.window is not None:
        left, right = float(spec.window[0]), float(spec.window[1])
    if spec.is_causal:
        right = min(right, 0.0)
    return left, right


def plan(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(full_pairs, partial_pairs): int32 arrays (P, 2) of (query block, key block)."""
    spec = cfg.spec
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = -(-spec.t // bq), -(-spec.s // bk)
    left, right = _bounds(spec)
    dynamic = cfg.mask_bcast is not None or cfg.has_kvlen or cfg.has_segments
    full, partial = [], []
    for i in range(nq):
        qlo, qhi = i * bq, min(spec.t, (i + 1) * bq) - 1
        for j in range(nk):
            klo, khi = j * bk, min(spec.s, (j + 1) * bk) - 1
            if klo > qhi + right or khi < qlo - left:
                continue  # nothing visible
            all_vis = (j + 1) * bk <= spec.s and (j + 1) * bk - 1 <= qlo + right
            all_vis = all_vis and klo >= qhi - left
            (full if all_vis and not dynamic else partial).append((i, j))
    as_arr = lambda x: np.asarray(x, np.int32).reshape(-1, 2)
    return as_arr(full), as_arr(partial)


# ----------------------------------------------------------------------------- layout


def _to_rows(q: jax.Array, kh: int) -> jax.Array:
    """(B, T, N, H) -> (B*K, T*G, H)."""
    b, t, n, h = q.shape
    g = n // kh
    return q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b * kh, t * g, h)


def _from_rows(x: jax.Array, b: int, kh: int, g: int) -> jax.Array:
    """(B*K, T*G, H) -> (B, T, N, H)."""
    z, tg, h = x.shape
    t = tg // g
    return x.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, kh * g, h)


def _kv_layout(k: jax.Array) -> jax.Array:
    """(B, S, K, H) -> (B*K, S, H)."""
    b, s, kh, h = k.shape
    return k.transpose(0, 2, 1, 3).reshape(b * kh, s, h)


def _bnts_to_bktgs(x: jax.Array, kh: int, g: int) -> jax.Array:
    """(Bb, Nb, Tb, Sb) (Nb in {1, N}) -> (Bb, Kb, Tb, Gb, Sb)."""
    bb, nb, tb, sb = x.shape
    if nb == 1:
        return x.reshape(bb, 1, 1, tb, sb).transpose(0, 1, 3, 2, 4)
    return x.reshape(bb, kh, g, tb, sb).transpose(0, 1, 3, 2, 4)


def _pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


# ----------------------------------------------------------------------------- block pieces


@dataclasses.dataclass
class _Aux:
    """Per-call dynamic arrays used by the mask/bias of a block."""

    bias: jax.Array | None  # (Bb, Kb, Tp|1, Gb, Sp|1)
    mask: jax.Array | None
    kvlen: jax.Array | None  # (Z,)
    qseg: jax.Array | None  # (B, Tp)
    kvseg: jax.Array | None  # (B, Sp)


def _block_of(x: jax.Array, bcast: tuple[bool, ...], i: Any, j: Any, cfg: Config, b: int, kh: int):
    """Slice a (Bb, Kb, Tp|1, Gb, Sp|1) array at block (i, j) -> (Z, R, bk)."""
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    t0 = _Z if bcast[2] else i * bq
    s0 = _Z if bcast[4] else j * bk
    sizes = list(x.shape)
    if not bcast[2]:
        sizes[2] = bq
    if not bcast[4]:
        sizes[4] = bk
    blk = jax.lax.dynamic_slice(x, (_Z, _Z, t0, _Z, s0), sizes)
    blk = jnp.broadcast_to(blk, (b, kh, bq, g, bk))
    return blk.reshape(b * kh, bq * g, bk)


def _visible(cfg: Config, aux: _Aux, i: Any, j: Any, b: int, kh: int) -> jax.Array | None:
    """Boolean (Z or 1, R, bk) visibility of block (i, j); None if all visible."""
    spec = cfg.spec
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    qpos = (i * bq + jnp.arange(bq * g, dtype=jnp.int32) // g)[None, :, None]
    kpos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, None, :]
    vis = None

    def _and(a, c):
        return c if a is None else jnp.logical_and(a, c)

    left, right = _bounds(spec)
    if right != _INF:
        vis = _and(vis, kpos <= qpos + int(right))
    if left != _INF:
        vis = _and(vis, kpos >= qpos - int(left))
    if spec.s % bk:
        vis = _and(vis, kpos < spec.s)
    if aux.kvlen is not None:
        vis = _and(vis, kpos < aux.kvlen[:, None, None])
    if aux.qseg is not None:
        qs = jax.lax.dynamic_slice_in_dim(aux.qseg, i * bq, bq, axis=1)  # (B, bq)
        ks = jax.lax.dynamic_slice_in_dim(aux.kvseg, j * bk, bk, axis=1)  # (B, bk)
        qs = jnp.broadcast_to(qs[:, None, :, None], (b, kh, bq, g)).reshape(b * kh, bq * g)
        ks = jnp.broadcast_to(ks[:, None, :], (b, kh, bk)).reshape(b * kh, bk)
        vis = _and(vis, qs[:, :, None] == ks[:, None, :])
    if aux.mask is not None:
        vis = _and(vis, _block_of(aux.mask, cfg.mask_bcast, i, j, cfg, b, kh))
    return vis


def _logits(qb, kbt, cfg: Config, aux: _Aux, i, j, b, kh, masked: bool):
    """Scaled (q pre-scaled), capped, biased, masked logits of block (i, j).

    Returns (logits, tanh or None, visibility or None).
    """
    s = jnp.einsum("zrh,zhk->zrk", qb, kbt)
    th = None
    if cfg.spec.soft_cap is not None:
        cap = cfg.spec.soft_cap
        th = jnp.tanh(s / cap)
        s = cap * th
    if aux.bias is not None:
        s = s + _block_of(aux.bias, cfg.bias_bcast, i, j, cfg, b, kh).astype(s.dtype)
    vis = _visible(cfg, aux, i, j, b, kh) if masked else None
    if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
    return s, th, vis


def _init(shape, value, dtype, *like):
    """A constant array that carries the (shard_map) varying axes of every array in ``like``."""
    tok = sum(jnp.zeros_like(x[(0,) * x.ndim], dtype) for x in like if x is not None)
    return jnp.full(shape, value, dtype) + tok


# ----------------------------------------------------------------------------- forward


def _forward(q, k, v, aux: _Aux, cfg: Config, b: int, kh: int):
    """q (Z, Tp*G, H) pre-scaled, k (Z, Sp, H), v (Z, Sp, Hv) -> (out, lse) in rows layout."""
    kt = jnp.swapaxes(k, 1, 2)  # (Z, H, Sp): the logits matmul runs untransposed
    z, rows, _ = q.shape
    hv = v.shape[-1]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    r = bq * g
    cdt = q.dtype
    like = (q, k, v, aux.bias, aux.mask, aux.kvlen, aux.qseg, aux.kvseg)
    acc = _init((z, rows, hv), 0.0, cdt, *like)
    m = _init((z, rows), -jnp.inf, cdt, *like)
    l = _init((z, rows), 0.0, cdt, *like)
    full, partial = plan(cfg)
    dynamic = cfg.mask_bcast is not None or cfg.has_kvlen or cfg.has_segments

    def update(carry, i, j, masked):
        acc, m, l = carry
        qb = jax.lax.dynamic_slice_in_dim(q, i * r, r, axis=1)
        kbt = jax.lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
        s, _, vis = _logits(qb, kbt, cfg, aux, i, j, b, kh, masked)

        def compute(carry):
            acc, m, l = carry
            m_old = jax.lax.dynamic_slice_in_dim(m, i * r, r, axis=1)
            l_old = jax.lax.dynamic_slice_in_dim(l, i * r, r, axis=1)
            a_old = jax.lax.dynamic_slice_in_dim(acc, i * r, r, axis=1)
            m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_use[..., None])
            alpha = jnp.exp(m_old - m_use)
            l_new = alpha * l_old + jnp.sum(p, axis=-1)
            a_new = alpha[..., None] * a_old + jnp.einsum("zrk,zkh->zrh", p, vb)
            acc = jax.lax.dynamic_update_slice_in_dim(acc, a_new, i * r, axis=1)
            m = jax.lax.dynamic_update_slice_in_dim(m, m_new, i * r, axis=1)
            l = jax.lax.dynamic_update_slice_in_dim(l, l_new, i * r, axis=1)
            return acc, m, l

        if masked and dynamic and vis is not None:
            return jax.lax.cond(jnp.any(vis), compute, lambda c: c, (acc, m, l))
        return compute((acc, m, l))

    carry = (acc, m, l)
    for pairs, masked in ((full, False), (partial, True)):
        if len(pairs) == 0:
            continue

        def body(c, ij, masked=masked):
            return update(c, ij[0], ij[1], masked), None

        carry, _ = jax.lax.scan(body, carry, jnp.asarray(pairs))
    acc, m, l = carry
    ok = l > 0
    out = acc / jnp.where(ok, l, 1.0)[..., None]
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)
    return out, lse


# ----------------------------------------------------------------------------- backward


def _backward(q, k, v, o, lse, do, dlse, aux: _Aux, cfg: Config, b: int, kh: int, lean=False):
    """FlashAttention-2 backward in rows layout; q pre-scaled. Returns (dq_s, dk, dv, dbias).

    ``lean``: transpose K/V per block instead of once (no full-size transposed copies: less
    memory, for callers such as ring attention that keep many local-size buffers live); then
    ``o`` is None and ``dlse`` is the precomputed delta = rowsum(do * o) - dlse.
    """
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    r = bq * g
    cdt = q.dtype
    dead = lse == -jnp.inf  # fully masked rows: zero gradients whatever the cotangent
    if lean:
        delta = jnp.where(dead, 0.0, dlse)
    else:
        do = jnp.where(dead[..., None], 0.0, do)
        delta = jnp.where(dead, 0.0, jnp.sum(do * o, axis=-1) - dlse)  # (Z, rows)
    lse_safe = jnp.where(dead, jnp.inf, lse)
    like = (q, k, v, o, do, dlse, aux.bias, aux.mask, aux.kvlen, aux.qseg, aux.kvseg)
    dq = _init(q.shape, 0.0, cdt, *like)
    dk = _init(k.shape, 0.0, cdt, *like)
    dv = _init(v.shape, 0.0, cdt, *like)
    dbias = None if aux.bias is None else _init(aux.bias.shape, 0.0, cdt, *like)
    full, partial = plan(cfg)
    dynamic = cfg.mask_bcast is not None or cfg.has_kvlen or cfg.has_segments
    kt = None if lean else jnp.swapaxes(k, 1, 2)
    vt = None if lean else jnp.swapaxes(v, 1, 2)

    def update(carry, i, j, masked):
        qb = jax.lax.dynamic_slice_in_dim(q, i * r, r, axis=1)
        kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        if lean:
            kbt = jnp.swapaxes(kb, 1, 2)
            vbt = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1), 1, 2)
        else:
            kbt = jax.lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vbt = jax.lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
        s, th, vis = _logits(qb, kbt, cfg, aux, i, j, b, kh, masked)

        def compute(carry):
            dq, dk, dv, dbias = carry
            dob = jax.lax.dynamic_slice_in_dim(do, i * r, r, axis=1)
            lb = jax.lax.dynamic_slice_in_dim(lse_safe, i * r, r, axis=1)
            db = jax.lax.dynamic_slice_in_dim(delta, i * r, r, axis=1)
            if lean:  # dead rows: zero cotangent whatever it holds (inf, nan)
                dob = jnp.where((lb == jnp.inf)[..., None], 0.0, dob)
            p = jnp.exp(s - lb[..., None])
            dv_b = jnp.einsum("zrk,zrh->zkh", p, dob)
            dp = jnp.einsum("zrh,zhk->zrk", dob, vbt)
            ds = p * (dp - db[..., None])
            if dbias is not None:
                red = ds.reshape(b, kh, bq, g, bk)
                axes = tuple(a for a, bc in enumerate(cfg.bias_bcast) if bc)
                red = jnp.sum(red, axis=axes, keepdims=True) if axes else red
                t0 = _Z if cfg.bias_bcast[2] else i * bq
                s0 = _Z if cfg.bias_bcast[4] else j * bk
                cur = jax.lax.dynamic_slice(dbias, (_Z, _Z, t0, _Z, s0), red.shape)
                dbias = jax.lax.dynamic_update_slice(dbias, cur + red, (_Z, _Z, t0, _Z, s0))
            if th is not None:
                ds = ds * (1.0 - th * th)
            dq_b = jnp.einsum("zrk,zkh->zrh", ds, kb)
            dk_b = jnp.einsum("zrk,zrh->zkh", ds, qb)
            cur = jax.lax.dynamic_slice_in_dim(dq, i * r, r, axis=1)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, cur + dq_b, i * r, axis=1)
            cur = jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=1)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, cur + dk_b, j * bk, axis=1)
            cur = jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, cur + dv_b, j * bk, axis=1)
            return dq, dk, dv, dbias

        if masked and dynamic and vis is not None:
            return jax.lax.cond(jnp.any(vis), compute, lambda c: c, carry)
        return compute(carry)

    carry = (dq, dk, dv, dbias)
    for pairs, masked in ((full, False), (partial, True)):
        if len(pairs) == 0:
            continue

        def body(c, ij, masked=masked):
            return update(c, ij[0], ij[1], masked), None

        carry, _ = jax.lax.scan(body, carry, jnp.asarray(pairs))
    return carry


# ----------------------------------------------------------------------------- derivatives


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _flash(cfg: Config, b: int, kh: int, q, k, v, bias, mask, kvlen, qseg, kvseg):
    """(out, lse) in rows layout. A custom JVP whose tangent map is a ``linear_call``
    (:func:`jaxcore.autodiff.tangent_call`): forward mode evaluates the JVP of the same blockwise
    forward (O(T) memory: the tangent accumulators ride along the online softmax); reverse mode
    transposes it with the FlashAttention-2 backward (:func:`_backward`), storing only q, k, v,
    out and the lse."""
    return _forward(q, k, v, _Aux(bias, mask, kvlen, qseg, kvseg), cfg, b, kh)


@functools.partial(_flash.defjvp, symbolic_zeros=True)
def _flash_jvp(cfg, b, kh, primals, tangents):
    q, k, v, bias, *consts = primals
    out = _flash(cfg, b, kh, *primals)  # itself: differentiable again

    def fun(consts, q, k, v, bias):
        return _forward(q, k, v, _Aux(bias, *consts), cfg, b, kh)

    def backward(prim, consts, saved, cts):
        q, k, v, bias = prim
        aux = _Aux(bias, *consts)
        return _backward(q, k, v, *saved, *cts, aux, cfg, b, kh)

    tan = tangent_call(fun, backward, (q, k, v, bias), tangents[:4], tuple(consts), out, out)
    return out, tuple(tan)


def padded_twin(spec: MaskSpec, groups: int, q, k, v, qseg, kseg, bias, mask):
    """What the Pallas and Mosaic kernels compute from their padded operands, in this module's
    differentiable blockwise XLA (their forward-mode tangent map). q (B, Tp, N, Hp), k
    (B, Sp, K, Hp), v (B, Sp, K, Hvp); qseg (B, Tp) / kseg (B, Sp) int segment ids that also
    hide padded keys (or None); bias / mask (int, 1 = attend) padded (B|1, N|1, Tp|1, Sp|1) or
    None. Returns (out (B, Tp, N, Hvp) in q's dtype, lse (B, N, Tp))."""
    tp, sp = q.shape[1], k.shape[1]
    inp = Inputs(
        q, k, v, bias, None if mask is None else mask != 0, None, None, qseg, kseg,
        dataclasses.replace(spec, t=tp, s=sp), False,
    )  # fmt: skip
    out, lse = attention_xla(inp)
    return out, jnp.swapaxes(lse, 1, 2)


def _prepare(inp: Inputs, block_q: int | None, block_k: int | None):
    """Rows-layout operands and the static Config of one call (shared by forward and backward)."""
    spec = inp.spec
    q, k, v = inp.query, inp.key, inp.value
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    dbq, dbk = default_blocks(t, s, g)
    bq, bk = block_q or dbq, block_k or dbk
    nq, nk = -(-t // bq), -(-s // bk)
    tp, sp = nq * bq, nk * bk
    cdt = compute_dtype(q.dtype)

    qr = _to_rows(_pad_axis(q.astype(cdt) * jnp.asarray(spec.scale, cdt), 1, tp), kh)
    kr = _kv_layout(_pad_axis(k.astype(cdt), 1, sp))
    vr = _kv_layout(_pad_axis(v.astype(cdt), 1, sp))

    def _prep(x, dtype, fill):
        if x is None:
            return None, None
        x = _bnts_to_bktgs(x.astype(dtype), kh, g)
        if x.shape[2] != 1:
            x = _pad_axis(x, 2, tp, fill)
        if x.shape[4] != 1:
            x = _pad_axis(x, 4, sp, fill)
        return x, tuple(d == 1 for d in x.shape)

    bias, bias_bc = _prep(inp.bias, cdt, 0)
    mask, mask_bc = _prep(inp.mask, jnp.bool_, False)
    kvlen = None if inp.kv_seqlen is None else jnp.repeat(inp.kv_seqlen, kh)
    qseg = kvseg = None
    if inp.q_segment_ids is not None:
        qseg = _pad_axis(inp.q_segment_ids, 1, tp, -1)
        kvseg = _pad_axis(inp.kv_segment_ids, 1, sp, -2)
    cfg = Config(
        spec=spec,
        block_q=bq,
        block_k=bk,
        groups=g,
        bias_bcast=bias_bc,
        mask_bcast=mask_bc,
        has_kvlen=kvlen is not None,
        has_segments=qseg is not None,
    )
    return cfg, (b, kh, g, t, tp), (qr, kr, vr), _Aux(bias, mask, kvlen, qseg, kvseg)


def attention_xla(
    inp: Inputs, *, block_q: int | None = None, block_k: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Chunked attention. Returns (out (B, T, N, Hv) in query dtype, lse (B, T, N) f32/f64)."""
    q = inp.query
    cfg, (b, kh, g, t, _), (qr, kr, vr), aux = _prepare(inp, block_q, block_k)
    out, lse = _flash(cfg, b, kh, qr, kr, vr, aux.bias, aux.mask, aux.kvlen, aux.qseg, aux.kvseg)
    out = _from_rows(out, b, kh, g)[:, :t].astype(q.dtype)
    lse = _from_rows(lse[..., None], b, kh, g)[:, :t, :, 0]
    return out, lse


def attention_bwd_xla(
    inp: Inputs,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    dlse: jax.Array | None = None,
    *,
    delta: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FlashAttention-2 backward from a saved output and lse (no forward recompute).

    ``out`` (B, T, N, Hv) and ``lse`` (B, T, N) need not come from this call's keys: with the
    output and lse of attention over a superset of keys (ring attention's merged result) the
    gradients are those of this key block's share of it. Returns (dq, dk, dv) in the input
    dtypes (bias gradients are not returned). ``delta`` (B, T, N): rowsum(dout * out) - dlse
    precomputed (then ``out`` and ``dlse`` are not read), for callers that differentiate many
    key blocks against one output.
    """
    q, k, v = inp.query, inp.key, inp.value
    cfg, (b, kh, g, t, tp), (qr, kr, vr), aux = _prepare(inp, block_q, block_k)
    cdt = qr.dtype
    lse = jnp.asarray(lse).astype(cdt)
    rows = lambda x, fill: _to_rows(_pad_axis(x, 1, tp, fill), kh)  # noqa: E731
    dout = jnp.asarray(dout).astype(cdt)
    if delta is None:
        delta = jnp.sum(dout * jnp.asarray(out).astype(cdt), axis=-1)  # (B, T, N)
        if dlse is not None:
            delta = delta - jnp.asarray(dlse).astype(cdt)
    delta = jnp.asarray(delta).astype(cdt)
    do_r = rows(dout, 0)  # zeroed on dead rows block by block (no full-size masked copy)
    lse_r = rows(lse[..., None], -jnp.inf)[..., 0]  # padded rows are dead: zero gradients
    delta_r = rows(delta[..., None], 0)[..., 0]
    dq, dk, dv, _ = _backward(qr, kr, vr, None, lse_r, do_r, delta_r, aux, cfg, b, kh, lean=True)
    s = k.shape[1]
    dq = _from_rows(dq, b, kh, g)[:, :t] * jnp.asarray(inp.spec.scale, cdt)
    hk, hv = k.shape[-1], v.shape[-1]
    dk = dk[:, :s].reshape(b, kh, s, hk).transpose(0, 2, 1, 3)
    dv = dv[:, :s].reshape(b, kh, s, hv).transpose(0, 2, 1, 3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def dot_product_attention_bwd(
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    lse: Any,
    dout: Any,
    dlse: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_value_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: Any = None,
    logits_soft_cap: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Backward of :func:`dot_product_attention` from its saved output and lse ("xla" kernel).

    Args:
      query, key, value, and the mask options: as :func:`dot_product_attention`.
      out: (B, T, N, Hv) the attention output; lse: (B, T, N) its float32 log-sum-exp.
      dout: (B, T, N, Hv) cotangent of ``out``; dlse: optional (B, T, N) cotangent of ``lse``.
      block_q, block_k: query / key block sizes (default: :func:`default_blocks`); smaller
        blocks trade speed for a smaller (Z, block_q * G, block_k) float32 logits buffer.

    ``out``/``lse`` may be those of attention over a larger key set that contains these keys
    (the merged result of ring or split-KV attention): the gradients are then those of this
    key block's share, so blocks can be differentiated one at a time with no forward recompute.
    Returns (dq, dk, dv) in the dtypes of query, key, value. Rows with lse = -inf (no visible
    key) get zero gradients.
    """
    inp = normalize(
        query,
        key,
        value,
        scale=scale,
        is_causal=is_causal,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
    )
    b, t, n, _ = inp.query.shape
    hv = inp.value.shape[-1]
    out, lse, dout = (jnp.asarray(x) for x in (out, lse, dout))
    if inp.squeeze:
        out, lse, dout = out[None], lse[None], dout[None]
    checks.check_shape(out, (b, t, n, hv), "out")
    checks.check_shape(dout, (b, t, n, hv), "dout")
    checks.check_shape(lse, (b, t, n), "lse")
    if dlse is not None:
        dlse = jnp.asarray(dlse)
        dlse = dlse[None] if inp.squeeze else dlse
        checks.check_shape(dlse, (b, t, n), "dlse")
    dq, dk, dv = attention_bwd_xla(inp, out, lse, dout, dlse, block_q=block_q, block_k=block_k)
    if inp.squeeze:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return dq, dk, dv
