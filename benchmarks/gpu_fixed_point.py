"""GPU check for the parallel recurrence solvers (run by benchmarks/gpu_check.sh; < ~60 s).

GRU, f32, T = 100k, contracting weights, matmul precision "highest" for both sides:
- hidden 8: quasi-Newton and Newton with default options (on GPU the linear solves use
  ``linear_scan`` "associative") vs ``lax.scan`` wall time (target: >= 10x faster);
- hidden 64: the default options (automatic fallback rule) vs ``lax.scan``: must not be slower.
Every case first checks the states against ``lax.scan`` (max |diff| printed, must be < 1e-3).

    python benchmarks/gpu_fixed_point.py [--quick] [--sweep] [--json-out out.json]

``--quick`` runs tiny shapes (works on CPU); ``--sweep`` adds the "chunked" linear solves and
hidden 16/32 without fallback (the calibration behind the fallback rule).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
from bench_fixed_point import make_case, scan_peer, solver
from harness import Bench

jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    bench = Bench("gpu_fixed_point")
    args = bench.parse(lambda p: p.add_argument("--sweep", action="store_true"))
    T = 2000 if args.quick else 100_000
    peer = scan_peer()
    failures = []
    t_start = time.perf_counter()
    cases = [
        (8, "quasi_newton", {}),
        (8, "newton", {}),
        (64, "quasi_newton", {}),
        (64, "newton", {}),  # dense Jacobians too large: the static fallback rule applies
    ]
    if args.sweep:
        cases += [
            (8, "quasi_newton", {"fallback": False, "scan_implementation": "chunked"}),
            (8, "newton", {"fallback": False, "scan_implementation": "chunked"}),
            (64, "quasi_newton", {"fallback": False}),
        ]
        for n in (16, 32):
            cases += [(n, "quasi_newton", {"fallback": False}), (n, "newton", {"fallback": False})]
    data = {}
    for n, method, kw in cases:
        if n not in data:
            data[n] = make_case(n, T)
        params, h0, xs = data[n]
        ref = peer(params, h0, xs)
        fn = solver(method, tol=1e-6, **kw)
        t0 = time.perf_counter()
        sol = fn(params, h0, xs)
        err = float(jnp.max(jnp.abs(sol.states - ref)))
        first = time.perf_counter() - t0
        label = ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
        case = f"gru n={n} T={T} {method} [{label}]"
        rec = bench.compare(
            case,
            ours=fn,
            peer=peer,
            peer_name="lax.scan",
            args=(params, h0, xs),
            reps=3,
            memory=False,
            iterations=int(sol.iterations),
            converged=bool(sol.converged),
            fell_back=bool(sol.fell_back),
            max_abs_err=err,
            compile_and_first_s=round(first, 2),
        )
        if not err < 1e-3:
            failures.append(f"{case}: max |diff| vs lax.scan {err:.3g}")
        on_gpu = jax.default_backend() == "gpu"
        if on_gpu and n == 64 and not kw and rec["ratio"] < 0.9:
            failures.append(f"{case}: slower than lax.scan (ratio {rec['ratio']:.2f})")
        if n == 8 and not kw:
            print(f"# {case}: {rec['ratio']:.1f}x vs lax.scan (target >= 10x)")
            if on_gpu and rec["ratio"] < 10:
                failures.append(f"{case}: {rec['ratio']:.1f}x vs lax.scan, target >= 10x")
    bench.finish()
    print(f"# total {time.perf_counter() - t_start:.1f} s")
    for f in failures:
        print("# FAIL", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
