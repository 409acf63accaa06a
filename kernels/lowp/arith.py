"""Emulated low-precision arithmetic: quantized ``dot_general`` (narrow accumulators, the
int8 x int8 -> int32 path), L-Mul, and a bit-serial dot product with its cycle count."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._bits import F32, from_bits, to_bits
from .block import BlockFormat, block_round
from .formats import FixedFormat, FloatFormat, IntFormat
from .rounding import as_grid, check_float_input, check_mode, round, round_bits

DimensionNumbers = tuple[
    tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]
]


def _quantize(x: jax.Array, fmt: Any, mode: str, name: str) -> jax.Array:
    if fmt is None:
        return x
    if isinstance(fmt, BlockFormat):
        return block_round(x, fmt, mode)
    try:
        return round(x, fmt, mode)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def _norm_dims(dimension_numbers: Any, lhs: jax.Array, rhs: jax.Array) -> DimensionNumbers:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    except (TypeError, ValueError) as e:
        raise ValueError(
            "dimension_numbers: expected ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), "
            f"got {dimension_numbers!r}"
        ) from e
    (lc, rc), (lb, rb) = dn
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"dimension_numbers: mismatched lengths in {dimension_numbers!r}")
    for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(
                f"dimension_numbers: lhs axis {a} (size {lhs.shape[a]}) does not match rhs axis "
                f"{b} (size {rhs.shape[b]})"
            )
    return dn


def _to_bmkn(lhs, rhs, dn):
    """Transpose/reshape to lhs (B, M, K), rhs (B, K, N); returns them and the output shape."""
    (lc, rc), (lb, rb) = dn
    lf = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
    rf = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
    bshape = [lhs.shape[i] for i in lb]
    mshape = [lhs.shape[i] for i in lf]
    nshape = [rhs.shape[i] for i in rf]
    B = int(np.prod(bshape)) if bshape else 1
    M = int(np.prod(mshape)) if mshape else 1
    N = int(np.prod(nshape)) if nshape else 1
    K = int(np.prod([lhs.shape[i] for i in lc])) if lc else 1
    l3 = jnp.transpose(lhs, (*lb, *lf, *lc)).reshape(B, M, K)
    r3 = jnp.transpose(rhs, (*rb, *rc, *rf)).reshape(B, K, N)
    return l3, r3, (*bshape, *mshape, *nshape)


def int8_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, *, preferred_element_type=jnp.int32
) -> jax.Array:
    """Exact int8 x int8 -> int32 ``lax.dot_general`` (wraps on int32 overflow, K > 2**17)."""
    for n, v in (("lhs", lhs), ("rhs", rhs)):
        if jnp.result_type(v) != jnp.int8:
            raise TypeError(f"{n}: expected dtype int8, got {jnp.result_type(v)}")
    dn = _norm_dims(dimension_numbers, lhs, rhs)
    return lax.dot_general(lhs, rhs, dn, preferred_element_type=preferred_element_type)


def _small_int(fmt: Any) -> bool:
    return isinstance(fmt, IntFormat) and fmt.bits + (0 if fmt.signed else 1) <= 8


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    *,
    lhs_format: Any = None,
    rhs_format: Any = None,
    accumulate_format: FloatFormat | FixedFormat | IntFormat | None = None,
    preferred_element_type: Any = None,
    mode: str = "nearest_even",
    accumulate_mode: str = "nearest_even",
) -> jax.Array:
    """``lax.dot_general`` with operands rounded onto formats and an optional narrow accumulator.

    Args:
      lhs, rhs: float arrays (or int8 arrays for the integer path).
      lhs_format, rhs_format: FloatFormat / FixedFormat / IntFormat / dtype / BlockFormat (block
        axis given by the BlockFormat) or None (operand used as is).
      accumulate_format: emulate an accumulator of this format: the contraction runs
        sequentially over K and after each step the float32 sum ``acc + a_k * b_k`` is rounded
        onto ``accumulate_format`` with ``accumulate_mode`` (a 24-bit adder followed by
        rounding; products are exact in float32 when both operand formats have <= 11
        significand bits).
      preferred_element_type: result dtype. With two IntFormat operands of <= 8 bits (or int8
        inputs) and no accumulator format, the product runs as int8 x int8 -> int32 exactly;
        the result is int32 when ``preferred_element_type`` is int32, else float32.
    Returns: the ``lax.dot_general`` result shape (batch, lhs free, rhs free).
    """
    check_mode(mode)
    check_mode(accumulate_mode)
    dn = _norm_dims(dimension_numbers, lhs, rhs)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    int_in = lhs.dtype == jnp.int8 and rhs.dtype == jnp.int8
    if int_in or (_small_int(lhs_format) and _small_int(rhs_format) and accumulate_format is None):
        if not int_in:
            lq = _quantize(lhs, lhs_format, mode, "lhs_format").astype(jnp.int8)
            rq = _quantize(rhs, rhs_format, mode, "rhs_format").astype(jnp.int8)
        else:
            lq, rq = lhs, rhs
        if accumulate_format is None:
            out = lax.dot_general(lq, rq, dn, preferred_element_type=jnp.int32)
            if preferred_element_type is not None and np.dtype(preferred_element_type) == np.int32:
                return out
            return out.astype(preferred_element_type or jnp.float32)
        lhs, rhs = lq.astype(jnp.float32), rq.astype(jnp.float32)
    check_float_input(lhs, "lhs")
    check_float_input(rhs, "rhs")
    lq = _quantize(lhs.astype(jnp.float32), lhs_format, mode, "lhs_format")
    rq = _quantize(rhs.astype(jnp.float32), rhs_format, mode, "rhs_format")
    out_dt = preferred_element_type or jnp.result_type(lhs, rhs)
    if accumulate_format is None:
        return lax.dot_general(
            lq, rq, dn, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
        ).astype(out_dt)
    acc_fmt = as_grid(accumulate_format, "accumulate_format")
    l3, r3, out_shape = _to_bmkn(lq, rq, dn)

    def step(acc, lr):
        lk, rk = lr  # (B, M), (B, N)
        s = acc + lk[:, :, None] * rk[:, None, :]
        return from_bits(round_bits(to_bits(s, F32), F32, acc_fmt, accumulate_mode), F32), None

    acc0 = jnp.zeros((l3.shape[0], l3.shape[1], r3.shape[2]), jnp.float32)
    acc, _ = lax.scan(step, acc0, (jnp.moveaxis(l3, 2, 0), jnp.moveaxis(r3, 1, 0)))
    return acc.reshape(out_shape).astype(out_dt)


# ---- L-Mul ---------------------------------------------------------------------------------------
def _l(m: int) -> int:
    return m if m <= 3 else 3 if m == 4 else 4


def lmul(x: jax.Array, y: jax.Array, mantissa_bits: int) -> jax.Array:
    """L-Mul (Luo & Sun 2024): ``(1 + xm + ym + 2**-l(m)) * 2**(xe + ye)`` with the sign xor.

    x and y (float32, broadcastable) are first rounded to nearest-even onto an 8-bit-exponent
    format with ``mantissa_bits`` bits and no subnormals; the product is formed on the bit fields
    with integer adds (exact in float32 for mantissa_bits <= 22). Zeros give (signed) zero,
    NaN/inf propagate, exponent overflow gives inf and underflow below 2**-126 gives zero.
    """
    if not isinstance(mantissa_bits, int) or not 0 <= mantissa_bits <= 22:
        raise ValueError(f"mantissa_bits: expected an int in 0..22, got {mantissa_bits!r}")
    check_float_input(x, "x")
    check_float_input(y, "y")
    x, y = jnp.broadcast_arrays(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    m = mantissa_bits
    fmt = FloatFormat(8, m, subnormals=False)
    ux = round_bits(to_bits(x, F32), F32, fmt, "nearest_even")
    uy = round_bits(to_bits(y, F32), F32, fmt, "nearest_even")
    sign = (ux ^ uy) & np.uint32(0x80000000)
    ax, ay = ux & np.uint32(0x7FFFFFFF), uy & np.uint32(0x7FFFFFFF)
    ex = (ax >> np.uint32(23)).astype(jnp.int32)
    ey = (ay >> np.uint32(23)).astype(jnp.int32)
    sh = np.uint32(23 - m)
    mx = (ax & np.uint32(0x7FFFFF)) >> sh
    my = (ay & np.uint32(0x7FFFFF)) >> sh
    off = np.uint32(2 ** (m - _l(m)))  # 2**-l(m) in units of 2**-m (l(m) <= m always)
    s = np.uint32(2**m) + mx + my + off  # significand sum in units of 2**-m, < 2**(m+2)
    e = ex + ey - np.int32(127)  # biased exponent of the product
    carry = s >= np.uint32(2 ** (m + 1))
    mant = jnp.where(
        carry, (s - np.uint32(2 ** (m + 1))) << (sh - np.uint32(1)), (s - np.uint32(2**m)) << sh
    )
    e = e + carry.astype(jnp.int32)
    out = (jnp.clip(e, 0, 255).astype(jnp.uint32) << np.uint32(23)) | mant
    out = jnp.where(e >= 255, np.uint32(0x7F800000), out)
    out = jnp.where(e <= 0, np.uint32(0), out)
    zero = (ax == 0) | (ay == 0)
    out = jnp.where(zero, np.uint32(0), out)
    inf = (ax == np.uint32(0x7F800000)) | (ay == np.uint32(0x7F800000))
    out = jnp.where(inf, np.uint32(0x7F800000), out)
    nan = (ax > np.uint32(0x7F800000)) | (ay > np.uint32(0x7F800000)) | (inf & zero)
    out = jnp.where(nan, np.uint32(0x7FC00000), out | sign)
    return from_bits(out, F32)


def lmul_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, *, mantissa_bits: int
) -> jax.Array:
    """``dot_general`` whose products are :func:`lmul` and whose sums are float32.

    Materialises the (B, M, K, N) products in chunks of K; meant for emulation at small sizes.
    """
    dn = _norm_dims(dimension_numbers, lhs, rhs)
    l3, r3, out_shape = _to_bmkn(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), dn)

    def step(acc, lr):
        lk, rk = lr
        return acc + lmul(lk[:, :, None], rk[:, None, :], mantissa_bits), None

    acc0 = jnp.zeros((l3.shape[0], l3.shape[1], r3.shape[2]), jnp.float32)
    acc, _ = lax.scan(step, acc0, (jnp.moveaxis(l3, 2, 0), jnp.moveaxis(r3, 1, 0)))
    return acc.reshape(out_shape)


# ---- bit-serial ----------------------------------------------------------------------------------
class BitSerialResult(NamedTuple):
    """``value``: exact int32 dot products; ``cycles``: int32 cycles per output column."""

    value: jax.Array
    cycles: jax.Array


def bitserial_dot(
    a_codes: jax.Array,
    w_codes: jax.Array,
    bits: int,
    *,
    signed: bool = True,
    skip_zero_planes: bool = False,
) -> BitSerialResult:
    """Bit-serial dot product: weights enter one bit plane per cycle, LSB first.

    Args:
      a_codes: integer activations (..., K).
      w_codes: integer weights (K,) or (K, N) holding ``bits``-bit values (two's complement
        when ``signed``: the MSB plane has weight -2**(bits-1)).
      skip_zero_planes: count only cycles of bit planes with a non-zero bit in that column
        (zero-plane skipping); otherwise every output takes ``bits`` cycles.
    Returns: value (..., N) or (...) int32, exactly ``sum_k a_k * w_k``; cycles (N,) or ().
    """
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits: expected an int in 1..16, got {bits!r}")
    a = jnp.asarray(a_codes)
    w = jnp.asarray(w_codes)
    for n, v in (("a_codes", a), ("w_codes", w)):
        if not jnp.issubdtype(v.dtype, jnp.integer):
            raise TypeError(f"{n}: expected an integer dtype, got {v.dtype}")
    if w.ndim not in (1, 2):
        raise ValueError(f"w_codes: expected rank 1 or 2, got shape {w.shape}")
    if a.ndim < 1 or a.shape[-1] != w.shape[0]:
        raise ValueError(
            f"a_codes: expected last axis {w.shape[0]} (w_codes' K), got shape {a.shape}"
        )
    vec = w.ndim == 1
    w2 = w[:, None] if vec else w
    a32 = a.astype(jnp.int32)
    u = w2.astype(jnp.int32) & np.int32(2**bits - 1)
    total = jnp.zeros((*a.shape[:-1], w2.shape[1]), jnp.int32)
    cycles = jnp.zeros((w2.shape[1],), jnp.int32)
    for b in range(bits):  # one weight bit plane per cycle
        plane = (u >> np.int32(b)) & np.int32(1)
        partial_ = jnp.matmul(a32, plane, preferred_element_type=jnp.int32)
        weight = -(2**b) if (signed and b == bits - 1) else 2**b
        total = total + partial_ * np.int32(weight)
        if skip_zero_planes:
            cycles = cycles + jnp.any(plane != 0, axis=0).astype(jnp.int32)
        else:
            cycles = cycles + np.int32(1)
    if vec:
        return BitSerialResult(total[..., 0], cycles[0])
    return BitSerialResult(total, cycles)
