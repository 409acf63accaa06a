"""Codes: ``encode`` values to a format's bit patterns, ``decode`` them, ``pack`` / ``unpack``
sub-byte codes into uint8 / uint32 words. All integer ops, exact under jit."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._bits import F32, from_bits, to_bits
from .formats import FixedFormat, FloatFormat
from .rounding import (
    _check_word,
    as_grid,
    check_float_input,
    check_mode,
    check_sr_bits,
    random_words,
    round_bits,
)


def code_dtype(bits: int) -> Any:
    """Smallest unsigned dtype holding ``bits``-bit codes."""
    if bits <= 8:
        return jnp.uint8
    if bits <= 16:
        return jnp.uint16
    return jnp.uint32


def _fits_f32(fmt: FloatFormat | FixedFormat) -> None:
    if isinstance(fmt, FloatFormat):
        lo = fmt.emin - (fmt.mantissa_bits if fmt.subnormals else 0)
        if fmt.mantissa_bits > 23 or fmt.emax > 127 or lo < -149:
            raise ValueError(f"fmt: codes need a format whose values fit float32, got {fmt}")
    elif fmt.bits > 32 or fmt.fraction_bits > 126 or fmt.integer_bits > 31:
        raise ValueError(f"fmt: codes need at most 32 bits and values in float32, got {fmt}")


def encode_bits(
    r: jax.Array, fmt: FloatFormat | FixedFormat, eoff: jax.Array | None = None
) -> jax.Array:
    """uint32 codes of float32 bits ``r`` that already lie on ``fmt``'s grid scaled by 2**eoff."""
    w = F32
    a = r & np.uint32(w.abs_mask)
    neg = (r >> np.uint32(31)) != np.uint32(0)
    ex = (a >> np.uint32(23)).astype(jnp.int32)
    is_sub = ex == 0
    sig = jnp.where(is_sub, a, (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000))
    ue = jnp.where(is_sub, np.int32(-149), ex - np.int32(150))
    off = np.int32(0) if eoff is None else eoff.astype(jnp.int32)
    if isinstance(fmt, FloatFormat):
        E, M, B = fmt.exponent_bits, fmt.mantissa_bits, fmt.bias
        e = jnp.where(
            is_sub, (np.int32(31) - lax.clz(a).astype(jnp.int32)) - np.int32(149), ex - 127
        )
        e = e - off
        normal = e >= np.int32(fmt.emin)
        cexp = jnp.where(normal, e + np.int32(B), np.int32(0))
        # mantissa field: significand in units of the quantum
        qe = jnp.where(normal, e - np.int32(M), np.int32(fmt.emin - M)) + off
        sh = qe - ue
        s_r = jnp.clip(sh, 0, 31).astype(jnp.uint32)
        s_l = jnp.clip(-sh, 0, 31).astype(jnp.uint32)
        k = jnp.where(sh >= 0, sig >> s_r, sig << s_l)
        cm = jnp.where(normal, k & np.uint32(2**M - 1), k)
        code = (cexp.astype(jnp.uint32) << np.uint32(M)) | cm
        code = jnp.where(a == 0, np.uint32(0), code)
        signbit = np.uint32(1 << (E + M))
        if fmt.signed:
            code = code | jnp.where(neg, signbit, np.uint32(0))
        isnan = a > np.uint32(0x7F800000)
        isinf = a == np.uint32(0x7F800000)
        if fmt.specials == "ieee":
            top = np.uint32((2**E - 1) << M)
            nan_code = top | np.uint32(1 << (M - 1) if M > 0 else 0)
            code = jnp.where(isinf, top | jnp.where(neg, signbit, np.uint32(0)), code)
            code = jnp.where(
                isnan, nan_code | jnp.where(neg & fmt.signed, signbit, np.uint32(0)), code
            )
        elif fmt.specials == "fn":
            nan_code = np.uint32(2 ** (E + M) - 1)
            sgn = jnp.where(neg, signbit, np.uint32(0)) if fmt.signed else np.uint32(0)
            code = jnp.where(isnan | isinf, nan_code | sgn, code)
        elif fmt.specials == "fnuz":
            code = jnp.where(isnan | isinf, signbit, code)
        else:
            code = jnp.where(isnan, np.uint32(0), code)
        return code
    # fixed point / integers: two's complement of k = value * 2**fraction_bits
    sh = (np.int32(-fmt.fraction_bits) + off) - ue
    s_r = jnp.clip(sh, 0, 31).astype(jnp.uint32)
    s_l = jnp.clip(-sh, 0, 31).astype(jnp.uint32)
    k = jnp.where(sh >= 0, sig >> s_r, sig << s_l)
    k = jnp.where(a == 0, np.uint32(0), k)
    k = jnp.where(a > np.uint32(0x7F800000), np.uint32(0), k)
    mask = np.uint32(2**fmt.bits - 1)
    return jnp.where(neg, (np.uint32(0) - k) & mask, k & mask)


def decode_bits(
    code: jax.Array, fmt: FloatFormat | FixedFormat, eoff: jax.Array | None = None
) -> jax.Array:
    """float32 bits of uint32 ``code`` (scaled by 2**eoff)."""
    code = code.astype(jnp.uint32)
    off = np.int32(0) if eoff is None else eoff.astype(jnp.int32)
    if isinstance(fmt, FloatFormat):
        E, M, B = fmt.exponent_bits, fmt.mantissa_bits, fmt.bias
        signbit = np.uint32(1 << (E + M))
        neg = (code & signbit) != 0 if fmt.signed else jnp.zeros(code.shape, bool)
        body = code & np.uint32(2 ** (E + M) - 1)
        cexp = (body >> np.uint32(M)).astype(jnp.int32)
        cm = body & np.uint32(2**M - 1)
        sub = (cexp == 0) & fmt.zero
        # normal: value = (2^M + cm) * 2^(cexp - B - M)
        k = jnp.where(sub, cm, cm | np.uint32(2**M))
        qe = jnp.where(sub, np.int32(fmt.emin - M), cexp - np.int32(B + M)) + off
        out = _int_times_pow2(k, qe)
        top = 2**E - 1
        if fmt.specials == "ieee":
            isspec = cexp == top
            out = jnp.where(
                isspec,
                jnp.where(cm == 0, np.uint32(0x7F800000), np.uint32(0x7FC00000)),
                out,
            )
        elif fmt.specials == "fn":
            out = jnp.where(body == np.uint32(2 ** (E + M) - 1), np.uint32(0x7FC00000), out)
        elif fmt.specials == "fnuz":
            out = jnp.where(code == signbit, np.uint32(0x7FC00000), out)
        return out | jnp.where(neg, np.uint32(0x80000000), np.uint32(0))
    bits = fmt.bits
    mask = np.uint32(2**bits - 1)
    c = code & mask
    if fmt.signed:
        neg = (c >> np.uint32(bits - 1)) != 0
        mag = jnp.where(neg, (np.uint32(0) - c) & mask, c)
        if bits == 32:
            mag = jnp.where(neg, np.uint32(0) - c, c)
    else:
        neg = jnp.zeros(c.shape, bool)
        mag = c
    out = _int_times_pow2(mag, np.int32(-fmt.fraction_bits) + off)
    return out | jnp.where(neg, np.uint32(0x80000000), np.uint32(0))


def _int_times_pow2(k: jax.Array, qe: jax.Array) -> jax.Array:
    """float32 bits of k * 2**qe for uint32 k (rounded toward zero if k has > 24 bits)."""
    lead = np.int32(31) - lax.clz(k).astype(jnp.int32)  # -1 for k == 0
    e = lead + qe
    # normal result
    sh = lead - np.int32(23)
    s_r = jnp.clip(sh, 0, 31).astype(jnp.uint32)
    s_l = jnp.clip(-sh, 0, 31).astype(jnp.uint32)
    m = jnp.where(sh >= 0, k >> s_r, k << s_l) & np.uint32(0x7FFFFF)
    normal = (jnp.clip(e + 127, 0, 255).astype(jnp.uint32) << np.uint32(23)) | m
    # subnormal result: k * 2^(qe + 149)
    ss = qe + np.int32(149)
    s_r2 = jnp.clip(-ss, 0, 31).astype(jnp.uint32)
    s_l2 = jnp.clip(ss, 0, 31).astype(jnp.uint32)
    subn = jnp.where(ss >= 0, k << s_l2, k >> s_r2)
    out = jnp.where(e >= -126, normal, subn)
    out = jnp.where(e > 127, np.uint32(0x7F800000), out)
    return jnp.where(k == 0, np.uint32(0), out)


def encode(
    x: jax.Array,
    fmt: Any,
    mode: str = "nearest_even",
    *,
    key: jax.Array | None = None,
    stochastic_bits: int | None = None,
) -> jax.Array:
    """Round ``x`` (float32/bfloat16/float16) onto ``fmt`` and return its codes.

    Codes are uint8 for formats up to 8 bits, uint16 up to 16, else uint32; fixed-point and
    integer codes are two's complement in ``fmt.bits`` bits. Floats follow the ml_dtypes bit
    layout (so ``codes.view(ml_dtype)`` gives the same values). NaN becomes the format's NaN
    code, or code 0 in formats without one (float6/float4, integers).
    """
    check_float_input(x)
    grid = as_grid(fmt)
    check_mode(mode)
    _fits_f32(grid)
    _check_word(grid, F32)
    sr_bits = check_sr_bits(stochastic_bits)
    x32 = jnp.asarray(x).astype(jnp.float32)
    rand = random_words(x32.shape, key, None) if mode == "stochastic" else None
    r = round_bits(to_bits(x32, F32), F32, grid, mode, rand=rand, sr_bits=sr_bits)
    return encode_bits(r, grid).astype(code_dtype(grid.bits))


def decode(codes: jax.Array, fmt: Any, dtype: Any = jnp.float32) -> jax.Array:
    """Values of ``codes`` in ``fmt`` as ``dtype`` (float32 default; exact for all presets)."""
    grid = as_grid(fmt)
    _fits_f32(grid)
    dt = jnp.result_type(codes)
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(f"codes: expected an integer dtype, got {dt}")
    out = from_bits(decode_bits(jnp.asarray(codes), grid), F32)
    return out.astype(dtype)


# ---- packing ----------------------------------------------------------------------------------
def _group(bits: int, word_bits: int) -> tuple[int, int]:
    l = math.lcm(bits, word_bits)
    return l // bits, l // word_bits


def _check_pack(bits: int, word_dtype: Any) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits: expected an int in 1..16, got {bits!r}")
    wd = np.dtype(word_dtype)
    if wd not in (np.uint8, np.uint16, np.uint32):
        raise ValueError(f"word_dtype: expected uint8, uint16 or uint32, got {wd}")
    return wd.itemsize * 8


def pack(codes: jax.Array, bits: int, word_dtype: Any = jnp.uint8) -> jax.Array:
    """Pack ``bits``-bit codes along the last axis into words, little-endian bit order.

    4-bit codes: 2 per byte; 6-bit: 4 per 3 bytes. The last axis length must be a multiple of
    ``lcm(bits, word_bits) / bits``; the output's last axis is ``n * bits / word_bits``.
    """
    wb = _check_pack(bits, word_dtype)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes: expected an integer dtype, got {codes.dtype}")
    g, nw = _group(bits, wb)
    n = codes.shape[-1] if codes.ndim else 1
    if codes.ndim == 0 or n % g:
        raise ValueError(
            f"codes: expected a last axis that is a multiple of {g} for {bits}-bit codes in "
            f"{wb}-bit words, got shape {codes.shape}"
        )
    c = codes.astype(jnp.uint32) & np.uint32(2**bits - 1)
    c = c.reshape(*codes.shape[:-1], n // g, g)
    words = []
    for j in range(nw):
        acc = jnp.zeros(c.shape[:-1], jnp.uint32)
        for i in range(g):
            off = i * bits - j * wb  # position of code i relative to word j
            if off >= wb or off + bits <= 0:
                continue
            ci = c[..., i]
            acc = acc | (ci << np.uint32(off) if off >= 0 else ci >> np.uint32(-off))
        if wb < 32:
            acc = acc & np.uint32(2**wb - 1)
        words.append(acc)
    out = jnp.stack(words, axis=-1).astype(word_dtype)
    return out.reshape(*codes.shape[:-1], (n // g) * nw)


def unpack(words: jax.Array, bits: int, dtype: Any = None) -> jax.Array:
    """Inverse of :func:`pack`: codes along the last axis (uint8/uint16 by width, or ``dtype``)."""
    words = jnp.asarray(words)
    wb = _check_pack(bits, words.dtype)
    g, nw = _group(bits, wb)
    m = words.shape[-1] if words.ndim else 1
    if words.ndim == 0 or m % nw:
        raise ValueError(
            f"words: expected a last axis that is a multiple of {nw}, got shape {words.shape}"
        )
    w = words.astype(jnp.uint32).reshape(*words.shape[:-1], m // nw, nw)
    codes = []
    for i in range(g):
        acc = jnp.zeros(w.shape[:-1], jnp.uint32)
        for j in range(nw):
            off = i * bits - j * wb
            if off >= wb or off + bits <= 0:
                continue
            wj = w[..., j]
            acc = acc | (wj >> np.uint32(off) if off >= 0 else wj << np.uint32(-off))
        codes.append(acc & np.uint32(2**bits - 1))
    out = jnp.stack(codes, axis=-1).reshape(*words.shape[:-1], (m // nw) * g)
    return out.astype(dtype if dtype is not None else code_dtype(bits))
