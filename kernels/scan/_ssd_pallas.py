"""Pallas forward kernels for Mamba-2 SSD (Triton lowering on GPU; ``interpret=True`` on CPU).

Mamba-2's chunked algorithm as three kernels that are parallel over chunks (chunk length Q):

1. chunk states, grid (H, chunks, B): S_c = sum_s exp(cum_last - cum_s) dt_s x_s B_s^T, the
   state chunk c leaves when it starts from zero, (P, N) in the state dtype (f32), and the
   chunk's total log decay cum_last;
2. state passing, grid (state blocks, H, B): a short sequential pass over the chunks per
   (batch, head, block of the flattened P*N state), S_in[c+1] = exp(cum_last[c]) S_in[c] + S_c
   from the initial state (zeros when None, not read); writes each chunk's start state in the
   dot dtype (bf16 for bf16 inputs: phase 3 feeds it to a bf16 matmul anyway) and the final
   state (f32);
3. outputs, grid (row blocks, head blocks, chunks, B): for a block of bm rows of the chunk,
   y = exp(cum) * (C S_in^T) + sum over column blocks k <= m of ((C B_k^T) * decay * dt_k) x_k
   (decay_ij = exp(cum_i - cum_j), masked to j <= i), + D * x, written in x's dtype; with
   SSD_HEADS_PER_PROGRAM > 1 a program serves several heads of one B/C group and computes each
   C B^T block once for them.

With ``SSD_KERNEL = "fused"`` (see its comment) the per-chunk states never reach HBM: phases 1
and 2 run over segments of several chunks, and one kernel per (P block, head, segment, batch)
walks its segment's chunks with the state in registers, writing y as it goes.

The cumulative in-chunk log decay cum_s = sum_{t<=s in the chunk} dt_t A is computed in the
kernels (per block of rows: an offset plus a cumsum), so x, dt, A, B, C and D are read as they
come (bf16 or f32), with no XLA prologue unless padding or segment_ids need one. Dots take bf16
operands with f32 accumulation for bf16 inputs (as Mamba-2's Triton kernels), and f32 operands
at ``Precision.HIGHEST`` (IEEE, not TF32) for f32 inputs. The first grid axis is the
fastest-varying one in launch order, so programs sharing a chunk of B/C (heads of a group) or
of x (row blocks) run close together and hit L2.

Resets (``segment_ids``): each step's segment relative to the one carried into its chunk
(B, nc, Q) int32 comes from the prologue; phase 1 keeps only the chunk's last segment, phase 2
drops the carried state across a chunk with a reset (decay 0), phase 3 masks the intra-chunk
matrix to equal segments and reads the carried state out only in the carried segment (0).

Ragged shapes: L is padded up to a multiple of Q (dt = 0: the state is unchanged; only when
L % Q != 0), P and N up to powers of two >= 16 (zeros; only when they are not), so every load,
store and dot has power-of-two shapes >= 16 as Triton needs.

Derivatives: a ``custom_jvp`` whose rule (used only when differentiating) is the JVP of the XLA
``ssd`` ("chunked" on CPU, "matmul" elsewhere); reverse mode transposes it (the XLA
implementation's backward), forward mode runs it; undifferentiated calls run the Pallas
kernels. On an H200 (session 5, B=2 L=8192 H=16 P=64 N=64 bf16) the Pallas forward took
0.12-0.14 ms and the "matmul" one 1.32 ms (chunk 256).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxcore import backend, checks

from ._common import pad_time, reset_mask, split_for_programs

Array = Any

# (chunk length Q used when chunk_size=None, rows/columns per block inside a chunk, warps,
# software-pipeline stages) of phases 1 and 3. Read at trace time; benchmarks/gpu_scan.py sweeps
# it. On an H200 (session 5, B=2 L=8192 H=16 P=64 N=64 bf16, two runs) Q=128 took 0.124 /
# 0.129 ms, Mamba-2's own Q=256 0.137 / 0.137 ms, Q=512 0.169 / 0.170 ms (64-row blocks, 4 warps).
SSD_CONFIG: tuple[int, int, int, int] = (128, 64, 4, 2)

# Phase 2: (elements of the flattened (P*N) state per program, warps, steps loaded ahead).
SSD_PASS_CONFIG: tuple[int, int, int] = (512, 4, 4)

# Phase 3: heads per program (at most; the largest divisor of the heads per B/C group). The
# heads of one program share each C B^T block, half of the intra-chunk matmul work, at the cost
# of one (rows x P) f32 accumulator per head in registers. Not yet measured on a GPU.
SSD_HEADS_PER_PROGRAM: int = 1


# Kernel design (read at trace time): "three_phase" (the three kernels above) or "fused": a
# single pass over x for the outputs, in three kernels:
#   A. segment states, grid (H, segments - 1, B): phase 1's kernel over segments of
#      ``chunks per segment x Q`` steps (only the state each segment leaves from zero);
#   B. segment passing: phase 2's kernel over the segments (start states kept in f32);
#   C. fused outputs, grid (P blocks, H, segments, B): each program walks the chunks of its
#      segment in order, carrying the (P block, N) state in registers from the segment's start
#      state: per chunk y = ((C B^T) * decay * dt) x + exp(cum) C S^T + D x, then
#      S = exp(last) S + (x * exp(last - cum) dt)^T B. The last segment writes the final state.
# Its HBM traffic is x, B, C, dt read twice at most (A reads x/B/dt, C reads all) and y written
# once; the per-chunk states of "three_phase" (B*H*L/Q*P*N f32, written, read and re-written)
# never leave the chip. The segment count is the smallest giving about ``programs`` programs
# in C. Not yet measured on a GPU (benchmarks/gpu_scan.py times both designs in one run).
SSD_KERNEL: str = "three_phase"
SSD_KERNELS: tuple[str, ...] = ("three_phase", "fused")

# "fused": (chunk length Q when chunk_size=None (the whole Q x Q intra-chunk tile in
# registers), columns of P per program, warps, software-pipeline stages, target programs).
SSD_FUSED_CONFIG: tuple[int, int, int, int, int] = (64, 64, 4, 2, 512)


class _Cfg(NamedTuple):
    q: int  # chunk length
    bm: int  # rows (and columns) per block inside a chunk
    warps: int
    stages: int
    pass_block: int
    pass_warps: int
    prefetch: int
    interpret: bool
    xla_impl: str  # XLA implementation differentiated in the backward
    hb: int = 1  # phase 3: heads per program (dividing the heads per group)
    kernel: str = "three_phase"  # SSD_KERNEL
    bp: int = 64  # "fused": columns of P per program of kernel C (capped at the padded P)
    programs: int = 512  # "fused": target number of programs of kernel C


def _pow2_at_least(n: int, lo: int = 1) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _params(interpret: bool, warps: int, stages: int):
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _dot(a: Array, b: Array, acc, trans_a: bool = False, trans_b: bool = False) -> Array:
    """2-D matmul accumulated in ``acc``; the transposes stay in the dot; IEEE for f32."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def _i32(v: int) -> Array:
    return np.int32(v)


def _log_decays(dt_ref, head, a, rows, off):
    """dt (in a's dtype), the cumulative log decay off + cumsum(dt * a) of the chunk's steps
    ``rows``, and its total off + sum(dt * a) (the next block's ``off``); off, a: (1,).
    ``head``: None for a (Q,) dt ref, else the column of a (Q, heads) one.
    (Triton has no slices of loaded values: the total is a sum, not the cumsum's last entry.)"""
    dt = (dt_ref[rows] if head is None else dt_ref[rows, head]).astype(a.dtype)
    da = dt * a
    return dt, off + jnp.cumsum(da), off + jnp.sum(da)


# pl.CostEstimate of each kernel: whole-grid totals from the static (padded) shapes the kernels
# compute on (Lp, Pp, Np: padded work counted). flops: float arithmetic per element (a
# multiply-add = 2, a dot 2 M N K, a sum over n values n adds; selects, compares, casts and
# index math not counted); transcendentals: exp evaluated; bytes: every load and store the
# programs issue to HBM (data read by several programs counted each time).


def _isz(v: Any) -> int:
    """Bytes per element of ``v`` (0 for None)."""
    return 0 if v is None else int(jnp.dtype(v.dtype).itemsize)


def _estimate(flops: float, transcendentals: float, bytes_accessed: float) -> Any:
    return pl.CostEstimate(
        flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed)
    )


def _cost_chunk_states(x, b, dt, a, seg, cfg: _Cfg, acc, nc: int, local: bool = False) -> Any:
    """Phase 1, per (head, chunk, batch) program over the Q steps of its chunk: the total log
    decay (dt a and its sum: 2 flops per step, dt read once; not with ``local``), then per block
    of bk rows dt read again, its log decay (dt a, cumsum, + offset, block sum: 4 per step),
    w = exp(last - cum) dt (2 flops + 1 exp per step), x w (Pp per step), the (Pp, bk) @ (bk,
    Np) dot (2 Pp Np per step) and its accumulation (Pp Np per block); with ``local`` also the
    state's rescaling per block (1 exp, Pp Np flops). Reads x (Pp), B (Np), seg (int32) per
    step, A and seg's last entry per program; writes the (Pp, Np) state and the log decay
    (acc)."""
    bsz, _, heads, pp = x.shape
    npad = b.shape[3]
    lp, bk = nc * cfg.q, min(cfg.bm, cfg.q)  # the steps of the ``nc`` chunks computed
    blocks = lp // bk
    flops = lp * (6 + 2 * (not local) + pp + 2 * pp * npad) + blocks * pp * npad * (1 + local)
    nbytes = lp * ((2 - local) * _isz(dt) + pp * _isz(x) + npad * _isz(b) + _isz(seg))
    nbytes += nc * (_isz(a) + _isz(seg) + (pp * npad + 1) * jnp.dtype(acc).itemsize)
    bh = bsz * heads
    return _estimate(bh * flops, bh * (lp + local * blocks), bh * nbytes)


def _cost_pass_states(states, log_decay, h0, bf: int, depth: int, mm) -> Any:
    """Phase 2, per (state block, head, batch) program: nc steps h = d h + s (2 flops per state
    element) and nc + depth fetches (the ring loads ``depth`` chunks past the end, clamped) of
    a (bf,) state block and one log decay, exponentiated (1 exp per fetch); reads h0 (if
    given), writes every chunk's start state (in ``mm``) and the final state (acc)."""
    bsz, heads, nc, f = states.shape
    fetches = bsz * heads * (f // bf) * (nc + depth)
    nbytes = fetches * (bf * _isz(states) + _isz(log_decay))
    nbytes += bsz * heads * f * (_isz(h0) + nc * jnp.dtype(mm).itemsize + _isz(states))
    return _estimate(2 * bsz * heads * nc * f, fetches, nbytes)


def _cost_outputs(x, b, c, dt, a, starts, d, seg, cfg: _Cfg) -> Any:
    """Phase 3, per (row block m, head block, chunk, batch) program (bm rows, hb heads): per
    head, the offset (dt a, masked sum over the chunk: 2 Q flops, dt read), the rows' log decay
    (4 per row), exp (1 per row), the (bm, Np) @ (Np, Pp) read-out of the start state and its
    scaling (2 bm Pp Np + bm Pp), D x (2 bm Pp, x rows re-read); then m + 1 column blocks k <= m
    (causal: nm (nm + 1) / 2 per chunk, not nm^2): C B_k^T (2 bm^2 Np, once for the hb
    heads), per head the columns' log decay (4 bm), the decay (cum_i - cum_j: bm^2, exp: bm^2
    transcendentals), w = cb decay dt (2 bm^2), w @ x_k (2 bm^2 Pp) and its accumulation
    (bm Pp). Reads C rows, the start states, seg; per column block B_k, x_k, dt, seg; writes
    y (bm, hb, Pp) in x's dtype."""
    bsz, lp, heads, pp = x.shape
    npad = b.shape[3]
    q, bm = cfg.q, min(cfg.bm, cfg.q)
    nc, nm = lp // q, q // bm
    tri = nm * (nm + 1) // 2  # column blocks visited per (head block, chunk, batch)
    has_d = d is not None
    dsize = 0 if d is None else (1 if d.ndim == 1 else pp)
    # per (chunk, batch) and head: nm row blocks and ``tri`` column blocks
    flops = nm * (2 * q + 4 * bm + bm * pp * (1 + 2 * npad + 2 * has_d))
    flops += tri * (4 * bm + 3 * bm * bm + 2 * bm * bm * pp + bm * pp)
    trans = nm * bm + tri * bm * bm
    nbytes = nm * (_isz(a) + (q + bm) * _isz(dt) + pp * npad * _isz(starts) + bm * pp * _isz(x))
    nbytes += nm * (dsize * _isz(d) + has_d * bm * pp * _isz(x))
    nbytes += tri * bm * (_isz(dt) + pp * _isz(x))
    per_head_block = nm * bm * (npad * _isz(c) + _isz(seg)) + tri * bm * (
        npad * _isz(b) + _isz(seg)
    )
    # C B_k^T is computed once per head block
    flops_hb = tri * 2 * bm * bm * npad
    groups = bsz * nc * (heads // cfg.hb)
    total = lambda per_head, per_hb: bsz * nc * heads * per_head + groups * per_hb
    return _estimate(total(flops, flops_hb), total(trans, 0), total(nbytes, per_head_block))


def _chunk_states(x, b, dt, a, seg, cfg: _Cfg, acc, mm, count: int | None = None,
                  local: bool = False):  # fmt: skip
    """Phase 1: x (B, Lp, H, Pp), b (B, Lp, G, Np), dt (B, Lp, H), a (H,), seg (B, nc, Q) or
    None -> (chunk states (B, H, nc, Pp, Np), chunk log decays (B, H, nc), -inf where a reset
    inside the chunk drops the carried state), for the first ``count`` chunks (None: all).

    The state is accumulated over blocks of ``bm`` rows. By default each row's weight is
    exp(last - cum) with cum running over the whole chunk. With ``local`` (the "fused" design's
    segments of thousands of steps), cum restarts in every block and the state is rescaled by
    the block's total decay, so that the f32 log decays never grow past one block's and lose
    no digits over a long segment."""
    bsz, lp, heads, pp = x.shape
    g, npad = b.shape[2], b.shape[3]
    r = heads // g
    q = cfg.q
    nc = lp // q if count is None else count
    bk = min(cfg.bm, q)
    has_seg = seg is not None

    def kernel(x_ref, b_ref, dt_ref, a_ref, *rest):
        seg_ref, s_ref, ld_ref = rest if has_seg else (None, *rest)
        av = a_ref[...].astype(acc)  # (1,)
        zero = jnp.zeros((1,), acc)
        if not local:
            last = jnp.sum(dt_ref[...].astype(acc) * av)  # the chunk's total log decay
        if has_seg:
            last_seg = seg_ref[pl.ds(_i32(q - 1), 1)]  # (1,)

        def body(k, carry):
            s, off = carry
            rows = pl.ds(k * bk, bk)
            if local:  # block-local log decays; the state so far decays by the block's total
                dtk, cum, tot = _log_decays(dt_ref, None, av, rows, zero)
                w = jnp.exp(tot - cum) * dtk
                s, off = jnp.exp(tot)[:, None] * s, off + tot
            else:
                dtk, cum, off = _log_decays(dt_ref, None, av, rows, off)
                w = jnp.exp(last - cum) * dtk  # (bk,)
            if has_seg:  # only the chunk's last segment reaches the state it leaves
                w = jnp.where(seg_ref[rows] == last_seg, w, 0.0)
            xw = (x_ref[rows, :].astype(acc) * w[:, None]).astype(mm)  # (bk, Pp)
            return s + _dot(xw, b_ref[rows, :].astype(mm), acc, trans_a=True), off

        init = (jnp.zeros((pp, npad), acc), zero)
        s, total = lax.fori_loop(_i32(0), _i32(q // bk), body, init)
        s_ref[...] = s.astype(s_ref.dtype)
        ld = total if local else jnp.broadcast_to(last, (1,))
        if has_seg:  # a reset inside the chunk (its last segment is not the carried one: 0)
            ld = jnp.where(last_seg == 0, ld, -jnp.inf)
        ld_ref[...] = ld.astype(ld_ref.dtype)

    in_specs = [
        pl.BlockSpec((None, q, None, pp), lambda h, c, i: (i, c, h, 0)),
        pl.BlockSpec((None, q, None, npad), lambda h, c, i: (i, c, h // r, 0)),
        pl.BlockSpec((None, q, None), lambda h, c, i: (i, c, h)),
        pl.BlockSpec((1,), lambda h, c, i: (h,)),
    ]
    args = [x, b, dt, a]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, None, q), lambda h, c, i: (i, c, 0)))
        args.append(seg)
    return backend.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, heads, nc, pp, npad), acc),
            jax.ShapeDtypeStruct((bsz, heads, nc), acc),
        ),
        grid=(heads, nc, bsz),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, None, None, pp, npad), lambda h, c, i: (i, h, c, 0, 0)),
            pl.BlockSpec((None, None, 1), lambda h, c, i: (i, h, c)),
        ),
        interpret=cfg.interpret,
        compiler_params=_params(cfg.interpret, cfg.warps, cfg.stages),
        name="jaxcore_ssd_chunk_states",
        cost_estimate=_cost_chunk_states(x, b, dt, a, seg, cfg, acc, nc, local),
    )(*args)


def _pass_states(states, log_decay, h0, cfg: _Cfg, acc, mm):
    """Phase 2: states (B, H, nc, F), log_decay (B, H, nc), h0 (B, H, F) or None (zeros) ->
    the state entering each chunk (B, H, nc, F) in ``mm`` and the final state (B, H, F) in
    ``acc``."""
    bsz, heads, nc, f = states.shape
    bf = min(cfg.pass_block, f)
    depth = max(1, cfg.prefetch)
    has_h0 = h0 is not None

    def kernel(s_ref, d_ref, *rest):
        h0_ref, st_ref, ht_ref = rest if has_h0 else (None, *rest)

        def fetch(c):
            cc = jnp.minimum(c, nc - 1)  # loads past the last chunk: prefetch only, unused
            return s_ref[cc, :].astype(acc), jnp.exp(d_ref[pl.ds(cc, 1)].astype(acc))

        def body(c, carry):
            h, queue = carry
            st_ref[c, :] = h.astype(st_ref.dtype)
            s, d = queue[0]
            return d * h + s, queue[1:] + (fetch(c + depth),)

        queue = tuple(fetch(_i32(k)) for k in range(depth))
        h = h0_ref[...].astype(acc) if has_h0 else jnp.zeros((bf,), acc)
        h, _ = lax.fori_loop(_i32(0), _i32(nc), body, (h, queue))
        ht_ref[...] = h.astype(ht_ref.dtype)

    vec = pl.BlockSpec((None, None, bf), lambda j, h, i: (i, h, j))
    return backend.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, heads, nc, f), mm),
            jax.ShapeDtypeStruct((bsz, heads, f), acc),
        ),
        grid=(f // bf, heads, bsz),
        in_specs=[
            pl.BlockSpec((None, None, nc, bf), lambda j, h, i: (i, h, 0, j)),
            pl.BlockSpec((None, None, nc), lambda j, h, i: (i, h, 0)),
            *([vec] if has_h0 else []),
        ],
        out_specs=(pl.BlockSpec((None, None, nc, bf), lambda j, h, i: (i, h, 0, j)), vec),
        interpret=cfg.interpret,
        compiler_params=_params(cfg.interpret, cfg.pass_warps, 1),
        name="jaxcore_ssd_state_passing",
        cost_estimate=_cost_pass_states(states, log_decay, h0, bf, depth, mm),
    )(states, log_decay, *([h0] if has_h0 else []))


def _outputs(x, b, c, dt, a, starts, d, seg, cfg: _Cfg, acc, mm):
    """Phase 3: y (B, Lp, H, Pp) in x's dtype from the inputs and the chunk start states
    ``starts`` (B, H, nc, Pp, Np); d: (H,), (H, Pp) or None; seg: (B, nc, Q) or None.

    Each program computes a block of ``bm`` rows of one chunk for ``cfg.hb`` heads of one
    group: each C B^T block once, then per head its decay, dt and x (heads unrolled)."""
    bsz, lp, heads, pp = x.shape
    g, npad = b.shape[2], b.shape[3]
    r = heads // g
    q, nc = cfg.q, lp // cfg.q
    bm = min(cfg.bm, q)
    nm = q // bm
    hb = cfg.hb
    has_d, has_seg = d is not None, seg is not None

    def kernel(x_ref, b_ref, c_ref, dt_ref, a_ref, s_ref, *rest):
        rest = list(rest)
        d_ref = rest.pop(0) if has_d else None
        seg_ref = rest.pop(0) if has_seg else None
        (y_ref,) = rest
        m = pl.program_id(0)
        rows = pl.ds(m * bm, bm)
        cm = c_ref[rows, :].astype(mm)  # (bm, Np), shared by the hb heads
        seg_m = seg_ref[rows] if has_seg else None
        before = lax.broadcasted_iota(jnp.int32, (q,), 0) < m * bm
        avs, cums, ys = [], [], []
        for j in range(hb):  # per head: the carried state read out, exp(cum_i) C_i S_in^T
            av = a_ref[pl.ds(j, 1)].astype(acc)  # (1,)
            # log decay of the steps before row block m (a masked sum over the whole chunk)
            off = jnp.sum(jnp.where(before, dt_ref[:, j].astype(acc) * av, 0.0))
            _, cum_m, _ = _log_decays(dt_ref, j, av, rows, jnp.broadcast_to(off, (1,)))
            od = jnp.exp(cum_m)
            if has_seg:  # only rows in the carried segment (0) see the carried state
                od = jnp.where(seg_m == 0, od, 0.0)
            s_j = s_ref[j, :, :].astype(mm)  # (Pp, Np)
            ys.append(od[:, None] * _dot(cm, s_j, acc, trans_b=True))
            avs.append(av)
            cums.append(cum_m)
        ii = m * bm + lax.broadcasted_iota(jnp.int32, (bm, bm), 0)
        jj0 = lax.broadcasted_iota(jnp.int32, (bm, bm), 1)

        def body(k, carry):  # column block k <= m of the intra-chunk (attention-like) part
            ys, offs = carry
            cols = pl.ds(k * bm, bm)
            cb = _dot(cm, b_ref[cols, :].astype(mm), acc, trans_b=True)  # (bm, bm)
            vis = ii >= k * bm + jj0
            if has_seg:
                vis = vis & (seg_m[:, None] == seg_ref[cols][None, :])
            new_ys, new_offs = [], []
            for j in range(hb):
                dtk, cum_k, off = _log_decays(dt_ref, j, avs[j], cols, offs[j])
                decay = jnp.exp(jnp.where(vis, cums[j][:, None] - cum_k[None, :], -jnp.inf))
                w = (cb * decay * dtk[None, :]).astype(mm)
                new_ys.append(ys[j] + _dot(w, x_ref[cols, j, :].astype(mm), acc))
                new_offs.append(off)
            return tuple(new_ys), tuple(new_offs)

        init = (tuple(ys), tuple(jnp.zeros((1,), acc) for _ in range(hb)))
        ys, _ = lax.fori_loop(_i32(0), m + 1, body, init)
        for j in range(hb):
            y = ys[j]
            if has_d:
                dv = d_ref[pl.ds(j, 1)] if d.ndim == 1 else d_ref[j, :]  # (1,) or (Pp,)
                dv = dv.astype(acc)
                y = y + dv[None, :] * x_ref[rows, j, :].astype(acc)
            y_ref[:, j, :] = y.astype(y_ref.dtype)

    rg = r // hb  # head blocks per group
    in_specs = [
        pl.BlockSpec((None, q, hb, pp), lambda m, h, c, i: (i, c, h, 0)),
        pl.BlockSpec((None, q, None, npad), lambda m, h, c, i: (i, c, h // rg, 0)),
        pl.BlockSpec((None, q, None, npad), lambda m, h, c, i: (i, c, h // rg, 0)),
        pl.BlockSpec((None, q, hb), lambda m, h, c, i: (i, c, h)),
        pl.BlockSpec((hb,), lambda m, h, c, i: (h,)),
        pl.BlockSpec((None, hb, None, pp, npad), lambda m, h, c, i: (i, h, c, 0, 0)),
    ]
    args = [x, b, c, dt, a, starts]
    if has_d:
        if d.ndim == 1:
            in_specs.append(pl.BlockSpec((hb,), lambda m, h, c, i: (h,)))
        else:
            in_specs.append(pl.BlockSpec((hb, pp), lambda m, h, c, i: (h, 0)))
        args.append(d)
    if has_seg:
        in_specs.append(pl.BlockSpec((None, None, q), lambda m, h, c, i: (i, c, 0)))
        args.append(seg)
    return backend.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, lp, heads, pp), x.dtype),
        grid=(nm, heads // hb, nc, bsz),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, hb, pp), lambda m, h, c, i: (i, c * nm + m, h, 0)),
        interpret=cfg.interpret,
        compiler_params=_params(cfg.interpret, cfg.warps, cfg.stages),
        name="jaxcore_ssd_outputs",
        cost_estimate=_cost_outputs(x, b, c, dt, a, starts, d, seg, cfg),
    )(*args)


def _cost_fused_outputs(x, b, c, dt, a, d, seg, cfg: _Cfg, cps: int, reads: int, acc) -> Any:
    """Kernel C of "fused", per (P block, head, segment, batch) program (bp columns of P) and
    chunk of Q steps: dt a, its cumsum and sum, last - cum and its product with dt (5 Q flops),
    C B^T (2 Q^2 Np), the decay's differences and its two products (3 Q^2), w @ x (2 Q^2 bp), the
    read-out C S^T (2 Q Np bp) scaled and added, x times the state weights (3 Q bp), D x (2 Q
    bp), the update (x w)^T B (2 bp Q Np), exp(last) S and the sum (2 bp Np); exps: the decay
    (Q^2), exp(cum) and exp(last - cum) (2 Q), exp(last) (1). Reads x, B, C, dt, seg per step,
    A, D and ``reads`` (bp, Np) start states (the ``starts`` and ``final`` operands) per
    program; writes y (x's dtype) and, from the last segment only, the final state (acc)."""
    bsz, lp, heads, pp = x.shape
    npad = b.shape[3]
    q, bp = cfg.q, min(cfg.bp, pp)
    nseg = lp // (q * cps)
    per_chunk = 5 * q + 3 * q * q + 2 * q * q * (npad + bp) + 4 * q * npad * bp
    per_chunk += (3 + 2 * (d is not None)) * q * bp + 2 * bp * npad
    trans = q * q + 2 * q + 1
    step = 2 * bp * _isz(x) + npad * (_isz(b) + _isz(c)) + _isz(dt) + _isz(seg)
    isz_acc = jnp.dtype(acc).itemsize
    per_prog = _isz(a) + (0 if d is None else (1 if d.ndim == 1 else bp) * _isz(d))
    per_prog += reads * bp * npad * isz_acc
    programs = bsz * heads * (pp // bp) * nseg
    nbytes = programs * (per_prog + cps * q * step) + bsz * heads * pp * npad * isz_acc
    return _estimate(programs * cps * per_chunk, programs * cps * trans, nbytes)


def _fused_outputs(x, b, c, dt, a, starts, final, d, seg, cfg: _Cfg, cps: int, acc, mm):
    """Kernel C of "fused": y (B, Lp, H, Pp) in x's dtype and the final state (B, H, Pp, Np)
    (acc), from the state entering each segment of ``cps`` chunks: ``starts`` (B, H, S - 1,
    Pp, Np) for segments 0 .. S - 2 and ``final`` (B, H, Pp, Np) for segment S - 1 (either may
    be None: zeros; acc dtype); d: (H,), (H, Pp) or None; seg: (B, nc, Q) or None."""
    bsz, lp, heads, pp = x.shape
    g, npad = b.shape[2], b.shape[3]
    r = heads // g
    q, bp = cfg.q, min(cfg.bp, pp)
    lseg = q * cps
    nseg = lp // lseg
    has_d, has_seg = d is not None, seg is not None
    has_starts, has_final = starts is not None, final is not None

    def kernel(x_ref, b_ref, c_ref, dt_ref, a_ref, *rest):
        rest = list(rest)
        st_ref = rest.pop(0) if has_starts else None
        fin_ref = rest.pop(0) if has_final else None
        d_ref = rest.pop(0) if has_d else None
        seg_ref = rest.pop(0) if has_seg else None
        y_ref, ht_ref = rest
        sgi = pl.program_id(2)
        av = a_ref[...].astype(acc)  # (1,)
        dv = None
        if has_d:
            dv = (d_ref[...] if d.ndim == 1 else d_ref[0, :]).astype(acc)  # (1,) or (bp,)
        causal = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(
            jnp.int32, (q, q), 1
        )
        s0 = jnp.zeros((bp, npad), acc)
        if has_final:  # the last segment's start state
            s0 = fin_ref[...].astype(acc)
        if has_starts:
            s0 = jnp.where(sgi < nseg - 1, st_ref[...].astype(acc), s0)

        def body(k, st):
            rows = pl.ds(k * q, q)
            dtk = dt_ref[rows].astype(acc)
            da = dtk * av
            cum, last = jnp.cumsum(da), jnp.sum(da)
            xk = x_ref[rows, :]  # (Q, bp)
            bk = b_ref[rows, :].astype(mm)
            ck = c_ref[rows, :].astype(mm)
            vis, od, keep = causal, jnp.exp(cum), None
            wst = jnp.exp(last - cum) * dtk  # (Q,) weight of each step in the state left
            if has_seg:
                sk = seg_ref[k, :]  # (Q,) segment relative to the one carried in (0)
                last_seg = jnp.max(sk)  # the segments only grow along a chunk
                vis = vis & (sk[:, None] == sk[None, :])
                od = jnp.where(sk == 0, od, 0.0)
                wst = jnp.where(sk == last_seg, wst, 0.0)
                keep = last_seg == 0
            cb = _dot(ck, bk, acc, trans_b=True)  # (Q, Q)
            decay = jnp.exp(jnp.where(vis, cum[:, None] - cum[None, :], -jnp.inf))
            w = (cb * decay * dtk[None, :]).astype(mm)
            y = _dot(w, xk.astype(mm), acc)  # (Q, bp)
            y = y + od[:, None] * _dot(ck, st.astype(mm), acc, trans_b=True)
            if has_d:
                y = y + dv[None, :] * xk.astype(acc)
            y_ref[rows, :] = y.astype(y_ref.dtype)
            xw = (xk.astype(acc) * wst[:, None]).astype(mm)  # (Q, bp)
            carried = jnp.exp(last) * st
            if keep is not None:  # a reset in the chunk drops the carried state
                carried = jnp.where(keep, carried, 0.0)
            return carried + _dot(xw, bk, acc, trans_a=True)

        st = lax.fori_loop(_i32(0), _i32(cps), body, s0)
        last_seg_mask = jnp.broadcast_to(sgi == nseg - 1, (bp, npad))
        plgpu.store(
            ht_ref.at[pl.ds(_i32(0), bp), pl.ds(_i32(0), npad)],
            st.astype(ht_ref.dtype),
            mask=last_seg_mask,
        )

    state_blk = pl.BlockSpec((None, None, bp, npad), lambda j, h, s, i: (i, h, j, 0))
    in_specs = [
        pl.BlockSpec((None, lseg, None, bp), lambda j, h, s, i: (i, s, h, j)),
        pl.BlockSpec((None, lseg, None, npad), lambda j, h, s, i: (i, s, h // r, 0)),
        pl.BlockSpec((None, lseg, None, npad), lambda j, h, s, i: (i, s, h // r, 0)),
        pl.BlockSpec((None, lseg, None), lambda j, h, s, i: (i, s, h)),
        pl.BlockSpec((1,), lambda j, h, s, i: (h,)),
    ]
    args = [x, b, c, dt, a]
    if has_starts:  # segment s < S - 1 (clamped for the last, which reads ``final``)
        in_specs.append(
            pl.BlockSpec(
                (None, None, None, bp, npad),
                lambda j, h, s, i: (i, h, jnp.minimum(s, nseg - 2), j, 0),
            )
        )
        args.append(starts)
    if has_final:
        in_specs.append(state_blk)
        args.append(final)
    if has_d:
        if d.ndim == 1:
            in_specs.append(pl.BlockSpec((1,), lambda j, h, s, i: (h,)))
        else:
            in_specs.append(pl.BlockSpec((1, bp), lambda j, h, s, i: (h, j)))
        args.append(d)
    if has_seg:
        in_specs.append(pl.BlockSpec((None, cps, q), lambda j, h, s, i: (i, s, 0)))
        args.append(seg)
    return backend.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, lp, heads, pp), x.dtype),
            jax.ShapeDtypeStruct((bsz, heads, pp, npad), acc),
        ),
        grid=(pp // bp, heads, nseg, bsz),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, lseg, None, bp), lambda j, h, s, i: (i, s, h, j)),
            state_blk,
        ),
        interpret=cfg.interpret,
        compiler_params=_params(cfg.interpret, cfg.warps, cfg.stages),
        name="jaxcore_ssd_fused_outputs",
        cost_estimate=_cost_fused_outputs(
            x, b, c, dt, a, d, seg, cfg, cps, has_starts + has_final, acc
        ),
    )(*args)


def _dtypes(x) -> tuple[Any, Any]:
    """(state/accumulation dtype, dot operand dtype): bf16/f16 inputs feed the dots as they are."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return acc, (x.dtype if jnp.dtype(x.dtype).itemsize < 4 else acc)


def _relative_segments(sidx: Array | None, q: int) -> Array | None:
    """From the padded segment index (B, Lp) (or None): each step's segment relative to the one
    carried into its chunk of ``q`` steps, (B, Lp / q, q) int32 (0: the carried segment)."""
    if sidx is None:
        return None
    bsz, lp = sidx.shape
    sidx = sidx.reshape(bsz, lp // q, q)
    end = sidx[:, :, -1]  # (B, nc): the segment each chunk ends in
    prev_end = jnp.concatenate([jnp.zeros_like(end[:, :1]), end[:, :-1]], axis=1)
    return (sidx - prev_end[:, :, None]).astype(jnp.int32)


def _prepare(x, dt, Bg, Cg, D, h0, sidx, q: int, span: int | None = None):
    """XLA prologue, only where needed: pad L to a multiple of ``span`` (default ``q``; dt = 0:
    the state is unchanged) and P, N to powers of two >= 16 (zeros); h0 (or None) flattened to
    (B, H, Pp * Np); from the segment index ``sidx`` (B, L) (or None) each step's segment
    relative to the one carried into its chunk, (B, nc, Q) int32 (0: the carried segment; the
    padded steps join the last one). Without padding x, dt, B, C and D pass through as they are.
    Returns also the padded segment index (B, Lp) (or None).
    """
    bsz, length, heads, p = x.shape
    n = Bg.shape[-1]
    span = q if span is None else span
    lp = -(-length // span) * span
    pp, npad = _pow2_at_least(p, 16), _pow2_at_least(n, 16)
    x, dt, Bg, Cg = (pad_time(v, lp) for v in (x, dt, Bg, Cg))
    if pp != p:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pp - p)))
        if h0 is not None:
            h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, pp - p), (0, 0)))
        if D is not None and D.ndim == 2:
            D = jnp.pad(D, ((0, 0), (0, pp - p)))
    if npad != n:
        padn = lambda v: jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, npad - n)])  # noqa: E731
        Bg, Cg = padn(Bg), padn(Cg)
        h0 = None if h0 is None else padn(h0)
    if sidx is not None:
        sidx = jnp.concatenate([sidx, jnp.broadcast_to(sidx[:, -1:], (bsz, lp - length))], 1)
    h0f = None if h0 is None else h0.reshape(bsz, heads, pp * npad)
    return x, dt, Bg, Cg, D, h0f, _relative_segments(sidx, q), sidx


def _forward(x, dt, A, Bg, Cg, D, h0, sidx, cfg: _Cfg):
    """The three phases on unpadded inputs (h0: (B, H, P, N) or None for zeros; ``sidx``: (B, L)
    segment index or None); returns (y (B, L, H, P) in x's dtype, final state (B, H, P, N))."""
    if cfg.kernel == "fused":
        return _forward_fused(x, dt, A, Bg, Cg, D, h0, sidx, cfg)
    bsz, length, heads, p = x.shape
    n = Bg.shape[-1]
    acc, mm = _dtypes(x)
    xp, dtp, Bp, Cp, dv, h0f, seg, _ = _prepare(x, dt, Bg, Cg, D, h0, sidx, cfg.q)
    nc, pp, npad = xp.shape[1] // cfg.q, xp.shape[3], Bp.shape[3]
    states, log_decay = _chunk_states(xp, Bp, dtp, A, seg, cfg, acc, mm)
    starts, h_t = _pass_states(states.reshape(bsz, heads, nc, -1), log_decay, h0f, cfg, acc, mm)
    starts = starts.reshape(bsz, heads, nc, pp, npad)
    y = _outputs(xp, Bp, Cp, dtp, A, starts, dv, seg, cfg, acc, mm)
    return _unpad(y, h_t.reshape(bsz, heads, pp, npad), length, p, n)


def _unpad(y, h_t, length: int, p: int, n: int):
    """y (B, Lp, H, Pp) and the final state (B, H, Pp, Np) cut back to L, P, N."""
    if y.shape[1] != length or y.shape[3] != p:
        y = y[:, :length, :, :p]
    return y, h_t[:, :, :p, :n]


def segment_plan(bsz: int, length: int, heads: int, p: int, cfg: _Cfg) -> tuple[int, int]:
    """ "fused": (chunks per segment, segments): the fewest segments giving kernel C about
    ``cfg.programs`` programs (batch x heads x P blocks x segments), at most one per chunk."""
    pp = _pow2_at_least(p, 16)
    per_segment = bsz * heads * (pp // min(cfg.bp, pp))
    return split_for_programs(-(-length // cfg.q), per_segment, cfg.programs)


def _forward_fused(x, dt, A, Bg, Cg, D, h0, sidx, cfg: _Cfg):
    """SSD_KERNEL="fused" (kernels A, B, C above) on unpadded inputs; as ``_forward``."""
    bsz, length, heads, p = x.shape
    n = Bg.shape[-1]
    acc, mm = _dtypes(x)
    cps, nseg = segment_plan(bsz, length, heads, p, cfg)
    lseg = cps * cfg.q
    xp, dtp, Bp, Cp, dv, h0f, seg, sidx_p = _prepare(x, dt, Bg, Cg, D, h0, sidx, cfg.q, lseg)
    pp, npad = xp.shape[3], Bp.shape[3]
    starts, final = None, None if h0f is None else h0f.reshape(bsz, heads, pp, npad)
    if nseg > 1:  # A: the state each segment but the last leaves from zero; B: pass them on
        cfg_a = cfg._replace(q=lseg, bm=min(cfg.bm, cfg.q))
        seg_a = _relative_segments(sidx_p, lseg)
        states, log_decay = _chunk_states(
            xp, Bp, dtp, A, seg_a, cfg_a, acc, mm, nseg - 1, local=True
        )
        starts, final = _pass_states(
            states.reshape(bsz, heads, nseg - 1, -1), log_decay, h0f, cfg, acc, acc
        )
        starts = starts.reshape(bsz, heads, nseg - 1, pp, npad)
        final = final.reshape(bsz, heads, pp, npad)
    y, h_t = _fused_outputs(xp, Bp, Cp, dtp, A, starts, final, dv, seg, cfg, cps, acc, mm)
    return _unpad(y, h_t, length, p, n)


@functools.partial(jax.custom_jvp, nondiff_argnums=(8,))
def _ssd_pallas(x, dt, A, B, C, D, h0, segment_ids, cfg):
    Bg = B[:, :, None] if B.ndim == 3 else B
    Cg = C[:, :, None] if C.ndim == 3 else C
    sidx = None
    if segment_ids is not None:  # segment index: +1 at every reset (step 0 never resets)
        sidx = jnp.cumsum(reset_mask(segment_ids).astype(jnp.int32), axis=1)
    return _forward(x, dt, A, Bg, Cg, D, h0, sidx, cfg)


@_ssd_pallas.defjvp
def _ssd_pallas_jvp(cfg, primals, tangents):
    """Differentiated calls run the XLA ``ssd`` (its JVP): the Pallas kernels serve the
    undifferentiated (inference) calls. Reverse mode transposes that JVP (the XLA
    implementation's own backward), so training costs exactly the XLA forward + backward, and
    forward mode (jvp, jacfwd) works too. No tangent for segment_ids."""
    from ._ssd import ssd

    segment_ids = primals[7]

    def f(x, dt, A, B, C, D, h0):
        return ssd(x, dt, A, B, C, D=D, initial_state=h0, return_final_state=True,
                   segment_ids=segment_ids, implementation=cfg.xla_impl)  # fmt: skip

    return jax.jvp(f, tuple(primals[:7]), tuple(tangents[:7]))


def check_chunk(chunk_size: int | None, length: int, default: int | None = None) -> int:
    """The Pallas chunk length: ``chunk_size`` (None: ``default``, else SSD_CONFIG[0]) must be
    a power of two >= 16; it shrinks to the smallest power of two >= max(L, 16) when L is
    shorter."""
    q = (SSD_CONFIG[0] if default is None else default) if chunk_size is None else chunk_size
    if not checks.is_tile_size(q):
        raise ValueError(
            f"chunk_size: implementation='pallas' needs a power of two >= 16 or None, got {q!r}"
        )
    return min(q, _pow2_at_least(length, 16))


def ssd_pallas(x, dt, A, B, C, D, h0, segment_ids=None, *, chunk_size: int | None,
               interpret: bool, xla_impl: str) -> tuple[Array, Array]:  # fmt: skip
    """Mamba-2 SSD forward in Pallas (gradients: the XLA ``xla_impl``), arguments checked.

    x: (B, L, H, P); dt: (B, L, H) (positive); A: (H,); B, C: (B, L, G, N) or (B, L, N);
    D: (H,), (H, P) or None; h0: (B, H, P, N) in the state dtype (f32, or f64 for f64 inputs)
    or None (zeros);
    segment_ids: (B, L) ints (the state resets where the id changes) or None.
    Returns (y (B, L, H, P) in x's dtype, final state (B, H, P, N) in the state dtype).
    """
    groups = 1 if B.ndim == 3 else B.shape[2]
    cfg = make_config(chunk_size, x.shape[1], x.shape[3], B.shape[-1], x.shape[2], groups,
                      interpret, xla_impl)  # fmt: skip
    return _ssd_pallas(x, dt, A, B, C, D, h0, segment_ids, cfg)


def make_config(chunk_size: int | None, length: int, p: int, n: int, heads: int, groups: int,
                interpret: bool, xla_impl: str) -> _Cfg:  # fmt: skip
    """The static configuration of one call, from SSD_KERNEL, SSD_CONFIG, SSD_PASS_CONFIG,
    SSD_HEADS_PER_PROGRAM and (for "fused") SSD_FUSED_CONFIG (checked)."""
    if SSD_KERNEL not in SSD_KERNELS:
        raise ValueError(f"SSD_KERNEL: expected one of {SSD_KERNELS}, got {SSD_KERNEL!r}")
    fq, bp, fwarps, fstages, programs = SSD_FUSED_CONFIG
    if SSD_KERNEL == "fused" and not (checks.is_tile_size(fq) and checks.is_tile_size(bp)):
        raise ValueError(
            f"SSD_FUSED_CONFIG: expected a power-of-two chunk and P block >= 16, got {fq!r}, {bp!r}"
        )
    q = check_chunk(chunk_size, length, fq if SSD_KERNEL == "fused" else None)
    bm, warps, stages = SSD_CONFIG[1:]
    if SSD_KERNEL == "fused":
        warps, stages = fwarps, fstages
    hb = SSD_HEADS_PER_PROGRAM
    if not isinstance(hb, int) or hb < 1:
        raise ValueError(f"SSD_HEADS_PER_PROGRAM: expected a positive int, got {hb!r}")
    per_group = heads // groups
    hb = max(h for h in range(1, min(hb, per_group) + 1) if per_group % h == 0)
    if not checks.is_tile_size(bm):
        raise ValueError(f"SSD_CONFIG: expected a power-of-two block >= 16, got {bm!r}")
    pblock, pwarps, prefetch = SSD_PASS_CONFIG
    f = _pow2_at_least(p, 16) * _pow2_at_least(n, 16)
    if not checks.is_tile_size(pblock, 1):
        raise ValueError(f"SSD_PASS_CONFIG: expected a power-of-two block, got {pblock!r}")
    return _Cfg(q, min(bm, q), warps, stages, min(pblock, f), pwarps, prefetch, bool(interpret),
                xla_impl, hb, SSD_KERNEL, bp, max(1, int(programs)))  # fmt: skip
