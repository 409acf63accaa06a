"""GPU throughput of selective_scan and ssd (bf16 inputs, f32 state) vs the device's copy bandwidth.

Throughput = (bytes of inputs read + outputs written) / forward time, as a fraction of a device copy
(``x + 1`` on a large bf16 array: bytes read + written / time) measured in the same run. Times the
old "sequential" Pallas kernel, the chunked three-phase one (a few tilings and grid sizes) and the
XLA "chunked" path in the same run, checks each against XLA on the device (max_abs_diff_vs_xla),
and times forward+backward for the defaults; also linear_scan (bf16 a, b, h).
One JSON object per line. ``--quick`` runs tiny shapes (on CPU: the Pallas kernel in interpret
mode) so the script itself can be checked anywhere.

    python benchmarks/gpu_scan.py            # on a GPU (run from benchmarks/gpu_check.sh)
    python benchmarks/gpu_scan.py --quick    # smoke run, any backend
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import jax
import jax.numpy as jnp
from harness import time_blocks
from jaxcore.kernels.scan import _common as _scan_common
from jaxcore.kernels.scan import _pallas, linear_scan, selective_scan, ssd


def timeit(f, *args, reps: int = 10) -> float:
    return time_blocks([f], args, reps=reps)[0]


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


def _selective_inputs(bsz, length, dim, n):
    k = jax.random.split(jax.random.key(0), 7)
    bf = jnp.bfloat16
    return dict(
        u=jax.random.normal(k[0], (bsz, length, dim), bf),
        dl=(jax.random.normal(k[1], (bsz, length, dim)) * 0.5 - 1.0).astype(bf),
        A=-jnp.exp(jax.random.normal(k[2], (dim, n), jnp.float32)),
        B=jax.random.normal(k[3], (bsz, length, n), bf),
        C=jax.random.normal(k[4], (bsz, length, n), bf),
        D=jax.random.normal(k[5], (dim,), jnp.float32),
        z=jax.random.normal(k[6], (bsz, length, dim), bf),
    )


_KNOBS = ("SELECTIVE_KERNEL", "LINEAR_KERNEL", "SELECTIVE_CONFIG", "SELECTIVE_CHUNKED_CONFIG",
          "LINEAR_CHUNKED_CONFIG", "CHUNKED_CONFIG", "PREFETCH")  # fmt: skip


def _set(**overrides) -> dict:
    """Set _pallas module knobs (read at trace time); returns the previous values."""
    old = {k: getattr(_pallas, k) for k in _KNOBS}
    for k, v in overrides.items():
        setattr(_pallas, k, v)
    return old


def bench_selective(bw: float, quick: bool, pallas: str) -> None:
    """Old (sequential) and new (chunked, fused) Pallas kernels and XLA "chunked", same run."""
    shapes = [(2, 256, 64, 16)] if quick else [(2, 8192, 1024, 16), (8, 8192, 2048, 16)]
    base = _set()
    target, min_steps = base["CHUNKED_CONFIG"]
    chunked = {"SELECTIVE_KERNEL": "chunked"}
    for si, (bsz, length, dim, n) in enumerate(shapes):
        d = _selective_inputs(bsz, length, dim, n)
        shape = {"B": bsz, "L": length, "D": dim, "N": n}
        ref = None
        # (impl, knob overrides, with D and z, time forward+backward too)
        runs = [
            ("chunked", {}, False, True),
            (pallas, {"SELECTIVE_KERNEL": "sequential"}, False, True),
        ]
        runs += [(pallas, chunked, False, True)]  # the default chunked kernel
        sweep = [{"PREFETCH": 1}]
        if not quick and si == 0:
            sweep += [
                {"SELECTIVE_CHUNKED_CONFIG": c}
                for c in ((16, 4, 1), (32, 1, 1), (8, 1, 1), (32, 2, 1))
            ]
            sweep += [{"CHUNKED_CONFIG": (t, min_steps)} for t in (1024, 4096)]
            sweep += [{"PREFETCH": 4}, {"PREFETCH": 8}]
        runs += [(pallas, {**chunked, **o}, False, False) for o in sweep]
        runs += [(pallas, chunked, True, False), ("chunked", {}, True, False)]
        for impl, knobs, dz, with_bwd in runs:
            _set(**{**base, **knobs})
            rec = {"case": "selective_scan bf16" + (" +D,z" if dz else ""), "impl": impl,
                   "knobs": knobs, **shape}  # fmt: skip
            try:
                args = [d[k] for k in ("u", "dl", "A", "B", "C")]
                extra = (d["D"], d["z"]) if dz else ()

                def fwd(u, dl, A, B, C, *e, impl=impl):
                    return selective_scan(u, dl, A, B, C, *e, delta_softplus=True,
                                          implementation=impl)  # fmt: skip

                f = jax.jit(fwd)
                y = f(*args, *extra)
                io = nbytes(*args, *extra) + nbytes(y)  # inputs read + y written
                if not dz:
                    err = (
                        None
                        if ref is None
                        else float(
                            jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)))
                        )
                    )
                    ref = y if ref is None else ref
                    rec["max_abs_diff_vs_xla"] = err
                if impl != "chunked" and _pallas.SELECTIVE_KERNEL != "sequential":
                    bd = _pallas._channel_block(dim, _pallas.SELECTIVE_CHUNKED_CONFIG[0])
                    rec["chunk_steps,chunks"] = _pallas._plan_chunks(
                        bsz * dim // bd, length, _scan_common.default_chunk(length)
                    )
                t = timeit(f, *args, *extra, reps=3 if impl == "chunked" else 10)
                rec.update(fwd_s=t, GBps=io / t / 1e9, fraction_of_copy=io / t / bw)
                if with_bwd:
                    loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
                    g = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)))
                    rec["fwdbwd_s"] = timeit(g, *args, reps=3)
                emit(rec)
            except Exception as e:  # report and go on: one failing kernel must not hide the rest
                traceback.print_exc(file=sys.stderr)
                emit({**rec, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    _set(**base)


def bench_linear(bw: float, quick: bool, pallas: str) -> None:
    """linear_scan h_t = a_t h_{t-1} + b_t, bf16 a, b, h: Pallas sequential vs chunked vs XLA."""
    bsz, length, s = (2, 256, 64) if quick else (2, 8192, 1024)
    k = jax.random.split(jax.random.key(2), 2)
    a = jax.random.uniform(k[0], (bsz, length, s), minval=0.9, maxval=1.0).astype(jnp.bfloat16)
    b = jax.random.normal(k[1], (bsz, length, s), jnp.bfloat16)
    io = 3 * nbytes(a)
    shape = {"B": bsz, "L": length, "S": s}
    ref = None
    base = _set()
    runs = [("chunked", {}, True), (pallas, {"LINEAR_KERNEL": "sequential"}, True)]
    runs += [(pallas, {"LINEAR_KERNEL": "chunked"}, True)]
    sweep = [{"PREFETCH": 1}]
    if not quick:
        sweep += [{"LINEAR_CHUNKED_CONFIG": c} for c in ((256, 4), (64, 2), (32, 1))]
        sweep += [{"PREFETCH": 4}, {"PREFETCH": 8}, {"CHUNKED_CONFIG": (4096, 32)}]
    runs += [(pallas, {"LINEAR_KERNEL": "chunked", **o}, False) for o in sweep]
    for impl, knobs, with_bwd in runs:
        _set(**{**base, **knobs})
        rec = {"case": "linear_scan bf16", "impl": impl, "knobs": knobs, **shape}
        try:
            f = jax.jit(lambda a, b, impl=impl: linear_scan(a, b, implementation=impl))
            h = f(a, b).astype(jnp.float32)
            rec["max_abs_diff_vs_xla"] = None if ref is None else float(jnp.max(jnp.abs(h - ref)))
            ref = h if ref is None else ref
            t = timeit(f, a, b, reps=3 if impl == "chunked" else 10)
            rec.update(fwd_s=t, GBps=io / t / 1e9, fraction_of_copy=io / t / bw)
            if with_bwd:
                loss = lambda a, b, impl=impl: jnp.sum(
                    linear_scan(a, b, implementation=impl).astype(jnp.float32)
                )
                g = jax.jit(jax.grad(loss, (0, 1)))
                rec["fwdbwd_s"] = timeit(g, a, b, reps=3)
            emit(rec)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            emit({**rec, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    _set(**base)


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
    if args.quick:  # several chunks at L=256 too
        _pallas.CHUNKED_CONFIG = (_pallas.CHUNKED_CONFIG[0], 16)
    bw = copy_bandwidth(args.quick)
    bench_selective(bw, args.quick, pallas)
    bench_linear(bw, args.quick, pallas)
    bench_ssd(bw, args.quick)


if __name__ == "__main__":
    main()
