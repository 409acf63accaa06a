"""Scaled formats: block formats (OCP MX v1.0, NVFP4, block floating point) and per-tensor /
per-channel / per-group integer quantization.

MX blocks share a power-of-two scale, so the element rounding is done with an exponent offset
inside the integer bit kernel: ``block_round`` is the exact ``dequantize(quantize(x))`` in one
pass, with no float multiply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._bits import F32, from_bits, to_bits
from .codes import code_dtype, decode_bits, encode_bits
from .formats import (
    FixedFormat,
    FloatFormat,
    IntFormat,
    float4_e2m1fn,
    float6_e2m3fn,
    float6_e3m2fn,
    float8_e4m3fn,
    float8_e5m2,
    float8_e8m0fnu,
)
from .rounding import (
    as_grid,
    check_float_input,
    check_mode,
    check_sr_bits,
    random_words,
    round_bits,
)


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """Blocks of ``block_size`` consecutive elements along ``axis`` share one scale.

    element: the element format (floats saturate inside blocks, as OCP MX specifies).
    scale_format: ``float8_e8m0fnu`` (power-of-two scale, shared_exp = floor(log2(amax)) -
      emax_elem, OCP MX v1.0) or another FloatFormat (scale = round(amax / elem_max), NVFP4).
    tensor_scale: also keep one float32 scale for the whole tensor (NVFP4: amax / (6 * 448)).
    """

    element: FloatFormat | FixedFormat | IntFormat
    block_size: int
    scale_format: FloatFormat = float8_e8m0fnu
    axis: int = -1
    tensor_scale: bool = False
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {self.block_size!r}")
        if not isinstance(self.scale_format, FloatFormat):
            raise ValueError(f"scale_format: expected a FloatFormat, got {self.scale_format!r}")
        el = as_grid(self.element, "element")
        if isinstance(el, FloatFormat) and el.emax < 0:
            raise ValueError(f"element: expected a format with emax >= 0, got {el}")
        if self.pow2 and self.tensor_scale:
            raise ValueError("tensor_scale: only supported with a non-power-of-two scale_format")

    @property
    def pow2(self) -> bool:
        """Whether scales are powers of two (E8M0-like: mantissa_bits == 0)."""
        return self.scale_format.mantissa_bits == 0

    @property
    def grid(self) -> FloatFormat | FixedFormat:
        """The element grid, saturating."""
        el = as_grid(self.element, "element")
        if isinstance(el, FloatFormat):
            return dataclasses.replace(el, overflow="saturate")
        return el

    @property
    def emax_elem(self) -> int:
        """Exponent of the element format's largest power of two (OCP's emax_elem)."""
        el = self.grid
        if isinstance(el, FloatFormat):
            return el.emax
        return el.integer_bits - 1

    @property
    def elem_max(self) -> float:
        return self.grid.max

    def __str__(self) -> str:
        return self.name or f"block({self.element}, {self.block_size}, {self.scale_format})"


MXFP8_E4M3 = BlockFormat(float8_e4m3fn, 32, name="MXFP8_E4M3")
MXFP8_E5M2 = BlockFormat(float8_e5m2, 32, name="MXFP8_E5M2")
MXFP6_E3M2 = BlockFormat(float6_e3m2fn, 32, name="MXFP6_E3M2")
MXFP6_E2M3 = BlockFormat(float6_e2m3fn, 32, name="MXFP6_E2M3")
MXFP4 = BlockFormat(float4_e2m1fn, 32, name="MXFP4")
MXINT8 = BlockFormat(FixedFormat(1, 6, narrow=True), 32, name="MXINT8")
NVFP4 = BlockFormat(float4_e2m1fn, 16, float8_e4m3fn, tensor_scale=True, name="NVFP4")


def BFP(mantissa_bits: int, block_size: int, axis: int = -1) -> BlockFormat:  # noqa: N802
    """Block floating point: a shared power-of-two exponent per block and sign + ``mantissa_bits``
    magnitude elements (fixed point with 1 integer bit, symmetric). ``BFP(7, 32)`` == MXINT8."""
    if not isinstance(mantissa_bits, int) or not 1 <= mantissa_bits <= 24:
        raise ValueError(f"mantissa_bits: expected an int in 1..24, got {mantissa_bits!r}")
    return BlockFormat(
        FixedFormat(1, mantissa_bits - 1, narrow=True),
        block_size,
        axis=axis,
        name=f"BFP{mantissa_bits}x{block_size}",
    )


class BlockQuantized(NamedTuple):
    """Element codes (x's shape), scale codes (x's shape with the block axis divided by the
    block size) and the float32 tensor scale (NVFP4) or None."""

    codes: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array | None


def _blocked(x: jax.Array, bf: BlockFormat, name: str = "x") -> tuple[jax.Array, int]:
    """Move the block axis last and split it: (..., nblocks, block_size)."""
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least rank 1, got a scalar")
    ax = bf.axis % x.ndim if -x.ndim <= bf.axis < x.ndim else None
    if ax is None:
        raise ValueError(f"axis: expected an axis of a rank-{x.ndim} array, got {bf.axis}")
    n = x.shape[ax]
    if n % bf.block_size:
        raise ValueError(
            f"{name}: expected axis {bf.axis} of size a multiple of block_size={bf.block_size}, "
            f"got shape {x.shape}"
        )
    xm = jnp.moveaxis(x, ax, -1)
    return xm.reshape(*xm.shape[:-1], n // bf.block_size, bf.block_size), ax


def _unblocked(y: jax.Array, ax: int) -> jax.Array:
    y = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1])
    return jnp.moveaxis(y, -1, ax)


def _shared_exp(amax_bits: jax.Array, bf: BlockFormat) -> jax.Array:
    """int32 shared exponent floor(log2(amax)) - emax_elem, clamped to the scale's range."""
    ex = (amax_bits >> np.uint32(23)).astype(jnp.int32)
    lead = np.int32(31) - lax.clz(amax_bits).astype(jnp.int32)
    fl = jnp.where(ex == 0, lead - np.int32(149), ex - np.int32(127))
    sf = bf.scale_format
    lo, hi = sf.emin, sf.emax
    se = jnp.clip(fl - np.int32(bf.emax_elem), lo, hi)
    return jnp.where(amax_bits == 0, np.int32(lo), se)


def _nonpow2_scales(xb: jax.Array, bf: BlockFormat):
    """NVFP4-style scales: (block scale values f32, scale codes, tensor scale f32 or None)."""
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    sf = dataclasses.replace(bf.scale_format, overflow="saturate")
    emax = np.float32(bf.elem_max)
    if bf.tensor_scale:
        t_amax = jnp.max(jnp.abs(xb))
        ts = t_amax / (emax * np.float32(sf.max))
        ts = jnp.where((ts > 0) & jnp.isfinite(ts), ts, np.float32(1.0))
        raw = amax / emax / ts
    else:
        ts = None
        raw = amax / emax
    sbits = round_bits(to_bits(raw, F32), F32, sf, "nearest_even")
    svals = from_bits(sbits, F32)
    return svals, encode_bits(sbits, sf), ts


def _block_core(
    x: jax.Array,
    bf: BlockFormat,
    mode: str,
    rand: jax.Array | None,
    sr_bits: int,
    want_codes: bool,
):
    """Returns (dequantized f32 in blocked layout, elem codes or None, scale codes, tensor scale,
    per-element magnitude limit), all in the blocked layout (..., nblocks, block_size)."""
    grid = bf.grid
    xb, _ = _blocked(x, bf)
    if rand is not None:
        rand, _ = _blocked(rand, bf, "random_bits")
    if bf.pow2:
        u = to_bits(xb, F32)
        a = u & np.uint32(0x7FFFFFFF)
        amax_bits = jnp.max(a, axis=-1, keepdims=True)  # NaN > inf > finite as integers
        se = _shared_exp(amax_bits, bf)
        r = round_bits(u, F32, grid, mode, rand=rand, sr_bits=sr_bits, eoff=se)
        bad = amax_bits >= np.uint32(0x7F800000)  # a NaN or inf in the block: scale NaN
        r = jnp.where(bad, np.uint32(0x7FC00000), r)
        sf = bf.scale_format
        scodes = jnp.where(
            bad, np.uint32(2 ** (sf.bits) - 1), (se + np.int32(sf.bias)).astype(jnp.uint32)
        )
        lim_bits = (np.int32(F32.bits_floor(grid.max_exact)) + (se << np.int32(23))).astype(
            jnp.uint32
        )
        lim = from_bits(lim_bits, F32)
        codes = None
        if want_codes:
            codes = encode_bits(r, grid, eoff=se)
            codes = jnp.where(bad, np.uint32(0), codes)
        return from_bits(r, F32), codes, scodes, None, lim
    svals, scodes, ts = _nonpow2_scales(xb, bf)
    denom = svals if ts is None else svals * ts
    safe = jnp.where(denom > 0, denom, np.float32(1.0))
    e = xb / safe
    r = round_bits(to_bits(e, F32), F32, grid, mode, rand=rand, sr_bits=sr_bits)
    ev = from_bits(r, F32)
    y = jnp.where(denom > 0, ev * denom, jnp.zeros_like(ev))
    codes = encode_bits(r, grid) if want_codes else None
    lim = denom * np.float32(grid.max)
    return y, codes, scodes, ts, lim


def _prep(x: Any, bf: Any, mode: str) -> jax.Array:
    if not isinstance(bf, BlockFormat):
        raise ValueError(f"fmt: expected a BlockFormat, got {bf!r}")
    dt = check_float_input(x)
    check_mode(mode)
    if np.dtype(dt) == np.float64:
        raise ValueError("x: block formats take float32 (or bfloat16/float16) input, got float64")
    return jnp.asarray(x).astype(jnp.float32)


def block_round(
    x: jax.Array,
    fmt: BlockFormat,
    mode: str = "nearest_even",
    *,
    key: jax.Array | None = None,
    stochastic_bits: int | None = None,
) -> jax.Array:
    """``block_dequantize(block_quantize(x, fmt))`` in one pass; x's shape and dtype."""
    x32 = _prep(x, fmt, mode)
    sr = check_sr_bits(stochastic_bits)
    rand = random_words(x32.shape, key, None) if mode == "stochastic" else None
    y, _, _, _, _ = _block_core(x32, fmt, mode, rand, sr, False)
    _, ax = _blocked(x32, fmt)
    return _unblocked(y, ax).astype(jnp.result_type(x))


def block_round_with_limit(x, fmt, mode, rand, sr_bits):
    """(block_round(x), per-element representable magnitude limit) for the clipped STE."""
    x32 = jnp.asarray(x).astype(jnp.float32)
    y, _, _, _, lim = _block_core(x32, fmt, mode, rand, sr_bits, False)
    _, ax = _blocked(x32, fmt)
    lim = jnp.broadcast_to(lim, y.shape)
    return _unblocked(y, ax), _unblocked(lim, ax)


def block_quantize(
    x: jax.Array,
    fmt: BlockFormat,
    mode: str = "nearest_even",
    *,
    key: jax.Array | None = None,
    stochastic_bits: int | None = None,
) -> BlockQuantized:
    """Quantize ``x`` into element codes and per-block scale codes (see :class:`BlockQuantized`).

    A block holding NaN or inf gets the NaN scale code (its elements decode to NaN), as OCP MX
    specifies; an all-zero block gets the smallest scale.
    """
    x32 = _prep(x, fmt, mode)
    sr = check_sr_bits(stochastic_bits)
    rand = random_words(x32.shape, key, None) if mode == "stochastic" else None
    _, codes, scodes, ts, _ = _block_core(x32, fmt, mode, rand, sr, True)
    _, ax = _blocked(x32, fmt)
    codes = _unblocked(codes, ax).astype(code_dtype(fmt.grid.bits))
    scodes = jnp.moveaxis(scodes[..., 0], -1, ax).astype(code_dtype(fmt.scale_format.bits))
    return BlockQuantized(codes, scodes, ts)


def block_dequantize(q: BlockQuantized, fmt: BlockFormat, dtype: Any = jnp.float32) -> jax.Array:
    """Values of a :class:`BlockQuantized` as ``dtype``."""
    if not isinstance(fmt, BlockFormat):
        raise ValueError(f"fmt: expected a BlockFormat, got {fmt!r}")
    codes = jnp.asarray(q.codes)
    cb, ax = _blocked(codes, fmt, "codes")
    s = jnp.expand_dims(jnp.moveaxis(jnp.asarray(q.scales), ax, -1), -1)
    sf = fmt.scale_format
    if fmt.pow2:
        s = s.astype(jnp.uint32)
        bad = s == np.uint32(2**sf.bits - 1)
        se = s.astype(jnp.int32) - np.int32(sf.bias)
        r = decode_bits(cb, fmt.grid, eoff=se)
        r = jnp.where(bad, np.uint32(0x7FC00000), r)
        y = from_bits(r, F32)
    else:
        ev = from_bits(decode_bits(cb, fmt.grid), F32)
        sv = from_bits(decode_bits(s, sf), F32)
        denom = sv if q.tensor_scale is None else sv * q.tensor_scale
        y = ev * denom
    return _unblocked(y, ax).astype(dtype)


# ---- integer quantization with scales ------------------------------------------------------------
class IntQuantized(NamedTuple):
    """Integer codes (int8/int16/int32 by width), float32 scales and zero points (int32) that
    broadcast against the codes: ``x ~= (codes - zero_point) * scale``."""

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array


def _int_dtype(f: IntFormat) -> Any:
    b = f.bits + (0 if f.signed else 1)
    return jnp.int8 if b <= 8 else jnp.int16 if b <= 16 else jnp.int32


def quantize_int(
    x: jax.Array,
    fmt: IntFormat,
    *,
    axis: int = -1,
    granularity: str = "tensor",
    group_size: int | None = None,
    symmetric: bool = True,
    mode: str = "nearest_even",
    key: jax.Array | None = None,
) -> IntQuantized:
    """Quantize to ``fmt`` integers with scales per tensor, per channel (one per index of ``axis``)
    or per group (``group_size`` consecutive elements along ``axis``).

    Symmetric: scale = amax / fmt.max, zero_point = 0. Asymmetric: scale = (max - min) /
    (fmt.max - fmt.min), zero_point = round(fmt.min - min / scale). An all-zero slice gets
    scale 1. Codes are rounded with ``mode`` and saturate. For group granularity the returned
    codes have x's shape and scale/zero_point have the group axis split as (..., n/g, 1, ...).
    """
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"fmt: expected an IntFormat, got {fmt!r}")
    if granularity not in ("tensor", "channel", "group"):
        raise ValueError(
            f"granularity: expected 'tensor', 'channel' or 'group', got {granularity!r}"
        )
    check_float_input(x)
    check_mode(mode)
    x = jnp.asarray(x).astype(jnp.float32)
    if x.ndim == 0 and granularity != "tensor":
        raise ValueError("x: expected at least rank 1 for channel/group granularity")
    ax = axis % x.ndim if x.ndim else 0
    if x.ndim and not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: expected an axis of a rank-{x.ndim} array, got {axis}")
    shape = x.shape
    if granularity == "group":
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
        if shape[ax] % group_size:
            raise ValueError(
                f"x: expected axis {axis} of size a multiple of group_size={group_size}, "
                f"got shape {shape}"
            )
        xg = x.reshape(*shape[:ax], shape[ax] // group_size, group_size, *shape[ax + 1 :])
        red: tuple[int, ...] = (ax + 1,)
    elif granularity == "channel":
        xg = x
        red = tuple(i for i in range(x.ndim) if i != ax)
    else:
        xg = x
        red = tuple(range(x.ndim))
    qmax, qmin = np.float32(fmt.max), np.float32(fmt.min)
    if symmetric:
        amax = jnp.max(jnp.abs(xg), axis=red, keepdims=True)
        scale = amax / qmax
        zp = jnp.zeros_like(scale, dtype=jnp.int32)
    else:
        hi = jnp.maximum(jnp.max(xg, axis=red, keepdims=True), 0)
        lo = jnp.minimum(jnp.min(xg, axis=red, keepdims=True), 0)
        scale = (hi - lo) / (qmax - qmin)
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, np.float32(1.0))
    grid = fmt.fixed
    if not symmetric:
        zpf = from_bits(round_bits(to_bits(qmin - lo / scale, F32), F32, grid, "nearest_even"), F32)
        zp = zpf.astype(jnp.int32)
    else:
        zpf = jnp.zeros_like(scale)
    v = xg / scale + zpf
    rand = random_words(v.shape, key, None) if mode == "stochastic" else None
    qv = from_bits(round_bits(to_bits(v, F32), F32, grid, mode, rand=rand), F32)
    codes = qv.astype(jnp.int32).astype(_int_dtype(fmt)).reshape(shape)
    return IntQuantized(codes, scale, zp)


def dequantize_int(q: IntQuantized, group_size: int | None = None, axis: int = -1) -> jax.Array:
    """float32 ``(codes - zero_point) * scale`` (pass the group_size/axis used to quantize)."""
    c = q.codes.astype(jnp.int32)
    if group_size is not None:
        ax = axis % c.ndim
        shp = c.shape
        c = c.reshape(*shp[:ax], shp[ax] // group_size, group_size, *shp[ax + 1 :])
        return ((c - q.zero_point).astype(jnp.float32) * q.scale).reshape(shp)
    return (c - q.zero_point).astype(jnp.float32) * q.scale
