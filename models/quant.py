"""Quantized layers: :class:`QDense` and :class:`QEinsum` (``jaxcore.models``).

A layer holds float master weights and, in its forward pass, fake-quantizes the weight and the
input activation onto low-precision formats from :mod:`jaxcore.kernels.lowp` (rounding with
``lowp.round``, gradients by the straight-through estimator), then multiplies in float32. For
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
    ``learn_bits``: use learnable integer bit-widths instead of the fixed formats, starting at
    ``init_bits`` and kept in ``bits_range``. ``quantize_acts``: also quantize activations in the
    learnable mode. ``mode``: the lowp rounding mode of the fixed formats.
    """

    weight_format: Any = None
    act_format: Any = None
    learn_bits: bool = False
    init_bits: float = 8.0
    bits_range: tuple[float, float] = (2.0, 16.0)
    quantize_acts: bool = True
    mode: str = "nearest_even"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "weight_format", resolve_format(self.weight_format, "weight_format")
        )
        object.__setattr__(self, "act_format", resolve_format(self.act_format, "act_format"))
        lo, hi = self.bits_range
        if not 1.0 < lo < hi <= 24.0:
            raise ValueError(f"bits_range: expected 1 < low < high <= 24, got {self.bits_range}")
        if not lo <= self.init_bits <= hi:
            raise ValueError(
                f"init_bits: expected a value in {self.bits_range}, got {self.init_bits}"
            )
        lowp.rounding.check_mode(self.mode)

    @property
    def active(self) -> bool:
        return self.learn_bits or self.weight_format is not None or self.act_format is not None


def resolve_format(fmt: Any, name: str = "format") -> Any:
    """A lowp format from a format, a dtype or a name: ``"float8_e4m3fn"`` (any lowp preset),
    ``"float32"``, ``"int8"`` / ``"int4"`` / ``"intN"``, ``"uint8"``; ``None`` stays None."""
    if fmt is None or isinstance(fmt, lowp.FloatFormat | lowp.IntFormat | lowp.FixedFormat):
        return fmt
    if isinstance(fmt, str):
        if fmt in ("none", "float", ""):
            return None
        if fmt == "float32":
            return lowp.float32
        if fmt in lowp.PRESETS:
            return lowp.PRESETS[fmt]
        m = re.fullmatch(r"(u?)int(\d+)", fmt)
        if m:
            try:
                return lowp.IntFormat(int(m.group(2)), signed=not m.group(1))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        names = ["float32", *lowp.PRESETS, "int8", "int4", "intN", "uintN"]
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


def fake_quantize(x: jax.Array, fmt: Any, scale_axes: tuple[int, ...], mode: str) -> jax.Array:
    """Round ``x`` onto ``fmt`` (absmax-scaled over ``scale_axes`` for integer/fixed formats),
    straight-through gradient. ``fmt=None`` returns ``x``."""
    if fmt is None:
        return x
    if isinstance(fmt, lowp.FloatFormat):
        return _ste(x, lowp.round(x, fmt, mode))
    grid = fmt.fixed if isinstance(fmt, lowp.IntFormat) else fmt
    s = _absmax_scale(x, float(grid.max), scale_axes)
    return _ste(x, lowp.round(x / s, grid, mode) * s)


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

    lo, hi = q(k), q(k + 1.0)
    mixed = jax.lax.stop_gradient(lo) * (1.0 - f) + jax.lax.stop_gradient(hi) * f
    return _ste(x, jax.lax.stop_gradient(mixed)) + (mixed - jax.lax.stop_gradient(mixed)).astype(
        x.dtype
    )


class _QBase(nnx.Module):
    def _init_quant(self, quant: QuantConfig | None) -> None:
        self.quant = quant if quant is not None else QuantConfig()
        if self.quant.learn_bits:
            self.weight_bits = BitWidth(jnp.asarray(self.quant.init_bits, jnp.float32))
            self.act_bits = BitWidth(jnp.asarray(self.quant.init_bits, jnp.float32))

    def _bits(self, var: BitWidth) -> jax.Array:
        lo, hi = self.quant.bits_range
        return jnp.clip(var[...], lo, hi)

    def _q_weight(self, w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        if self.quant.learn_bits:
            return relaxed_int_quantize(w, self._bits(self.weight_bits), axes)
        return fake_quantize(w, self.quant.weight_format, axes, self.quant.mode)

    def _q_act(self, x: jax.Array) -> jax.Array:
        if self.quant.learn_bits:
            if not self.quant.quantize_acts:
                return x
            return relaxed_int_quantize(x, self._bits(self.act_bits), (x.ndim - 1,))
        return fake_quantize(x, self.quant.act_format, (x.ndim - 1,), self.quant.mode)

    def _export(self, w: jax.Array, axes: tuple[int, ...]) -> dict[str, Any]:
        if self.quant.learn_bits:
            bits = int(round(float(self._bits(self.weight_bits))))
            fmt: Any = lowp.IntFormat(bits)
        else:
            fmt = self.quant.weight_format
        if fmt is None:
            return {"format": None, "values": w}
        if isinstance(fmt, lowp.FloatFormat):
            return {"format": str(fmt), "codes": _codes.encode(w, fmt, self.quant.mode)}
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
        self._init_quant(quant)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self._q_weight(self.kernel[...], (0,))
        x = self._q_act(x)
        y = jnp.matmul(x.astype(self.dtype), w.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
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
        self._init_quant(quant)

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
