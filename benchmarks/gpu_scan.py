"""GPU throughput of selective_scan and ssd (bf16 inputs, f32 state) vs the device's copy bandwidth.

Throughput = (bytes of inputs read + outputs written) / forward time, as a fraction of a device copy
(``x + 1`` on a large bf16 array: bytes read + written / time) measured in the same run. Also
checks the Pallas kernel against the XLA path on the device, and times forward+backward.
One JSON object per line. ``--quick`` runs tiny shapes (on CPU: the Pallas kernel in interpret
mode) so the script itself can be checked anywhere.

    python benchmarks/gpu_scan.py            # on a GPU (run from benchmarks/gpu_check.sh)
    python benchmarks/gpu_scan.py --quick    # smoke run, any backend
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from jaxcore.kernels.scan import _pallas, selective_scan, ssd


def timeit(f, *args, reps: int = 10) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def nbytes(*xs) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in xs)


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def copy_bandwidth(quick: bool) -> float:
    n = 2**18 if quick else 2**29  # bf16 elements: 0.5 MiB / 1 GiB
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda x: x + jnp.bfloat16(1))
    t = timeit(f, x)
    bw = 2 * nbytes(x) / t
    emit({"case": "device copy (x + 1, bf16)", "bytes": 2 * nbytes(x), "s": t, "GBps": bw / 1e9})
    return bw


def bench_selective(bw: float, quick: bool, pallas: str) -> None:
    shapes = [(2, 256, 64, 16)] if quick else [(2, 8192, 1024, 16), (8, 8192, 2048, 16)]
    for bsz, length, dim, n in shapes:
        k = jax.random.split(jax.random.key(0), 5)
        bf = jnp.bfloat16
        u = jax.random.normal(k[0], (bsz, length, dim), bf)
        dl = (jax.random.normal(k[1], (bsz, length, dim)) * 0.5 - 1.0).astype(bf)
        A = -jnp.exp(jax.random.normal(k[2], (dim, n), jnp.float32))
        B = jax.random.normal(k[3], (bsz, length, n), bf)
        C = jax.random.normal(k[4], (bsz, length, n), bf)
        io = nbytes(u, dl, A, B, C) + nbytes(u)  # inputs read + y written (bf16)
        shape = {"B": bsz, "L": length, "D": dim, "N": n}
        ref = None
        configs = [(16, 4, 1)] if quick else [(16, 4, 1), (8, 1, 3), (4, 1, 3), (8, 2, 4)]
        runs = [(pallas, c) for c in configs] + [("chunked", None)]
        for impl, cfg in runs:
            if cfg is not None:
                _pallas.SELECTIVE_CONFIG = cfg
            try:
                f = jax.jit(
                    lambda u, dl, A, B, C, impl=impl: selective_scan(
                        u, dl, A, B, C, delta_softplus=True, implementation=impl
                    )
                )
                g = jax.jit(
                    jax.grad(
                        lambda u, dl, A, B, C, impl=impl: jnp.sum(
                            selective_scan(
                                u, dl, A, B, C, delta_softplus=True, implementation=impl
                            ).astype(jnp.float32)
                        ),
                        (0, 1, 2, 3, 4),
                    )
                )
                y = f(u, dl, A, B, C)
                err = None if ref is None else float(jnp.max(jnp.abs(y - ref).astype(jnp.float32)))
                ref = y if ref is None else ref
                t = timeit(f, u, dl, A, B, C, reps=3 if impl == "chunked" else 10)
                tb = timeit(g, u, dl, A, B, C, reps=3) if cfg in (None, configs[0]) else None
                emit({"case": "selective_scan bf16", "impl": impl, "config": cfg, **shape,
                      "fwd_s": t, "fwdbwd_s": tb, "GBps": io / t / 1e9,
                      "fraction_of_copy": io / t / bw, "max_abs_diff_vs_first": err})  # fmt: skip
            except Exception as e:  # report and go on: one failing kernel must not hide the rest
                traceback.print_exc(file=sys.stderr)
                emit({"case": "selective_scan bf16", "impl": impl, **shape,
                      "error": f"{type(e).__name__}: {str(e)[:300]}"})  # fmt: skip


def bench_ssd(bw: float, quick: bool) -> None:
    bsz, length, heads, p, n = (2, 256, 4, 16, 16) if quick else (2, 8192, 16, 64, 64)
    k = jax.random.split(jax.random.key(1), 5)
    bf = jnp.bfloat16
    x = jax.random.normal(k[0], (bsz, length, heads, p), bf)
    dt = jax.nn.softplus(jax.random.normal(k[1], (bsz, length, heads)) - 1.0).astype(bf)
    A = -jnp.exp(jax.random.normal(k[2], (heads,), jnp.float32))
    B = jax.random.normal(k[3], (bsz, length, 1, n), bf)
    C = jax.random.normal(k[4], (bsz, length, 1, n), bf)
    io = nbytes(x, dt, A, B, C) + nbytes(x)
    shape = {"B": bsz, "L": length, "H": heads, "P": p, "N": n}
    for chunk in (64, 128, 256):
        try:
            f = jax.jit(lambda *a, c=chunk: ssd(*a, chunk_size=c))
            g = jax.jit(
                jax.grad(
                    lambda *a, c=chunk: jnp.sum(ssd(*a, chunk_size=c).astype(jnp.float32)),
                    (0, 1, 2, 3, 4),
                )
            )
            t = timeit(f, x, dt, A, B, C)
            tb = timeit(g, x, dt, A, B, C, reps=5)
            emit({"case": "ssd bf16", "impl": "chunked", "chunk": chunk, **shape,
                  "fwd_s": t, "fwdbwd_s": tb, "GBps": io / t / 1e9,
                  "fraction_of_copy": io / t / bw})  # fmt: skip
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            emit({"case": "ssd bf16", "chunk": chunk, **shape,
                  "error": f"{type(e).__name__}: {str(e)[:300]}"})  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run, any backend)")
    args = p.parse_args()
    dev = jax.devices()[0]
    emit({"benchmark": "gpu_scan", "jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(dev, "device_kind", str(dev))})  # fmt: skip
    pallas = "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"
    bw = copy_bandwidth(args.quick)
    bench_selective(bw, args.quick, pallas)
    bench_ssd(bw, args.quick)


if __name__ == "__main__":
    main()
