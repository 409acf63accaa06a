"""Bit-level helpers: float words, static constants, a counter-based hash generator."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Word:
    """Layout of an input float dtype (the word the rounding works on)."""

    fdtype: Any
    udtype: Any
    idtype: Any
    width: int
    mant: int  # stored mantissa bits
    bias: int

    @property
    def ebits(self) -> int:
        return self.width - 1 - self.mant

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return 2**self.ebits - 2 - self.bias

    def u(self, v: int) -> Any:
        """A static unsigned constant."""
        return self.udtype.type(v)

    def i(self, v: int) -> Any:
        return self.idtype.type(v)

    @property
    def inf_bits(self) -> int:
        return (2**self.ebits - 1) << self.mant

    @property
    def abs_mask(self) -> int:
        return 2 ** (self.width - 1) - 1

    @property
    def sign_bit(self) -> int:
        return 1 << (self.width - 1)

    @property
    def quiet_bit(self) -> int:
        return 1 << (self.mant - 1)

    def bits_floor(self, v: Fraction) -> int:
        """Bits of the largest word value <= v (v >= 0); inf bits if v exceeds the word's max."""
        if v <= 0:
            return 0
        max_exact = (2 - Fraction(2) ** -self.mant) * Fraction(2) ** self.emax
        if v > max_exact:
            return self.inf_bits
        n, d = v.numerator, v.denominator
        e = n.bit_length() - d.bit_length()
        if Fraction(2) ** e > v:
            e -= 1
        e = max(e, self.emin)
        q = e - self.mant  # quantum exponent
        k = int(v / Fraction(2) ** q)  # floor
        if e == self.emin and k < 2**self.mant:  # subnormal
            return k
        return ((e + self.bias) << self.mant) | (k - 2**self.mant)

    def pow2_bits(self, e: int) -> int:
        """Bits of 2**e (normal range only)."""
        assert self.emin <= e <= self.emax
        return (e + self.bias) << self.mant


F32 = Word(np.dtype(np.float32), np.dtype(np.uint32), np.dtype(np.int32), 32, 23, 127)
F64 = Word(np.dtype(np.float64), np.dtype(np.uint64), np.dtype(np.int64), 64, 52, 1023)


def word_of(dtype: Any) -> Word:
    dt = np.dtype(dtype)
    if dt == np.float32:
        return F32
    if dt == np.float64:
        return F64
    raise ValueError(f"x: expected a float32 or float64 word, got {dt}")


def to_bits(x: jax.Array, w: Word) -> jax.Array:
    return lax.bitcast_convert_type(x, w.udtype)


def from_bits(u: jax.Array, w: Word) -> jax.Array:
    return lax.bitcast_convert_type(u, w.fdtype)


# ---- random bits: a counter-based hash, seeded from a key ---------------------------------
_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_GOLD = np.uint32(0x9E3779B9)


def _mix32(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash with low bias."""
    x = x ^ (x >> np.uint32(16))
    x = x * _M1
    x = x ^ (x >> np.uint32(15))
    x = x * _M2
    return x ^ (x >> np.uint32(16))


def seeds_from_key(key: jax.Array) -> jax.Array:
    """Two uint32 seed words from a JAX PRNG key (typed or raw uint32[2])."""
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        return jax.random.bits(key, (2,), jnp.uint32)
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32:
        raise TypeError(f"key: expected a PRNG key or uint32 key data, got dtype {key.dtype}")
    return jax.random.bits(jax.random.wrap_key_data(key), (2,), jnp.uint32)


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 row-major element index (wraps past 2**32), built from iotas so that it is the
    global index under any sharding."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        io = lax.broadcasted_iota(jnp.uint32, shape, d)
        idx = idx + io * np.uint32(stride % 2**32)
        stride *= shape[d]
    return idx


def hash_bits(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random words, one per element: a function of (seeds, global index) only."""
    s0 = seeds[0]
    s1 = seeds[1]
    c = flat_index(shape)
    h = _mix32(c * _GOLD + s0)
    return _mix32(h ^ s1)
