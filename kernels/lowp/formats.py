"""Number formats: :class:`FloatFormat`, :class:`IntFormat`, :class:`FixedFormat` and presets.

Formats are frozen, hashable dataclasses (static arguments under ``jit``). Every ml_dtypes float
type has a preset that matches it exactly (:func:`format_of` maps a dtype to its preset).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np

SPECIALS = ("ieee", "fn", "fnuz", "none")
OVERFLOWS = ("inf", "nan", "saturate")


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with ``exponent_bits`` and ``mantissa_bits`` fields.

    specials:
      * ``"ieee"``: the top exponent field holds inf (mantissa 0) and NaN (otherwise).
      * ``"fn"``: finite; only the all-ones code is NaN (e.g. float8_e4m3fn, max 448).
      * ``"fnuz"``: finite; the negative-zero code is the only NaN, there is no -0.
      * ``"none"``: finite and no NaN code (float6/float4 in ml_dtypes).
    overflow (what a finite value beyond ``max`` rounds to in the nearest/away modes):
      ``"inf"`` (ieee only), ``"nan"`` (formats with a NaN code) or ``"saturate"`` (+-max).
      ``None`` picks the ml_dtypes behaviour: inf for ieee, nan for fn/fnuz, saturate for none.
    ``signed=False`` drops the sign bit (negative inputs become NaN); ``zero=False`` (only with
    ``subnormals=False``, like float8_e8m0fnu) makes exponent field 0 an ordinary power of two, so
    there is no zero code: exact zeros become NaN and underflow clamps to the smallest value.
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    subnormals: bool = True
    specials: str = "ieee"
    overflow: str | None = None
    signed: bool = True
    zero: bool = True
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        if not isinstance(e, int) or not 1 <= e <= 11:
            if e == 0 and not self.subnormals:
                raise ValueError(
                    "exponent_bits: expected 1..11, got 0 (with subnormals=False there are no "
                    "representable non-zero values)"
                )
            raise ValueError(f"exponent_bits: expected an int in 1..11, got {e!r}")
        if not isinstance(m, int) or not 0 <= m <= 52:
            raise ValueError(f"mantissa_bits: expected an int in 0..52, got {m!r}")
        if self.specials not in SPECIALS:
            raise ValueError(f"specials: expected one of {SPECIALS}, got {self.specials!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (e - 1) - 1)
        if not isinstance(self.bias, int):
            raise ValueError(f"bias: expected an int, got {self.bias!r}")
        if self.overflow is None:
            default = {"ieee": "inf", "fn": "nan", "fnuz": "nan", "none": "saturate"}
            object.__setattr__(self, "overflow", default[self.specials])
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow: expected one of {OVERFLOWS}, got {self.overflow!r}")
        if self.overflow == "inf" and self.specials != "ieee":
            raise ValueError(
                f"overflow: 'inf' needs specials='ieee', got specials={self.specials!r}"
            )
        if self.overflow == "nan" and self.specials == "none":
            raise ValueError("overflow: 'nan' needs a NaN code, but specials='none' has none")
        if self.specials == "ieee" and e == 1 and m == 0:
            raise ValueError("mantissa_bits: e1m0 with ieee specials has no finite non-zero value")
        if self.specials == "fn" and m == 0 and e == 1 and self.zero:
            raise ValueError("mantissa_bits: e1m0 'fn' has no finite non-zero value")
        if self.specials == "fnuz" and not self.signed:
            raise ValueError("specials: 'fnuz' needs signed=True (its NaN is the -0 code)")
        if not self.zero and self.subnormals:
            raise ValueError("zero: zero=False needs subnormals=False")
        if not self.zero and self.signed:
            raise ValueError("zero: zero=False is only supported with signed=False (e8m0)")
        if self.emin - self.mantissa_bits < -1074 or self.emax > 1023:
            raise ValueError(
                f"bias: exponent range [{self.emin}, {self.emax}] exceeds float64's; got "
                f"bias={self.bias}"
            )

    # ---- derived, all static Python numbers -------------------------------------------------
    @property
    def bits(self) -> int:
        """Total code width in bits."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return (1 if self.zero else 0) - self.bias

    @property
    def _top_field(self) -> int:
        """Largest exponent field holding finite values."""
        top = 2**self.exponent_bits - 1
        if self.specials == "ieee":
            return top - 1
        if self.specials == "fn" and self.mantissa_bits == 0:
            return top - 1
        return top

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        return self._top_field - self.bias

    @property
    def max_mantissa(self) -> int:
        """Mantissa field of the largest finite value."""
        full = 2**self.mantissa_bits - 1
        if self.specials == "fn" and self.mantissa_bits > 0:
            return full - 1
        return full

    @property
    def max_exact(self) -> Fraction:
        m = self.mantissa_bits
        return Fraction(2**m + self.max_mantissa, 2**m) * Fraction(2) ** self.emax

    @property
    def max(self) -> float:
        """Largest finite value (Python float; inf if beyond float64)."""
        return float(self.max_exact)

    @property
    def min_normal(self) -> float:
        return float(Fraction(2) ** self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (== min_normal without subnormals)."""
        if not self.subnormals:
            return self.min_normal
        return float(Fraction(2) ** (self.emin - self.mantissa_bits))

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.specials != "none"

    @property
    def has_negative_zero(self) -> bool:
        return self.signed and self.specials != "fnuz" and self.zero

    def __str__(self) -> str:
        """The preset name, else ``[u]e<E>m<M>[fn|fnuz]`` plus a suffix for each other field
        that differs from its default (so two different formats never print alike)."""
        if self.name:
            return self.name
        e = self.exponent_bits
        out = f"{'' if self.signed else 'u'}e{e}m{self.mantissa_bits}"
        out += {"ieee": "", "fn": "fn", "fnuz": "fnuz", "none": "_finite"}[self.specials]
        default_overflow = {"ieee": "inf", "fn": "nan", "fnuz": "nan", "none": "saturate"}
        if self.overflow != default_overflow[self.specials]:
            out += f"_{self.overflow}"
        if not self.subnormals:
            out += "_nosub"
        if not self.zero:
            out += "_nozero"
        if self.bias != 2 ** (e - 1) - 1:
            out += f"_bias{self.bias}"
        return out


@dataclasses.dataclass(frozen=True)
class FixedFormat:
    """Fixed point: ``integer_bits`` + ``fraction_bits`` (+ a sign bit when ``signed``).

    Values are multiples of ``2**-fraction_bits`` in ``[-2**integer_bits, 2**integer_bits -
    2**-fraction_bits]`` (two's complement; ``narrow=True`` drops the most negative value).
    Out-of-range values saturate.
    """

    integer_bits: int
    fraction_bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.integer_bits, int) or not -126 <= self.integer_bits <= 62:
            raise ValueError(
                f"integer_bits: expected an int in -126..62, got {self.integer_bits!r}"
            )
        if not isinstance(self.fraction_bits, int) or not -62 <= self.fraction_bits <= 126:
            raise ValueError(
                f"fraction_bits: expected an int in -62..126, got {self.fraction_bits!r}"
            )
        if self.integer_bits + self.fraction_bits < (0 if self.signed else 1):
            raise ValueError(
                "fraction_bits: integer_bits + fraction_bits must be >= 0 (signed) or >= 1, got "
                f"{self.integer_bits} + {self.fraction_bits}"
            )

    @property
    def bits(self) -> int:
        return int(self.signed) + self.integer_bits + self.fraction_bits

    @property
    def quantum_exp(self) -> int:
        return -self.fraction_bits

    @property
    def max_exact(self) -> Fraction:
        return Fraction(2) ** self.integer_bits - Fraction(2) ** (-self.fraction_bits)

    @property
    def min_exact(self) -> Fraction:
        """Most negative value (0 if unsigned)."""
        if not self.signed:
            return Fraction(0)
        if self.narrow:
            return -self.max_exact
        return -(Fraction(2) ** self.integer_bits)

    @property
    def max(self) -> float:
        return float(self.max_exact)

    @property
    def min(self) -> float:
        return float(self.min_exact)

    def __str__(self) -> str:
        return f"{'s' if self.signed else 'u'}fix{self.integer_bits}.{self.fraction_bits}"


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """``bits``-wide integers (two's complement when signed; ``narrow`` drops -2**(bits-1))."""

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not (2 if self.signed else 1) <= self.bits <= 32:
            raise ValueError(f"bits: expected an int in 1..32 (2..32 signed), got {self.bits!r}")

    @property
    def fixed(self) -> FixedFormat:
        """The same value set as a :class:`FixedFormat`."""
        return FixedFormat(self.bits - int(self.signed), 0, self.signed, self.narrow)

    @property
    def max(self) -> int:
        return 2 ** (self.bits - int(self.signed)) - 1

    @property
    def min(self) -> int:
        if not self.signed:
            return 0
        return -self.max if self.narrow else -self.max - 1

    def __str__(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}{'n' if self.narrow else ''}"


def _f(e: int, m: int, name: str, **kw: Any) -> FloatFormat:
    return FloatFormat(e, m, name=name, **kw)


# ---- presets matching ml_dtypes -------------------------------------------------------------
float32 = _f(8, 23, "float32")
bfloat16 = _f(8, 7, "bfloat16")
float16 = _f(5, 10, "float16")
float8_e4m3fn = _f(4, 3, "float8_e4m3fn", specials="fn")
float8_e4m3fnuz = _f(4, 3, "float8_e4m3fnuz", bias=8, specials="fnuz")
float8_e4m3b11fnuz = _f(4, 3, "float8_e4m3b11fnuz", bias=11, specials="fnuz")
float8_e4m3 = _f(4, 3, "float8_e4m3")
float8_e5m2 = _f(5, 2, "float8_e5m2")
float8_e5m2fnuz = _f(5, 2, "float8_e5m2fnuz", bias=16, specials="fnuz")
float8_e3m4 = _f(3, 4, "float8_e3m4")
float8_e8m0fnu = _f(
    8, 0, "float8_e8m0fnu", bias=127, subnormals=False, specials="fn", signed=False, zero=False
)
float6_e2m3fn = _f(2, 3, "float6_e2m3fn", specials="none")
float6_e3m2fn = _f(3, 2, "float6_e3m2fn", specials="none")
float4_e2m1fn = _f(2, 1, "float4_e2m1fn", specials="none")

PRESETS: dict[str, FloatFormat] = {
    f.name: f  # type: ignore[misc]
    for f in (
        bfloat16,
        float16,
        float8_e4m3fn,
        float8_e4m3fnuz,
        float8_e4m3b11fnuz,
        float8_e4m3,
        float8_e5m2,
        float8_e5m2fnuz,
        float8_e3m4,
        float8_e8m0fnu,
        float6_e2m3fn,
        float6_e3m2fn,
        float4_e2m1fn,
    )
}


def format_of(dtype: Any) -> FloatFormat:
    """The :class:`FloatFormat` of an ml_dtypes / numpy / jnp float dtype (``jnp.bfloat16``)."""
    try:
        name = np.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype: expected a float dtype, got {dtype!r}") from e
    if name == "float32":
        return float32
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(
        f"dtype: expected one of float32, {', '.join(PRESETS)}, got {name!r} "
        "(build a FloatFormat for other formats)"
    )


def ml_dtype(fmt: FloatFormat) -> Any:
    """The ml_dtypes / numpy dtype with exactly this format's values, or None."""
    for name, f in PRESETS.items():
        if f == fmt:
            return np.dtype(np.float16) if name == "float16" else np.dtype(getattr(ml_dtypes, name))
    return None


Format = FloatFormat | FixedFormat | IntFormat


def formats_table() -> str:
    """Markdown table of every preset: bits, max, min normal, min subnormal, specials.

    docs/lowp.md embeds this output; a test keeps the page equal to it.
    """
    rows = [
        "| format | bits | e | m | bias | max | min normal | min subnormal | inf | NaN | -0 "
        "| overflow |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in (float32, *PRESETS.values()):
        sub = f"{f.min_subnormal:.6g}" if f.subnormals else "none"
        rows.append(
            f"| {f.name} | {f.bits} | {f.exponent_bits} | {f.mantissa_bits} | {f.bias} "
            f"| {f.max:.6g} | {f.min_normal:.6g} | {sub} | {'yes' if f.has_inf else 'no'} "
            f"| {'yes' if f.has_nan else 'no'} | {'yes' if f.has_negative_zero else 'no'} "
            f"| {f.overflow} |"
        )
    return "\n".join(rows)
