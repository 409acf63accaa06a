"""Parallel recurrence solvers vs ``lax.scan`` on a GRU (f32): iterations, memory, wall time.

For hidden n in {1, 8, 32, 64} and T in {1k, 10k, 100k} (contracting recurrent weights): the
iterations each method needs to reach tol 1e-6 (scaled residual), the compiled temporary memory
(bytes and bytes / (4 T n): quasi-Newton must stay O(T n)), the wall time of ours vs ``lax.scan``
in the same run, and the max |difference| from ``lax.scan``. The methods run with
``fallback=False`` so each one is measured itself. Combinations whose per-iteration work would
take too long on a 2-core CPU are skipped and listed (``skipped`` records).

    python benchmarks/bench_fixed_point.py [--quick] [--reps 3] [--json-out out.json]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from harness import Bench, temp_bytes
from jaxcore.kernels import fixed_point as fp
from jaxcore.kernels import rnn

METHODS = ("newton", "quasi_newton", "elk", "jacobi")


def gru_init(key, d: int, n: int, scale: float, dtype=jnp.float32) -> dict:
    """``rnn.gru_init`` weights with the recurrent matrix scaled so that its entries have std
    ``scale / sqrt(n)`` (< 1: contracting)."""
    p = rnn.gru_init(key, d, n, dtype=dtype)
    return {**p, "w_hh": p["w_hh"] * (scale * np.sqrt(3.0))}


gru_cell = rnn.gru_cell


def make_case(n: int, T: int, *, scale: float = 0.5, d: int | None = None, seed: int = 0):
    d = d or n
    params = gru_init(jax.random.PRNGKey(seed), d, n, scale)
    h0 = jnp.zeros((n,), jnp.float32)
    xs = jax.random.normal(jax.random.PRNGKey(seed + 1), (T, d), jnp.float32)
    return params, h0, xs


def solver(method: str, **kw):
    def run(params, h0, xs):
        f = lambda h, x: gru_cell(params, h, x)
        return fp.solve_recurrence(f, h0, xs, method=method, throw=False, **kw)

    return jax.jit(run)


def scan_peer():
    def run(params, h0, xs):
        return fp.solve_recurrence_reference(lambda h, x: gru_cell(params, h, x), h0, xs)

    return jax.jit(run)


def skip_reason(method: str, n: int, T: int) -> str | None:
    """Why a combination is skipped on a 2-core CPU (None: run it)."""
    if method == "newton" and T * n * n > 2**24:
        return f"dense Jacobians T*n^2 = {T * n * n:.2e} entries (> 2^24): too slow/large here"
    if method in ("quasi_newton", "elk") and T * n * n * n > 2**31:
        return f"n JVPs per iteration, T*n^3 = {T * n**3:.2e} (> 2^31): too slow here"
    if method == "jacobi" and T * n * n > 2**31:
        return "too slow here"
    return None


def main() -> None:
    bench = Bench("fixed_point")
    args = bench.parse()
    hidden = (1, 8) if args.quick else (1, 8, 32, 64)
    lengths = (1000,) if args.quick else (1000, 10_000, 100_000)
    peer = scan_peer()
    checks = []
    for n in hidden:
        for T in lengths:
            params, h0, xs = make_case(n, T)
            ref = peer(params, h0, xs)
            for method in METHODS:
                case = f"gru n={n} T={T} {method}"
                why = skip_reason(method, n, T)
                if why is not None:
                    bench.record({"case": case, "skipped": why})
                    continue
                fn = solver(method, fallback=False, tol=1e-6)
                sol = fn(params, h0, xs)
                it = int(sol.iterations)
                tb = temp_bytes(fn, params, h0, xs)
                bench.compare(
                    case,
                    ours=fn,
                    peer=peer,
                    peer_name="lax.scan",
                    args=(params, h0, xs),
                    reps=bench.reps,
                    memory=False,
                    ours_temp_bytes=tb,
                    peer_temp_bytes=temp_bytes(peer, params, h0, xs),
                    temp_bytes_per_4Tn=None if tb is None else round(tb / (4 * T * n), 2),
                    iterations=it,
                    converged=bool(sol.converged),
                    max_abs_err=float(jnp.max(jnp.abs(sol.states - ref))),
                )
                if T == 10_000 and method in ("newton", "quasi_newton"):
                    cap = 10 if method == "newton" else 50
                    checks.append((case, it, cap, bool(sol.converged)))
    for case, it, cap, conv in checks:
        ok = conv and it <= cap
        print(f"# figure {'HOLDS' if ok else 'FAILS'}: {case}: {it} iterations (<= {cap})")
    bench.finish()


if __name__ == "__main__":
    main()
