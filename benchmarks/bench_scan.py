"""Scans: jaxcore selective_scan / ssd / linear_scan vs the obvious JAX baselines, same process.

Peers (measured in the same run, alternating with ours):
- selective_scan: mamba_ssm's ``selective_scan_ref`` algorithm in JAX (materialise exp(delta*A)
  and delta*B*u as (B, L, D, N), then ``lax.scan``), i.e. implementation="reference".
- ssd: the sequential ``lax.scan`` reference (forward and forward+backward; all functions warmed,
  then each timed in its own block of reps, min reported).
- linear_scan: ``lax.scan`` and ``lax.associative_scan`` on a diagonal recurrence.
Plus the compile time of selective_scan forward+backward at L=1024 and L=65536.

    python benchmarks/bench_scan.py [--quick] [--reps N] [--json-out FILE]
"""

import jax
import jax.numpy as jnp
from harness import Bench, compile_seconds, temp_bytes, time_blocks
from jax import lax
from jaxcore.kernels.scan import linear_scan, selective_scan, ssd


def selective_inputs(bsz, length, dim, n, abstract=False):
    if abstract:
        s = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        return (s((bsz, length, dim)), s((bsz, length, dim)), s((dim, n)),
                s((bsz, length, n)), s((bsz, length, n)))  # fmt: skip
    k = jax.random.split(jax.random.key(0), 5)
    u = jax.random.normal(k[0], (bsz, length, dim))
    dl = jax.random.normal(k[1], (bsz, length, dim)) * 0.5 - 1.0
    A = -jnp.exp(jax.random.normal(k[2], (dim, n)))
    B = jax.random.normal(k[3], (bsz, length, n))
    C = jax.random.normal(k[4], (bsz, length, n))
    return u, dl, A, B, C


def sel_fwd(impl):
    return jax.jit(
        lambda u, dl, A, B, C: selective_scan(
            u, dl, A, B, C, delta_softplus=True, implementation=impl
        )
    )


def sel_grad(impl):
    def loss(u, dl, A, B, C):
        y = selective_scan(u, dl, A, B, C, delta_softplus=True, implementation=impl)
        return jnp.sum(y * y)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def main() -> None:
    bench = Bench("scan")
    args = bench.parse(
        lambda p: p.add_argument(
            "--cases", default="selective,compile,ssd,linear", help="comma list of case groups"
        )
    )
    cases = set(args.cases.split(","))
    q = args.quick
    heavy_reps = 2 if q else 3

    # ---- selective_scan (Mamba-1 shapes) -------------------------------------------------------
    bsz, length, dim, n = (2, 512, 128, 16) if q else (2, 8192, 1024, 16)
    if "selective" in cases:
        selective_cases(bench, bsz, length, dim, n, heavy_reps)
    if "compile" in cases:
        compile_case(bench, dim, n, q)
    if "ssd" in cases:
        ssd_case(bench, q, heavy_reps)
    if "linear" in cases:
        linear_cases(bench, q)
    bench.finish()


def selective_cases(bench, bsz, length, dim, n, heavy_reps):
    xs = selective_inputs(bsz, length, dim, n)
    shape = dict(B=bsz, L=length, D=dim, N=n, dtype="float32")
    bench.compare(
        f"selective_scan fwd B{bsz} L{length} D{dim} N{n}",
        ours=sel_fwd("chunked"),
        peer=sel_fwd("reference"),
        peer_name="materialised lax.scan (selective_scan_ref algorithm)",
        args=xs,
        reps=heavy_reps,
        **shape,
    )
    bench.compare(
        f"selective_scan fwd+bwd B{bsz} L{length} D{dim} N{n}",
        ours=sel_grad("chunked"),
        peer=sel_grad("reference"),
        peer_name="materialised lax.scan (selective_scan_ref algorithm)",
        args=xs,
        reps=heavy_reps,
        **shape,
    )


def compile_case(bench, dim, n, q):
    # ---- compile time of selective_scan fwd+bwd vs L ------------------------------------------
    lens = (256, 4096) if q else (1024, 65536)
    cts = [
        compile_seconds(sel_grad("chunked"), *selective_inputs(2, ln, dim, n, True)) for ln in lens
    ]
    bench.record({"case": f"selective_scan fwd+bwd compile L{lens[0]} -> L{lens[1]}",
                  "peer": f"itself at L={lens[0]}", "ours_s": cts[1], "peer_s": cts[0],
                  "growth": cts[1] / cts[0], "D": dim, "N": n})  # fmt: skip


def ssd_case(bench, q, heavy_reps):
    # ---- ssd (Mamba-2 shapes) -----------------------------------------------------------------
    bsz, length, heads, p, n = (2, 512, 4, 16, 16) if q else (2, 8192, 16, 64, 64)
    k = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(k[0], (bsz, length, heads, p))
    dt = jax.nn.softplus(jax.random.normal(k[1], (bsz, length, heads)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[2], (heads,)))
    B = jax.random.normal(k[3], (bsz, length, 1, n))
    C = jax.random.normal(k[4], (bsz, length, 1, n))
    args = (x, dt, A, B, C)

    def ssd_grad(impl, chunk_size=64):
        loss = lambda *a: jnp.sum(ssd(*a, chunk_size=chunk_size, implementation=impl) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    def ssd_fwd(impl, chunk_size=64):
        return jax.jit(lambda *a: ssd(*a, chunk_size=chunk_size, implementation=impl))

    shape = dict(B=bsz, L=length, H=heads, P=p, N=n, dtype="float32")
    # "chunked" (CPU default; chunk 32 is its CPU default) at three chunk sizes, and "matmul" (the
    # all-chunks-at-once form, default off CPU) at 64
    variants = (("chunked", 32), ("chunked", 64), ("chunked", 128), ("matmul", 64))
    for mode, make in (("fwd", ssd_fwd), ("fwd+bwd", ssd_grad)):
        # all timed in the same process; each function in its own block of reps after all are
        # warm, so the reference's 8.7 GB of fwd+bwd temporaries are not allocated between ours
        fns = [make(i, c) for i, c in variants] + [make("reference")]
        times = time_blocks(fns, args, reps=heavy_reps, stat=min)
        peer_temp = temp_bytes(fns[-1], *args)
        name = f"ssd {mode} B{bsz} L{length} H{heads} P{p} N{n}"
        for (impl, c), f, t in zip(variants, fns, times):
            bench.record({"case": f"{name} {impl} chunk {c}",
                          "peer": "sequential lax.scan reference", "ours_s": t,
                          "peer_s": times[-1], "ratio": times[-1] / t,
                          "ours_temp_bytes": temp_bytes(f, *args), "peer_temp_bytes": peer_temp,
                          "impl": impl, "chunk": c, "timing": f"min of {heavy_reps}",
                          **shape})  # fmt: skip


def linear_cases(bench, q):
    # ---- linear_scan (diagonal, the associative_scan example) -------------------------
    bsz, length, dim, n = (1, 512, 64, 16) if q else (1, 4096, 512, 16)
    k = jax.random.split(jax.random.key(2), 2)
    a = jax.random.uniform(k[0], (bsz, length, dim, n), jnp.float32, 0.5, 1.0)
    b = jax.random.normal(k[1], (bsz, length, dim, n))

    def scan_peer(a, b):
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        _, hs = lax.scan(
            step, jnp.zeros_like(b[:, 0]), (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0))
        )
        return jnp.moveaxis(hs, 0, 1)

    def assoc_peer(a, b):
        comb = lambda x, y: (y[0] * x[0], y[0] * x[1] + y[1])
        return lax.associative_scan(comb, (a, b), axis=1)[1]

    ours = jax.jit(lambda a, b: linear_scan(a, b, implementation="chunked"))
    for name, peer in (("lax.scan", scan_peer), ("lax.associative_scan", assoc_peer)):
        bench.compare(f"linear_scan fwd B{bsz} L{length} D{dim} N{n}", ours=ours,
                      peer=jax.jit(peer), peer_name=name, args=(a, b))  # fmt: skip
        loss = lambda f: jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) ** 2), (0, 1)))
        bench.compare(f"linear_scan fwd+bwd B{bsz} L{length} D{dim} N{n}",
                      ours=loss(lambda a, b: linear_scan(a, b, implementation="chunked")),
                      peer=loss(peer), peer_name=name, args=(a, b))  # fmt: skip


if __name__ == "__main__":
    main()
