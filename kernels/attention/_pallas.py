"""Pallas flash attention (forward + FlashAttention-2 backward), grid/BlockSpec style.

On GPU the kernels are lowered through Pallas' Triton backend, selected explicitly with
``triton.CompilerParams`` (JAX 0.11 makes Mosaic GPU the default for ``pallas_call``, but the
Mosaic GPU path wants warpgroup-level kernels; the Triton path compiles generic grid kernels
like this one). With ``interpret=True`` the same kernels run on CPU for tests.

Handled in-kernel: causal, sliding window, segment ids, key/value lengths and key padding (the
last three folded into one segment comparison), soft cap, GQA (the key/value head of a query
head comes from the BlockSpec index map; nothing is repeated), Hv != H, and an additive ``bias``
and boolean ``mask`` broadcastable to (B, N, T, S): each is loaded per (query block, key block)
tile through the same BlockSpec machinery as Q/K/V, with block size 1 and index 0 on a
broadcast axis (nothing is broadcast in HBM). The bias gradient is dS per tile, written by the
dQ kernel (summed in-kernel over a broadcast query or key axis; broadcast batch/head axes are
summed outside), and only when the bias is differentiated (symbolic-zeros custom VJP). Every
block size is a static power of two >= 16; sequences and head dims are zero-padded to them.

Layout: query (B, Tp, N, Hp), key (B, Sp, K, Hp), value (B, Sp, K, Hvp); lse (B, N, Tp) f32;
bias (Bb, Nb, Tp|1, Sp|1) in its own dtype; mask the same as int8 (1 = attend).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl

from jaxcore import backend
from jaxcore.autodiff import tangent_call

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
    # (B, N, T, S): True where the bias / mask has size 1 (broadcast); None = no bias / mask.
    bias_bcast: tuple[bool, bool, bool, bool] | None = None
    mask_bcast: tuple[bool, bool, bool, bool] | None = None
    bias_grad: bool = True  # the dQ kernel also writes dS (False: bias not differentiated)
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


# ----------------------------------------------------------------------------- shared setup


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """BlockSpecs of one ``pallas_call`` over the grid (P, B, N).

    Program P walks query blocks (``over_q``: forward and dQ) or key blocks (dK/dV) of
    ``block`` rows; the other sequence axis is passed whole (Tp or Sp rows) and the kernel
    slices it with ``pl.ds``. Operands broadcast over an axis get block size 1, index 0 there.
    """

    over_q: bool
    block: int
    tp: int
    sp: int
    groups: int

    def rows(self, on_q: bool) -> int:
        """Rows of the query (``on_q``) or key axis in one program's block."""
        if on_q == self.over_q:
            return self.block
        return self.tp if on_q else self.sp

    def at(self, on_q: bool, p):
        """Block index along the query / key axis for program p."""
        return p if on_q == self.over_q else 0

    def seq(self, hd: int, on_q: bool, kv_head: bool = False) -> pl.BlockSpec:
        """(B, T|S, N|K, hd) operand; ``kv_head``: the key/value head h // G of query head h."""
        g = self.groups if kv_head else 1
        return pl.BlockSpec(
            (None, self.rows(on_q), None, hd),
            lambda p, bb, h: (bb, self.at(on_q, p), h // g, 0),
        )

    def rowvec(self) -> pl.BlockSpec:
        """(B, N, Tp) per-query-row values (lse, delta)."""
        return pl.BlockSpec(
            (None, None, self.rows(True)), lambda p, bb, h: (bb, h, self.at(True, p))
        )

    def seg(self, on_q: bool) -> pl.BlockSpec:
        """(B, Tp) query or (B, Sp) key segment ids."""
        return pl.BlockSpec((None, self.rows(on_q)), lambda p, bb, h: (bb, self.at(on_q, p)))

    def bnts(self, bc: tuple[bool, ...]) -> pl.BlockSpec:
        """(Bb, Nb, Tp|1, Sp|1) bias or mask; ``bc`` marks the broadcast (size 1) axes."""
        return pl.BlockSpec(
            (None, None, 1 if bc[2] else self.rows(True), 1 if bc[3] else self.rows(False)),
            lambda p, bb, h: (
                0 if bc[0] else bb,
                0 if bc[1] else h,
                0 if bc[2] else self.at(True, p),
                0 if bc[3] else self.at(False, p),
            ),
        )


@dataclasses.dataclass(frozen=True)
class _Dims:
    """Padded problem sizes: batch, query heads, key/value heads, Tp, Sp, Hp, Hvp."""

    b: int
    n: int
    kh: int
    tp: int
    sp: int
    hp: int
    hvp: int


def _dims(q, k, v) -> _Dims:
    b, tp, n, hp = q.shape
    return _Dims(b, n, k.shape[2], tp, k.shape[1], hp, v.shape[-1])


def _extras(cfg: PallasConfig, tl: _Tiling, qseg, kseg, bias, mask) -> tuple[list, list]:
    """BlockSpecs and arrays of the optional inputs, in the order ``_split`` reads them."""
    specs, args = [], []
    if cfg.has_segments:
        specs += [tl.seg(True), tl.seg(False)]
        args += [qseg, kseg]
    if cfg.bias_bcast is not None:
        specs.append(tl.bnts(cfg.bias_bcast))
        args.append(bias)
    if cfg.mask_bcast is not None:
        specs.append(tl.bnts(cfg.mask_bcast))
        args.append(mask)
    return specs, args


def visited_blocks(spec: MaskSpec, tp: int, sp: int, bq: int, bk: int) -> int:
    """(query block, key block) pairs a kernel with these tiles visits under the static mask
    (causal / window and the static key length ``spec.s``; dynamic lengths and segment ids
    can only skip more). The same block ranges as the kernels' loops."""
    left, right = _bounds(spec)
    r0 = np.arange(0, tp, bq, dtype=np.int64)
    s_end = min(spec.s, sp)
    lo = np.zeros_like(r0) if left is None else np.maximum(r0 - left, 0) // bk
    end = np.full_like(r0, s_end)
    if right is not None:
        end = np.clip(r0 + bq - 1 + right + 1, 0, s_end)
    hi = -(-end // bk)
    return int(np.maximum(hi - lo, 0).sum())


def cost_estimate(
    kind: str,
    spec: MaskSpec,
    d: _Dims,
    bq: int,
    bk: int,
    itemsize: int,
    extra_bytes_per_pair: float = 0.0,
) -> pl.CostEstimate:
    """Whole-call work of one flash-attention kernel (all B x N programs), for XLA and
    ``jaxcore.hardware.trace``: ``kind`` "fwd", "dkdv" or "dq".

    Per visited (bq, bk) block pair: the matmuls (fwd: Q K^T, P V; dK/dV: Q K^T, dO V^T,
    P^T dO, dS^T Q; dQ: Q K^T, dO V^T, dS K; 2 flops per multiply-add), ~8 flops of softmax
    arithmetic per logit, one exp per logit (plus a tanh with a soft cap). Bytes: each program
    reads its own tile once and the other side's tiles once per visited block (K/V for fwd and
    dQ; Q, dO, lse, delta for dK/dV), writes its outputs once; ``extra_bytes_per_pair`` adds
    segment ids / bias / mask traffic per visited logit.
    """
    pairs = visited_blocks(spec, d.tp, d.sp, bq, bk) * d.b * d.n
    logits = pairs * bq * bk
    mm = {"fwd": d.hp + d.hvp, "dkdv": 2 * (d.hp + d.hvp), "dq": 2 * d.hp + d.hvp}[kind]
    flops = logits * (2 * mm + 8)
    trans = logits * (2 if spec.soft_cap is not None else 1)
    q_row = d.hp * itemsize  # one query (or key) row of one head
    v_row = d.hvp * itemsize
    if kind == "fwd":  # read Q, write O and lse once; K, V per visited block
        own = d.b * d.n * d.tp * (q_row + v_row + 4)
        other = pairs * bk * (q_row + v_row)
    elif kind == "dkdv":  # read K, V, write dK, dV once; Q, dO, lse, delta per visited block
        own = d.b * d.n * d.sp * 2 * (q_row + v_row)
        other = pairs * bq * (q_row + v_row + 8)
    else:  # read Q, dO, lse, delta, write dQ once; K, V per visited block
        own = d.b * d.n * d.tp * (2 * q_row + v_row + 8)
        other = pairs * bk * (q_row + v_row)
    nbytes = own + other + int(logits * extra_bytes_per_pair)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(trans), bytes_accessed=int(nbytes))


def _extra_bytes(cfg: PallasConfig, bq: int, bk: int, bias, mask) -> float:
    """Per-logit bytes of the optional inputs a kernel reads per visited block pair."""
    extra = 0.0
    if cfg.has_segments:
        extra += 4.0 / bk + 4.0 / bq  # one int32 id per row and per column of a block
    for arr, bc in ((bias, cfg.bias_bcast), (mask, cfg.mask_bcast)):
        if arr is not None:
            per = arr.dtype.itemsize
            per = per / bq if bc[2] else per
            per = per / bk if bc[3] else per
            extra += per
    return extra


def _call(
    cfg: PallasConfig,
    kernel,
    programs: int,
    d: _Dims,
    in_specs,
    out_specs,
    out_shape,
    *,
    name: str,
    bwd: bool,
    cost: pl.CostEstimate | None = None,
):
    """``pallas_call`` over the grid (programs, B, N) with this call's compiler params.

    The outputs vary over the manual mesh axes of the inputs (runs inside ``jax.shard_map``
    with ``check_vma=True``).
    """

    return backend.pallas_call(
        kernel,
        grid=(programs, d.b, d.n),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, bwd=bwd),
        interpret=cfg.interpret,
        name=name,
        cost_estimate=cost,
    )


@dataclasses.dataclass
class _Opt:
    """Optional input refs of a kernel (None when the call has no such input)."""

    qseg: Any
    kseg: Any
    bias: Any
    mask: Any


def _split(cfg: PallasConfig, rest) -> tuple[_Opt, list]:
    """(optional input refs, output refs) from a kernel's trailing refs."""
    rest = list(rest)
    take = lambda on: rest.pop(0) if on else None  # noqa: E731
    seg = cfg.has_segments
    opt = _Opt(
        take(seg), take(seg), take(cfg.bias_bcast is not None), take(cfg.mask_bcast is not None)
    )
    return opt, rest


def _tile(ref, bc, qs, ks):
    """(bq|1, bk|1) tile of a bias/mask ref; qs / ks slice the query / key axis (None: whole)."""
    if ref is None:
        return None
    rows = slice(None) if bc[2] or qs is None else qs
    cols = slice(None) if bc[3] or ks is None else ks
    return ref[rows, cols]


def _scores(cfg: PallasConfig, q, k, qpos, kpos, qseg, kseg, bias, mask, static: bool):
    """Logits (bq, bk) as the reference: cap(scale * q k^T) + bias; tanh (or None); visibility.

    The bias / mask tiles may be (1, bk), (bq, 1) or (1, 1) (broadcast axes).
    """
    s, th = _logits(cfg, q, k)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    vis = _mask(cfg, qpos, kpos, qseg, kseg, static=static)
    if mask is not None:
        mk = mask != 0
        vis = mk if vis is None else jnp.logical_and(vis, mk)
    return s, th, vis


def _reduce(x, rows: bool, cols: bool):
    """Sum a (bq, bk) tile over its rows and/or columns, keeping rank 2."""
    if cols:
        x = jnp.sum(x, axis=1)[:, None]
    if rows:
        x = jnp.sum(x, axis=0)[None, :]
    return x


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, *rest, cfg: PallasConfig, nk: int):
    opt, (o_ref, lse_ref) = _split(cfg, rest)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    qpos = i * bq + jnp.arange(bq)
    qseg = opt.qseg[...] if cfg.has_segments else None
    hv = o_ref.shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s, _, vis = _scores(
            cfg,
            q,
            k,
            qpos,
            j * bk + jnp.arange(bk),
            qseg,
            opt.kseg[ks] if qseg is not None else None,
            _tile(opt.bias, cfg.bias_bcast, None, ks),
            _tile(opt.mask, cfg.mask_bcast, None, ks),
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


def _forward(cfg: PallasConfig, q, k, v, qseg, kseg, bias, mask):
    d = _dims(q, k, v)
    tl = _Tiling(True, cfg.block_q, d.tp, d.sp, cfg.groups)
    lse_dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    ex_specs, ex_args = _extras(cfg, tl, qseg, kseg, bias, mask)
    out, lse = _call(
        cfg,
        functools.partial(_fwd_kernel, cfg=cfg, nk=d.sp // cfg.block_k),
        d.tp // cfg.block_q,
        d,
        [tl.seq(d.hp, True), tl.seq(d.hp, False, True), tl.seq(d.hvp, False, True)] + ex_specs,
        [tl.seq(d.hvp, True), tl.rowvec()],
        [
            jax.ShapeDtypeStruct((d.b, d.tp, d.n, d.hvp), q.dtype),
            jax.ShapeDtypeStruct((d.b, d.n, d.tp), lse_dt),
        ],
        name="jaxcore_flash_fwd",
        bwd=False,
        cost=cost_estimate(
            "fwd",
            cfg.spec,
            d,
            cfg.block_q,
            cfg.block_k,
            q.dtype.itemsize,
            _extra_bytes(cfg, cfg.block_q, cfg.block_k, bias, mask),
        ),
    )(q, k, v, *ex_args)
    return out, lse


# ----------------------------------------------------------------------------- backward


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg, nq):
    opt, (dk_ref, dv_ref) = _split(cfg, rest)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    kpos = j * bk + jnp.arange(bk)
    kseg = opt.kseg[...] if cfg.has_segments else None
    acc_dt = jnp.float64 if k.dtype == jnp.float64 else jnp.float32

    def body(i, carry, masked):
        dk, dv = carry
        qs = pl.ds(i * bq, bq)
        q = q_ref[qs, :]
        do = do_ref[qs, :]
        lse = lse_ref[qs]
        delta = delta_ref[qs]
        s, th, vis = _scores(
            cfg,
            q,
            k,
            i * bq + jnp.arange(bq),
            kpos,
            opt.qseg[qs] if kseg is not None else None,
            kseg,
            _tile(opt.bias, cfg.bias_bcast, qs, None),
            _tile(opt.mask, cfg.mask_bcast, qs, None),
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
    """dQ of one query block; with a bias also its dS tiles (the bias gradient)."""
    opt, outs = _split(cfg, rest)
    dq_ref = outs[0]
    db_ref = outs[1] if cfg.bias_bcast is not None and cfg.bias_grad else None
    bc = cfg.bias_bcast
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    qpos = i * bq + jnp.arange(bq)
    qseg = opt.qseg[...] if cfg.has_segments else None
    acc_dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    # Key-broadcast bias: its gradient is a row sum over every key block, kept in the carry.
    db_carry = db_ref is not None and bc[3]

    def body(j, carry, masked):
        dq = carry[0]
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s, th, vis = _scores(
            cfg,
            q,
            k,
            qpos,
            j * bk + jnp.arange(bk),
            qseg,
            opt.kseg[ks] if qseg is not None else None,
            _tile(opt.bias, bc, None, ks),
            _tile(opt.mask, cfg.mask_bcast, None, ks),
            static=masked,
        )
        p = jnp.exp(s - lse[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        out = ()
        if db_carry:
            out = (carry[1] + _reduce(ds, bc[2], True),)
        elif db_ref is not None:
            db_ref[:, ks] = _reduce(ds, bc[2], False).astype(db_ref.dtype)
        if th is not None:
            ds = ds * (1.0 - th * th)
        return (dq + _dot(ds.astype(k.dtype), k) * cfg.spec.scale, *out)

    lo, hi = _k_range(cfg, i, nk, bq, bk)
    flo, fhi = _full_k_range(cfg, i, lo, hi, bq, bk)
    init = (jnp.zeros(dq_ref.shape, acc_dt),)
    if db_carry:
        init += (jnp.zeros(db_ref.shape, acc_dt),)
    res = _loops(cfg, lo, flo, fhi, hi, body, init)
    dq_ref[...] = res[0].astype(dq_ref.dtype)
    if db_carry:
        db_ref[...] = res[1].astype(db_ref.dtype)
    elif db_ref is not None:  # key blocks this query block never sees: zero gradient

        def clear(j, c):
            db_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((db_ref.shape[0], bk), db_ref.dtype)
            return c

        if not isinstance(lo, int):  # a left bound (window): blocks before it
            lax.fori_loop(0, lo, clear, 0)
        if not isinstance(hi, int):  # a right bound (causal / window): blocks after it
            lax.fori_loop(hi, nk, clear, 0)


def _backward(cfg: PallasConfig, q, k, v, qseg, kseg, bias, mask, out, lse, do, dlse, delta=None):
    """Gradients from the saved output and lse (padded shapes, lse (B, N, Tp)); ``delta``
    (B, N, Tp) = rowsum(do * out) - dlse precomputed (then ``out`` and ``dlse`` are unused)."""
    d = _dims(q, k, v)
    g = cfg.groups
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    nq, nk = d.tp // bq, d.sp // bk
    dead = lse == -jnp.inf  # (B, N, Tp): fully masked rows get zero gradients
    cdt = lse.dtype
    if delta is None:
        delta = jnp.sum(do.astype(cdt) * out.astype(cdt), axis=-1)  # (B, Tp, N)
        delta = jnp.swapaxes(delta, 1, 2).astype(lse.dtype) - dlse
    delta = jnp.where(dead, 0.0, delta.astype(cdt))
    lse_s = jnp.where(dead, _BIG, lse)
    do = jnp.where(jnp.swapaxes(dead, 1, 2)[..., None], jnp.zeros((), do.dtype), do)

    def main_specs(tl: _Tiling) -> list:  # q, k, v, do, lse, delta
        return [
            tl.seq(d.hp, True),
            tl.seq(d.hp, False, True),
            tl.seq(d.hvp, False, True),
            tl.seq(d.hvp, True),
            tl.rowvec(),
            tl.rowvec(),
        ]

    args = (q, k, v, do, lse_s, delta)

    tk = _Tiling(False, bk, d.tp, d.sp, g)
    ex_specs, ex_args = _extras(cfg, tk, qseg, kseg, bias, mask)
    dk, dv = _call(
        cfg,
        functools.partial(_dkdv_kernel, cfg=cfg, nq=nq),
        nk,
        d,
        main_specs(tk) + ex_specs,
        [tk.seq(d.hp, False), tk.seq(d.hvp, False)],
        [
            jax.ShapeDtypeStruct((d.b, d.sp, d.n, d.hp), k.dtype if g == 1 else cdt),
            jax.ShapeDtypeStruct((d.b, d.sp, d.n, d.hvp), v.dtype if g == 1 else cdt),
        ],
        name="jaxcore_flash_bwd_dkdv",
        bwd=True,
        cost=cost_estimate(
            "dkdv", cfg.spec, d, bq, bk, q.dtype.itemsize, _extra_bytes(cfg, bq, bk, bias, mask)
        ),
    )(*args, *ex_args)
    if g > 1:  # sum the G query heads of each key/value head
        dk = dk.reshape(d.b, d.sp, d.kh, g, d.hp).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(d.b, d.sp, d.kh, g, d.hvp).sum(axis=3).astype(v.dtype)

    tq = _Tiling(True, bq, d.tp, d.sp, g)
    ex_specs, ex_args = _extras(cfg, tq, qseg, kseg, bias, mask)
    out_specs = [tq.seq(d.hp, True)]
    out_shape = [jax.ShapeDtypeStruct((d.b, d.tp, d.n, d.hp), q.dtype)]
    bc = cfg.bias_bcast if cfg.bias_grad else None
    if bc is not None:
        # dS per (b, h): (B, N, nq | Tp, 1 | Sp); the query axis is summed per block in-kernel
        # when the bias broadcasts over it, the key axis over all blocks.
        red = tuple(a for a in range(3) if bc[a])  # summed below
        db_dt = bias.dtype if not red else jnp.promote_types(bias.dtype, cdt)
        rows, row_block = (nq, 1) if bc[2] else (d.tp, bq)
        cols = 1 if bc[3] else d.sp
        out_specs.append(
            pl.BlockSpec((None, None, row_block, cols), lambda p, bb, h: (bb, h, p, 0))
        )
        out_shape.append(jax.ShapeDtypeStruct((d.b, d.n, rows, cols), db_dt))
    res = _call(
        cfg,
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        nq,
        d,
        main_specs(tq) + ex_specs,
        out_specs,
        out_shape,
        name="jaxcore_flash_bwd_dq",
        bwd=True,
        cost=cost_estimate(
            "dq", cfg.spec, d, bq, bk, q.dtype.itemsize, _extra_bytes(cfg, bq, bk, bias, mask)
        ),
    )(*args, *ex_args)
    dq, dbias = res[0], None
    if bc is not None:
        dbias = res[1]
        if red:
            dbias = jnp.sum(dbias, axis=red, keepdims=True)
        dbias = dbias.astype(bias.dtype)
    return dq, dk, dv, dbias


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(cfg: PallasConfig, q, k, v, qseg, kseg, bias, mask):
    """(out, lse) from the Pallas forward. A custom JVP whose tangent map is a ``linear_call``
    (:func:`jaxcore.autodiff.tangent_call`): reverse mode transposes it with the Pallas backward
    kernels; forward mode evaluates the JVP of the same attention in blockwise XLA
    (:func:`_xla.padded_twin`: a Pallas kernel has no JVP)."""
    return _forward(cfg, q, k, v, qseg, kseg, bias, mask)


def _twin(cfg: PallasConfig, consts, q, k, v, bias):
    from ._xla import padded_twin

    qseg, kseg, mask = consts
    return padded_twin(cfg.spec, cfg.groups, q, k, v, qseg, kseg, bias, mask)


@functools.partial(_flash.defjvp, symbolic_zeros=True)
def _flash_jvp(cfg, primals, tangents):
    q, k, v, qseg, kseg, bias, mask = primals
    out = _flash(cfg, *primals)  # itself: differentiable again
    tq, tk, tv, _, _, tbias, _ = tangents
    # a bias that is not differentiated gets no dS output at all
    bcfg = dataclasses.replace(cfg, bias_grad=bias is not None and type(tbias) is not SymbolicZero)

    def backward(prim, consts, saved, cts):
        (q, k, v, bias), (qseg, kseg, mask) = prim, consts
        return _backward(bcfg, q, k, v, qseg, kseg, bias, mask, *saved, *cts)

    fun = functools.partial(_twin, cfg)
    prim, consts = (q, k, v, bias), (qseg, kseg, mask)
    return out, tuple(tangent_call(fun, backward, prim, (tq, tk, tv, tbias), consts, out, out))


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


HOPPER_SMEM_BYTES = 227 * 1024  # Hopper's (and B100/B200's) shared memory per block (opt-in max)


def smem_limit(device: Any = None) -> int:
    """Shared memory one Triton program may use on ``device`` (default: the first), bytes."""
    kind = str(getattr(device or jax.devices()[0], "device_kind", ""))
    if any(x in kind for x in ("H100", "H200", "H800", "H20", "GH200", "B200", "B100")):
        return HOPPER_SMEM_BYTES
    if any(x in kind for x in ("A100", "A800", "A30")):
        return 163 * 1024
    return 99 * 1024


def forward_smem(opts: dict, hp: int, hvp: int, itemsize: int, bias_tile, mask_tile) -> int:
    """Shared-memory estimate (bytes) of the Triton forward with tiles ``opts``.

    The query tile, (stages - 1) pipelined K / V / bias / mask tiles and one f32 logits
    tile of layout scratch. ``bias_tile`` / ``mask_tile``: (rows, cols, itemsize), a
    broadcast axis given as 0 (one row / column), or None. Matches the 294912 bytes that
    Triton asked for on an H200 (bf16, H=128, 128x128 tiles, 3 stages, bias (1, N, T, S));
    over-estimates the f32 bias + mask case (393216 vs 361472).
    """
    bq, bk, st = opts["block_q"], opts["block_k"], opts["num_stages"]
    per_stage = bk * (hp + hvp) * itemsize
    for tile in (bias_tile, mask_tile):
        if tile is not None:
            rows, cols, isz = tile
            per_stage += (bq if rows else 1) * (bk if cols else 1) * isz
    return bq * hp * itemsize + max(st - 1, 1) * per_stage + bq * bk * 4


def fit_smem(opts: dict, limit: int, *sizes) -> dict:
    """Fewer stages (down to 2), then smaller key blocks, then smaller query blocks (down to
    16), until :func:`forward_smem` ``(opts, *sizes)`` fits in ``limit`` bytes; a copy of
    ``opts``."""
    opts = dict(opts)
    while forward_smem(opts, *sizes) > limit:
        if opts["num_stages"] > 2:
            opts["num_stages"] -= 1
        elif opts["block_k"] > 16:
            opts["block_k"] //= 2
        elif opts["block_q"] > 16:
            opts["block_q"] //= 2
        else:
            break
    return opts


def _check_blocks(opts: dict) -> None:
    for nm in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
        x = opts[nm]
        if x < 16 or x & (x - 1):
            raise ValueError(f"{nm}: expected a power of two >= 16, got {x}")


def _pad_bnts(x: jax.Array | None, tp: int, sp: int, fill) -> jax.Array | None:
    """Pad the non-broadcast T / S axes of a (Bb, Nb, Tb, Sb) array to Tp / Sp."""
    if x is None:
        return None
    _, _, tb, sb = x.shape
    pt = 0 if tb == 1 else tp - tb
    ps = 0 if sb == 1 else sp - sb
    if pt or ps:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pt), (0, ps)), constant_values=fill)
    return x


def _prepare(inp: Inputs, interpret: bool, blocks: dict | None):
    """Padded q, k, v, folded segment ids, bias / mask and the static config of one call."""
    spec = inp.spec
    q, k, v = inp.query, inp.key, inp.value
    b, t, n, h = q.shape
    s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    opts = default_blocks(t, s, h, hv, interpret)
    if not interpret:  # bias / mask tiles (and f32) can overflow shared memory: shrink to fit

        def tile(x):  # (query rows?, key columns?, bytes per element) of a bias / mask tile
            return None if x is None else (x.shape[2] > 1, x.shape[3] > 1, x.dtype.itemsize)

        sizes = (_pow2_at_least(h), _pow2_at_least(hv), q.dtype.itemsize)
        opts = fit_smem(opts, smem_limit(), *sizes, tile(inp.bias), tile(inp.mask))
    if blocks:
        opts.update(blocks)
    _check_blocks(opts)
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
    # Bias / mask keep their broadcast (size 1) axes; the mask travels as int8 (1 = attend).
    bias = _pad_bnts(inp.bias, tp, sp, 0)
    mask = None if inp.mask is None else _pad_bnts(inp.mask.astype(jnp.int8), tp, sp, 0)
    bcast = lambda x: None if x is None else tuple(dim == 1 for dim in x.shape)  # noqa: E731
    cfg = PallasConfig(
        spec=spec,
        groups=n // kh,
        has_segments=dynamic,
        bias_bcast=bcast(bias),
        mask_bcast=bcast(mask),
        interpret=interpret,
        **opts,
    )
    return cfg, (qp, kp, vp, qseg, kseg, bias, mask)


def attention_pallas(
    inp: Inputs, *, interpret: bool, blocks: dict | None = None
) -> tuple[jax.Array, jax.Array]:
    """Pallas flash attention. Returns (out (B, T, N, Hv), lse (B, T, N) f32).

    ``blocks`` overrides fields of :func:`default_blocks` (and ``split_loops``).
    """
    t, hv = inp.query.shape[1], inp.value.shape[-1]
    cfg, (qp, kp, vp, qseg, kseg, bias, mask) = _prepare(inp, interpret, blocks)
    out, lse = _flash(cfg, qp, kp, vp, qseg, kseg, bias, mask)
    out = out[:, :t, :, :hv]
    lse = jnp.swapaxes(lse, 1, 2)[:, :t]
    return out, lse


def attention_bwd_pallas(
    inp: Inputs,
    lse: jax.Array,
    dout: jax.Array,
    delta: jax.Array,
    *,
    interpret: bool,
    blocks: dict | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Pallas FlashAttention-2 backward kernels from an lse and ``delta`` that need not
    come from these keys (ring attention: the merged lse and rowsum(dout * out) - dlse of the
    whole ring), like ``_xla.attention_bwd_xla(..., delta=...)``.

    lse, delta (B, T, N) f32; dout (B, T, N, Hv). Returns (dq, dk, dv) in the input dtypes.
    Bias gradients are not returned.
    """
    q, k, v = inp.query, inp.key, inp.value
    t, s, h, hv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    cfg, (qp, kp, vp, qseg, kseg, bias, mask) = _prepare(inp, interpret, blocks)
    tp, hvp = qp.shape[1], vp.shape[-1]
    f32 = jnp.float64 if q.dtype == jnp.float64 else jnp.float32

    def rows(x, fill):  # (B, T, N) -> (B, N, Tp)
        x = jnp.swapaxes(jnp.asarray(x).astype(f32), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, tp - t)), constant_values=fill)

    do = jnp.pad(jnp.asarray(dout).astype(q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, hvp - hv)))
    cfg = dataclasses.replace(cfg, bias_grad=False)
    dq, dk, dv, _ = _backward(
        cfg, qp, kp, vp, qseg, kseg, bias, mask, None, rows(lse, -jnp.inf), do, None,
        delta=rows(delta, 0.0),
    )  # fmt: skip
    return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :hv]
