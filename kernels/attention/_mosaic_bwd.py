"""Hopper flash-attention backward in Mosaic GPU (Pallas ``plgpu``): wgmma, TMA, warp groups.

The backward of ``_mosaic._forward`` (FlashAttention-2/3 formulation), from the saved output and
float32 lse, selected by ``_mosaic.MOSAIC_BACKWARD`` (by default for the shapes checked on a GPU,
see :func:`checked`). Two kernels, each with two compute
warpgroups of 64 rows and one TMA producer warpgroup that feeds a ring of ``stages`` shared-memory
slots ("loaded" barriers per slot; one "consumed" barrier with two arrivals per slot):

* dK/dV: a CTA owns ``2 * 64`` key rows of one (batch, key/value head) and walks, for each of the
  ``G`` query heads of that key/value head (GQA summed inside, no per-head copies), the query
  blocks some of its keys see (causal / window / key length). The producer loads, per step, the
  Q tile, the dO tile and the (lse, delta) rows. Per step: S^T = K Q^T, P^T = exp2(S^T c - lse),
  dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
* dQ: a CTA owns ``2 * 64`` query rows of one (batch, head) (like the forward) and walks the key
  blocks they see; the producer loads K/V blocks. S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.

``delta = rowsum(dO * O) - dlse`` is computed in XLA beforehand. A fully masked query row (lse =
-inf) gets lse = +1e30 here, so its probabilities are exactly 0 (zero gradients, never NaN). Query
rows past T (padding) have dO = 0 and delta = 0, so they add nothing. Blocks whose every entry a
warpgroup sees run without the mask. Soft cap: dS is multiplied by 1 - tanh^2.

Interpret mode (tests) runs the same kernels in JAX's Mosaic GPU interpreter with the forward's
substitutions: the matmuls are ``lax.dot_general`` on the shared-memory tiles (its wgmma takes no
transposed or register operand and it has no ``run_state``), and register layouts are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import _mosaic, _pallas
from ._common import MaskSpec

_LOG2E = math.log2(math.e)
_BIG = 1e30
ROWS = 64  # rows per compute warpgroup (wgmma's M)


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Static options of the two backward kernels."""

    spec: MaskSpec
    groups: int
    block_q: int = ROWS  # dQ: query rows per warpgroup; dK/dV: query rows per step
    block_k: int = 64  # dQ: key rows per step
    stages_dq: int = 2
    stages_dkdv: int = 2
    has_lengths: bool = False
    has_segments: bool = False  # folded segment ids and per-tile block ranges as inputs
    interpret: bool = False


def smem_dq(block_k: int, stages: int, hp: int, hvp: int, itemsize: int = 2) -> int:
    """Shared memory of a dQ CTA: Q and dO tiles, lse/delta rows, the K/V ring, barriers."""
    own = 2 * ROWS * (hp + hvp) * itemsize + 2 * 2 * ROWS * 4
    return own + stages * block_k * (hp + hvp) * itemsize + 64 * (3 * stages + 8)


def smem_dkdv(block_q: int, stages: int, hp: int, hvp: int, itemsize: int = 2) -> int:
    """Shared memory of a dK/dV CTA: K and V tiles, the Q/dO/(lse, delta) ring, barriers."""
    own = 2 * ROWS * (hp + hvp) * itemsize
    ring = stages * (block_q * (hp + hvp) * itemsize + 2 * block_q * 4)
    return own + ring + 64 * (4 * stages + 8)


# (padded head dim, value head dim, dtype) combinations whose compiled Mosaic backward matched the
# reference on a GPU (session 5, H200: causal GQA ragged at 64, key lengths and packed ids at 128).
# MOSAIC_BACKWARD="auto" takes the Mosaic backward only for these; benchmarks/gpu_attention.py
# --parts mosaic_bwd checks every case with it, the evidence for widening this set.
CHECKED: frozenset = frozenset({(64, 64, "bfloat16"), (128, 128, "bfloat16")})


def checked(hp: int, hvp: int, dtype) -> bool:
    """True when the compiled backward has been checked on a GPU for these padded head dims and
    this dtype (:data:`CHECKED`); their tiles also fit in shared memory with two stages."""
    return (hp, hvp, jnp.dtype(dtype).name) in CHECKED


def default_config(hp: int, hvp: int) -> dict:
    """Two stages where they fit in shared memory (head dims up to 128), else one.

    Measured on an H200 at H=128 only (session 5: 436 TFLOP/s causal bf16 T=8192).
    """
    s_dq = 2 if smem_dq(64, 2, hp, hvp) <= _mosaic.SMEM_BYTES else 1
    s_kv = 2 if smem_dkdv(ROWS, 2, hp, hvp) <= _mosaic.SMEM_BYTES else 1
    return dict(block_q=ROWS, block_k=64, stages_dq=s_dq, stages_dkdv=s_kv)


_i32 = _mosaic._i32
_cdiv = _mosaic._cdiv
_dot = _mosaic._dot


def _q_steps(cfg: BwdConfig, k0, rows: int, s_end):
    """Query blocks [lo, hi) (of block_q rows) that some key of [k0, k0 + rows) is seen by."""
    left, right = _pallas._bounds(cfg.spec)
    bq = cfg.block_q
    lo = jnp.minimum(k0, _i32(0))  # 0, traced (see _mosaic._steps)
    if right is not None:
        lo = lax.div(jnp.maximum(k0 - _i32(right), _i32(0)), _i32(bq))
    end = _i32(cfg.spec.t)  # query rows past T are padding (dO = 0): skipped
    if left is not None:
        end = jnp.minimum(jnp.maximum(k0 + _i32(rows + left), _i32(0)), end)
    hi = jnp.maximum(_cdiv(end, bq), lo)
    hi = jnp.where(k0 < s_end, hi, lo)  # every key of the CTA is padding
    return lo, hi


def _full_q_steps(cfg: BwdConfig, r0, lo, hi, s_end):
    """Sub-range [flo, fhi) of [lo, hi) where every key of [r0, r0 + 64) sees every query."""
    left, right = _pallas._bounds(cfg.spec)
    bq = cfg.block_q
    flo = lo
    if right is not None:  # q >= k - right for the last key
        flo = _cdiv(jnp.maximum(r0 + _i32(ROWS - 1 - right), _i32(0)), bq)
    fhi = hi
    if left is not None:  # q <= k + left for the first key
        fhi = lax.div(jnp.maximum(r0 + _i32(left + 1), _i32(0)), _i32(bq))
    flo = jnp.minimum(jnp.maximum(flo, lo), hi)
    fhi = jnp.minimum(jnp.maximum(fhi, flo), hi)
    fhi = jnp.where(r0 + _i32(ROWS) <= s_end, fhi, flo)  # a padded key inside: all masked
    return flo, fhi


def _interpret_params(cfg: BwdConfig):
    if not cfg.interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _helpers(cfg: BwdConfig, shape: tuple[int, int]):
    wgmma_layout = plgpu.Layout.WGMMA
    cap = cfg.spec.soft_cap
    c = cfg.spec.scale * _LOG2E

    def laid_out(x, layout):
        return _mosaic.laid_out(x, layout, cfg.interpret)

    def iota(dim: int):
        return _mosaic.iota(shape, dim, cfg.interpret)

    def row_vec(ref, dim: int):
        """A (rows,) f32 smem vector in registers, broadcast later along ``dim``'s other axis."""
        if cfg.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=wgmma_layout.reduce(dim))

    def probs(qk, lse2, lse_dim: int):
        """P (and tanh for the soft cap) from raw logits q.k; lse2 in base-2 units."""
        th = None
        if cap is None:
            z = qk * c
        else:
            th = jnp.tanh(qk * (cfg.spec.scale / cap))
            z = th * (cap * _LOG2E)
        return jnp.exp2(z - lax.broadcast_in_dim(lse2, qk.shape, [lse_dim])), th

    def d_logits(p, dp, delta, th, delta_dim: int):
        ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [delta_dim]))
        if th is not None:
            ds = ds * (1.0 - th * th)
        return ds

    return laid_out, iota, row_vec, probs, d_logits


def _tiled():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


# ------------------------------------------------------------------------------------ dK / dV


def _dkdv(cfg: BwdConfig, q, k, v, do, stats, lens, seg=None):
    """dK (B, Sp, K, Hp), dV (B, Sp, K, Hvp); Sp a multiple of 128, Tp of block_q.

    ``seg`` (with ``cfg.has_segments``): (qseg (B, Tp), kseg (B, Sp), ranges (B, Sp // 128, 2))
    int32: a key sees a query only with the same id; key tile i walks query blocks
    [ranges[i, 0], ranges[i, 1]) at most.
    """
    b, tp, n, hp = q.shape
    sp, kh, hvp = k.shape[1], k.shape[2], v.shape[3]
    g, bq, stages = cfg.groups, cfg.block_q, cfg.stages_dkdv
    nkt = sp // (2 * ROWS)
    dtype = q.dtype
    left, right = _pallas._bounds(cfg.spec)
    laid_out, iota, row_vec, probs, d_logits = _helpers(cfg, (ROWS, bq))
    wgmma_layout = plgpu.Layout.WGMMA

    segs = cfg.has_segments

    def body(q_ref, k_ref, v_ref, do_ref, st_ref, len_ref, seg_refs, dk_ref, dv_ref, smem, bars):
        k_smem, v_smem, q_ring, do_ring, st_ring, *seg_smem = smem
        kseg_smem, qseg_ring = seg_smem if segs else (None, None)
        qseg_ref, kseg_ref, rng_ref = seg_refs if segs else (None, None, None)
        k_loaded, v_loaded, q_loaded, do_loaded, st_loaded, consumed = bars
        bi = lax.axis_index("batch")
        kvh = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile = lax.axis_index("k_seq")
        base = tile * _i32(2 * ROWS)
        s_end = _i32(min(cfg.spec.s, sp))
        if len_ref is not None:
            s_end = jnp.minimum(jnp.maximum(len_ref[bi], _i32(0)), s_end)
        lo, hi = _q_steps(cfg, base, 2 * ROWS, s_end)
        if segs:  # only the query blocks whose ids can meet this key tile's
            lo, hi = _mosaic.narrow(lo, hi, rng_ref, bi, tile)
        nsteps = hi - lo
        total = nsteps * _i32(g)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            r0 = base + wg * _i32(ROWS)
            kt, vt = k_smem.at[wg], v_smem.at[wg]
            rows = (bi, pl.ds(r0, ROWS), kvh)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], kt, k_loaded.at[wg])
            if segs:  # this warpgroup's key ids, a second arrival on the K barrier
                ks_smem = kseg_smem.at[wg]
                plgpu.copy_gmem_to_smem(kseg_ref.at[bi, pl.ds(r0, ROWS)], ks_smem, k_loaded.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], vt, v_loaded.at[wg])
            plgpu.barrier_wait(k_loaded.at[wg])
            plgpu.barrier_wait(v_loaded.at[wg])
            kseg_own = _mosaic.vec(ks_smem, 0, cfg.interpret) if segs else None
            flo, fhi = _full_q_steps(cfg, r0, lo, hi, s_end)
            if segs:  # every block is masked (segment ids are data)
                flo = fhi = lo

            def step(i, carry, hh, masked: bool):
                dk, dv = carry
                slot = lax.rem(hh * nsteps + i - lo, _i32(stages))
                qs, dos, st = q_ring.at[slot], do_ring.at[slot], st_ring.at[slot]
                plgpu.barrier_wait(q_loaded.at[slot])
                plgpu.barrier_wait(st_loaded.at[slot])
                qseg_blk = _mosaic.vec(qseg_ring.at[slot], 1, cfg.interpret) if segs else None

                st_ = _mosaic.mm_nt(kt, qs, (ROWS, bq), cfg.interpret)
                pt, th = probs(st_, row_vec(st.at[0], 0), 1)
                if masked:
                    kpos = iota(0) + r0
                    qpos = iota(1) + i * _i32(bq)
                    vis = _mosaic.visible(qpos, kpos, s_end, left, right)
                    if segs:
                        vis = jnp.logical_and(vis, _same(kseg_own, qseg_blk, (ROWS, bq)))
                    pt = jnp.where(vis, pt, 0.0)
                pt16 = pt.astype(dtype)
                plgpu.barrier_wait(do_loaded.at[slot])

                def dv_dp_fn(refs):
                    dv_ref, dpt_ref = refs
                    plgpu.wgmma(dv_ref, pt16, dos)
                    plgpu.wgmma(dpt_ref, vt, plgpu.transpose_ref(dos, (1, 0)))

                if cfg.interpret:
                    dv = dv + _dot(pt16, dos[...])
                    dpt = _dot(vt[...], dos[...], trans_b=True)
                else:
                    zeros = laid_out(jnp.zeros((ROWS, bq), jnp.float32), wgmma_layout)
                    dv, dpt = pl.run_state(dv_dp_fn)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
                dst = d_logits(pt, dpt, row_vec(st.at[1], 0), th, 1).astype(dtype)

                dk = _mosaic.mm_acc(dk, dst, qs, cfg.interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dk, dv

            def head(hh, carry):
                one = functools.partial(step, hh=hh)
                carry = lax.fori_loop(lo, flo, functools.partial(one, masked=True), carry)
                carry = lax.fori_loop(flo, fhi, functools.partial(one, masked=False), carry)
                return lax.fori_loop(fhi, hi, functools.partial(one, masked=True), carry)

            dk = laid_out(jnp.zeros((ROWS, hp), jnp.float32), wgmma_layout)
            dv = laid_out(jnp.zeros((ROWS, hvp), jnp.float32), wgmma_layout)
            dk, dv = lax.fori_loop(_i32(0), _i32(g), head, (dk, dv))
            kt[...] = (dk * cfg.spec.scale).astype(dtype)  # K and V tiles are free now
            vt[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(kt, dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(vt, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            per = jnp.maximum(nsteps, _i32(1))

            def load(idx, wait: bool):
                slot = lax.rem(idx, _i32(stages))
                head = kvh * _i32(g) + lax.div(idx, per)
                i = lo + lax.rem(idx, per)
                rows = (bi, pl.ds(i * _i32(bq), bq), head)
                if wait:
                    plgpu.barrier_wait(consumed.at[slot])
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_ring.at[slot], q_loaded.at[slot])
                if segs:  # the block's query ids, a second arrival on the Q barrier
                    qseg_rows = qseg_ref.at[bi, pl.ds(i * _i32(bq), bq)]
                    plgpu.copy_gmem_to_smem(qseg_rows, qseg_ring.at[slot], q_loaded.at[slot])
                plgpu.copy_gmem_to_smem(
                    st_ref.at[bi, head, :, pl.ds(i * _i32(bq), bq)],
                    st_ring.at[slot],
                    st_loaded.at[slot],
                )
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_ring.at[slot], do_loaded.at[slot])

            _mosaic.producer_ring(total, stages, load, (consumed,))

    def entry(q_ref, k_ref, v_ref, do_ref, st_ref, *refs):
        len_ref, seg_refs = _mosaic.optional_refs(refs, cfg.has_lengths, segs)
        dk_ref, dv_ref = refs[-2:]
        scratch = [
            plgpu.SMEM((2, ROWS, hp), dtype, transforms=_tiled()),
            plgpu.SMEM((2, ROWS, hvp), dtype, transforms=_tiled()),
            plgpu.SMEM((stages, bq, hp), dtype, transforms=_tiled()),
            plgpu.SMEM((stages, bq, hvp), dtype, transforms=_tiled()),
            plgpu.SMEM((stages, 2, bq), jnp.float32),
        ]
        seg_scratch, arrivals = _mosaic.segment_scratch(segs, ROWS, bq, stages)
        scratch += seg_scratch
        bars = (
            plgpu.Barrier(num_arrivals=arrivals, num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        )
        pl.run_scoped(
            lambda smem, bars: body(
                q_ref, k_ref, v_ref, do_ref, st_ref, len_ref, seg_refs, dk_ref, dv_ref, smem, bars
            ),
            scratch,
            bars,
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((b, sp, kh, hp), k.dtype),
            jax.ShapeDtypeStruct((b, sp, kh, hvp), v.dtype),
        ),
        grid=(kh, nkt, b),
        grid_names=("heads", "k_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(cfg),
    )(q, k, v, do, stats, *(() if lens is None else (lens,)), *(() if seg is None else seg))


def _same(a, b, shape):
    """Id equality (shape) of a vector along dim 0 and one along dim 1."""
    return lax.broadcast_in_dim(a, shape, [0]) == lax.broadcast_in_dim(b, shape, [1])


# ------------------------------------------------------------------------------------------ dQ


def _dq(cfg: BwdConfig, q, k, v, do, stats, lens, seg=None):
    """dQ (B, Tp, N, Hp); Tp a multiple of 2 * block_q, Sp of block_k.

    ``seg``: (qseg, kseg, ranges (B, Tp // (2 * block_q), 2)) as the forward's.
    """
    b, tp, n, hp = q.shape
    sp, hvp = k.shape[1], v.shape[3]
    bq, bk, stages = cfg.block_q, cfg.block_k, cfg.stages_dq
    nqt, ns = tp // (2 * bq), sp // bk
    dtype = q.dtype
    left, right = _pallas._bounds(cfg.spec)
    laid_out, iota, row_vec, probs, d_logits = _helpers(cfg, (bq, bk))
    wgmma_layout = plgpu.Layout.WGMMA

    segs = cfg.has_segments

    def body(q_ref, k_ref, v_ref, do_ref, st_ref, len_ref, seg_refs, dq_ref, smem, bars):
        q_smem, do_smem, st_smem, k_ring, v_ring, *seg_smem = smem
        qseg_smem, kseg_ring = seg_smem if segs else (None, None)
        qseg_ref, kseg_ref, rng_ref = seg_refs if segs else (None, None, None)
        q_loaded, do_loaded, st_loaded, k_loaded, v_loaded, consumed = bars
        bi = lax.axis_index("batch")
        head = lax.axis_index("heads")
        tile = _i32(nqt - 1) - lax.axis_index("q_seq")  # heavy (late) causal tiles first
        wg = lax.axis_index("wg")
        base = tile * _i32(2 * bq)
        s_end = _i32(min(cfg.spec.s, ns * bk))
        if len_ref is not None:
            s_end = jnp.minimum(jnp.maximum(len_ref[bi], _i32(0)), s_end)
        lo, hi = _mosaic._steps(cfg, base, 2 * bq, s_end)
        if segs:  # only the key blocks whose ids can meet this query tile's
            lo, hi = _mosaic.narrow(lo, hi, rng_ref, bi, tile)
        nsteps = hi - lo

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            r0 = base + wg * _i32(bq)
            qt, dot_, stt = q_smem.at[wg], do_smem.at[wg], st_smem.at[wg]
            rows = (bi, pl.ds(r0, bq), head)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], qt, q_loaded.at[wg])
            if segs:  # this warpgroup's query ids, a second arrival on the Q barrier
                qs_smem = qseg_smem.at[wg]
                plgpu.copy_gmem_to_smem(qseg_ref.at[bi, pl.ds(r0, bq)], qs_smem, q_loaded.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], dot_, do_loaded.at[wg])
            plgpu.copy_gmem_to_smem(st_ref.at[bi, head, :, pl.ds(r0, bq)], stt, st_loaded.at[wg])
            plgpu.barrier_wait(q_loaded.at[wg])
            plgpu.barrier_wait(do_loaded.at[wg])
            plgpu.barrier_wait(st_loaded.at[wg])
            lse2 = row_vec(stt.at[0], 1)
            delta = row_vec(stt.at[1], 1)
            qseg_own = _mosaic.vec(qs_smem, 0, cfg.interpret) if segs else None
            flo, fhi = _mosaic._full_steps(cfg, r0, lo, hi, s_end)
            if segs:  # every block is masked (segment ids are data)
                flo = fhi = lo

            def step(j, dq, masked: bool):
                slot = lax.rem(j - lo, _i32(stages))
                ks, vs = k_ring.at[slot], v_ring.at[slot]
                plgpu.barrier_wait(k_loaded.at[slot])
                kseg_blk = _mosaic.vec(kseg_ring.at[slot], 1, cfg.interpret) if segs else None

                s = _mosaic.mm_nt(qt, ks, (bq, bk), cfg.interpret)
                p, th = probs(s, lse2, 0)
                if masked:
                    qpos = iota(0) + r0
                    kpos = iota(1) + j * _i32(bk)
                    vis = _mosaic.visible(qpos, kpos, s_end, left, right)
                    if segs:
                        vis = jnp.logical_and(vis, _same(qseg_own, kseg_blk, (bq, bk)))
                    p = jnp.where(vis, p, 0.0)
                plgpu.barrier_wait(v_loaded.at[slot])

                dp = _mosaic.mm_nt(dot_, vs, (bq, bk), cfg.interpret)
                ds = d_logits(p, dp, delta, th, 0).astype(dtype)

                dq = _mosaic.mm_acc(dq, ds, ks, cfg.interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dq

            dq = laid_out(jnp.zeros((bq, hp), jnp.float32), wgmma_layout)
            dq = lax.fori_loop(lo, flo, functools.partial(step, masked=True), dq)
            dq = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), dq)
            qt[...] = (dq * cfg.spec.scale).astype(dtype)  # the query tile is free now
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qt, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, _i32(cfg.groups))

            def load(i, wait: bool):
                slot = lax.rem(i, _i32(stages))
                rows = (bi, pl.ds((lo + i) * _i32(bk), bk), kv_head)
                if wait:
                    plgpu.barrier_wait(consumed.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_ring.at[slot], k_loaded.at[slot])
                if segs:  # the block's key ids, a second arrival on the K barrier
                    kseg_rows = kseg_ref.at[bi, pl.ds((lo + i) * _i32(bk), bk)]
                    plgpu.copy_gmem_to_smem(kseg_rows, kseg_ring.at[slot], k_loaded.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_ring.at[slot], v_loaded.at[slot])

            _mosaic.producer_ring(nsteps, stages, load, (consumed,))

    def entry(q_ref, k_ref, v_ref, do_ref, st_ref, *refs):
        len_ref, seg_refs = _mosaic.optional_refs(refs, cfg.has_lengths, segs)
        dq_ref = refs[-1]
        scratch = [
            plgpu.SMEM((2, bq, hp), dtype, transforms=_tiled()),
            plgpu.SMEM((2, bq, hvp), dtype, transforms=_tiled()),
            plgpu.SMEM((2, 2, bq), jnp.float32),
            plgpu.SMEM((stages, bk, hp), dtype, transforms=_tiled()),
            plgpu.SMEM((stages, bk, hvp), dtype, transforms=_tiled()),
        ]
        seg_scratch, arrivals = _mosaic.segment_scratch(segs, bq, bk, stages)
        scratch += seg_scratch
        bars = (
            plgpu.Barrier(num_arrivals=arrivals, num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        )
        pl.run_scoped(
            lambda smem, bars: body(
                q_ref, k_ref, v_ref, do_ref, st_ref, len_ref, seg_refs, dq_ref, smem, bars
            ),
            scratch,
            bars,
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((b, tp, n, hp), q.dtype),
        grid=(n, nqt, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(cfg),
    )(q, k, v, do, stats, *(() if lens is None else (lens,)), *(() if seg is None else seg))


# ------------------------------------------------------------------------------------- driver


def backward(
    mcfg: _mosaic.MosaicConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lens: jax.Array | None,
    out: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    dlse: jax.Array,
    blocks: dict | None = None,
    seg: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of ``_mosaic._forward`` w.r.t. q, k, v (padded shapes, as the forward's).

    q (B, Tp, N, Hp), k (B, Sp, K, Hp), v (B, Sp, K, Hvp), out / do (B, Tp, N, Hvp), lse / dlse
    (B, N, Tp) f32 (natural log; -inf for fully masked rows), lens (B,) int32 key lengths or None.
    Tp is a multiple of 128; Sp is padded here to a multiple of 128. ``blocks`` overrides
    :func:`default_config`. ``seg``: the forward's folded (qseg (B, Tp), kseg (B, Sp)) int32
    segment ids (keys that no query may see carry an id below every query's); each kernel then
    masks by id equality and walks only the blocks whose id ranges meet its tile's.
    """
    b, tp, n, hp = q.shape
    sp, hvp = k.shape[1], v.shape[3]
    opts = default_config(hp, hvp)
    opts.update(blocks or {})
    if opts["block_k"] not in (64, 128):
        raise ValueError(f"block_k: expected 64 or 128 for the mosaic backward, got {opts}")
    if opts["block_q"] != ROWS:
        raise ValueError(f"block_q: expected {ROWS} for the mosaic backward, got {opts}")
    for name, need in (
        ("stages_dq", smem_dq(opts["block_k"], opts["stages_dq"], hp, hvp)),
        ("stages_dkdv", smem_dkdv(ROWS, opts["stages_dkdv"], hp, hvp)),
    ):
        if opts[name] < 1 or need > _mosaic.SMEM_BYTES:
            raise ValueError(
                f"{name}: {opts[name]} stages need {need // 1024} KiB of shared memory for head "
                f"dims {hp}/{hvp}, expected >= 1 stage and <= {_mosaic.SMEM_BYTES // 1024} KiB"
            )
    if tp % (2 * ROWS):
        raise ValueError(f"query: padded length {tp} must be a multiple of {2 * ROWS}")
    cfg = BwdConfig(
        spec=mcfg.spec,
        groups=mcfg.groups,
        has_lengths=lens is not None,
        has_segments=seg is not None,
        interpret=mcfg.interpret,
        **opts,
    )
    mult = math.lcm(2 * ROWS, cfg.block_k)
    sp2 = -(-sp // mult) * mult
    if sp2 != sp:  # the extra keys are past spec.s: masked
        pad = ((0, 0), (0, sp2 - sp), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    seg_dq = seg_kv = None
    if seg is not None:
        qseg, kseg = (x.astype(jnp.int32) for x in seg)
        low = jnp.min(qseg)
        kseg = jnp.pad(kseg, ((0, 0), (0, sp2 - sp)), constant_values=low - 1)
        kvalid = kseg >= low  # lower ids are the forward's "never seen" keys
        kpos = jnp.arange(sp2, dtype=jnp.int32)[None, :]
        kvalid = kvalid & (kpos < mcfg.spec.s)
        if lens is not None:
            kvalid = kvalid & (kpos < lens[:, None])
        qvalid = jnp.broadcast_to(jnp.arange(tp)[None, :] < mcfg.spec.t, qseg.shape)
        rq = _mosaic._segment_ranges(qseg, kseg, kvalid, 2 * ROWS, cfg.block_k, qvalid)
        rk = _mosaic._segment_ranges(kseg, qseg, qvalid, 2 * ROWS, cfg.block_q, kvalid)
        seg_dq, seg_kv = (qseg, kseg, rq), (qseg, kseg, rk)

    dead = lse == -jnp.inf  # fully masked rows: P = exp2(z - 1e30) = 0 exactly
    f32 = jnp.float32
    delta = jnp.swapaxes(jnp.sum(do.astype(f32) * out.astype(f32), axis=-1), 1, 2) - dlse
    delta = jnp.where(dead, 0.0, delta)
    lse2 = jnp.where(dead, _BIG, lse) * _LOG2E
    stats = jnp.stack([lse2, delta], axis=2).astype(f32)  # (B, N, 2, Tp)
    do = do.astype(q.dtype)
    if lens is not None:
        lens = lens.astype(jnp.int32)

    dq = _dq(cfg, q, k, v, do, stats, lens, seg_dq)
    dk, dv = _dkdv(cfg, q, k, v, do, stats, lens, seg_kv)
    return dq, dk[:, :sp], dv[:, :sp]
