"""CPU attention benchmark: jaxcore "xla" (chunked flash attention) vs jax.nn and tokamax.

f32, B=1, N=8, H=64, causal. Cases (peers in the same process, alternating):
  * forward and forward+backward at T=4096 vs ``jax.nn.dot_product_attention(implementation=
    "xla")`` and tokamax ``implementation="xla_chunked"`` (skipped if tokamax is missing);
  * compiled temporary memory of forward+backward at T=8192 (ours vs jax.nn);
  * T=65536 (N=1) forward+backward runs (time and temp memory);
  * useful causal FLOP/s of the forward at T=4096 as a fraction of a 2048^3 f32 matmul measured
    in the same run;
  * forward mode: ``jax.jvp`` at T=4096 (time and temp memory; a peer without forward mode is
    recorded as such).
``--quick``: T=512 / 1024 and no 64k case.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from harness import Bench, temp_bytes, time_alternating
from jaxcore.kernels.attention import dot_product_attention

try:
    import tokamax
except ImportError:  # peer is optional
    tokamax = None


def _fns(impl: str):
    if impl == "ours":
        f = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    elif impl == "jax.nn":
        f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:
        f = lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla_chunked"
        )
    fb = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(q)), argnums=(0, 1, 2))
    return jax.jit(f), jax.jit(fb)


def _jvp_fn(impl: str):
    """Forward mode: out and its tangent along (cos q, cos k, cos v)."""
    f = _fns(impl)[0]
    return jax.jit(lambda q, k, v: jax.jvp(f, (q, k, v), (jnp.cos(q), jnp.cos(k), jnp.cos(v))))


def _qkv(t: int, n: int, h: int = 64):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((1, t, n, h), dtype=np.float32)) for _ in range(3))


def main() -> None:
    bench = Bench("attention")
    args = bench.parse()
    n, h = 8, 64
    t_main = 1024 if args.quick else 4096
    t_mem = 2048 if args.quick else 8192
    peers = ["jax.nn"] + (["tokamax xla_chunked"] if tokamax is not None else [])
    if tokamax is None:
        print("# tokamax not installed: comparing with jax.nn only")
    else:  # tokamax reads absl flags from sys.argv: mark them parsed without our options
        from absl import flags

        flags.FLAGS(sys.argv[:1])

    # f32 matmul rate in this run (the yardstick for useful FLOP/s)
    mm = 2048
    a = jnp.asarray(np.random.default_rng(1).standard_normal((mm, mm), dtype=np.float32))
    dot = jax.jit(jnp.dot)
    (t_mm,) = time_alternating([dot], (a, a), reps=bench.reps)
    mm_gflops = 2.0 * mm**3 / t_mm / 1e9
    bench.record({"case": f"matmul {mm}^3 f32", "ours_s": t_mm, "gflops": mm_gflops})

    q, k, v = _qkv(t_main, n, h)
    fwd_flops = 4.0 * n * t_main * t_main * h / 2  # causal: useful half of the square
    ours_f, ours_fb = _fns("ours")
    for peer in peers:
        pf, pfb = _fns(peer)
        rec = bench.compare(
            f"fwd T={t_main} N={n} H={h} causal f32",
            ours=ours_f,
            peer=pf,
            peer_name=peer,
            args=(q, k, v),
            flops=fwd_flops,
        )
        if peer == "jax.nn":
            bench.record(
                {
                    "case": f"useful fwd GFLOP/s / matmul GFLOP/s T={t_main}",
                    "ours_gflops": rec["ours_gflops"],
                    "matmul_gflops": mm_gflops,
                    "fraction": rec["ours_gflops"] / mm_gflops,
                    "peer_fraction": rec["peer_gflops"] / mm_gflops,
                }
            )
        bench.compare(
            f"fwd+bwd T={t_main} N={n} H={h} causal f32",
            ours=ours_fb,
            peer=pfb,
            peer_name=peer,
            args=(q, k, v),
            flops=3.5 * fwd_flops,
        )

    # forward mode (jax.jvp): ours is O(T) (the tangent rides along the online softmax)
    for peer in peers:
        try:
            pj = _jvp_fn(peer)
            pj.lower(q, k, v)
        except Exception as e:  # e.g. a custom_vjp peer: no forward mode
            bench.record({"case": f"jvp T={t_main}", "peer": peer, "peer_error": str(e)[:120]})
            continue
        bench.compare(
            f"jvp T={t_main} N={n} H={h} causal f32",
            ours=_jvp_fn("ours"),
            peer=pj,
            peer_name=peer,
            args=(q, k, v),
            flops=2.0 * fwd_flops,
        )

    qm, km, vm = _qkv(t_mem, n, h)
    ours_mem = temp_bytes(ours_fb, qm, km, vm)
    nn_mem = temp_bytes(_fns("jax.nn")[1], qm, km, vm)
    bench.record(
        {
            "case": f"fwd+bwd temp memory T={t_mem} N={n}",
            "peer": "jax.nn",
            "ours_temp_bytes": ours_mem,
            "peer_temp_bytes": nn_mem,
            "ratio": None if not ours_mem or not nn_mem else nn_mem / ours_mem,
        }
    )

    if not args.quick:
        t_long = 65536
        ql, kl, vl = _qkv(t_long, 1, h)
        (t_run,) = time_alternating([ours_fb], (ql, kl, vl), reps=1, warmup=1)
        bench.record(
            {
                "case": f"fwd+bwd T={t_long} N=1 H={h} causal f32 runs",
                "ours_s": t_run,
                "ours_temp_bytes": temp_bytes(ours_fb, ql, kl, vl),
                "ours_gflops": 3.5 * 4.0 * t_long * t_long * h / 2 / t_run / 1e9,
            }
        )
    bench.finish()


if __name__ == "__main__":
    main()
