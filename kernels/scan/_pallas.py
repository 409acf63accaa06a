"""Pallas kernels for the scans (Triton lowering on GPU; ``interpret=True`` runs them on CPU).

The linear-scan kernel keeps the state of a block of channels in registers and walks the time axis
inside the kernel: one program per (batch, channel block), so no step is a separate launch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = Any

BLOCK = 128  # channels per program (a power of two, as Triton needs)


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=1)


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
