"""Hopper flash-attention forward in Mosaic GPU (Pallas ``plgpu``): wgmma, TMA, warp specialisation.

The Triton lowering (``_pallas.py``) cannot use Hopper's asynchronous warpgroup matmuls (wgmma) or
its TMA copy engine; on an H200 it reached 0.49x cuDNN's forward. This kernel is written for them,
after the FlashAttention-3 design:

* One CTA owns ``2 * block_q`` query rows of one (batch, head) and runs three warpgroups. Warpgroups
  0 and 1 each own ``block_q`` rows (wgmma's M is 64 per warpgroup); warpgroup 2 only issues TMA
  loads of K/V blocks into a ring of ``stages`` shared-memory slots, guarded by "loaded" and
  "consumed" barriers, and gives its registers to the other two.
* The two compute warpgroups ping-pong through one two-arrival barrier, so one's softmax runs
  while the other's matmuls occupy the tensor cores.
* Both compute warpgroups walk the same key blocks [lo, hi): the blocks that some row of the CTA
  sees under the causal / window / key-length mask (the rest are never loaded). Blocks that every
  row of a warpgroup sees run without a mask; the others mask with -inf. The running maximum
  starts at a finite -1e30, so a row that sees nothing has l = 0 and is written as zeros with
  lse = -inf (never NaN).
* Softmax in base 2 with the logit scale folded into one multiply; output and f32 lse (natural
  log, (B, N, T) like the Triton kernel) go back through shared memory and TMA.
* Heavy causal tiles (late query rows) are launched first.

The backward (:data:`MOSAIC_BACKWARD`, read at trace time) is the Mosaic GPU kernels of
``_mosaic_bwd.py`` (the default where their tiles fit in shared memory) or the Triton kernel's
(``_pallas._backward``), both from the saved output and lse. Inputs are bf16 / f16; supported
options are scale, is_causal, local_window_size, logits_soft_cap, GQA, key_value_seq_lengths,
segment_ids and any T / S (padded here); bias and mask raise a ValueError (use
implementation="pallas").

Segment ids (packed sequences): the query rows' ids arrive with the Q tile and each key block's
ids with its K block (TMA copies on the same barriers, two arrivals each); every block is then
masked by id equality. An XLA prologue gives each CTA tile the key blocks whose id range meets
the tile's (:func:`_segment_ranges`), so packed sequences only walk their own blocks.

Interpret mode runs the same kernel in JAX's Mosaic GPU
interpreter on CPU (tests), with one difference: there the two matmuls are ``lax.dot_general``
on the shared-memory tiles (the interpreter's wgmma takes neither a transposed nor a register
operand, and it has no ``run_state``). Barriers, TMA copies, block ranges, masks and the softmax
are the compiled kernel's. Register layouts are compiler hints and are skipped there too.
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

from jaxcore import backend
from jaxcore.autodiff import tangent_call

from . import _pallas
from ._common import Inputs, MaskSpec

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_BIG = 1e30


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Static options of one call (hashable: a custom_jvp nondiff argument)."""

    spec: MaskSpec
    groups: int  # query heads per key/value head
    block_q: int = 64  # rows per compute warpgroup (the CTA owns 2 * block_q)
    block_k: int = 128
    stages: int = 2  # K/V ring depth
    pingpong: bool = True
    has_lengths: bool = False  # a (B,) int32 key_value_seq_lengths input
    has_segments: bool = False  # (B, Tp) / (B, Sp) int32 segment ids and (B, tiles, 2) ranges
    interpret: bool = False


SMEM_BYTES = _pallas.HOPPER_SMEM_BYTES  # Hopper's shared memory per CTA (opt-in maximum)


def smem_bytes(
    block_q: int,
    block_k: int,
    stages: int,
    hp: int,
    hvp: int,
    itemsize: int = 2,
    segments: bool = False,
) -> int:
    """Shared memory one CTA allocates: Q (and O) tiles, the K/V ring, lse rows, barriers (and
    the int32 segment ids of the query rows and of each ring slot's keys)."""
    q = 2 * block_q * hp * itemsize
    o = 0 if hvp == hp else 2 * block_q * hvp * itemsize
    ring = stages * block_k * (hp + hvp) * itemsize
    seg = (2 * block_q + stages * block_k) * 4 if segments else 0
    return q + o + ring + seg + 2 * block_q * 4 + 64 * (2 * stages + 4)


def default_config(hp: int = 128, hvp: int = 128) -> dict:
    """Tiles for Hopper: block_k 128 where two stages fit in shared memory, else 64.

    Not yet measured on a GPU (benchmarks/gpu_attention.py sweeps the alternatives).
    """
    bk = 128 if smem_bytes(64, 128, 2, hp, hvp) <= SMEM_BYTES else 64
    return dict(block_q=64, block_k=bk, stages=2)


def _i32(x: int) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def _cdiv(a, b: int):
    return lax.div(a + _i32(b - 1), _i32(b))


def _steps(cfg: MosaicConfig, r0, rows: int, s_end):
    """Key blocks [lo, hi) that rows [r0, r0 + rows) see (some entry), traced int32.

    ``s_end``: int32 scalar, keys at or past it are padding (the static length, or the
    sequence's key_value_seq_length).
    """
    left, right = _pallas._bounds(cfg.spec)
    bk = cfg.block_k
    # min(r0, 0) == 0 but traced: a literal 0 here reaches the loops as a constant, which
    # JAX 0.11's Mosaic GPU lowering rejects ("Shaped arrays must be represented by ir.Values").
    lo = jnp.minimum(r0, _i32(0))
    if left is not None:
        lo = lax.div(jnp.maximum(r0 - _i32(left), _i32(0)), _i32(bk))
    end = s_end  # exclusive key end
    if right is not None:
        end = jnp.minimum(jnp.maximum(r0 + _i32(rows + right), _i32(0)), s_end)
    hi = _cdiv(end, bk)
    hi = jnp.maximum(hi, lo)
    return lo, hi


def _full_steps(cfg: MosaicConfig, r0, lo, hi, s_end):
    """Sub-range [flo, fhi) of [lo, hi) whose blocks every row of [r0, r0 + block_q) sees fully."""
    left, right = _pallas._bounds(cfg.spec)
    bq, bk = cfg.block_q, cfg.block_k
    flo = lo
    if left is not None:  # k >= q - left for the last row
        flo = _cdiv(jnp.maximum(r0 + _i32(bq - 1 - left), _i32(0)), bk)
    fhi = lax.div(s_end, _i32(bk))  # no padded key inside
    if right is not None:  # k <= q + right for the first row
        fhi = jnp.minimum(fhi, lax.div(jnp.maximum(r0 + _i32(right + 1), _i32(0)), _i32(bk)))
    flo = jnp.minimum(jnp.maximum(flo, lo), hi)
    fhi = jnp.minimum(jnp.maximum(fhi, flo), hi)
    return flo, fhi


def producer_ring(n, stages: int, load, consumed) -> None:
    """A TMA producer warpgroup's loop: steps 0..n-1 (traced int32) into ``stages`` slots.

    ``load(i, wait)`` issues step i's copies into slot i % stages, first waiting on that slot's
    consumed barrier(s) when ``wait`` (every use but the first). At the end each used slot's
    last consumption is waited on too (the interpreter checks every phase is observed).
    ``consumed``: the barrier refs (``num_barriers=stages``) the consumers arrive on.
    """
    for r in range(stages):
        pl.when(_i32(r) < n)(functools.partial(load, _i32(r), False))

    @pl.loop(_i32(stages), jnp.maximum(n, _i32(stages)))
    def _(i):
        load(i, True)

    def drain(r: int):
        for bar in consumed:
            plgpu.barrier_wait(bar.at[r])

    for r in range(stages):
        pl.when(_i32(r) < n)(functools.partial(drain, r))


def _dot(a, b, trans_b: bool = False):
    """Interpreter-only matmul with f32 accumulation (the compiled kernel uses wgmma)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# The pieces below are shared by the forward and the backward kernels. Each takes
# ``interpret``: the Mosaic GPU interpreter's wgmma takes neither a transposed nor a register
# operand, it has no run_state and no rule for register layouts, so there the matmuls are
# dot_general on the shared-memory tiles and layouts are skipped.


def mm_nt(a, b, shape: tuple[int, int], interpret: bool, then=None) -> jax.Array:
    """``a @ b.T`` (f32) from shared-memory tiles a (M, K) and b (N, K); ``shape`` = (M, N).

    ``then()`` runs after the wgmma is issued and before its result is read (a schedule sync).
    """

    def fn(acc_ref):
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)))
        if then is not None:
            then()
        return acc_ref[...]

    if not interpret:
        return pl.run_scoped(fn, plgpu.ACC(shape, jnp.float32))
    out = _dot(a[...], b[...], trans_b=True)
    if then is not None:
        then()
    return out


def mm_acc(acc: jax.Array, a: jax.Array, b, interpret: bool, then=None) -> jax.Array:
    """``acc + a @ b``: f32 accumulator (M, N), a (M, K) in registers, b (K, N) a shared-memory
    tile; compiled, the wgmma accumulates in place. ``then()`` runs while it does."""

    def fn(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if then is not None:
            then()

    if not interpret:
        return pl.run_state(fn)(plgpu.ACC.init(acc))
    out = acc + _dot(a, b[...])
    if then is not None:
        then()
    return out


def laid_out(x: jax.Array, layout, interpret: bool) -> jax.Array:
    """``x`` cast to a register layout (a compiler hint; skipped in the interpreter)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def iota(shape: tuple[int, int], dim: int, interpret: bool) -> jax.Array:
    """int32 positions along ``dim`` in the wgmma register layout."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def vec(ref, dim: int, interpret: bool) -> jax.Array:
    """A 1-D shared-memory vector in registers, laid out to broadcast along tile dim ``dim``
    (``lax.broadcast_in_dim(x, shape, [dim])`` of a wgmma-layout tile)."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim))


def optional_refs(refs, has_lengths: bool, has_segments: bool):
    """(len_ref or None, (qseg, kseg, ranges) refs or None) from a kernel's trailing inputs."""
    n = int(has_lengths)
    return (refs[0] if has_lengths else None), (refs[n : n + 3] if has_segments else None)


def segment_scratch(segs: bool, own_rows: int, ring_rows: int, stages: int) -> tuple[list, int]:
    """(int32 id scratch: this CTA's own rows (2, own_rows) and the ring's (stages, ring_rows);
    arrivals on the barriers the ids share with their tiles: 2 with segment ids, else 1)."""
    if not segs:
        return [], 1
    return [plgpu.SMEM((2, own_rows), jnp.int32), plgpu.SMEM((stages, ring_rows), jnp.int32)], 2


def narrow(lo, hi, rng_ref, bi, tile):
    """[lo, hi) intersected with the tile's segment block range (empty stays empty)."""
    lo = jnp.maximum(lo, rng_ref[bi, tile, 0])
    return lo, jnp.maximum(jnp.minimum(hi, rng_ref[bi, tile, 1]), lo)


def visible(qpos, kpos, s_end, left: int | None, right: int | None) -> jax.Array:
    """The mask: key before ``s_end`` and inside the window [q - left, q + right]."""
    vis = kpos < s_end
    if right is not None:
        vis = jnp.logical_and(vis, kpos <= qpos + _i32(right))
    if left is not None:
        vis = jnp.logical_and(vis, kpos >= qpos - _i32(left))
    return vis


def _forward(cfg: MosaicConfig, q: jax.Array, k: jax.Array, v: jax.Array, lens=None, seg=None):
    """q (B, Tp, N, Hp), k (B, Sp, K, Hp), v (B, Sp, K, Hvp) -> out (B, Tp, N, Hvp), lse (B, N, Tp).

    Tp is a multiple of 2 * block_q, Sp of block_k; keys at or past spec.s (and, with
    ``lens`` (B,) int32, at or past lens[b]) are padding. ``seg`` (with ``cfg.has_segments``):
    (qseg (B, Tp), kseg (B, Sp), ranges (B, Tp // (2 * block_q), 2)) int32: query t sees key
    j only if qseg[t] == kseg[j], and CTA tile i only walks key blocks [ranges[i, 0],
    ranges[i, 1]) (intersected with the causal / window / length range).
    """
    b, tp, n, hp = q.shape
    sp, hvp = k.shape[1], v.shape[3]
    bq, bk, stages = cfg.block_q, cfg.block_k, cfg.stages
    nqt, ns = tp // (2 * bq), sp // bk
    dtype = q.dtype
    left, right = _pallas._bounds(cfg.spec)
    cap = cfg.spec.soft_cap
    c = cfg.spec.scale * _LOG2E
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    interp = cfg.interpret

    def z_of(qk):
        """Soft-capped logits in base-2 units."""
        return jnp.tanh(qk * (cfg.spec.scale / cap)) * (cap * _LOG2E)

    segs = cfg.has_segments

    def body(q_ref, k_ref, v_ref, len_ref, seg_refs, o_ref, lse_ref, smem, loaded, consumed, sched):
        qo_smem, k_smem, v_smem, lse_smem, *extra = smem
        qseg_smem, kseg_smem = extra[-2:] if segs else (None, None)
        o_extra = extra[:-2] if segs else extra
        qseg_ref, kseg_ref, rng_ref = seg_refs if segs else (None, None, None)
        k_loaded, v_loaded, q_loaded = loaded
        k_consumed, v_consumed = consumed
        bi = lax.axis_index("batch")
        head = lax.axis_index("heads")
        tile = _i32(nqt - 1) - lax.axis_index("q_seq")  # heavy (late) causal tiles first
        wg = lax.axis_index("wg")
        base = tile * _i32(2 * bq)
        s_end = _i32(min(cfg.spec.s, ns * bk))
        if len_ref is not None:  # this sequence's key length (clipped to [0, S])
            s_end = jnp.minimum(jnp.maximum(len_ref[bi], _i32(0)), s_end)
        lo, hi = _steps(cfg, base, 2 * bq, s_end)
        if segs:  # only the key blocks whose segment ids can meet this tile's
            lo, hi = narrow(lo, hi, rng_ref, bi, tile)
        nsteps = hi - lo

        def sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem = qo_smem.at[wg]
            r0 = base + wg * _i32(bq)
            flo, fhi = _full_steps(cfg, r0, lo, hi, s_end)
            if segs:  # every block is masked (segment ids are data)
                flo = fhi = lo
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(r0, bq), head], q_smem, q_loaded.at[wg])
            if segs:
                qs_smem = qseg_smem.at[wg]
                plgpu.copy_gmem_to_smem(qseg_ref.at[bi, pl.ds(r0, bq)], qs_smem, q_loaded.at[wg])
            plgpu.barrier_wait(q_loaded.at[wg])
            qs = vec(qs_smem, 0, interp) if segs else None
            m = laid_out(jnp.full((bq,), -_BIG, jnp.float32), row_layout, interp)
            l = laid_out(jnp.full((bq,), 0.0, jnp.float32), row_layout, interp)
            acc = laid_out(jnp.full((bq, hvp), 0.0, jnp.float32), wgmma_layout, interp)

            @pl.when(nsteps > 0)
            def _():
                plgpu.barrier_wait(k_loaded.at[0])

            if cfg.pingpong:
                pl.when(wg == 1)(sync)

            def step(j, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(j - lo, _i32(stages))
                # the block's key segment ids, read before its slot is released
                ks = vec(kseg_smem.at[slot], 1, interp) if masked and segs else None

                qk = mm_nt(
                    q_smem, k_smem.at[slot], (bq, bk), interp, sync if cfg.pingpong else None
                )
                plgpu.barrier_arrive(k_consumed.at[slot])
                # Without a soft cap the scale is folded into the exponent (one FMA per
                # logit): z stays raw, m is kept in scaled base-2 units (c > 0 keeps the max).
                z = qk if cap is None else z_of(qk)
                scaled = (lambda x: x * c) if cap is None else (lambda x: x)  # noqa: E731
                if masked:
                    qpos = iota((bq, bk), 0, interp) + r0
                    kpos = iota((bq, bk), 1, interp) + j * _i32(bk)
                    vis = visible(qpos, kpos, s_end, left, right)
                    if segs:
                        same = lax.broadcast_in_dim(qs, (bq, bk), [0]) == lax.broadcast_in_dim(
                            ks, (bq, bk), [1]
                        )
                        vis = jnp.logical_and(vis, same)
                    z = jnp.where(vis, z, -jnp.inf)
                m_new = jnp.maximum(m, scaled(z.max(axis=1)))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(scaled(z) - lax.broadcast_in_dim(m_new, z.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                if cfg.pingpong:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_loaded.at[slot])
                if cfg.pingpong:
                    plgpu.barrier_wait(sched)

                def pv_wait():  # the next block's K, while this P @ V runs
                    nxt = j + 1

                    @pl.when(nxt < hi)
                    def _():
                        plgpu.barrier_wait(k_loaded.at[lax.rem(nxt - lo, _i32(stages))])

                acc = mm_acc(acc, p16, v_smem.at[slot], interp, pv_wait)
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l

            carry = (acc, m, l)
            carry = lax.fori_loop(lo, flo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), carry)
            if cfg.pingpong:
                pl.when(wg == 0)(sync)

            ok = l > 0.0
            l_safe = jnp.where(ok, l, 1.0)
            out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            o_smem = o_extra[0].at[wg] if o_extra else q_smem  # the query tile is free now
            o_smem[...] = out.astype(dtype)
            lse_smem.at[wg][...] = jnp.where(ok, m * _LN2 + jnp.log(l_safe), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, pl.ds(r0, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, head, pl.ds(r0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, _i32(cfg.groups))

            def load(i, wait: bool):
                slot = lax.rem(i, _i32(stages))
                rows = (bi, pl.ds((lo + i) * _i32(bk), bk), kv_head)
                if wait:
                    plgpu.barrier_wait(k_consumed.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_loaded.at[slot])
                if segs:  # the keys' segment ids travel with K (a second arrival)
                    kseg_rows = kseg_ref.at[bi, pl.ds((lo + i) * _i32(bk), bk)]
                    plgpu.copy_gmem_to_smem(kseg_rows, kseg_smem.at[slot], k_loaded.at[slot])
                if wait:
                    plgpu.barrier_wait(v_consumed.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_loaded.at[slot])

            producer_ring(nsteps, stages, load, (k_consumed, v_consumed))

    def entry(q_ref, k_ref, v_ref, *refs):
        len_ref, seg_refs = optional_refs(refs, cfg.has_lengths, segs)
        o_ref, lse_ref = refs[-2:]
        tiled = lambda h: (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # noqa: E731
        scratch = [
            plgpu.SMEM((2, bq, hp), dtype, transforms=tiled(hp)),
            plgpu.SMEM((stages, bk, hp), dtype, transforms=tiled(hp)),
            plgpu.SMEM((stages, bk, hvp), dtype, transforms=tiled(hvp)),
            plgpu.SMEM((2, bq), jnp.float32),
        ]
        if hvp != hp:  # the output tile cannot reuse the query tile
            scratch.append(plgpu.SMEM((2, bq, hvp), dtype, transforms=tiled(hvp)))
        seg_scratch, arrivals = segment_scratch(segs, bq, bk, stages)  # ids ride with Q / K
        scratch += seg_scratch
        pl.run_scoped(
            lambda *a: body(q_ref, k_ref, v_ref, len_ref, seg_refs, o_ref, lse_ref, *a),
            scratch,
            (
                plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_arrivals=arrivals, num_barriers=2),
            ),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    interpret = None
    if cfg.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    out, lse = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((b, tp, n, hvp), dtype),
            jax.ShapeDtypeStruct((b, n, tp), jnp.float32),
        ),
        grid=(n, nqt, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, *(() if lens is None else (lens,)), *(() if seg is None else seg))
    # inside shard_map: plgpu.kernel types its outputs invariant (it traces with check_vma
    # off); they vary like the inputs, and the custom JVP's tangents are typed so
    out, lse, *_ = backend.vary_together(out, lse, q, k, v)
    return out, lse


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _flash(cfg: MosaicConfig, pcfg: _pallas.PallasConfig, q, k, v, lens, qseg, kseg, rng):
    """(out, lse) from the Mosaic GPU forward. A custom JVP whose tangent map is a
    ``linear_call`` (:func:`jaxcore.autodiff.tangent_call`): reverse mode transposes it with the
    MOSAIC_BACKWARD kernels; forward mode evaluates the JVP of the same attention in blockwise
    XLA (:func:`_xla.padded_twin`; qseg / kseg already hide padded and past-length keys)."""
    seg = (qseg, kseg, rng) if cfg.has_segments else None
    return _forward(cfg, q, k, v, lens, seg)


def _twin(cfg: MosaicConfig, consts, q, k, v):
    from ._xla import padded_twin

    _, qseg, kseg, _ = consts
    return padded_twin(cfg.spec, cfg.groups, q, k, v, qseg, kseg, None, None)


@functools.partial(_flash.defjvp, symbolic_zeros=True)
def _flash_jvp(cfg, pcfg, primals, tangents):
    q, k, v, *consts = primals
    out = _flash(cfg, pcfg, *primals)  # itself: differentiable again

    def backward(prim, consts, saved, cts):
        return _flash_bwd(cfg, pcfg, (*prim, *consts[:3], *saved), cts)

    fun = functools.partial(_twin, cfg)
    tan = tangent_call(fun, backward, (q, k, v), tangents[:3], tuple(consts), out, out)
    return out, tuple(tan)


# Which kernels differentiate implementation="mosaic" (read at trace time): "triton" (the Triton
# backward of _pallas.py), "mosaic" (_mosaic_bwd.py, Hopper wgmma/TMA) or "auto" (= "mosaic"
# compiled, for the head dims and dtype it has been checked with on a GPU: _mosaic_bwd.CHECKED,
# bf16 at H = Hv = 64 or 128; else "triton", also in interpret mode, where the Mosaic GPU
# interpreter is much the slower; tests pick explicitly).
# On an H200 (session 5, bf16 B=4 N=16 H=128 T=8192 causal) the Mosaic backward ran at 436
# TFLOP/s, 0.84x cuDNN's 516; the Triton one at 185 (0.36x).
MOSAIC_BACKWARD = "auto"
BACKWARDS = ("auto", "triton", "mosaic")


def backward_kind(hp: int, hvp: int, dtype, interpret: bool = False) -> str:
    """The backward that MOSAIC_BACKWARD selects for padded head dims ``hp`` / ``hvp``."""
    if MOSAIC_BACKWARD not in BACKWARDS:
        raise ValueError(f"MOSAIC_BACKWARD: expected one of {BACKWARDS}, got {MOSAIC_BACKWARD!r}")
    if MOSAIC_BACKWARD != "auto":
        return MOSAIC_BACKWARD
    from . import _mosaic_bwd

    return "mosaic" if _mosaic_bwd.checked(hp, hvp, dtype) and not interpret else "triton"


def _flash_bwd(cfg, pcfg, res, cts):
    """(dq, dk, dv) of the (padded) operands by the MOSAIC_BACKWARD kernels."""
    q, k, v, lens, qseg, kseg, out, lse = res
    do, dlse = cts
    if backward_kind(q.shape[3], v.shape[3], q.dtype, cfg.interpret) == "mosaic":
        from . import _mosaic_bwd

        seg = (qseg, kseg) if cfg.has_segments else None
        dq, dk, dv = _mosaic_bwd.backward(cfg, q, k, v, lens, out, lse, do, dlse, seg=seg)
        return dq, dk, dv
    pcfg = dataclasses.replace(pcfg, bias_grad=False)
    dq, dk, dv, _ = _pallas._backward(pcfg, q, k, v, qseg, kseg, None, None, out, lse, do, dlse)
    return dq, dk, dv


UNSUPPORTED = (
    ("bias", "bias"),
    ("mask", "mask"),
)


def supports(inp: Inputs) -> str | None:
    """None if the Mosaic kernel takes these inputs, else the reason (an argument name and why)."""
    for field, arg in UNSUPPORTED:
        if getattr(inp, field) is not None:
            return f"{arg}: not supported by implementation='mosaic' (use 'pallas')"
    if inp.query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"query: implementation='mosaic' takes bfloat16 or float16, got {inp.query.dtype}"
    if max(inp.query.shape[-1], inp.value.shape[-1]) > 256:
        return f"query/value: head dims up to 256 for 'mosaic', got {inp.query.shape[-1]}"
    return None


MIN_CPU_DEVICES = 3


def _check_interpreter_threads() -> None:
    """The Mosaic GPU interpreter runs each warpgroup as a thread executing its own XLA:CPU
    program while the caller's program waits in a host callback; with fewer than 3 CPU devices
    XLA's host thread pool was seen to starve and hang (2-core VM, jax 0.10.2). Fail instead."""
    n = len(jax.devices("cpu"))
    if n < MIN_CPU_DEVICES:
        raise ValueError(
            f"implementation='mosaic_interpret': needs >= {MIN_CPU_DEVICES} CPU devices for the "
            f"interpreter's warpgroup threads (else XLA's host thread pool can deadlock), got {n}; "
            "start JAX with jax.config.update('jax_num_cpu_devices', 4) or "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4"
        )


def _segment_ranges(
    tile_ids, block_ids, block_valid, rows: int, bk: int, tile_valid=None
) -> jax.Array:
    """(B, n_tiles, 2) int32 block range [lo, hi) per tile of ``rows`` ids.

    Tiles are this kernel's own rows (queries in the forward and dQ, keys in dK/dV), blocks the
    other side's steps. A block is needed if the id ranges [min, max] of the tile's (valid) ids
    and of the block's valid ids overlap; [lo, hi) spans the first to the last such block (the
    blocks between are masked in the kernel), (0, 0) if none. Packed sequences (ids
    non-decreasing along the sequence) give exactly the blocks of the tile's own sequences.
    """
    b, tp = tile_ids.shape
    big = jnp.iinfo(jnp.int32).max
    qt = tile_ids.reshape(b, tp // rows, rows)
    tv = jnp.ones(qt.shape, bool) if tile_valid is None else tile_valid.reshape(qt.shape)
    qmin = jnp.where(tv, qt, big).min(-1)  # (B, tiles); no valid row: empty range
    qmax = jnp.where(tv, qt, -big).max(-1)
    kb = block_ids.reshape(b, -1, bk)
    vb = block_valid.reshape(kb.shape)
    kmin = jnp.where(vb, kb, big).min(-1)  # (B, blocks)
    kmax = jnp.where(vb, kb, -big).max(-1)
    hit = (kmax[:, None, :] >= qmin[:, :, None]) & (kmin[:, None, :] <= qmax[:, :, None])
    nb = hit.shape[-1]
    any_hit = hit.any(-1)
    lo = jnp.argmax(hit, axis=-1)
    hi = nb - jnp.argmax(hit[..., ::-1], axis=-1)
    return jnp.stack([jnp.where(any_hit, lo, 0), jnp.where(any_hit, hi, 0)], axis=-1).astype(
        jnp.int32
    )


def attention_mosaic(
    inp: Inputs, *, interpret: bool, blocks: dict | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mosaic GPU flash attention forward (+ the MOSAIC_BACKWARD backward).

    Returns (out, lse (B, T, N) f32).

    ``blocks`` overrides :func:`default_config` (block_q, block_k, stages, pingpong) and the
    Triton backward's tiles (block_q_bwd, block_k_bwd, num_warps_bwd, num_stages_bwd).
    """
    why = supports(inp)
    if why is not None:
        raise ValueError(why)
    if interpret:
        _check_interpreter_threads()
    q, k, v = inp.query, inp.key, inp.value
    b, t, n, h = q.shape
    s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    hp, hvp = (max(64, _pallas._pow2_at_least(x)) for x in (h, hv))
    opts = default_config(hp, hvp)
    bwd = {
        key: val
        for key, val in _pallas.default_blocks(t, s, h, hv, interpret).items()
        if key.endswith("_bwd")
    }
    for key, val in (blocks or {}).items():
        (bwd if key.endswith("_bwd") else opts)[key] = val
    for nm in ("block_q", "block_k"):
        if opts[nm] not in (64, 128):
            raise ValueError(f"{nm}: expected 64 or 128 for 'mosaic', got {opts[nm]}")
    if opts["stages"] < 1:
        raise ValueError(f"stages: expected >= 1, got {opts['stages']}")
    segs = inp.q_segment_ids is not None
    need = smem_bytes(opts["block_q"], opts["block_k"], opts["stages"], hp, hvp, segments=segs)
    if need > SMEM_BYTES:
        raise ValueError(
            f"blocks: block_k={opts['block_k']}, stages={opts['stages']} need {need // 1024} KiB "
            f"of shared memory for head dims {hp}/{hvp}, expected <= {SMEM_BYTES // 1024} KiB"
        )
    _pallas._check_blocks(dict(block_q=64, block_k=64, **bwd))
    mq = math.lcm(2 * opts["block_q"], bwd["block_q_bwd"])
    mk = math.lcm(opts["block_k"], bwd["block_k_bwd"])
    tp, sp = -(-t // mq) * mq, -(-s // mk) * mk

    def pad(x, tlen, hd):
        return jnp.pad(x, ((0, 0), (0, tlen - x.shape[1]), (0, 0), (0, hd - x.shape[3])))

    qp, kp, vp = pad(q, tp, hp), pad(k, sp, hp), pad(v, sp, hvp)
    spec = inp.spec
    lens = None if inp.kv_seqlen is None else inp.kv_seqlen.astype(jnp.int32)
    qseg = kseg = rng = None
    if sp != s or lens is not None or segs:  # the Triton backward masks keys through segments
        kpos = jnp.arange(sp, dtype=jnp.int32)[None, :]
        valid = jnp.broadcast_to(kpos < s, (b, sp))
        if lens is not None:
            valid = valid & (kpos < lens[:, None])
        if segs:
            # padded query rows copy the last real row's id (they are cut off afterwards)
            qseg = jnp.pad(inp.q_segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)), "edge")
            kseg = jnp.pad(inp.kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))
            rng = _segment_ranges(qseg, kseg, valid, 2 * opts["block_q"], opts["block_k"])
            kseg = jnp.where(valid, kseg, jnp.min(qseg) - 1)  # never equal to a query's id
        else:
            qseg = jnp.zeros((b, tp), jnp.int32)
            kseg = jnp.where(valid, 0, -1).astype(jnp.int32)
    cfg = MosaicConfig(
        spec=spec,
        groups=n // kh,
        has_lengths=lens is not None,
        has_segments=segs,
        interpret=interpret,
        **opts,
    )
    pcfg = _pallas.PallasConfig(
        spec=spec, groups=n // kh, has_segments=qseg is not None, interpret=interpret, **bwd
    )
    out, lse = _flash(cfg, pcfg, qp, kp, vp, lens, qseg, kseg, rng)
    return out[:, :t, :, :hv], jnp.swapaxes(lse, 1, 2)[:, :t]
