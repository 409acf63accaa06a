"""Pallas kernels for the scans (Triton lowering on GPU; ``interpret=True`` runs them on CPU).

Kernel designs, chosen by :data:`LINEAR_KERNEL` / :data:`SELECTIVE_KERNEL` (read at trace time):

- "sequential": one program per (batch, channel block) keeps the block's state in registers and
  walks all L steps. Few programs when batch x channels is small (B=2, D=1024: 128 programs of a
  16x16 state on a 132-SM GPU), each latency-bound on one tiny load per step.
- "chunked" (default, "auto"): L is split into chunks of T_c steps across the grid
  (batch x channel blocks x chunks). Phase 1: every chunk but the last scans from a zero state
  and writes its end state and the product of its decays (selective scan: exp(A * sum of delta)
  times the product of the reset flags). Phase 2, folded into phase 3's prologue (no extra
  launch, no XLA loop): each program combines the earlier chunks' (decay, end state) pairs into
  its true start state (c tiny steps on L2-resident data). Phase 3: every chunk rescans from its
  true start state and writes the outputs (selective scan: y = <x_t, C_t> + D*u_t, times
  silu(z_t), fused, in u's dtype). Inputs are read twice; the grid has (batch x channel blocks x
  chunks) programs. The number of chunks is chosen so that the grid has about
  :data:`CHUNKED_CONFIG` ``[0]`` programs (1 chunk, i.e. a single fused pass, when L is short or
  batch x channels already fill the device).

The selective scan has a third design, "blocked" (:data:`SELECTIVE_BLOCKED_CONFIG`, opt-in until
timed on a GPU): a pass over L per (batch, channel block), T steps at a time as (T, N, channels)
tiles with the recurrence along T as one Triton ``tt.scan`` (``_tt_scan.linear_recurrence``);
split into chunks like "chunked" (:data:`SELECTIVE_BLOCKED_PROGRAMS`).

All keep f32 state (f64 under x64 with f64 inputs) and read bf16/f32 inputs as they come. The
chunked kernels load the inputs of step t + PREFETCH while step t computes (a ring of loaded
steps carried through the loop), so that load latency overlaps arithmetic; ragged L and channel
edges are handled with clamped indices and masked loads/stores (no padding copies).

Selective-scan gradients (:data:`SELECTIVE_BACKWARD`): the chunked forward saves the states
entering every ``chunk_size`` steps; the backward is either the chunk-parallel Pallas reverse
scan of ``_pallas_bwd.py`` (three phases like the forward; the default when compiled: on an
H200 forward+backward took 3.7 ms vs 231 ms with the XLA recompute, B=2 L=8192 D=1024 N=16
bf16, session 5) or the chunked XLA recompute (a ``lax.scan`` over chunks; the default in
interpret mode). benchmarks/gpu_scan.py compares both in one run.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu  # masked load/store (Triton and interpret)

from jaxcore import backend
from jaxcore.autodiff import tangent_call, with_saved

from ._common import split_for_programs

Array = Any

BLOCK = 128  # channels per program (a power of two, as Triton needs)


# Selective-scan kernel tiling on GPU: (max channels per program, warps, software-pipeline stages).
# Read at trace time; benchmarks/gpu_scan.py sweeps it.
SELECTIVE_CONFIG: tuple[int, int, int] = (16, 4, 1)  # the config measured on an H200

# Kernel design: "sequential", "chunked" or "auto" (= "chunked", whose chunk count falls to 1 when
# batch x channel blocks already give CHUNKED_CONFIG[0] programs). Read at trace time.
LINEAR_KERNEL: str = "auto"
SELECTIVE_KERNEL: str = "auto"
KERNELS: tuple[str, ...] = ("auto", "sequential", "chunked")
# the selective scan also has "blocked" (see SELECTIVE_BLOCKED_CONFIG)
SELECTIVE_KERNELS: tuple[str, ...] = (*KERNELS, "blocked")

# "blocked" selective scan (session 6; session 7 changed its tiles to time-first; tested in
# interpret mode, lowered to Triton IR and compiled for sm_90a offline (triton_static.py), not
# yet timed on a GPU, so not the default): per (batch, channel block, chunk) program, T steps
# at a time as (T, N, channels) tiles: coalesced (T, channels) / (T, N) tile loads, all
# exp(dt A) of the block at once, the recurrence along T as one Triton ``tt.scan``
# (_tt_scan.linear_recurrence), y stored as a (T, channels) tile. Time first keeps each
# lane's T steps in its registers (Triton gives the lanes to the last axis): the scan runs
# in-thread, with no shuffles, and the sum over N stays within the warp or the thread.
# Session 6's (channels, N, T) tiles put T on the lanes: 45 SASS instructions per (step,
# channel, state) element, 216 shuffles per block; time first: 12-24 (benchmarks/triton_static
# .py, BENCHMARKS.md "Session 7"). (max channels per program, T (a power of two; with gradients
# at most the largest power of two dividing the saved-state interval), warps,
# software-pipeline stages: 2 lets Triton load the next block while this one computes).
# (32, 4, 1, 2): one warp, 32 channels on the lanes, the 4 x 16 (T, N) of each channel in its
# registers; 168 registers, no spills, bound 156 us offline (session 8). (32, 8, 1, 2) has the
# lowest bound (143 us) but 254 registers, at the edge of spilling under another Triton
# revision; benchmarks/gpu_scan.py times both.
SELECTIVE_BLOCKED_CONFIG: tuple[int, int, int, int] = (32, 4, 1, 2)
# "blocked": target number of programs. 0: one pass over L (B x D / channels programs: 64 at
# B=2, D=1024, 32 channels, too few for a GPU). Larger: L is split into chunks, as in the
# chunked kernel, until the grid has about this many programs. That is two passes: each exp is
# computed twice, for a grid that fills the device when B x D is small. Read at trace time; not
# yet measured.
SELECTIVE_BLOCKED_PROGRAMS: int = 1024

# Chunked kernels: (target number of programs in the grid, fewest steps per chunk). Read at trace
# time; tests lower the second to get several chunks at small L.
CHUNKED_CONFIG: tuple[int, int] = (2048, 64)

# Chunked selective-scan tiling (max channels per program, warps, stages): one warp holds the
# 32 x N state (16 values per thread at N=16) so the per-step overhead (loads, softplus, the
# reduction over N) is shared by more state than with 4 warps. Best of the sweep in
# benchmarks/gpu_scan.py on an H200 (session 5, B=2 L=8192 D=1024 N=16 bf16): 0.57 ms vs
# 0.96 ms (16, 1, 1), 1.03 ms (32, 2, 1), 1.28 ms (8, 1, 1), 1.97 ms (16, 4, 1).
SELECTIVE_CHUNKED_CONFIG: tuple[int, int, int] = (32, 1, 1)

# Backward of the chunked selective scan (read at trace time): "pallas" (the chunk-parallel
# reverse kernels of _pallas_bwd.py), "xla" (the chunked XLA recompute: a lax.scan over chunks)
# or "auto" (= "pallas" when compiled: on an H200 its gradients matched the XLA backward's to
# bf16 rounding and forward+backward ran 54-63x faster with half the temporary memory, session
# 5; = "xla" in interpret mode, where the XLA recompute is much the faster. Tests select
# "pallas" explicitly).
SELECTIVE_BACKWARD: str = "auto"
BACKWARDS: tuple[str, ...] = ("auto", "pallas", "xla")

# Pallas selective-scan backward tiling: (max channels per program, warps, max steps per
# unrolled block S; S is the largest power of two <= this dividing the saved-state interval).
# Best of benchmarks/gpu_scan.py's sweep on an H200 (session 5, forward+backward): 3.67 ms and
# 118 MiB temporaries vs 4.28 ms / 182 MiB with (16, 4, 16), 3.84 ms (16, 1, 8), 4.03 (16, 2, 8).
SELECTIVE_BWD_CONFIG: tuple[int, int, int] = (32, 4, 16)

# Chunked linear-scan tiling (max channels per program, a power of two; warps). Not yet measured.
LINEAR_CHUNKED_CONFIG: tuple[int, int] = (128, 4)

# Steps of inputs loaded ahead in the chunked kernels' time loops (a ring carried through the
# loop), so that the loads of step t + PREFETCH are in flight while step t computes.
PREFETCH: int = 2

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is one MUFU op on NVIDIA GPUs


def _compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 1):
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _block(s: int) -> int:
    b = 1
    while b < min(s, BLOCK):
        b *= 2
    return b


def _i32(v: int) -> Array:
    """An int32 loop bound: loop indices stay int32 under x64 too (Triton/dynamic_slice indices)."""
    return np.int32(v)


def _check_kernel(kernel: str, name: str, allowed: tuple[str, ...] = KERNELS) -> str:
    if kernel not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {kernel!r}")
    return kernel


def decay_product(sdt: Array, kp: Array, a: Array) -> Array:
    """A chunk's decay product per (channel, state) lane, (bd, Np): exp2(a * sum of delta) (a:
    A log2(e), (bd, Np); sdt: (bd,)) times the product of the reset flags ``kp`` (1,) (0 when
    the chunk resets the state)."""
    return jnp.where(kp[:, None] > 0, jnp.exp2(sdt[:, None] * a), 0.0)


def chunk_ends_call(local, in_args, in_specs, chunk_state, *, grid, dim: int, npad: int, acc,
                    interpret: bool, params, name: str, cost):  # fmt: skip
    """Phase 1 of the chunk-parallel kernels: ``local`` writes one chunk's (end state, decay
    product) blocks per program over ``grid`` = (B, channel blocks, chunks - 1); returns the two
    (B, chunks - 1, D, Np) arrays (``chunk_state`` is their block spec)."""
    bsz, _, chunks = grid
    return backend.pallas_call(
        local,
        out_shape=(jax.ShapeDtypeStruct((bsz, chunks, dim, npad), acc),) * 2,
        grid=grid,
        in_specs=in_specs,
        out_specs=(chunk_state, chunk_state),
        interpret=interpret,
        compiler_params=params,
        name=name,
        cost_estimate=cost,
    )(*in_args)


def _check_backward(backward: str) -> str:
    if backward not in BACKWARDS:
        raise ValueError(f"SELECTIVE_BACKWARD: expected one of {BACKWARDS}, got {backward!r}")
    return backward


def _plan_chunks(programs: int, length: int, unit: int = 1) -> tuple[int, int]:
    """(steps per chunk T_c, number of chunks) for a grid of ``programs`` per chunk index.

    T_c is a multiple of ``unit`` and at least CHUNKED_CONFIG[1] steps (unless one chunk covers
    L); the chunk count is the smallest giving about CHUNKED_CONFIG[0] programs in all.
    """
    target, min_steps = CHUNKED_CONFIG
    most = max(1, length // max(min_steps, 1))
    per, _ = split_for_programs(-(-length // unit), programs, target, most)
    tc = per * unit
    return tc, -(-length // tc)


# ----------------------------------------------------------------------------------------------
# cost estimates (pl.CostEstimate of each pallas_call: whole-grid totals from static shapes)
#
# Units (as XLA's): flops = floating-point arithmetic per element (add, sub, mul, div, min/max,
# a multiply-add = 2, a sum over n values = n adds); selects, compares, casts and index math are
# not counted. transcendentals = exp/exp2/log1p evaluated. bytes_accessed = the loads and stores
# the kernel issues to HBM (each program's loads counted, so data re-read by several programs
# (B/C per channel block, the prefetch ring's rows past a chunk, rows clamped at L-1) counts
# every time; masked-off lanes move nothing). Padded work (channel lanes past S in the last
# block, identity steps past L in the ragged last chunk, the static fold loops) is counted as
# the kernel does it.


def _isz(v: Any) -> int:
    """Bytes per element of ``v`` (0 for None)."""
    return 0 if v is None else int(jnp.dtype(v.dtype).itemsize)


def _estimate(flops: float, transcendentals: float, bytes_accessed: float) -> Any:
    return pl.CostEstimate(
        flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed)
    )


def _cost_linear_chunked(phase: int, *, bsz, length, s, bs, nb, tc, nc, ia, ib, ih, iacc, iout):
    """Chunked linear scan, phase 1 (grid B x nb x (nc-1)) or phase 3 (grid B x nb x nc).

    Every program walks tc steps on bs lanes (nb * bs >= S: the last block's padded lanes
    compute too) and fetches tc + PREFETCH rows of a and b (the ring reads PREFETCH rows past
    its chunk), S real columns per row. Phase 1: p = 0 + 1 once, then h = a h + b, p = a p
    (3 flops per lane-step); writes (end state, decay product) per chunk in acc. Phase 3: every
    program reads h0, folds the nc - 1 earlier-chunk slots (h = p h + e, 2 flops per lane-slot,
    every slot computed; slots k < c loaded: nc (nc - 1) / 2 (e, p) pairs per batch row), then
    runs tc steps of 2 flops; writes the L output rows (ragged tail masked).
    """
    lanes = bsz * nb * bs
    fetched = (tc + max(1, PREFETCH)) * s * (ia + ib)
    if phase == 1:
        chunks = nc - 1
        flops = lanes * (3 * tc + 1) * chunks
        nbytes = bsz * chunks * (fetched + 2 * s * iacc)
        return _estimate(flops, 0, nbytes)
    flops = lanes * nc * (2 * tc + 2 * (nc - 1))
    folded = nc * (nc - 1) // 2 * 2 * s * iacc
    nbytes = bsz * (nc * (fetched + s * ih) + folded + length * s * iout)
    return _estimate(flops, 0, nbytes)


def _cost_linear_sequential(*, bsz, length, sp, ia, ib, ih, iout):
    """One-pass linear scan on S padded to sp: 2 flops per lane-step (h = a h + b); a, b and
    h0 read once, the (B, L, sp) output written once."""
    return _estimate(2 * bsz * length * sp, 0, bsz * sp * (length * (ia + ib + iout) + ih))


def _cost_selective_sequential(*, bsz, lp, dim, npad, bd, nc, iu, idt, ia, ib, ic, ih, ik, iacc):
    """One-pass selective scan (grid B x D/bd), lp steps (padded to whole chunks), N padded to
    npad. Per (channel, state) lane-step: dt A, exp (1 transcendental), da x, (dt u) B, +,
    x C and its sum: 6 flops; dt u: 1 per channel-step. Reads: u, dt once; each program the
    B and C rows of its group and keep at every step (B/C re-read per channel block), A and h0
    once; writes y (acc), the final state and the nc chunk-start states."""
    flops = bsz * lp * dim * (6 * npad + 1)
    trans = bsz * lp * dim * npad
    programs = bsz * (dim // bd)
    nbytes = (
        bsz * lp * dim * (iu + idt + iacc)
        + programs * lp * (npad * (ib + ic) + ik)
        + bsz * dim * npad * (ia + ih + iacc * (1 + nc))
    )
    return _estimate(flops, trans, nbytes)


def _cost_selective_chunked(phase: int, u, dl, A, Bg, Cg, Dv, z, bias, keep, h0, y_dtype, *,
                            bd, tc, nc, nsub, softplus, save, keep_ypre):  # fmt: skip
    """Chunked fused selective scan, phase 1 (grid B x D/bd x (nc-1)) or 3 (B x D/bd x nc).

    Per program: tc steps (identity steps past L in the ragged last chunk included) and
    tc + PREFETCH fetches (the ring loads PREFETCH steps past its chunk). A fetch reads delta, u
    (bd each), the group's B row (npad) and keep (1); phase 3 also C (npad) and z (bd); per
    channel it adds delta_bias (1 flop) and applies softplus (min: 1 flop; exp, log1p: 2
    transcendentals). A step (advance) per (channel, state) lane: dt * A, exp2, da * x,
    (dt u) * B, +: 4 flops and 1 transcendental, plus dt u per channel. Phase 1 adds dt to its
    running sum (1 per channel), then per lane sum * A and exp2 once, and writes two (bd, npad)
    blocks. Phase 3: y = sum x C (2 per lane), + D u (2 per channel), * silu(z) (-z, 1 +, /,
    *: 4 per channel and 1 exp); the fold over nc - 1 slots (2 flops per lane-slot, all slots
    computed, slots k < c loaded); reads h0, writes y (and y before the gate) for the L rows,
    the saved sub-chunk states and the final state. Both phases scale A by log2(e) once per
    program (1 per lane) and read A (and D, delta_bias) once per program.
    """
    bsz, length, dim = u.shape
    npad = A.shape[1]
    iacc = _isz(h0)
    lanes = bd * npad
    programs = bsz * (dim // bd) * (nc - 1 if phase == 1 else nc)
    fetches, steps = tc + max(1, PREFETCH), tc
    f_flops = bd * ((bias is not None) + (1 if softplus else 0))
    f_trans = bd * (2 if softplus else 0)
    f_bytes = bd * (_isz(dl) + _isz(u)) + npad * _isz(Bg) + _isz(keep)
    s_flops = 4 * lanes + bd
    s_trans = lanes
    fixed_flops, fixed_trans = lanes, 0
    fixed_bytes = lanes * _isz(A) + bd * _isz(bias)
    if phase == 1:
        s_flops += bd
        fixed_flops += lanes
        fixed_trans += lanes
        fixed_bytes += 2 * lanes * iacc
    else:
        f_bytes += npad * _isz(Cg) + bd * _isz(z)
        s_flops += 2 * lanes + 2 * bd * (Dv is not None) + 4 * bd * (z is not None)
        s_trans += bd * (z is not None)
        fixed_flops += 2 * lanes * (nc - 1)
        fixed_bytes += bd * _isz(Dv) + lanes * iacc + (lanes * iacc * nsub if save else 0)
    flops = programs * (fixed_flops + fetches * f_flops + steps * s_flops)
    trans = programs * (fixed_trans + fetches * f_trans + steps * s_trans)
    nbytes = programs * (fixed_bytes + fetches * f_bytes)
    if phase == 3:
        nbytes += bsz * dim * npad * iacc * (nc * (nc - 1) + 1)  # fold loads, final state
        nbytes += bsz * length * dim * (jnp.dtype(y_dtype).itemsize + (iacc if keep_ypre else 0))
    return _estimate(flops, trans, nbytes)


def linear_scan_pallas(a: Array, b: Array, h0: Array, *, interpret: bool) -> Array:
    """h_t = a_t * h_{t-1} + b_t along axis 1 for real elementwise a (broadcastable to b).

    b: (batch, length, *state); h0: (batch, *state). Returns (batch, length, *state) in b's dtype.
    The kernel design is :data:`LINEAR_KERNEL`.
    """
    if jnp.issubdtype(b.dtype, jnp.complexfloating):
        raise ValueError(
            f"b: the Pallas linear scan supports real dtypes, got {b.dtype}; use 'chunked'"
        )
    if _check_kernel(LINEAR_KERNEL, "LINEAR_KERNEL") == "sequential":
        return _linear_sequential(a, b, h0, interpret=interpret)
    return _linear_chunked(a, b, h0, interpret=interpret)


def _linear_chunked(a: Array, b: Array, h0: Array, *, interpret: bool) -> Array:
    """Three-phase chunked linear scan (see the module docstring); a is broadcast to b's shape."""
    bsz, length = b.shape[:2]
    s = 1
    for d in b.shape[2:]:
        s *= d
    a2 = jnp.broadcast_to(a, b.shape).reshape(bsz, length, s)
    b2 = b.reshape(bsz, length, s)
    h02 = h0.reshape(bsz, s)
    acc = jnp.promote_types(b.dtype, jnp.float32)
    cap, warps = LINEAR_CHUNKED_CONFIG
    bs = _pow2_at_least(min(s, cap))
    nb = -(-s // bs)
    tc, nc = _plan_chunks(bsz * nb, length)
    ragged = nc * tc != length  # the last chunk runs past L (identity steps, stores masked)
    params = _compiler_params(interpret, warps)

    def load(ref, t, cols, cmask):
        """Row min(t, L-1) of a (L, S) ref at ``cols`` (0 outside S) in acc, and t < L."""
        tt = jnp.minimum(t, length - 1)
        v = plgpu.load(ref.at[tt, pl.ds(cols, bs)], mask=cmask, other=0)
        return v.astype(acc), t < length

    def walk(a_ref, b_ref, t0, carry, emit):
        """Steps t0 .. t0 + tc - 1 (identity past L), inputs loaded PREFETCH steps ahead."""
        j = pl.program_id(1)
        cols = j * bs
        cmask = cols + lax.broadcasted_iota(jnp.int32, (bs,), 0) < s

        def fetch(t):
            a_t, valid = load(a_ref, t, cols, cmask)
            b_t, _ = load(b_ref, t, cols, cmask)
            if not ragged:  # every step emitted is < L (loads past L: prefetch only, unused)
                return a_t, b_t
            return jnp.where(valid, a_t, 1.0), jnp.where(valid, b_t, 0.0)

        def body(i, cr):
            st, queue = cr
            nxt = fetch(t0 + i + depth)
            return emit(t0 + i, st, queue[0], cols, cmask), queue[1:] + (nxt,)

        depth = max(1, PREFETCH)
        queue = tuple(fetch(t0 + p) for p in range(depth))
        st, _ = lax.fori_loop(_i32(0), _i32(tc), body, (carry, queue))
        return st, cols, cmask

    cost_args = dict(bsz=bsz, length=length, s=s, bs=bs, nb=nb, tc=tc, nc=nc, ia=_isz(a2),
                     ib=_isz(b2), ih=_isz(h02), iacc=jnp.dtype(acc).itemsize,
                     iout=_isz(b))  # fmt: skip
    whole = pl.BlockSpec((None, length, s), lambda i, j, c: (i, 0, 0))
    row = pl.BlockSpec((None, None, s), lambda i, j, c: (i, c, 0))

    if nc > 1:  # phase 1: every chunk but the last from a zero state

        def local(a_ref, b_ref, e_ref, p_ref):
            def emit(t, st, cur, cols, cmask):
                h, p = st
                a_t, b_t = cur
                return a_t * h + b_t, a_t * p

            zero = jnp.zeros((bs,), acc)
            (h, p), cols, cmask = walk(a_ref, b_ref, pl.program_id(2) * tc, (zero, zero + 1), emit)
            plgpu.store(e_ref.at[pl.ds(cols, bs)], h.astype(e_ref.dtype), mask=cmask)
            plgpu.store(p_ref.at[pl.ds(cols, bs)], p.astype(p_ref.dtype), mask=cmask)

        ends, prods = backend.pallas_call(
            local,
            out_shape=(jax.ShapeDtypeStruct((bsz, nc - 1, s), acc),) * 2,
            grid=(bsz, nb, nc - 1),
            in_specs=[whole, whole],
            out_specs=(row, row),
            interpret=interpret,
            compiler_params=params,
            name="jaxcore_linear_scan_chunk_ends",
            cost_estimate=_cost_linear_chunked(1, **cost_args),
        )(a2, b2)

    def rerun(a_ref, b_ref, h0_ref, *refs):  # phase 3: from the true start states
        *ep, o_ref = refs

        def emit(t, h, cur, cols, cmask):
            a_t, b_t = cur
            h = a_t * h + b_t
            tt = jnp.minimum(t, length - 1)
            plgpu.store(
                o_ref.at[tt, pl.ds(cols, bs)],
                h.astype(o_ref.dtype),
                mask=cmask & (t < length) if ragged else cmask,
            )
            return h

        j = pl.program_id(1)
        cols = j * bs
        cmask = cols + lax.broadcasted_iota(jnp.int32, (bs,), 0) < s
        h = plgpu.load(h0_ref.at[pl.ds(cols, bs)], mask=cmask, other=0).astype(acc)
        if ep:  # phase 2, folded in: h = d_k h + e_k over the chunks k before this one
            c = pl.program_id(2)
            at = lambda k: (k, pl.ds(cols, bs))
            h = _fold_starts(h, *ep, c, nc - 1, at, lambda k: cmask & (k < c))
        walk(a_ref, b_ref, pl.program_id(2) * tc, h, emit)

    ep_args, ep_specs = [], []
    if nc > 1:
        ep_args = [ends, prods]
        ep_specs = [pl.BlockSpec((None, nc - 1, s), lambda i, j, c: (i, 0, 0))] * 2
    out = backend.pallas_call(
        rerun,
        out_shape=jax.ShapeDtypeStruct((bsz, length, s), b.dtype),
        grid=(bsz, nb, nc),
        in_specs=[whole, whole, pl.BlockSpec((None, s), lambda i, j, c: (i, 0)), *ep_specs],
        out_specs=whole,
        interpret=interpret,
        compiler_params=params,
        name="jaxcore_linear_scan_chunked",
        cost_estimate=_cost_linear_chunked(3, **cost_args),
    )(a2, b2, h02, *ep_args)
    return out.reshape(b.shape)


def _fold_starts(h, e_ref, p_ref, c, n: int, at, mask_at):
    """Phase 2 inside phase 3: the state entering chunk ``c`` from the state entering chunk 0,
    h <- p_k * h + e_k for k < c (chunk k's decay product and zero-start end state).

    A static loop over all ``n`` earlier-chunk slots (loads masked off for k >= c: identity
    steps), the loads PREFETCH slots ahead; ``at(k)`` is the ref index of slot k,
    ``mask_at(k)`` its load mask.
    """
    acc = h.dtype
    depth = max(1, PREFETCH)

    def fetch(k):
        kk = jnp.minimum(k, n - 1)
        m = mask_at(k)
        e = plgpu.load(e_ref.at[at(kk)], mask=m, other=0).astype(acc)
        p = plgpu.load(p_ref.at[at(kk)], mask=m, other=1).astype(acc)
        return e, p

    def body(k, cr):
        h, queue = cr
        e, p = queue[0]
        return p * h + e, queue[1:] + (fetch(k + depth),)

    queue = tuple(fetch(_i32(k)) for k in range(depth))
    h, _ = lax.fori_loop(_i32(0), _i32(n), body, (h, queue))
    return h


def _linear_sequential(a: Array, b: Array, h0: Array, *, interpret: bool) -> Array:
    """The sequential kernel: one program per (batch, channel block) walks all L steps."""
    bsz, length = b.shape[:2]
    state = b.shape[2:]
    s = 1
    for d in state:
        s *= d
    a = jnp.broadcast_to(a, b.shape).reshape(bsz, length, s)
    b2 = b.reshape(bsz, length, s)
    h02 = h0.reshape(bsz, s)
    bs = _block(s)
    sp = -(-s // bs) * bs
    if sp != s:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, sp - s)))
        b2 = jnp.pad(b2, ((0, 0), (0, 0), (0, sp - s)))
        h02 = jnp.pad(h02, ((0, 0), (0, sp - s)))
    acc = jnp.promote_types(b.dtype, jnp.float32)

    def kernel(a_ref, b_ref, h0_ref, o_ref):
        def body(t, h):
            h = a_ref[t, :].astype(acc) * h + b_ref[t, :].astype(acc)
            o_ref[t, :] = h.astype(o_ref.dtype)
            return h

        lax.fori_loop(0, length, body, h0_ref[...].astype(acc))

    seq_spec = pl.BlockSpec((None, length, bs), lambda i, j: (i, 0, j))
    out = backend.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, length, sp), b.dtype),
        grid=(bsz, sp // bs),
        in_specs=[seq_spec, seq_spec, pl.BlockSpec((None, bs), lambda i, j: (i, j))],
        out_specs=seq_spec,
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name="jaxcore_linear_scan",
        cost_estimate=_cost_linear_sequential(
            bsz=bsz, length=length, sp=sp, ia=_isz(a), ib=_isz(b2), ih=_isz(h02), iout=_isz(b)
        ),
    )(a, b2, h02)
    return out[:, :, :s].reshape(b.shape)


# ----------------------------------------------------------------------------------------------
# selective scan: forward kernel (writes chunk-start states), backward = the chunked recompute


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _channel_block(per_group: int, cap: int = 16) -> int:
    """The largest power of two <= cap dividing the channels of one group."""
    b = 1
    while b * 2 <= cap and per_group % (b * 2) == 0:
        b *= 2
    return b


def _selective_kernel_call(u, dt, A, Bg, Cg, h0, keep, chunk: int, interpret: bool):
    """u, dt (B, Lp, D); A (D, N); Bg, Cg (B, Lp, G, N); h0 (B, D, N); keep (B, Lp).

    Lp is a multiple of ``chunk``. Returns y (B, Lp, D) f32, final state (B, D, N) and the
    chunk-start states (B, Lp / chunk, D, N).
    """
    bsz, lp, dim = u.shape
    n = A.shape[1]
    nc = lp // chunk
    npad = _pow2_at_least(n)
    if npad != n:
        pad = lambda v: jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, npad - n)])
        A, Bg, Cg, h0 = pad(A), pad(Bg), pad(Cg), pad(h0)
    pg_b, pg_c = dim // Bg.shape[2], dim // Cg.shape[2]
    cap, warps, stages = SELECTIVE_CONFIG
    bd = _channel_block(min(pg_b, pg_c), cap)
    acc = u.dtype

    def kernel(u_ref, dt_ref, a_ref, b_ref, c_ref, h0_ref, k_ref, y_ref, hT_ref, st_ref):
        a = a_ref[...].astype(acc)  # (bd, Np)

        def chunk_body(c, x):
            st_ref[c] = x.astype(st_ref.dtype)

            def step(s, x):
                t = c * chunk + s
                dt_t = dt_ref[t, :].astype(acc)  # (bd,)
                u_t = u_ref[t, :].astype(acc)
                b_t = b_ref[t, :].astype(acc)  # (Np,)
                c_t = c_ref[t, :].astype(acc)
                k_t = k_ref[pl.ds(t, 1)].astype(acc)  # (1,)
                da = jnp.exp(dt_t[:, None] * a)
                da = jnp.where(k_t[:, None] > 0, da, 0.0)
                x = da * x + (dt_t * u_t)[:, None] * b_t[None, :]
                y_ref[t, :] = jnp.sum(x * c_t[None, :], axis=1).astype(y_ref.dtype)
                return x

            return lax.fori_loop(0, chunk, step, x)

        x = lax.fori_loop(0, nc, chunk_body, h0_ref[...].astype(acc))
        hT_ref[...] = x.astype(hT_ref.dtype)

    seq = pl.BlockSpec((None, lp, bd), lambda i, j: (i, 0, j))
    b_spec = pl.BlockSpec((None, lp, None, npad), lambda i, j: (i, 0, (j * bd) // pg_b, 0))
    c_spec = pl.BlockSpec((None, lp, None, npad), lambda i, j: (i, 0, (j * bd) // pg_c, 0))
    state = pl.BlockSpec((None, bd, npad), lambda i, j: (i, j, 0))
    y, h_t, starts = backend.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, lp, dim), acc),
            jax.ShapeDtypeStruct((bsz, dim, npad), acc),
            jax.ShapeDtypeStruct((bsz, nc, dim, npad), acc),
        ),
        grid=(bsz, dim // bd),
        in_specs=[
            seq,
            seq,
            pl.BlockSpec((bd, npad), lambda i, j: (j, 0)),
            b_spec,
            c_spec,
            state,
            pl.BlockSpec((None, lp), lambda i, j: (i, 0)),
        ],
        out_specs=(seq, state, pl.BlockSpec((None, nc, bd, npad), lambda i, j: (i, 0, j, 0))),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, warps, stages),
        name="jaxcore_selective_scan",
        cost_estimate=_cost_selective_sequential(
            bsz=bsz,
            lp=lp,
            dim=dim,
            npad=npad,
            bd=bd,
            nc=nc,
            iu=_isz(u),
            idt=_isz(dt),
            ia=_isz(A),
            ib=_isz(Bg),
            ic=_isz(Cg),
            ih=_isz(h0),
            ik=_isz(keep),
            iacc=_isz(u),
        ),
    )(u, dt, A, Bg, Cg, h0, keep)
    return y, h_t[..., :n], starts[..., :n]


def _pad_chunks(x: Array, lp: int, value: float = 0.0) -> Array:
    n = x.shape[1]
    if n == lp:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, lp - n)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8, 9, 10))
def _selective_pallas(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk, interpret):
    """(y, final state) of the sequential Pallas kernel. A custom JVP whose tangent map is a
    ``linear_call``: reverse mode transposes it with the chunked XLA backward from the chunk
    states the kernel saved; forward mode is the JVP of the chunked XLA scan."""
    y, h_t, _ = _selective_fwd_impl(u, dt, A, Bm, Cm, h0, keep, lb, chunk, interpret)
    return y, h_t


def _selective_fwd_impl(u, dt, A, Bm, Cm, h0, keep, lb, chunk, interpret):
    length = u.shape[1]
    nc = -(-length // chunk)
    lp = nc * chunk
    g = lambda v: v[:, :, None] if v.ndim == 3 else v  # time-varying == one group
    args = [_pad_chunks(v, lp) for v in (u, dt, g(Bm), g(Cm))]
    kp = _pad_chunks(keep, lp, 1.0)
    y, h_t, starts = _selective_kernel_call(
        args[0], args[1], A, args[2], args[3], h0, kp, chunk, interpret
    )
    return y[:, :length], h_t, starts


@functools.partial(_selective_pallas.defjvp, symbolic_zeros=True)
def _selective_pallas_jvp(lb, lc, chunk, interpret, primals, tangents):
    from ._selective import _run_chunked

    u, dt, A, Bm, Cm, h0, keep = primals

    def twin(keep, u, dt, A, Bm, Cm, h0):
        return _run_chunked(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk)

    def fast(*p):
        y, h_t, starts = _selective_fwd_impl(*p, lb, chunk, interpret)
        return (y, h_t), starts

    (y, h_t), starts = with_saved(fast, lambda *p: twin(p[6], *p[:6]))(*primals)

    def backward(prim, keep, saved, cts):
        return _selective_pallas_bwd(lb, lc, chunk, (*prim[:5], keep, saved), cts)[:6]

    prim = (u, dt, A, Bm, Cm, h0)
    tan = tangent_call(twin, backward, prim, tangents[:6], keep, starts, (y, h_t))
    return (y, h_t), tuple(tan)


def _selective_pallas_bwd(lb, lc, chunk, res, cts):
    from ._selective import _chunked_backward, _from_chunks, _to_chunks

    u, dt, A, Bm, Cm, keep, starts = res
    gy, gh = cts
    length = u.shape[1]
    nc = starts.shape[1]
    c = lambda v, value=0.0: _to_chunks(v, chunk, nc, value)
    res_c = (c(u), c(dt), A, c(Bm), c(Cm), c(keep, 1.0), jnp.moveaxis(starts, 1, 0))
    gu, gdt, ga, gb, gc, gh0, _ = _chunked_backward(lb, lc, res_c, (c(gy), gh))
    back = lambda v: _from_chunks(v, length)
    return back(gu), back(gdt), ga, back(gb), back(gc), gh0, jnp.zeros_like(keep)


def selective_scan_pallas(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk, interpret):
    """Batch-major selective scan core: returns (y (B, L, D), final state (B, D, N))."""
    return _selective_pallas(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk, interpret)


# ----------------------------------------------------------------------------------------------
# selective scan, chunked and fused: delta_bias/softplus, D*u and silu(z) inside the kernel


def _softplus_mamba(x: Array) -> Array:
    """mamba_ssm's softplus: log1p(exp(x)) for x <= 20, else x (no is_finite: Triton-friendly)."""
    return jnp.where(x <= 20.0, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))), x)


def _delta(dt: Array, bias: Array | None, softplus: bool) -> Array:
    """The forward kernels' step sizes: dt (+ delta_bias, of dt's rank), then softplus."""
    if bias is not None:
        dt = dt + bias
    return _softplus_mamba(dt) if softplus else dt


def _selective_chunked_call(u, dl, A, Bg, Cg, Dv, z, bias, h0, keep, *, softplus, tc, nc, sub,
                            save, interpret, save_ypre=True):  # fmt: skip
    """The three phases on padded-N operands.

    u, dl, z: (B, L, D) any real float dtype; A: (D, Np); Bg, Cg: (B, L, G, Np); Dv, bias: (D,)
    or None; h0: (B, D, Np) in the state dtype; keep: (B, L) or None (no resets). ``tc`` steps
    per chunk, ``nc`` chunks; with ``save`` the states entering every ``sub`` steps (sub divides
    tc) and, with z and ``save_ypre``, y before the gate are written too (for the backward).

    Returns (y (B, L, D) in u's dtype, final state (B, D, Np), y before the gate (B, L, D) state
    dtype or None, sub-chunk start states (B, nc * tc / sub, D, Np) or None).
    """
    bsz, length, dim = u.shape
    npad = A.shape[1]
    acc = h0.dtype
    pg_b, pg_c = dim // Bg.shape[2], dim // Cg.shape[2]
    cap, warps, stages = SELECTIVE_CHUNKED_CONFIG
    bd = _channel_block(min(pg_b, pg_c), cap)
    depth = max(1, PREFETCH)
    ragged = nc * tc != length  # the last chunk runs past L (identity steps, stores masked)
    has_d, has_z, has_bias, has_keep = (v is not None for v in (Dv, z, bias, keep))
    keep_ypre = save and has_z and save_ypre

    seq = pl.BlockSpec((None, length, bd), lambda i, j, c: (i, 0, j))
    b_spec = pl.BlockSpec((None, length, None, npad), lambda i, j, c: (i, 0, (j * bd) // pg_b, 0))
    c_spec = pl.BlockSpec((None, length, None, npad), lambda i, j, c: (i, 0, (j * bd) // pg_c, 0))
    a_spec = pl.BlockSpec((bd, npad), lambda i, j, c: (j, 0))
    vec = pl.BlockSpec((bd,), lambda i, j, c: (j,))
    k_spec = pl.BlockSpec((None, length), lambda i, j, c: (i, 0))
    chunk_state = pl.BlockSpec((None, None, bd, npad), lambda i, j, c: (i, c, j, 0))
    all_chunks = pl.BlockSpec((None, max(nc - 1, 1), bd, npad), lambda i, j, c: (i, 0, j, 0))
    state = pl.BlockSpec((None, bd, npad), lambda i, j, c: (i, j, 0))
    params = _compiler_params(interpret, warps, stages)

    def make_fetch(refs, need_c: bool, masked: bool):
        """fetch(t) -> the step's inputs in acc (with ``masked``, identity steps past L: delta 0,
        keep 1; without, the caller never emits a step past L)."""
        u_ref, dl_ref, b_ref, c_ref, z_ref, bias_ref, k_ref = refs
        bias_v = bias_ref[...].astype(acc) if has_bias else None

        def fetch(t):
            valid = t < length
            tt = jnp.minimum(t, length - 1)
            dt = _delta(dl_ref[tt, :].astype(acc), bias_v, softplus)
            if masked:
                dt = jnp.where(valid, dt, 0.0)
            out = {"dt": dt, "u": u_ref[tt, :].astype(acc), "b": b_ref[tt, :].astype(acc)}
            if has_keep:
                k = k_ref[pl.ds(tt, 1)].astype(acc)  # (1,)
                out["k"] = jnp.where(valid, k, 1.0) if masked else k
            if need_c:
                out["c"] = c_ref[tt, :].astype(acc)
                if has_z:
                    out["z"] = z_ref[tt, :].astype(acc)
            return out

        return fetch

    def advance(x, a, cur):
        da = jnp.exp2(cur["dt"][:, None] * a)  # a = A * log2(e)
        if has_keep:
            da = jnp.where(cur["k"][:, None] > 0, da, 0.0)
        return da * x + (cur["dt"] * cur["u"])[:, None] * cur["b"][None, :]

    def walk(fetch, t0, steps, carry, emit):
        """emit(t, state, inputs) over steps t0 .. t0 + steps - 1; carry = (state, the inputs
        of the next ``depth`` steps); the loop loads step t + depth while step t computes."""

        def body(i, cr):
            st, queue = cr
            nxt = fetch(t0 + i + depth)
            return emit(t0 + i, st, queue[0]), queue[1:] + (nxt,)

        return lax.fori_loop(_i32(0), _i32(steps), body, carry)

    def queue_at(fetch, t0):
        return tuple(fetch(t0 + p) for p in range(depth))

    # inputs: u, dl, A, B, C, [D], [z], [bias], [keep]; outputs follow
    def split_refs(refs, need_c):
        it = iter(refs)
        u_ref, dl_ref, a_ref, b_ref, c_ref = (next(it) for _ in range(5))
        d_ref = next(it) if has_d else None
        z_ref = next(it) if has_z else None
        bias_ref = next(it) if has_bias else None
        k_ref = next(it) if has_keep else None
        # only the last chunk (phase 3) can run past L
        masked = need_c and ragged
        fetch = make_fetch((u_ref, dl_ref, b_ref, c_ref, z_ref, bias_ref, k_ref), need_c, masked)
        return a_ref, d_ref, fetch, list(it)

    extra = [v for v in (Dv, z, bias, keep) if v is not None]
    extra_specs = [
        s for v, s in ((Dv, vec), (z, seq), (bias, vec), (keep, k_spec)) if v is not None
    ]
    in_args = [u, dl, A, Bg, Cg, *extra]
    in_specs = [seq, seq, a_spec, b_spec, c_spec, *extra_specs]

    nsub = tc // sub if save else 1
    cost = lambda phase: _cost_selective_chunked(
        phase, u, dl, A, Bg, Cg, Dv, z, bias, keep, h0, u.dtype, bd=bd, tc=tc, nc=nc, nsub=nsub,
        softplus=softplus, save=save, keep_ypre=keep_ypre,
    )  # fmt: skip

    if nc > 1:  # phase 1: chunks 0..nc-2 from a zero state -> end state and decay product

        def local(*refs):
            a_ref, _, fetch, (e_ref, p_ref) = split_refs(refs, need_c=False)
            a = a_ref[...].astype(acc) * _LOG2E

            def emit(t, st, cur):
                x, sdt, kp = st
                x = advance(x, a, cur)
                kp = kp * cur["k"] if has_keep else kp
                return x, sdt + cur["dt"], kp

            t0 = pl.program_id(2) * tc
            st0 = (jnp.zeros((bd, npad), acc), jnp.zeros((bd,), acc), jnp.ones((1,), acc))
            (x, sdt, kp), _ = walk(fetch, t0, tc, (st0, queue_at(fetch, t0)), emit)
            e_ref[...] = x.astype(e_ref.dtype)
            p_ref[...] = decay_product(sdt, kp, a).astype(p_ref.dtype)

        ends, decays = chunk_ends_call(
            local, in_args, in_specs, chunk_state, grid=(bsz, dim // bd, nc - 1), dim=dim,
            npad=npad, acc=acc, interpret=interpret, params=params,
            name="jaxcore_selective_scan_chunk_ends", cost=cost(1),
        )  # fmt: skip

    step_len = sub if save else tc

    def rerun(*refs):  # phase 3: from the true start states; y fused
        a_ref, d_ref, fetch, outs = split_refs(refs, need_c=True)
        h_ref, *outs = outs
        ep = (outs.pop(0), outs.pop(0)) if nc > 1 else ()
        y_ref, hT_ref, *rest = outs
        yp_ref = rest.pop(0) if keep_ypre else None
        st_ref = rest.pop(0) if save else None
        a = a_ref[...].astype(acc) * _LOG2E
        dv = d_ref[...].astype(acc) if has_d else None
        c = pl.program_id(2)
        row_ok = lambda t: jnp.broadcast_to(t < length, (bd,)) if ragged else None

        def emit(t, x, cur):
            x = advance(x, a, cur)
            y = jnp.sum(x * cur["c"][None, :], axis=1)
            if has_d:
                y = y + dv * cur["u"]
            tt = jnp.minimum(t, length - 1)
            if yp_ref is not None:
                plgpu.store(
                    yp_ref.at[tt, pl.ds(_i32(0), bd)], y.astype(yp_ref.dtype), mask=row_ok(t)
                )
            if has_z:
                zz = cur["z"]
                y = y * (zz / (1.0 + jnp.exp(-zz)))
            plgpu.store(y_ref.at[tt, pl.ds(_i32(0), bd)], y.astype(y_ref.dtype), mask=row_ok(t))
            return x

        def sub_chunk(k, cr):
            if st_ref is not None:
                st_ref[k] = cr[0].astype(st_ref.dtype)
            return walk(fetch, c * tc + k * step_len, step_len, cr, emit)

        t0 = c * tc
        x0 = h_ref[...].astype(acc)
        if ep:  # phase 2, folded in: x = decay_k x + end_k over the chunks k before this one
            full = pl.ds(_i32(0), bd), pl.ds(_i32(0), npad)
            mask_at = lambda k: jnp.broadcast_to(k < c, (bd, npad))
            x0 = _fold_starts(x0, *ep, c, nc - 1, lambda k: (k, *full), mask_at)
        x, _ = lax.fori_loop(_i32(0), _i32(nsub), sub_chunk, (x0, queue_at(fetch, t0)))
        last = jnp.broadcast_to(c == nc - 1, (bd, npad))
        plgpu.store(
            hT_ref.at[pl.ds(_i32(0), bd), pl.ds(_i32(0), npad)], x.astype(hT_ref.dtype), mask=last
        )

    saved = None
    if save:
        saved = nc * nsub, pl.BlockSpec((None, nsub, bd, npad), lambda i, j, c: (i, c, j, 0))
    out_shape, out_specs = _forward_outputs(u, npad, acc, seq, state, keep_ypre, saved)
    outs = backend.pallas_call(
        rerun,
        out_shape=out_shape,
        grid=(bsz, dim // bd, nc),
        in_specs=in_specs + [state] + ([all_chunks] * 2 if nc > 1 else []),
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
        name="jaxcore_selective_scan_chunked",
        cost_estimate=cost(3),
    )(*in_args, h0, *((ends, decays) if nc > 1 else ()))
    return _split_outputs(outs, keep_ypre, save)


def _forward_outputs(u, npad: int, acc, seq, state, keep_ypre: bool, saved):
    """(out_shape, out_specs) of the selective forward kernels: y (B, L, D) in u's dtype, the
    final state (B, D, Np), y before the gate (acc; with ``keep_ypre``) and the saved states
    (``saved``: (count, BlockSpec) of (B, count, D, Np) in acc, or None)."""
    bsz, length, dim = u.shape
    shapes = [jax.ShapeDtypeStruct((bsz, length, dim), u.dtype),
              jax.ShapeDtypeStruct((bsz, dim, npad), acc)]  # fmt: skip
    specs = [seq, state]
    if keep_ypre:
        shapes.append(jax.ShapeDtypeStruct((bsz, length, dim), acc))
        specs.append(seq)
    if saved is not None:
        shapes.append(jax.ShapeDtypeStruct((bsz, saved[0], dim, npad), acc))
        specs.append(saved[1])
    return tuple(shapes), tuple(specs)


def _split_outputs(outs, keep_ypre: bool, save: bool):
    """(y, final state, y before the gate or None, saved states or None)."""
    y, h_t, *rest = outs
    ypre = rest.pop(0) if keep_ypre else None
    subs = rest.pop(0) if save else None
    return y, h_t, ypre, subs


def _blocked_steps(sub: int | None, cap: int) -> int:
    """Steps T per block of the "blocked" kernel: the largest power of two <= cap (dividing the
    saved-state interval ``sub`` when the forward saves states)."""
    t = 1
    while t * 2 <= cap and (sub is None or sub % (t * 2) == 0):
        t *= 2
    return t


def _cost_selective_blocked(phase: int, u, dl, A, Bg, Cg, Dv, z, bias, keep, h0, *, bd, T, bpc,
                            nbc, nsave, softplus, keep_ypre):  # fmt: skip
    """ "blocked" selective scan, one program per (batch, channel block, chunk of ``bpc`` blocks
    of T steps): phase 3 (grid B x D/bd x nbc, y and states) or, with nbc > 1 chunks, phase 1
    (grid B x D/bd x (nbc - 1), each chunk's end state from zero and its decay product).

    Flops and transcendentals of every block step (identity steps past L included): per
    channel-step delta_bias (1 flop), softplus (1 flop, 2 transcendentals), dt u (1); per
    (channel, state, step) element dt A (1), exp2 (1 transcendental), (dt u) B (1), the
    carry into the first step's input (a_0 h + b_0: 2, counted on every row as the kernel body
    writes it; compiled, the other rows' fold away), the recurrence (3: one combine a1 a2,
    a2 b1 + b2; compiled, the unused running products fold away), the carry's masked sum over
    T (1); phase 1 also sums dt (1 per channel-step) and takes the minimum of the keep
    flags (1 per block), then exp2(A sum dt) per lane (1 flop, 1 exp); phase 3 also * C and
    the sum over N (2 per element), D u (2) and the silu gate (4 flops, 1 exp) per
    channel-step, and folds the nbc - 1 earlier chunks (2 flops per lane-slot). Both scale A by
    log2(e) (1 per lane).

    Bytes: what moves (masked-off lanes move nothing). Every row below L of the program's
    blocks: delta, u (bd), B (npad), keep; in phase 3 also C (npad), z (bd), y (and y before
    the gate, acc) written. Per program: A, delta_bias; phase 1 writes two (bd, npad) blocks;
    phase 3 reads D and h0, loads the earlier chunks' (end, decay) slots k < c, and per (batch,
    channel block) writes the ``nsave`` saved states and the final state once."""
    bsz, length, dim = u.shape
    npad = A.shape[1]
    iacc = _isz(h0)
    lanes = bd * npad
    groups = bsz * (dim // bd)  # (batch, channel block) pairs
    chunks = nbc - 1 if phase == 1 else nbc
    programs = groups * chunks
    steps = bpc * T  # per program
    per_ch = 1 + (bias is not None) + (1 if softplus else 0)
    per_el = 8
    trans = steps * (lanes + bd * 2 * bool(softplus))
    row = bd * (_isz(dl) + _isz(u)) + npad * _isz(Bg) + _isz(keep)
    fixed = lanes * _isz(A) + bd * _isz(bias)
    if phase == 1:
        rows = min(length, chunks * steps)
        per_ch += 1
        flops = steps * (per_el * lanes + bd * per_ch) + bpc * (keep is not None) + 2 * lanes
        trans += lanes
        fixed += 2 * lanes * iacc
        once = 0
    else:
        rows = length
        per_el += 2
        per_ch += 2 * (Dv is not None) + 4 * (z is not None)
        trans += steps * bd * (z is not None)
        flops = steps * (per_el * lanes + bd * per_ch) + lanes + 2 * lanes * (nbc - 1)
        row += npad * _isz(Cg) + bd * (_isz(z) + _isz(u) + (iacc if keep_ypre else 0))
        fixed += bd * _isz(Dv) + lanes * _isz(h0)
        once = lanes * iacc * (nsave + 1 + nbc * (nbc - 1))  # saved, final, fold slots k < c
    nbytes = groups * (rows * row + once) + programs * fixed
    return _estimate(programs * flops, programs * trans, nbytes)


def _selective_blocked_call(u, dl, A, Bg, Cg, Dv, z, bias, h0, keep, *, softplus, tc, nc, sub,
                            save, interpret, save_ypre=True):  # fmt: skip
    """SELECTIVE_KERNEL="blocked" (see SELECTIVE_BLOCKED_CONFIG): same operands and returns as
    ``_selective_chunked_call`` (with ``save``, the states entering every ``sub`` steps of the
    nc * tc steps, those past L equal to the final state). With SELECTIVE_BLOCKED_PROGRAMS the
    blocks are split into chunks like the chunked kernel's: phase 1 (every chunk but the last
    from zero: end state, decay product), phase 3 (the earlier chunks folded into the start
    state, then the chunk's blocks with the outputs)."""
    from ._tt_scan import linear_recurrence

    bsz, length, dim = u.shape
    npad = A.shape[1]
    acc = h0.dtype
    pg_b, pg_c = dim // Bg.shape[2], dim // Cg.shape[2]
    cap, tcap, warps, stages = SELECTIVE_BLOCKED_CONFIG
    bd = _channel_block(min(pg_b, pg_c), cap)
    T = _blocked_steps(sub if save else None, min(tcap, _pow2_at_least(length)))
    total = nc * tc if save else length  # with save: blocks up to the last saved interval
    nsave = nc * tc // sub if save else 0
    # one chunk (one pass) unless SELECTIVE_BLOCKED_PROGRAMS asks for more programs
    bpc, nbc = split_for_programs(
        -(-total // T), bsz * (dim // bd), int(SELECTIVE_BLOCKED_PROGRAMS)
    )
    has_d, has_z, has_bias, has_keep = (v is not None for v in (Dv, z, bias, keep))
    keep_ypre = save and has_z and save_ypre

    seq = pl.BlockSpec((None, length, bd), lambda i, j, c: (i, 0, j))
    b_spec = pl.BlockSpec((None, length, None, npad), lambda i, j, c: (i, 0, (j * bd) // pg_b, 0))
    c_spec = pl.BlockSpec((None, length, None, npad), lambda i, j, c: (i, 0, (j * bd) // pg_c, 0))
    vec = pl.BlockSpec((bd,), lambda i, j, c: (j,))
    state = pl.BlockSpec((None, bd, npad), lambda i, j, c: (i, j, 0))
    chunk_state = pl.BlockSpec((None, None, bd, npad), lambda i, j, c: (i, c, j, 0))
    all_chunks = pl.BlockSpec((None, max(nbc - 1, 1), bd, npad), lambda i, j, c: (i, 0, j, 0))
    k_spec = pl.BlockSpec((None, length), lambda i, j, c: (i, 0))
    extra = [v for v in (Dv, z, bias, keep) if v is not None]
    extra_specs = [
        sp for v, sp in ((Dv, vec), (z, seq), (bias, vec), (keep, k_spec)) if v is not None
    ]
    in_args = [u, dl, A, Bg, Cg, *extra]
    a_spec = pl.BlockSpec((bd, npad), lambda i, j, c: (j, 0))
    in_specs = [seq, seq, a_spec, b_spec, c_spec, *extra_specs]
    tid = lambda: lax.broadcasted_iota(jnp.int32, (T,), 0)  # noqa: E731

    def walk(refs, h, extra_carry, outputs: bool):
        """The blocks of this program's chunk (static count ``bpc``; blocks past ``total`` are
        identity steps). outputs: y, y before the gate, saved states; else (phase 1) the
        carry also sums dt and takes the keep flags' minimum."""
        u_ref, dl_ref, a_ref, b_ref, c_ref = refs[:5]
        rest = list(refs[5:])
        d_ref = rest.pop(0) if has_d else None
        z_ref = rest.pop(0) if has_z else None
        bias_ref = rest.pop(0) if has_bias else None
        k_ref = rest.pop(0) if has_keep else None
        y_ref, yp_ref, st_ref = rest if outputs else (None, None, None)
        a = a_ref[...].astype(acc) * _LOG2E  # (bd, Np)
        a_t = a.T[None]  # (1, Np, bd)
        dv = d_ref[...].astype(acc)[None, :] if has_d else None  # (1, bd)
        bias_v = bias_ref[...].astype(acc)[None, :] if has_bias else None  # (1, bd)
        step = lax.broadcasted_iota(jnp.int32, (T, 1, 1), 0)
        is_first, is_last = step == 0, step == T - 1
        first = pl.program_id(2) * bpc

        def body(k, carry):
            h, ex = carry  # h: (Np, bd)
            t0 = ((first + k) * T).astype(jnp.int32)  # int32 under x64 too
            valid = t0 + tid() < length  # rows past L: identity steps, stores masked
            rows = pl.ds(t0, T)

            def load(ref, width):
                mask = jnp.broadcast_to(valid[:, None], (T, width))
                return plgpu.load(ref.at[rows, pl.ds(_i32(0), width)], mask=mask, other=0.0)

            # tiles (T, Np, bd): time first, so that Triton keeps each lane's T steps in its
            # registers (the recurrence in-thread, no shuffles) and the channels on the lanes
            dt = _delta(load(dl_ref, bd).astype(acc), bias_v, softplus)  # (T, bd)
            dt = jnp.where(valid[:, None], dt, 0.0)
            uu = load(u_ref, bd).astype(acc)
            bt = load(b_ref, npad).astype(acc)  # (T, Np)
            da = jnp.exp2(dt[:, None, :] * a_t)  # (T, Np, bd)
            if has_keep:
                kt = plgpu.load(k_ref.at[rows], mask=valid, other=1.0).astype(acc)
                da = jnp.where(kt[:, None, None] > 0, da, 0.0)
            dbu = (dt * uu)[:, None, :] * bt[:, :, None]
            # the carry enters through the first step's input (b_0 + a_0 h), so the scan's
            # running products are unused (compiled away). -0.0 is the exact identity of +:
            # LLVM folds x + -0.0 -> x, so the selects on these in-thread rows cost nothing.
            dbu = dbu + jnp.where(is_first, da * h[None], -0.0)
            _, hs = linear_recurrence(da, dbu, axis=0)  # the states after each step
            h_next = jnp.sum(jnp.where(is_last, hs, -0.0), axis=0)  # the block's last state
            if not outputs:
                sdt, kp = ex
                sdt = sdt + jnp.sum(dt, axis=0)
                if has_keep:
                    kp = jnp.minimum(kp, jnp.min(kt))
                return h_next, (sdt, kp)
            ct = load(c_ref, npad).astype(acc)
            y = jnp.sum(hs * ct[:, :, None], axis=1)  # (T, bd)
            if has_d:
                y = y + dv * uu
            store_mask = jnp.broadcast_to(valid[:, None], (T, bd))
            out_rows = (rows, pl.ds(_i32(0), bd))
            if yp_ref is not None:
                plgpu.store(yp_ref.at[out_rows], y.astype(yp_ref.dtype), mask=store_mask)
            if has_z:
                zz = load(z_ref, bd).astype(acc)
                y = y * (zz / (1.0 + jnp.exp(-zz)))
            plgpu.store(y_ref.at[out_rows], y.astype(y_ref.dtype), mask=store_mask)
            if st_ref is not None:  # the state entering this block, at each saved interval
                at = (jnp.minimum(t0 // sub, nsave - 1), pl.ds(_i32(0), bd), pl.ds(_i32(0), npad))
                on = jnp.broadcast_to((t0 % sub == 0) & (t0 < total), (bd, npad))
                plgpu.store(st_ref.at[at], h.T.astype(st_ref.dtype), mask=on)
            return h_next, ex

        h, extra_carry = lax.fori_loop(_i32(0), _i32(bpc), body, (h.T, extra_carry))
        return (h.T, extra_carry), a  # h: (bd, Np) outside the walk

    cost = lambda phase: _cost_selective_blocked(
        phase, u, dl, A, Bg, Cg, Dv, z, bias, keep, h0, bd=bd, T=T, bpc=bpc, nbc=nbc,
        nsave=nsave, softplus=softplus, keep_ypre=keep_ypre,
    )  # fmt: skip
    params = _compiler_params(interpret, warps, stages)
    n_in = len(in_args)

    if nbc > 1:  # phase 1: chunks 0 .. nbc - 2 from zero -> end state and decay product

        def local(*refs):
            e_ref, p_ref = refs[n_in:]
            zero = jnp.zeros((bd, npad), acc)
            ex0 = (jnp.zeros((bd,), acc), jnp.ones((1,), acc))
            (h, (sdt, kp)), a = walk(refs[:n_in], zero, ex0, outputs=False)
            e_ref[...] = h.astype(e_ref.dtype)
            p_ref[...] = decay_product(sdt, kp, a).astype(p_ref.dtype)

        ends, decays = chunk_ends_call(
            local, in_args, in_specs, chunk_state, grid=(bsz, dim // bd, nbc - 1), dim=dim,
            npad=npad, acc=acc, interpret=interpret, params=params,
            name="jaxcore_selective_scan_blocked_chunk_ends", cost=cost(1),
        )  # fmt: skip

    def kernel(*refs):
        ins, (h_ref, *rest) = refs[:n_in], refs[n_in:]
        ep = (rest.pop(0), rest.pop(0)) if nbc > 1 else ()
        y_ref, ht_ref, *outs = rest
        yp_ref = outs.pop(0) if keep_ypre else None
        st_ref = outs.pop(0) if save else None
        c = pl.program_id(2)
        h = h_ref[...].astype(acc)
        if ep:  # the earlier chunks folded in: h = decay_k h + end_k for k < c
            full = pl.ds(_i32(0), bd), pl.ds(_i32(0), npad)
            mask_at = lambda k: jnp.broadcast_to(k < c, (bd, npad))  # noqa: E731
            h = _fold_starts(h, *ep, c, nbc - 1, lambda k: (k, *full), mask_at)
        (h, _), _ = walk((*ins, y_ref, yp_ref, st_ref), h, (), outputs=True)
        last = jnp.broadcast_to(c == nbc - 1, (bd, npad))
        plgpu.store(
            ht_ref.at[pl.ds(_i32(0), bd), pl.ds(_i32(0), npad)], h.astype(ht_ref.dtype), mask=last
        )

    saved = (nsave, pl.BlockSpec((None, nsave, bd, npad), lambda i, j, c: (i, 0, j, 0)))
    out_shape, out_specs = _forward_outputs(
        u, npad, acc, seq, state, keep_ypre, saved if save else None
    )
    outs = backend.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(bsz, dim // bd, nbc),
        in_specs=in_specs + [state] + ([all_chunks] * 2 if nbc > 1 else []),
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
        name="jaxcore_selective_scan_blocked",
        cost_estimate=cost(3),
    )(*in_args, h0, *((ends, decays) if nbc > 1 else ()))
    return _split_outputs(outs, keep_ypre, save)


class SelectiveConfig(NamedTuple):
    """Static configuration of one fused selective-scan call (hashable: a custom_jvp argument)."""

    softplus: bool
    lb: str  # B's layout, for the XLA backward
    lc: str  # C's layout
    chunk: int  # the backward's recompute chunk = the forward's saved-state interval
    tc: int  # steps per chunk of the chunked kernel's grid
    nc: int  # chunks
    interpret: bool
    backward: str  # "pallas" or "xla" (SELECTIVE_BACKWARD resolved)
    kernel: str = "chunked"  # the forward design: "chunked" or "blocked"


def _fused_impl(u, dl, A, Bm, Cm, Dv, z, bias, h0, keep, cfg: SelectiveConfig, save: bool):
    """The forward on N padded to a power of two; the saved states stay padded."""
    softplus, lb, lc, chunk, tc, nc, interpret = cfg[:7]
    n = A.shape[1]
    npad = _pow2_at_least(n)
    g = lambda v: v[:, :, None] if v.ndim == 3 else v  # time-varying == one group
    Bg, Cg = g(Bm), g(Cm)
    if npad != n:
        pad = lambda v: jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, npad - n)])
        A, Bg, Cg, h0 = pad(A), pad(Bg), pad(Cg), pad(h0)
    call = _selective_blocked_call if cfg.kernel == "blocked" else _selective_chunked_call
    y, h_t, ypre, subs = call(
        u, dl, A, Bg, Cg, Dv, z, bias, h0, keep, softplus=softplus, tc=tc, nc=nc, sub=chunk,
        save=save, interpret=interpret, save_ypre=cfg.backward == "xla",  # Pallas bwd recomputes it
    )  # fmt: skip
    return y, h_t[..., :n], ypre, subs


@functools.partial(jax.custom_jvp, nondiff_argnums=(10,))
def _selective_fused(u, dl, A, Bm, Cm, Dv, z, bias, h0, keep, cfg):
    """(y, final state) from the Pallas forward. Differentiated by a custom JVP whose tangent map
    is a ``linear_call``: reverse mode transposes it with the hand backward
    (:func:`_selective_fused_bwd`: the Pallas reverse kernels or the chunked XLA recompute, from
    the states the forward saved); forward mode evaluates it as the JVP of the same scan in XLA
    (:func:`_xla_twin`; a Pallas kernel has no JVP)."""
    y, h_t, _, _ = _fused_impl(u, dl, A, Bm, Cm, Dv, z, bias, h0, keep, cfg, save=False)
    return y, h_t


_DIFF = 9  # the differentiable operands: all but keep (0/1 reset flags)


def _xla_twin(cfg, keep, u, dl, A, Bm, Cm, Dv, z, bias, h0):
    """What the fused Pallas forward computes, in XLA (the chunked recurrence of
    ``_selective.py``): delta_bias and softplus, the scan, D u and silu(z); y in u's dtype."""
    from ._selective import _run_chunked

    acc = h0.dtype
    dt = dl.astype(acc)
    if bias is not None:
        dt = dt + bias.astype(acc)[None, None]
    if cfg.softplus:
        dt = jax.nn.softplus(dt)
    uf = u.astype(acc)
    kp = jnp.ones(u.shape[:2], acc) if keep is None else keep.astype(acc)
    y, h_t = _run_chunked(
        uf, dt, A, Bm.astype(acc), Cm.astype(acc), h0, kp, cfg.lb, cfg.lc, cfg.chunk
    )
    if Dv is not None:
        y = y + uf * Dv.astype(acc)[None, None]
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return y.astype(u.dtype), h_t


@functools.partial(_selective_fused.defjvp, symbolic_zeros=True)
def _selective_fused_jvp(cfg, primals, tangents):
    fun = functools.partial(_xla_twin, cfg)  # (keep, *differentiable operands)

    def fast(*p):  # also the states the backward reads (with_saved: differentiable again)
        y, h_t, ypre, subs = _fused_impl(*p, cfg, save=True)
        return (y, h_t), (ypre, subs)

    out, saved = with_saved(fast, lambda *p: fun(p[_DIFF], *p[:_DIFF]))(*primals)

    def backward(p, keep, saved, cts):
        u, dl, A, Bm, Cm, Dv, z, bias, h0 = p
        grads = _selective_fused_bwd(cfg, (u, dl, A, Bm, Cm, Dv, z, bias, keep, *saved, h0), cts)
        return grads[:_DIFF]

    diff, keep = primals[:_DIFF], primals[_DIFF]
    return out, tuple(tangent_call(fun, backward, diff, tangents[:_DIFF], keep, saved, out))


def _selective_fused_bwd(cfg, res, cts):
    bwd = _selective_fused_bwd_pallas if cfg.backward == "pallas" else _selective_fused_bwd_xla
    grads = bwd(cfg, res[:11], cts)
    u, dl, A, Bm, Cm, Dv, z, bias, keep, _, _, h0 = res
    primals = (u, dl, A, Bm, Cm, Dv, z, bias, h0, keep)
    # under shard_map: replicated inputs (A, D, bias, ...) get their gradients summed over
    # the shards, typed as their primals (check_vma=True)
    return tuple(
        None if g is None else backend.vary_as(g, p) for g, p in zip(grads, primals, strict=True)
    )


def _selective_fused_bwd_pallas(cfg, res, cts):
    """The Pallas backward kernels (_pallas_bwd.py), then XLA sums of their partials."""
    from ._pallas_bwd import selective_bwd_call

    softplus, lb, lc, chunk, tc, nc, interpret = cfg[:7]
    u, dl, A, Bm, Cm, Dv, z, bias, keep, ypre, subs = res
    gy, gh = cts
    acc = subs.dtype
    n = A.shape[1]
    npad = subs.shape[-1]
    g = lambda v: v[:, :, None] if v.ndim == 3 else v  # time-varying == one group
    Bg, Cg, Ap, ghp = g(Bm), g(Cm), A, gh.astype(acc)
    if npad != n:
        pad = lambda v: jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, npad - n)])
        Ap, Bg, Cg, ghp = pad(Ap), pad(Bg), pad(Cg), pad(ghp)
    gu, gdl, ga, gbp, gcp, gd, gz, gbias, gh0 = selective_bwd_call(
        u, dl, Ap, Bg, Cg, Dv, z, bias, keep, subs, gy, ghp, softplus=softplus, tc=tc,
        nc=nc, sub=chunk, interpret=interpret,
    )  # fmt: skip

    def fold(part, groups):  # (B, L, blocks, Np) -> (B, L, G, n): sum the blocks of each group
        bsz, length, nblk, _ = part.shape
        return part.reshape(bsz, length, groups, nblk // groups, npad).sum(axis=3)[..., :n]

    gb = fold(gbp, Bg.shape[2])
    gc = fold(gcp, Cg.shape[2])
    gb = gb[:, :, 0] if Bm.ndim == 3 else gb
    gc = gc[:, :, 0] if Cm.ndim == 3 else gc
    return (
        gu,
        gdl,
        ga[:, :n].astype(A.dtype),
        gb.astype(Bm.dtype),
        gc.astype(Cm.dtype),
        None if Dv is None else gd.astype(Dv.dtype),
        gz,
        None if bias is None else gbias.astype(bias.dtype),
        gh0[..., :n].astype(acc),
        None if keep is None else jnp.zeros_like(keep),
    )


def _selective_fused_bwd_xla(cfg, res, cts):
    """The chunked XLA backward (recompute per chunk of ``chunk`` steps from the saved states),
    plus the fused prologue (delta_bias, softplus) and epilogue (D, silu(z))."""
    from ._selective import _chunked_backward, _from_chunks, _to_chunks

    softplus, lb, lc, chunk = cfg[:4]
    u, dl, A, Bm, Cm, Dv, z, bias, keep, ypre, subs = res
    subs = subs[..., : A.shape[1]]
    gy, gh = cts
    acc = subs.dtype
    length = u.shape[1]
    nbc = -(-length // chunk)
    uf = u.astype(acc)

    def pre(dl, *bias):
        dt = dl.astype(acc)
        if bias:
            dt = dt + bias[0].astype(acc)[None, None]
        return jax.nn.softplus(dt) if softplus else dt

    dt, pre_vjp = jax.vjp(pre, dl, *([] if bias is None else [bias]))
    gy = gy.astype(acc)
    gz = None
    if z is not None:
        zf = z.astype(acc)
        sig = jax.nn.sigmoid(zf)
        gz = (gy * ypre * (sig * (1.0 + zf * (1.0 - sig)))).astype(z.dtype)
        gy = gy * (zf * sig)
    gd = None
    if Dv is not None:
        gd = jnp.sum(gy * uf, axis=(0, 1)).astype(Dv.dtype)
    c = lambda v, value=0.0: _to_chunks(v, chunk, nbc, value)
    kp = jnp.ones(u.shape[:2], acc) if keep is None else keep
    bf, cf = Bm.astype(acc), Cm.astype(acc)
    res_c = (c(uf), c(dt), A, c(bf), c(cf), c(kp, 1.0), jnp.moveaxis(subs[:, :nbc], 1, 0))
    gu, gdt, ga, gb, gc, gh0, _ = _chunked_backward(lb, lc, res_c, (c(gy), gh))
    back = lambda v: _from_chunks(v, length)
    gu = back(gu)
    if Dv is not None:
        gu = gu + gy * Dv.astype(acc)[None, None]
    gpre = pre_vjp(back(gdt))
    gbias = None if bias is None else gpre[1].astype(bias.dtype)
    gkeep = None if keep is None else jnp.zeros_like(keep)
    return (
        gu.astype(u.dtype),
        gpre[0].astype(dl.dtype),
        ga.astype(A.dtype),
        back(gb).astype(Bm.dtype),
        back(gc).astype(Cm.dtype),
        gd,
        gz,
        gbias,
        gh0.astype(acc),
        gkeep,
    )


def selective_scan_fused(u, delta, A, Bm, Cm, D, z, delta_bias, softplus, h0, keep, lb, lc,
                         chunk, interpret):  # fmt: skip
    """The whole selective scan in the chunked Pallas kernel (SELECTIVE_KERNEL != "sequential").

    u, delta, z: (B, L, D) as given (bf16/f32; delta_bias and softplus applied in the kernel);
    A: (D, N) real, state dtype; Bm, Cm: (B, L, N) or (B, L, G, N), any real float dtype (cast
    in the kernel); D, delta_bias: (D,) or None;
    h0: (B, D, N) state dtype; keep: (B, L) reset flags (0 = reset) or None; ``chunk``: the
    backward's recompute chunk (the kernel's chunk is a multiple of it).
    Returns (y (B, L, D) in u's dtype, with D*u and silu(z) applied; final state (B, D, N)).
    """
    bsz, length, dim = u.shape
    pg_b = dim // (1 if Bm.ndim == 3 else Bm.shape[2])
    pg_c = dim // (1 if Cm.ndim == 3 else Cm.shape[2])
    bd = _channel_block(min(pg_b, pg_c), SELECTIVE_CHUNKED_CONFIG[0])
    chunk = max(1, min(chunk, length))
    tc, nc = _plan_chunks(bsz * (dim // bd), length, unit=chunk)
    acc = h0.dtype
    cast = lambda v: None if v is None else jnp.asarray(v).astype(acc)
    backward = _check_backward(SELECTIVE_BACKWARD)
    if backward == "auto":
        backward = "xla" if interpret else "pallas"  # see SELECTIVE_BACKWARD
    kernel = _check_kernel(SELECTIVE_KERNEL, "SELECTIVE_KERNEL", SELECTIVE_KERNELS)
    cfg = SelectiveConfig(bool(softplus), lb, lc, chunk, tc, nc, bool(interpret), backward, kernel)
    return _selective_fused(u, delta, A, Bm, Cm, cast(D), z, cast(delta_bias), h0, keep, cfg)
