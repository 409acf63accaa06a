"""Pallas flash attention (forward + FlashAttention-2 backward), grid/BlockSpec style.

On GPU the kernels are lowered through Pallas' Triton backend, selected explicitly with
``triton.CompilerParams`` (JAX 0.11 makes Mosaic GPU the default for ``pallas_call``, but the
Mosaic GPU path wants warpgroup-level kernels; the Triton path compiles generic grid kernels
like this one). With ``interpret=True`` the same kernels run on CPU for tests.

Handled in-kernel: causal, sliding window, segment ids, key/value lengths and key padding (the
last three folded into one segment comparison), soft cap, GQA (the key/value head of a query
head comes from the BlockSpec index map; nothing is repeated), Hv != H. Every block size is a
static power of two >= 16; sequences and head dims are zero-padded to them.

Layout: query (B, Tp, N, Hp), key (B, Sp, K, Hp), value (B, Sp, K, Hvp); lse (B, N, Tp) f32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ._common import Inputs, MaskSpec

_BIG = 1e30  # finite "minus infinity" for running maxima (Triton-safe)


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Static tiling and mask options of one call."""

    spec: MaskSpec
    groups: int
    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    # Run fully visible blocks without the causal/window mask (three loops instead of one).
    # Correct in interpret mode; not yet compiled on a GPU, so off by default.
    split_loops: bool = False
    has_segments: bool = False
    interpret: bool = False


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


def _compiler_params(cfg: PallasConfig, bwd: bool = False):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    if bwd:
        return pltriton.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _bounds(spec: MaskSpec) -> tuple[int | None, int | None]:
    """Static mask as k in [q - left, q + right]; None = unbounded."""
    left = right = None
    if spec.window is not None:
        left, right = spec.window
    if spec.is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _mask(cfg: PallasConfig, qpos, kpos, qseg, kseg, static: bool = True):
    """Visibility (bq, bk) from positions and (optional) folded segment ids.

    ``static=False`` leaves out causal/window: the block is known to be fully inside them.
    """
    left, right = _bounds(cfg.spec) if static else (None, None)
    vis = None

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if right is not None:
        vis = _and(vis, kpos[None, :] <= qpos[:, None] + right)
    if left is not None:
        vis = _and(vis, kpos[None, :] >= qpos[:, None] - left)
    if qseg is not None:
        vis = _and(vis, qseg[:, None] == kseg[None, :])
    return vis


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """2-D matmul with float32 (float64 for f64) accumulation; the transposes stay in the dot."""
    out = jnp.float64 if jnp.float64 in (a.dtype, b.dtype) else jnp.float32
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=out)


def _logits(cfg: PallasConfig, q, k):
    s = _dot(q, k, trans_b=True) * cfg.spec.scale
    th = None
    if cfg.spec.soft_cap is not None:
        th = jnp.tanh(s / cfg.spec.soft_cap)
        s = cfg.spec.soft_cap * th
    return s, th


def _k_range(cfg: PallasConfig, i, nk: int, bq: int, bk: int):
    """Key blocks [lo, hi) that query block i can see."""
    left, right = _bounds(cfg.spec)
    lo = 0 if left is None else jnp.maximum(0, lax.div(jnp.maximum(i * bq - left, 0), np.int32(bk)))
    if right is None:
        hi = nk
    else:
        hi = jnp.minimum(nk, lax.div((i + 1) * bq - 1 + right + bk, np.int32(bk)))
    return lo, hi


def _q_range(cfg: PallasConfig, j, nq: int, bq: int, bk: int):
    """Query blocks [lo, hi) that can see key block j."""
    left, right = _bounds(cfg.spec)
    lo = (
        0
        if right is None
        else jnp.maximum(0, lax.div(jnp.maximum(j * bk - right, 0), np.int32(bq)))
    )
    if left is None:
        hi = nq
    else:
        hi = jnp.minimum(nq, lax.div((j + 1) * bk - 1 + left + bq, np.int32(bq)))
    return lo, hi


def _full_k_range(cfg: PallasConfig, i, lo, hi, bq: int, bk: int):
    """Key blocks in [lo, hi) that causal/window leave fully visible for query block i."""
    left, right = _bounds(cfg.spec)
    flo, fhi = lo, hi
    if left is not None:
        flo = lax.div(jnp.maximum((i + 1) * bq - 1 - left, 0) + bk - 1, np.int32(bk))
    if right is not None:
        fhi = lax.div(i * bq + right + 1, np.int32(bk))
    flo = jnp.clip(flo, lo, hi)
    return flo, jnp.clip(fhi, flo, hi)


def _full_q_range(cfg: PallasConfig, j, lo, hi, bq: int, bk: int):
    """Query blocks in [lo, hi) that see key block j fully (no causal/window mask needed)."""
    left, right = _bounds(cfg.spec)
    flo, fhi = lo, hi
    if right is not None:
        flo = lax.div(jnp.maximum((j + 1) * bk - 1 - right, 0) + bq - 1, np.int32(bq))
    if left is not None:
        fhi = lax.div(j * bk + 1 + left, np.int32(bq))
    flo = jnp.clip(flo, lo, hi)
    return flo, jnp.clip(fhi, flo, hi)


def _loops(cfg: PallasConfig, lo, flo, fhi, hi, body, init):
    """Run body(idx, carry, masked) over [lo, flo) and [fhi, hi) masked, [flo, fhi) unmasked."""
    left, right = _bounds(cfg.spec)
    if left is None and right is None:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=False), init)
    if not cfg.split_loops:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), init)
    carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), init)
    carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, *rest, cfg: PallasConfig, nk: int):
    if cfg.has_segments:
        qseg_ref, kseg_ref, o_ref, lse_ref = rest
    else:
        o_ref, lse_ref = rest
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    qpos = i * bq + jnp.arange(bq)
    qseg = qseg_ref[...] if cfg.has_segments else None
    hv = o_ref.shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s, _ = _logits(cfg, q, k)
        vis = _mask(
            cfg,
            qpos,
            j * bk + jnp.arange(bk),
            qseg,
            kseg_ref[ks] if qseg is not None else None,
            static=masked,
        )
        if vis is not None:
            s = jnp.where(vis, s, -_BIG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    lo, hi = _k_range(cfg, i, nk, bq, bk)
    flo, fhi = _full_k_range(cfg, i, lo, hi, bq, bk)
    acc_dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    init = (
        jnp.zeros((bq, hv), acc_dt),
        jnp.full((bq,), -_BIG, acc_dt),
        jnp.zeros((bq,), acc_dt),
    )
    acc, m, l = _loops(cfg, lo, flo, fhi, hi, body, init)
    ok = l > 0
    o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf).astype(lse_ref.dtype)


def _forward(cfg: PallasConfig, q, k, v, qseg, kseg):
    b, tp, n, hp = q.shape
    sp, hvp = k.shape[1], v.shape[-1]
    g = cfg.groups
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = tp // bq, sp // bk
    lse_dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    in_specs = [
        pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, sp, None, hp), lambda i, bb, h: (bb, 0, h // g, 0)),
        pl.BlockSpec((None, sp, None, hvp), lambda i, bb, h: (bb, 0, h // g, 0)),
    ]
    args = [q, k, v]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)),
            pl.BlockSpec((None, sp), lambda i, bb, h: (bb, 0)),
        ]
        args += [qseg, kseg]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
        grid=(nq, b, n),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, hvp), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, n, hvp), q.dtype),
            jax.ShapeDtypeStruct((b, n, tp), lse_dt),
        ],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="jaxcore_flash_fwd",
    )(*args)
    return out, lse


# ----------------------------------------------------------------------------- backward


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg, nq):
    if cfg.has_segments:
        qseg_ref, kseg_ref, dk_ref, dv_ref = rest
    else:
        dk_ref, dv_ref = rest
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    kpos = j * bk + jnp.arange(bk)
    kseg = kseg_ref[...] if cfg.has_segments else None
    acc_dt = jnp.float64 if k.dtype == jnp.float64 else jnp.float32

    def body(i, carry, masked):
        dk, dv = carry
        qs = pl.ds(i * bq, bq)
        q = q_ref[qs, :]
        do = do_ref[qs, :]
        lse = lse_ref[qs]
        delta = delta_ref[qs]
        s, th = _logits(cfg, q, k)
        vis = _mask(
            cfg,
            i * bq + jnp.arange(bq),
            kpos,
            qseg_ref[qs] if kseg is not None else None,
            kseg,
            static=masked,
        )
        p = jnp.exp(s - lse[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        if th is not None:
            ds = ds * (1.0 - th * th)
        ds = ds * cfg.spec.scale
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo, hi = _q_range(cfg, j, nq, bq, bk)
    flo, fhi = _full_q_range(cfg, j, lo, hi, bq, bk)
    init = (jnp.zeros(dk_ref.shape, acc_dt), jnp.zeros(dv_ref.shape, acc_dt))
    dk, dv = _loops(cfg, lo, flo, fhi, hi, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg, nk):
    if cfg.has_segments:
        qseg_ref, kseg_ref, dq_ref = rest
    else:
        (dq_ref,) = rest
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    qpos = i * bq + jnp.arange(bq)
    qseg = qseg_ref[...] if cfg.has_segments else None
    acc_dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32

    def body(j, dq, masked):
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s, th = _logits(cfg, q, k)
        vis = _mask(
            cfg,
            qpos,
            j * bk + jnp.arange(bk),
            qseg,
            kseg_ref[ks] if qseg is not None else None,
            static=masked,
        )
        p = jnp.exp(s - lse[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        if th is not None:
            ds = ds * (1.0 - th * th)
        return dq + _dot(ds.astype(k.dtype), k) * cfg.spec.scale

    lo, hi = _k_range(cfg, i, nk, bq, bk)
    flo, fhi = _full_k_range(cfg, i, lo, hi, bq, bk)
    dq = _loops(cfg, lo, flo, fhi, hi, body, jnp.zeros(dq_ref.shape, acc_dt))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(cfg: PallasConfig, q, k, v, qseg, kseg, out, lse, do, dlse):
    b, tp, n, hp = q.shape
    sp, kh, hvp = k.shape[1], k.shape[2], v.shape[-1]
    g = cfg.groups
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    nq, nk = tp // bq, sp // bk
    dead = lse == -jnp.inf  # (B, N, Tp): fully masked rows get zero gradients
    cdt = lse.dtype
    delta = jnp.sum(do.astype(cdt) * out.astype(cdt), axis=-1)  # (B, Tp, N)
    delta = jnp.swapaxes(delta, 1, 2).astype(lse.dtype) - dlse
    delta = jnp.where(dead, 0.0, delta)
    lse_s = jnp.where(dead, _BIG, lse)
    do = jnp.where(jnp.swapaxes(dead, 1, 2)[..., None], jnp.zeros((), do.dtype), do)
    seg_args = [qseg, kseg] if cfg.has_segments else []
    params = _compiler_params(cfg, bwd=True)

    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, nq=nq),
        grid=(nk, b, n),
        in_specs=[
            pl.BlockSpec((None, tp, None, hp), lambda j, bb, h: (bb, 0, h, 0)),
            pl.BlockSpec((None, bk, None, hp), lambda j, bb, h: (bb, j, h // g, 0)),
            pl.BlockSpec((None, bk, None, hvp), lambda j, bb, h: (bb, j, h // g, 0)),
            pl.BlockSpec((None, tp, None, hvp), lambda j, bb, h: (bb, 0, h, 0)),
            pl.BlockSpec((None, None, tp), lambda j, bb, h: (bb, h, 0)),
            pl.BlockSpec((None, None, tp), lambda j, bb, h: (bb, h, 0)),
        ]
        + (
            [
                pl.BlockSpec((None, tp), lambda j, bb, h: (bb, 0)),
                pl.BlockSpec((None, bk), lambda j, bb, h: (bb, j)),
            ]
            if cfg.has_segments
            else []
        ),
        out_specs=[
            pl.BlockSpec((None, bk, None, hp), lambda j, bb, h: (bb, j, h, 0)),
            pl.BlockSpec((None, bk, None, hvp), lambda j, bb, h: (bb, j, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, sp, n, hp), k.dtype if g == 1 else cdt),
            jax.ShapeDtypeStruct((b, sp, n, hvp), v.dtype if g == 1 else cdt),
        ],
        compiler_params=params,
        interpret=cfg.interpret,
        name="jaxcore_flash_bwd_dkdv",
    )(q, k, v, do, lse_s, delta, *seg_args)
    if g > 1:  # sum the G query heads of each key/value head
        dk = dk.reshape(b, sp, kh, g, hp).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(b, sp, kh, g, hvp).sum(axis=3).astype(v.dtype)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        grid=(nq, b, n),
        in_specs=[
            pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, sp, None, hp), lambda i, bb, h: (bb, 0, h // g, 0)),
            pl.BlockSpec((None, sp, None, hvp), lambda i, bb, h: (bb, 0, h // g, 0)),
            pl.BlockSpec((None, bq, None, hvp), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
        ]
        + (
            [
                pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)),
                pl.BlockSpec((None, sp), lambda i, bb, h: (bb, 0)),
            ]
            if cfg.has_segments
            else []
        ),
        out_specs=pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="jaxcore_flash_bwd_dq",
    )(q, k, v, do, lse_s, delta, *seg_args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: PallasConfig, q, k, v, qseg, kseg):
    return _forward(cfg, q, k, v, qseg, kseg)


def _flash_fwd(cfg, q, k, v, qseg, kseg):
    out, lse = _forward(cfg, q, k, v, qseg, kseg)
    return (out, lse), (q, k, v, qseg, kseg, out, lse)


def _flash_bwd(cfg, res, cts):
    q, k, v, qseg, kseg, out, lse = res
    do, dlse = cts
    dq, dk, dv = _backward(cfg, q, k, v, qseg, kseg, out, lse, do, dlse)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_blocks(t: int, s: int, h: int, hv: int, interpret: bool) -> dict:
    """Tiles and warps (best of three measured on an H200, bf16, H=128, T=8192, causal)."""
    del interpret, h, hv
    cap = lambda x, n: min(x, _pow2_at_least(n))
    return dict(
        block_q=cap(128, t),
        block_k=cap(128, s),
        block_q_bwd=cap(32, t),
        block_k_bwd=cap(64, s),
        num_warps=8,
        num_stages=3,
        num_warps_bwd=4,
        num_stages_bwd=2,
    )


def attention_pallas(
    inp: Inputs, *, interpret: bool, blocks: dict | None = None
) -> tuple[jax.Array, jax.Array]:
    """Pallas flash attention. Returns (out (B, T, N, Hv), lse (B, T, N) f32)."""
    spec = inp.spec
    q, k, v = inp.query, inp.key, inp.value
    b, t, n, h = q.shape
    s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kh
    opts = default_blocks(t, s, h, hv, interpret)
    if blocks:
        opts.update(blocks)
    for nm in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
        x = opts[nm]
        if x < 16 or x & (x - 1):
            raise ValueError(f"{nm}: expected a power of two >= 16, got {x}")
    lcm = max(opts["block_q"], opts["block_q_bwd"])
    lck = max(opts["block_k"], opts["block_k_bwd"])
    tp, sp = -(-t // lcm) * lcm, -(-s // lck) * lck
    hp, hvp = _pow2_at_least(h), _pow2_at_least(hv)

    def pad(x, tlen, hd):
        return jnp.pad(x, ((0, 0), (0, tlen - x.shape[1]), (0, 0), (0, hd - x.shape[3])))

    qp, kp, vp = pad(q, tp, hp), pad(k, sp, hp), pad(v, sp, hvp)
    # Fold key padding, key/value lengths and segment ids into one segment comparison.
    dynamic = inp.q_segment_ids is not None or inp.kv_seqlen is not None or sp != s
    qseg = kseg = None
    if dynamic:
        kpos = jnp.arange(sp, dtype=jnp.int32)[None, :]
        valid = jnp.broadcast_to(kpos < s, (b, sp))
        if inp.kv_seqlen is not None:
            valid = valid & (kpos < inp.kv_seqlen[:, None])
        if inp.q_segment_ids is not None:
            qseg = jnp.pad(inp.q_segment_ids, ((0, 0), (0, tp - t)))
            kseg = jnp.pad(inp.kv_segment_ids, ((0, 0), (0, sp - s)))
            sentinel = jnp.min(qseg) - 1
        else:
            qseg = jnp.zeros((b, tp), jnp.int32)
            kseg = jnp.zeros((b, sp), jnp.int32)
            sentinel = jnp.int32(-1)
        kseg = jnp.where(valid, kseg, sentinel)
    cfg = PallasConfig(spec=spec, groups=g, has_segments=dynamic, interpret=interpret, **opts)
    out, lse = _flash(cfg, qp, kp, vp, qseg, kseg)
    out = out[:, :t, :, :hv]
    lse = jnp.swapaxes(lse, 1, 2)[:, :t]
    return out, lse
