"""Low-precision arithmetic: exact rounding onto any float / fixed / integer format, codes,
block (MX, NVFP4, BFP) formats, differentiable fake quantization and emulated arithmetic.

Everything works on the raw float bits with integer ops, so results are bit-exact under jit on
every backend (XLA on CPU flushes denormals and folds float tricks; the bit kernels do not care).
"""

from .formats import (
    PRESETS,
    FixedFormat,
    FloatFormat,
    IntFormat,
    bfloat16,
    float4_e2m1fn,
    float6_e2m3fn,
    float6_e3m2fn,
    float8_e3m4,
    float8_e4m3,
    float8_e4m3b11fnuz,
    float8_e4m3fn,
    float8_e4m3fnuz,
    float8_e5m2,
    float8_e5m2fnuz,
    float8_e8m0fnu,
    float16,
    float32,
    format_of,
    ml_dtype,
)
from .reference import round_reference
from .rounding import MODES, round

__all__ = [
    "MODES",
    "PRESETS",
    "FixedFormat",
    "FloatFormat",
    "IntFormat",
    "bfloat16",
    "float4_e2m1fn",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float16",
    "float32",
    "format_of",
    "ml_dtype",
    "round",
    "round_reference",
]
