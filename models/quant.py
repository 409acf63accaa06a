"""Quantized layers: :class:`QDense` and :class:`QEinsum` (``jaxcore.models``).

A layer holds float master weights and, in its forward pass, fake-quantizes the weight and the
input activation onto low-precision formats from :mod:`jaxcore.kernels.lowp` (float, int, MX /
NVFP4 block formats, BitMoD; ``lowp.fake_quant`` with straight-through gradients), then
multiplies in float32. For
export, :meth:`QDense.export` returns the real codes (``lowp.encode``) and scales.

Scaling. Integer / fixed formats are scaled by the absolute maximum (weights: per output
channel; activations: per token, the last axis). Float formats are used unscaled (they have
their own exponent), so a 32-bit float format is exactly the float layer.

Learnable bit-widths (for co-design). With ``QuantConfig(learn_bits=True)`` each layer carries
two :class:`BitWidth` variables (weight and activation bits). The quantizer is a continuous
relaxation of a symmetric ``b``-bit integer quantizer: for real ``b`` it interpolates
``(1 - f) Q_floor(b)(x) + f Q_ceil(b)(x)`` with ``f = b - floor(b)``, so at integer ``b`` it is
exactly the ``b``-bit quantizer, and ``d/db`` is the difference the extra bit makes. BitWidth is
not an ``nnx.Param``: the ordinary training loop leaves it alone, and a co-design loop selects it
with ``nnx.state(model, BitWidth)``; :func:`bit_widths` lists them per layer.

``QuantConfig(learn_bits=True, learn_kind="float", exponent_bits=e)`` learns the width of a
float format instead: ``b`` total bits = sign + ``e`` exponent bits (fixed) + ``m = b - 1 - e``
mantissa bits (learned), absmax-scaled onto the format's largest value, finite (no inf/NaN
codes, saturating, subnormals kept, like ml_dtypes' float6/float4), round to nearest even; the
same interpolation between ``floor(m)`` and ``floor(m) + 1`` mantissa bits (at integer ``m`` it
equals ``lowp.fake_quant`` onto ``FloatFormat(e, m, specials="none")``, tested).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxcore.kernels import lowp
from jaxcore.kernels.lowp import codes as _codes


class BitWidth(nnx.Variable):
    """A continuous bit-width (float32 scalar): a co-design parameter, not a weight."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a layer quantizes (frozen, hashable; shared by every layer of a model).

    ``weight_format`` / ``act_format``: None (float), a lowp format (FloatFormat, IntFormat,
    FixedFormat), an ml_dtypes dtype, or a name accepted by :func:`resolve_format`.
    ``learn_bits``: use learnable bit-widths instead of the fixed formats, starting at
    ``init_bits`` and kept in ``bits_range`` (total bits). ``learn_kind``: "int" (symmetric
    integers) or "float" (sign + ``exponent_bits`` + learned mantissa bits). ``quantize_acts``:
    also quantize activations in the learnable mode. ``mode``: the lowp rounding mode of the
    fixed formats.
    """

    weight_format: Any = None
    act_format: Any = None
    learn_bits: bool = False
    init_bits: float = 8.0
    bits_range: tuple[float, float] = (2.0, 16.0)
    quantize_acts: bool = True
    mode: str = "nearest_even"
    learn_kind: str = "int"
    exponent_bits: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "weight_format", resolve_format(self.weight_format, "weight_format")
        )
        object.__setattr__(self, "act_format", resolve_format(self.act_format, "act_format"))
        if isinstance(self.act_format, BitMoD):
            raise ValueError(f"act_format: {self.act_format} is a weight-only format")
        lo, hi = self.bits_range
        if self.learn_kind not in ("int", "float"):
            raise ValueError(f"learn_kind: expected 'int' or 'float', got {self.learn_kind!r}")
        e = self.exponent_bits
        if self.learn_kind == "float":
            if not isinstance(e, int) or not 1 <= e <= 8:
                raise ValueError(f"exponent_bits: expected an int in 1..8, got {e!r}")
            if not 1 + e <= lo < hi <= 1 + e + 23:
                raise ValueError(
                    f"bits_range: expected {1 + e} <= low < high <= {1 + e + 23} (sign + "
                    f"{e} exponent bits + 0..23 mantissa bits), got {self.bits_range}"
                )
        elif not 1.0 < lo < hi <= 24.0:
            raise ValueError(f"bits_range: expected 1 < low < high <= 24, got {self.bits_range}")
        if not lo <= self.init_bits <= hi:
            raise ValueError(
                f"init_bits: expected a value in {self.bits_range}, got {self.init_bits}"
            )
        lowp.rounding.check_mode(self.mode)

    @property
    def active(self) -> bool:
        return self.learn_bits or self.weight_format is not None or self.act_format is not None


@dataclasses.dataclass(frozen=True)
class BitMoD:
    """BitMoD weight format (``lowp.bitmod_quantize``): ``bits``-bit codes with a per-group choice
    of datatype, groups of ``group_size`` along the contraction axis. Weights only."""

    bits: int = 4
    group_size: int = 32

    def __str__(self) -> str:
        return f"bitmod{self.bits}"


_BLOCK_NAMES = {
    "mxfp4": "MXFP4",
    "mxfp6_e2m3": "MXFP6_E2M3",
    "mxfp6_e3m2": "MXFP6_E3M2",
    "mxfp8_e4m3": "MXFP8_E4M3",
    "mxfp8_e5m2": "MXFP8_E5M2",
    "mxint8": "MXINT8",
    "nvfp4": "NVFP4",
}
_SCALAR = (lowp.FloatFormat, lowp.IntFormat, lowp.FixedFormat)


def resolve_format(fmt: Any, name: str = "format") -> Any:
    """A format from a format object, a dtype or a name; ``None`` stays None.

    Names: ``"float32"`` and every lowp float preset (``"float8_e4m3fn"``, ``"bfloat16"``, ...),
    ``"intN"`` / ``"uintN"``, the block formats ``"mxfp4"``, ``"mxfp6_e2m3"``, ``"mxfp6_e3m2"``,
    ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxint8"``, ``"nvfp4"``, and ``"bitmodN"`` (weights).
    """
    if fmt is None or isinstance(fmt, (*_SCALAR, lowp.BlockFormat, BitMoD)):
        return fmt
    if isinstance(fmt, str):
        key = fmt.lower()
        if key in ("none", "float", ""):
            return None
        if key == "float32":
            return lowp.float32
        if key in lowp.PRESETS:
            return lowp.PRESETS[key]
        if key in _BLOCK_NAMES:
            return getattr(lowp, _BLOCK_NAMES[key])
        m = re.fullmatch(r"(u?)int(\d+)", key)
        b = re.fullmatch(r"bitmod(\d+)", key)
        try:
            if m:
                return lowp.IntFormat(int(m.group(2)), signed=not m.group(1))
            if b:
                lowp.bitmod_tables(int(b.group(1)))  # validates the bit count
                return BitMoD(int(b.group(1)))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        names = ["float32", *lowp.PRESETS, "intN", "uintN", *_BLOCK_NAMES, "bitmodN"]
        raise ValueError(f"{name}: expected a format name in {names}, got {fmt!r}")
    try:
        return lowp.format_of(fmt)
    except (ValueError, TypeError):
        raise ValueError(f"{name}: expected a lowp format, dtype or name, got {fmt!r}") from None


# ---------------------------------------------------------------------------------------------
def _ste(x: jax.Array, q: jax.Array) -> jax.Array:
    """Value ``q``, gradient of the identity in ``x`` (straight-through estimator)."""
    return x + jax.lax.stop_gradient(q - x)


def _absmax_scale(x: jax.Array, qmax: float | jax.Array, axes: tuple[int, ...]) -> jax.Array:
    amax = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=axes, keepdims=True)
    return jnp.where(amax > 0, amax / qmax, 1.0).astype(x.dtype)


def _block_on(fmt: Any, axes: tuple[int, ...], ndim: int) -> Any:
    if len(axes) != 1:
        raise ValueError(f"weight_format: {fmt} needs one contraction axis, got axes {axes}")
    return dataclasses.replace(fmt, axis=axes[0] % ndim)


def fake_quantize(x: jax.Array, fmt: Any, axes: tuple[int, ...], mode: str) -> jax.Array:
    """Quantize-dequantize ``x`` onto ``fmt`` with a straight-through gradient
    (``lowp.fake_quant``). ``axes`` are the contraction axes: integer/fixed formats are
    absmax-scaled over them, block formats (MX, NVFP4) and BitMoD groups run along them, float
    formats are unscaled. ``fmt=None`` returns ``x``."""
    if fmt is None:
        return x
    if isinstance(fmt, lowp.FloatFormat):
        return lowp.fake_quant(x, fmt, mode)
    if isinstance(fmt, lowp.BlockFormat):
        return lowp.fake_quant(x, _block_on(fmt, axes, x.ndim), mode)
    if isinstance(fmt, BitMoD):
        if len(axes) != 1:
            raise ValueError(f"weight_format: {fmt} needs one contraction axis, got axes {axes}")
        q = lowp.bitmod_quantize(x, fmt.bits, fmt.group_size, axis=axes[0]).values
        return _ste(x, q.astype(x.dtype))
    grid = fmt.fixed if isinstance(fmt, lowp.IntFormat) else fmt
    s = _absmax_scale(x, float(grid.max), axes)
    return lowp.fake_quant(x / s, grid, mode) * s


def relaxed_int_quantize(x: jax.Array, bits: jax.Array, scale_axes: tuple[int, ...]) -> jax.Array:
    """Symmetric integer fake-quantization at a continuous bit-width ``bits`` (scalar).

    ``(1 - f) Q_k(x) + f Q_{k+1}(x)`` with ``k = floor(bits)``, ``f = bits - k``; ``Q_k`` rounds
    onto ``2**(k-1) - 1`` absmax-scaled levels each side of zero. Gradient: straight through in
    ``x``, ``Q_{k+1}(x) - Q_k(x)`` in ``bits``.
    """
    b = jnp.asarray(bits, jnp.float32)
    k = jnp.floor(jax.lax.stop_gradient(b))
    f = b - k

    def q(nbits):
        levels = jnp.exp2(nbits - 1.0) - 1.0
        s = _absmax_scale(x, levels, scale_axes)
        return jnp.clip(jnp.round(x / s), -levels, levels) * s

    return _mix(x, q(k), q(k + 1.0), f)


def float_grid_max(exponent_bits: int, mantissa_bits: Any) -> Any:
    """Largest value of the finite (no inf/NaN codes) float format with these fields."""
    emax = 2**exponent_bits - 1 - (2 ** (exponent_bits - 1) - 1)
    return (2.0 - _pow2(-jnp.asarray(mantissa_bits, jnp.float32))) * 2.0**emax


def _pow2(k: jax.Array) -> jax.Array:
    """Exact 2**k in float32 for integer-valued ``k`` (exp2 may be off by an ulp)."""
    return jnp.ldexp(jnp.float32(1.0), jnp.asarray(k).astype(jnp.int32))


def _round_float(y: jax.Array, e: int, m: jax.Array) -> jax.Array:
    """Round f32 ``y`` to the finite float format (sign, ``e`` exponent bits, ``m`` mantissa
    bits; ``m`` may be traced, integer-valued), nearest even, saturating, subnormals kept."""
    emin = 1 - (2 ** (e - 1) - 1)
    _, ex = jnp.frexp(y)  # |y| = f 2**ex, f in [0.5, 1): the binade is 2**(ex - 1)
    binade = jnp.maximum(ex - 1, emin).astype(jnp.float32)
    quantum = _pow2(binade - m)
    r = jnp.round(y / quantum) * quantum  # power-of-two quantum: exact division, RNE
    fmax = float_grid_max(e, m)
    return jnp.clip(r, -fmax, fmax)


def relaxed_float_quantize(
    x: jax.Array, bits: jax.Array, exponent_bits: int, scale_axes: tuple[int, ...]
) -> jax.Array:
    """Float fake-quantization at a continuous total width ``bits`` (scalar): sign,
    ``exponent_bits`` exponent bits and ``m = bits - 1 - exponent_bits`` mantissa bits.

    ``(1 - f) Q_k(x) + f Q_{k+1}(x)`` with ``k = floor(m)``, ``f = m - k``; ``Q_k`` scales ``x``
    by its absmax over ``scale_axes`` onto the format's largest value and rounds to ``k``
    mantissa bits (:func:`_round_float`). Gradient: straight through in ``x``,
    ``Q_{k+1}(x) - Q_k(x)`` in ``bits``.
    """
    m = jnp.asarray(bits, jnp.float32) - 1.0 - exponent_bits
    k = jnp.floor(jax.lax.stop_gradient(m))
    f = m - k

    def q(mb):
        s = _absmax_scale(x, float_grid_max(exponent_bits, mb), scale_axes)
        return _round_float((x / s).astype(jnp.float32), exponent_bits, mb) * s

    return _mix(x, q(k), q(k + 1.0), f)


def _mix(x: jax.Array, lo: jax.Array, hi: jax.Array, f: jax.Array) -> jax.Array:
    """Value ``(1 - f) lo + f hi``; gradient straight through in ``x`` and ``hi - lo`` in ``f``."""
    mixed = jax.lax.stop_gradient(lo) * (1.0 - f) + jax.lax.stop_gradient(hi) * f
    return _ste(x, jax.lax.stop_gradient(mixed)) + (mixed - jax.lax.stop_gradient(mixed)).astype(
        x.dtype
    )


class _QBase(nnx.Module):
    def _init_quant(self, quant: QuantConfig | None, contraction: int | None = None) -> None:
        self.quant = quant if quant is not None else QuantConfig()
        for nm in ("weight_format", "act_format"):
            fmt = getattr(self.quant, nm)
            group = (
                fmt.block_size
                if isinstance(fmt, lowp.BlockFormat)
                else fmt.group_size
                if isinstance(fmt, BitMoD)
                else None
            )
            if group and contraction is not None and contraction % group:
                raise ValueError(
                    f"{nm}: {fmt} groups {group} elements along the contraction axis, which has "
                    f"size {contraction}; expected a multiple of {group}"
                )
        if self.quant.learn_bits:
            self.weight_bits = BitWidth(jnp.asarray(self.quant.init_bits, jnp.float32))
            self.act_bits = BitWidth(jnp.asarray(self.quant.init_bits, jnp.float32))

    def _bits(self, var: BitWidth) -> jax.Array:
        lo, hi = self.quant.bits_range
        return jnp.clip(var[...], lo, hi)

    def _relaxed(self, x: jax.Array, bits: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        if self.quant.learn_kind == "float":
            return relaxed_float_quantize(x, bits, self.quant.exponent_bits, axes)
        return relaxed_int_quantize(x, bits, axes)

    def _q_weight(self, w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        if self.quant.learn_bits:
            return self._relaxed(w, self._bits(self.weight_bits), axes)
        return fake_quantize(w, self.quant.weight_format, axes, self.quant.mode)

    def _q_act(self, x: jax.Array) -> jax.Array:
        if self.quant.learn_bits:
            if not self.quant.quantize_acts:
                return x
            return self._relaxed(x, self._bits(self.act_bits), (x.ndim - 1,))
        return fake_quantize(x, self.quant.act_format, (x.ndim - 1,), self.quant.mode)

    def _export(self, w: jax.Array, axes: tuple[int, ...]) -> dict[str, Any]:
        if self.quant.learn_bits:
            bits = int(round(float(self._bits(self.weight_bits))))
            if self.quant.learn_kind == "float":  # absmax-scaled like the training quantizer
                e = self.quant.exponent_bits
                ffmt = lowp.FloatFormat(e, bits - 1 - e, specials="none")
                s = _absmax_scale(w, float(float_grid_max(e, bits - 1 - e)), axes)
                codes = _codes.encode(w / s, ffmt, "nearest_even")
                return {"format": str(ffmt), "codes": codes, "scale": s}
            fmt: Any = lowp.IntFormat(bits)
        else:
            fmt = self.quant.weight_format
        if fmt is None:
            return {"format": None, "values": w}
        if isinstance(fmt, lowp.FloatFormat):
            return {"format": str(fmt), "codes": _codes.encode(w, fmt, self.quant.mode)}
        if isinstance(fmt, lowp.BlockFormat):
            bq = lowp.block_quantize(w, _block_on(fmt, axes, w.ndim), self.quant.mode)
            return {
                "format": str(fmt.name),
                "codes": bq.codes,
                "scales": bq.scales,
                "tensor_scale": bq.tensor_scale,
            }
        if isinstance(fmt, BitMoD):
            r = lowp.bitmod_quantize(w, fmt.bits, fmt.group_size, axis=axes[0])
            return {"format": str(fmt), "codes": r.codes, "variant": r.variant, "scale": r.scale}
        grid = fmt.fixed if isinstance(fmt, lowp.IntFormat) else fmt
        s = _absmax_scale(w, float(grid.max), axes)
        return {
            "format": str(fmt),
            "codes": _codes.encode(w / s, grid, self.quant.mode),
            "scale": s,
        }


class QDense(_QBase):
    """``y = q_a(x) @ q_w(W) (+ b)``: a dense layer with fake-quantized weight and input.

    ``x``: (..., in_features) -> (..., out_features). Weights are float32 masters; ``dtype`` is
    the compute dtype of the product (float32 default).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        quant: QuantConfig | None = None,
        dtype: Any = jnp.float32,
        kernel_init: Any = None,
        rngs: nnx.Rngs,
    ):
        init = kernel_init or nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.dtype = dtype
        self._init_quant(quant, in_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self._q_weight(self.kernel[...], (0,))
        x = self._q_act(x)
        y = jnp.matmul(x.astype(self.dtype), w.astype(self.dtype))
        if self.bias is not None:  # explicit broadcast: valid under rank_promotion="raise"
            y = y + self.bias[...].astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y

    def export(self) -> dict[str, Any]:
        """Real codes of the weight (``lowp.encode``), the per-channel scale and the format."""
        out = self._export(self.kernel[...], (0,))
        if self.bias is not None:
            out["bias"] = self.bias[...]
        return out


class QEinsum(_QBase):
    """``einsum(equation, q_a(x), q_w(W))`` with a weight of ``weight_shape``.

    The equation has two operands, input first (e.g. ``"btd,dnh->btnh"``). Integer weight
    scales are per output channel: the absmax runs over the weight's contracted axes.
    """

    def __init__(
        self,
        equation: str,
        weight_shape: tuple[int, ...],
        *,
        fan_in_axes: tuple[int, ...] | None = None,
        quant: QuantConfig | None = None,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        m = re.fullmatch(r"\s*([\w.]+)\s*,\s*(\w+)\s*->\s*([\w.]+)\s*", equation)
        if m is None:
            raise ValueError(f"equation: expected 'input,weight->output', got {equation!r}")
        _, wspec, ospec = m.groups()
        if len(wspec) != len(weight_shape):
            raise ValueError(
                f"weight_shape: expected {len(wspec)} dimensions for {wspec!r}, got {weight_shape}"
            )
        self.equation = equation
        self.contracted = tuple(i for i, c in enumerate(wspec) if c not in ospec)
        fan_axes = fan_in_axes if fan_in_axes is not None else self.contracted
        fan_in = math.prod(weight_shape[i] for i in fan_axes) if fan_axes else 1
        std = 1.0 / math.sqrt(max(fan_in, 1))
        self.kernel = nnx.Param(
            std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, weight_shape, jnp.float32)
        )
        self.dtype = dtype
        self._init_quant(quant, weight_shape[self.contracted[0]] if self.contracted else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self._q_weight(self.kernel[...], self.contracted)
        x = self._q_act(x)
        return jnp.einsum(self.equation, x.astype(self.dtype), w.astype(self.dtype))

    def export(self) -> dict[str, Any]:
        """Real codes of the weight, its scale (integer formats) and the format."""
        return self._export(self.kernel[...], self.contracted)


def bit_widths(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
    """Per quantized layer (by its path in the model), the effective (clipped) bit-widths:
    ``{"blocks.0.attn.q": {"weight": b_w, "act": b_a}, ...}``; empty unless ``learn_bits``."""
    out = {}
    for path, mod in nnx.iter_graph(model):
        if isinstance(mod, _QBase) and mod.quant.learn_bits:
            key = ".".join(str(p) for p in path)
            out[key] = {"weight": mod._bits(mod.weight_bits), "act": mod._bits(mod.act_bits)}
    return out


def export_quantized(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """:meth:`QDense.export` of every quantized layer, keyed by its path."""
    out = {}
    for path, mod in nnx.iter_graph(model):
        if isinstance(mod, _QBase):
            out[".".join(str(p) for p in path)] = mod.export()
    return out
