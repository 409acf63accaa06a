"""Low-precision rounding speed: jaxcore.kernels.lowp vs the astype round trip,
jax.lax.reduce_precision and pychop's JAX backend, on 10^7 float32 values (same run)."""

import os

os.environ.setdefault("chop_backend", "jax")  # pychop reads this at import

import jax
import jax.numpy as jnp
import numpy as np
from harness import Bench
from jaxcore.kernels import lowp


def _pychop(exp_bits: int, sig_bits: int, rmode: int):
    try:
        import pychop
    except ImportError:
        return None
    return pychop.Chop(exp_bits=exp_bits, sig_bits=sig_bits, rmode=rmode)


def main() -> None:
    bench = Bench("lowp")
    args = bench.parse()
    n = 10**5 if args.quick else 10**7
    x = jnp.asarray(np.random.default_rng(0).standard_normal(n).astype(np.float32) * 8)
    key = jax.random.key(0)

    def ours(fmt, mode="nearest_even"):
        if mode == "stochastic":
            return jax.jit(lambda v: lowp.round(v, fmt, mode, key=key))
        return jax.jit(lambda v: lowp.round(v, fmt, mode))

    def astype(t):
        return jax.jit(lambda v: v.astype(t).astype(jnp.float32))

    def rp(e, m):
        return jax.jit(lambda v: jax.lax.reduce_precision(v, e, m))

    cases = [
        ("RNE bfloat16", ours(lowp.bfloat16), astype(jnp.bfloat16), "astype round trip"),
        ("RNE float8_e4m3fn", ours(lowp.float8_e4m3fn), astype(jnp.float8_e4m3fn),
         "astype round trip"),
        ("RNE e3m2", ours(lowp.FloatFormat(3, 2)), rp(3, 2), "lax.reduce_precision"),
        ("RNE e5m4", ours(lowp.FloatFormat(5, 4)), rp(5, 4), "lax.reduce_precision"),
        ("RNE e4m3 (ieee)", ours(lowp.float8_e4m3), rp(4, 3), "lax.reduce_precision"),
    ]  # fmt: skip
    for name, f, g, peer in cases:
        bench.compare(f"{name} n={n}", ours=f, peer=g, peer_name=peer, args=(x,), items=n)

    # pychop's JAX backend, jitted (Chop(exp_bits, sig_bits) with sig_bits = stored mantissa
    # bits; its e4m3 is IEEE-like with max 240, i.e. lowp.float8_e4m3, not e4m3fn)
    for name, fmt, e, m in [("bfloat16", lowp.bfloat16, 8, 7), ("e4m3", lowp.float8_e4m3, 4, 3)]:
        ch = _pychop(e, m, 1)
        if ch is None:
            print("# pychop not installed: skipping its cases")
            break
        bench.compare(
            f"RNE {name} vs pychop n={n}", ours=ours(fmt), peer=jax.jit(lambda v, ch=ch: ch(v)),
            peer_name="pychop jax Chop(rmode=1)", args=(x,), items=n, memory=False,
        )  # fmt: skip
    ch = _pychop(8, 7, 1)
    if ch is not None:  # as pychop's examples call it: eager, op by op
        for timing in ("alternating", "blocks"):  # its full-size temporaries slow interleaved calls
            bench.compare(
                f"RNE bfloat16 vs pychop eager n={n}", ours=ours(lowp.bfloat16), peer=ch,
                peer_name="pychop jax Chop(rmode=1), not jitted", args=(x,), items=n,
                memory=False, timing=timing,
            )  # fmt: skip
    ch = _pychop(8, 7, 5)
    if ch is not None:
        bench.compare(
            f"stochastic bfloat16 vs pychop n={n}", ours=ours(lowp.bfloat16, "stochastic"),
            peer=jax.jit(lambda v: ch(v)), peer_name="pychop jax Chop(rmode=5)", args=(x,), items=n,
            memory=False,
        )  # fmt: skip

    # stochastic rounding: no exact peer; the rate is the figure (threefry bits for scale)
    thr = jax.jit(lambda v: jax.random.bits(key, v.shape, jnp.uint32))
    for name, fmt in [("e4m3fn", lowp.float8_e4m3fn), ("e5m2", lowp.float8_e5m2)]:
        bench.compare(
            f"stochastic {name} n={n}", ours=ours(fmt, "stochastic"), peer=thr,
            peer_name="jax.random.bits threefry (bits only)", args=(x,), items=n,
        )  # fmt: skip

    # MX quantize + dequantize (fused and via codes); peer: the astype round trip of elements
    for bf, t in [(lowp.MXFP4, None), (lowp.MXFP8_E4M3, jnp.float8_e4m3fn)]:
        fused = jax.jit(lambda v, bf=bf: lowp.block_round(v, bf))
        codes = jax.jit(lambda v, bf=bf: lowp.block_dequantize(lowp.block_quantize(v, bf), bf))
        peer = astype(t) if t is not None else None
        bench.compare(
            f"{bf} quantize+dequantize fused n={n}", ours=fused, peer=peer,
            peer_name="element astype round trip (no scales)" if t else "-", args=(x,), items=n,
        )  # fmt: skip
        bench.compare(
            f"{bf} block_quantize -> block_dequantize n={n}", ours=codes, peer=None,
            peer_name="-", args=(x,), items=n,
        )  # fmt: skip
    bench.finish()


if __name__ == "__main__":
    main()
