"""Pallas kernels for the scans (Triton lowering on GPU; ``interpret=True`` runs them on CPU).

The linear-scan kernel keeps the state of a block of channels in registers and walks the time axis
inside the kernel: one program per (batch, channel block), so no step is a separate launch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = Any

BLOCK = 128  # channels per program (a power of two, as Triton needs)


# Selective-scan kernel tiling on GPU: (max channels per program, warps, software-pipeline stages).
# Read at trace time; benchmarks/gpu_scan.py sweeps it.
SELECTIVE_CONFIG: tuple[int, int, int] = (16, 4, 1)  # the config measured on an H200


def _compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 1):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _block(s: int) -> int:
    b = 1
    while b < min(s, BLOCK):
        b *= 2
    return b


def linear_scan_pallas(a: Array, b: Array, h0: Array, *, interpret: bool) -> Array:
    """h_t = a_t * h_{t-1} + b_t along axis 1 for real elementwise a (broadcastable to b)."""
    if jnp.issubdtype(b.dtype, jnp.complexfloating):
        raise ValueError(
            f"b: the Pallas linear scan supports real dtypes, got {b.dtype}; use 'chunked'"
        )
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
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, length, sp), b.dtype),
        grid=(bsz, sp // bs),
        in_specs=[seq_spec, seq_spec, pl.BlockSpec((None, bs), lambda i, j: (i, j))],
        out_specs=seq_spec,
        interpret=interpret,
        compiler_params=_compiler_params(interpret),
        name="jaxcore_linear_scan",
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
    y, h_t, starts = pl.pallas_call(
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
    )(u, dt, A, Bg, Cg, h0, keep)
    return y, h_t[..., :n], starts[..., :n]


def _pad_chunks(x: Array, lp: int, value: float = 0.0) -> Array:
    n = x.shape[1]
    if n == lp:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, lp - n)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _selective_pallas(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk, interpret):
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


def _selective_pallas_fwd(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk, interpret):
    y, h_t, starts = _selective_fwd_impl(u, dt, A, Bm, Cm, h0, keep, lb, chunk, interpret)
    return (y, h_t), (u, dt, A, Bm, Cm, keep, starts)


def _selective_pallas_bwd(lb, lc, chunk, interpret, res, cts):
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


_selective_pallas.defvjp(_selective_pallas_fwd, _selective_pallas_bwd)


def selective_scan_pallas(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk, interpret):
    """Batch-major selective scan core: returns (y (B, L, D), final state (B, D, N))."""
    return _selective_pallas(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk, interpret)
