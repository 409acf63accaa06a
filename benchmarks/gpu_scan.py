"""GPU throughput of selective_scan and ssd (bf16 inputs, f32 state) vs the device's copy bandwidth.

Throughput = (bytes of inputs read + outputs written) / forward time, as a fraction of a device copy
(``x + 1`` on a large bf16 array: bytes read + written / time) measured in the same run.

selective_scan: the chunked three-phase Pallas kernel (the default; a few tilings and grid
sizes), the "blocked" one (tt.scan over time-first blocks of T steps, session 7; several
tilings), the old "sequential" one and the XLA "chunked" path, in one run, each checked against
XLA on the device (max_abs_diff_vs_xla); forward+backward with the Pallas backward kernels and
with the XLA chunked backward (SELECTIVE_BACKWARD; the gradients compared on the device first;
a few backward tilings). Also linear_scan (bf16 a, b, h).

ssd: the Pallas kernels (``implementation="pallas"``: the three-phase default and the "fused"
design of session 6, a few tilings each, each checked against the sequential f32 reference
first; the kernels of both designs also timed apart, and, on a GPU, per kernel from a profiler
trace) and the XLA default at three chunk sizes.

One JSON object per line. ``--quick`` runs tiny shapes (on CPU: the Pallas kernel in interpret
mode) so the script itself can be checked anywhere.

    python benchmarks/gpu_scan.py            # on a GPU (run from benchmarks/gpu_check.sh)
    python benchmarks/gpu_scan.py --quick    # smoke run, any backend
    python benchmarks/gpu_scan.py --cases ssd_pallas,ssd   # a subset
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from harness import kernel_times, time_blocks
from jaxcore.kernels.scan import _common as _scan_common
from jaxcore.kernels.scan import (
    _pallas,
    _ssd_pallas,
    linear_scan,
    selective_scan,
    ssd,
    ssd_reference,
)


def timeit(f, *args, reps: int = 10) -> float:
    return time_blocks([f], args, reps=reps)[0]


def timeit_queued(f, *args, calls: int = 20, trials: int = 3) -> float:
    """Seconds per call of ``calls`` calls dispatched back to back (one block at the end), the
    best of ``trials``: for ~100 us kernels, where a host sync per call would be timed too."""
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        out = [f(*args) for _ in range(calls)]
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def nbytes(*xs) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in xs)


RECORDS: list[dict] = []  # every emitted record, for the closing summary


def emit(rec: dict) -> None:
    RECORDS.append(rec)
    print(json.dumps(rec), flush=True)


def best_of(records: list[dict]) -> list[dict]:
    """Per (case, shape): the fastest forward among the records that ran without error and
    were checked against their reference on the device (ok, or max_abs_diff_vs_xla within
    0.05: the Pallas kernels; the XLA references themselves are not), with the implementation
    and knobs that gave it: what a default switch should be read from."""
    shape_keys = ("B", "L", "D", "H", "P", "N")
    groups: dict[tuple, dict] = {}
    for r in records:
        diff = r.get("max_abs_diff_vs_xla")
        checked = r.get("ok") is True or (diff is not None and diff <= 0.05)
        if "fwd_s" not in r or "error" in r or not checked:
            continue
        key = (r["case"], *(r.get(k) for k in shape_keys))
        if key not in groups or r["fwd_s"] < groups[key]["fwd_s"]:
            groups[key] = r
    keep = ("case", *shape_keys, "impl", "knobs", "chunk", "fwd_s", "fraction_of_copy")
    return [{"summary": "fastest checked forward", **{k: r[k] for k in keep if k in r}}
            for r in groups.values()]  # fmt: skip


def summarize(records: list[dict]) -> None:
    for rec in best_of(records):
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
          "LINEAR_CHUNKED_CONFIG", "CHUNKED_CONFIG", "PREFETCH", "SELECTIVE_BACKWARD",
          "SELECTIVE_BWD_CONFIG", "SELECTIVE_BLOCKED_CONFIG",
          "SELECTIVE_BLOCKED_PROGRAMS")  # fmt: skip


# "blocked" tilings timed after the default: (SELECTIVE_BLOCKED_CONFIG, _PROGRAMS), in the
# order of triton_static.py's bound (us): 174 (spills), 180, 199, 202, 265 (one pass, 256
# programs; BENCHMARKS.md "Session 7")
_BLOCKED_SWEEP = (((32, 8, 1, 2), 1024), ((64, 8, 4, 2), 1024), ((32, 4, 1, 2), 4096),
                  ((32, 8, 4, 2), 1024), ((8, 16, 4, 2), 0))  # fmt: skip


def _set(**overrides) -> dict:
    """Set _pallas module knobs (read at trace time); returns the previous values."""
    old = {k: getattr(_pallas, k) for k in _KNOBS}
    for k, v in overrides.items():
        setattr(_pallas, k, v)
    return old


def _temp_mib(compiled) -> float | None:
    """Temporary memory of a compiled function in MiB (None where the backend does not say)."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # memory_analysis is optional per backend: report None, not a guess
        return None


def _selective_bwd_kernels_s(d: dict, interpret: bool) -> float:
    """Seconds of the Pallas backward kernels alone (both phases, no XLA reductions of their
    partials), on the residuals the default forward saves (softplus, time-varying B/C, no D/z)."""
    from jaxcore.kernels.scan import _pallas_bwd

    u, dl, A, B, C = (d[k] for k in ("u", "dl", "A", "B", "C"))
    bsz, length, dim = u.shape
    chunk = _scan_common.default_chunk(length)
    bd = _pallas._channel_block(dim, _pallas.SELECTIVE_CHUNKED_CONFIG[0])
    tc, nc = _pallas._plan_chunks(bsz * (dim // bd), length, unit=chunk)
    h0 = jnp.zeros((bsz, dim, A.shape[1]), jnp.float32)
    cfg = _pallas.SelectiveConfig(True, "time", "time", chunk, tc, nc, interpret, "pallas")
    fwd = jax.jit(lambda *a: _pallas._fused_impl(*a, None, None, None, h0, None, cfg, save=True))
    y, _, _, subs = fwd(u, dl, A, B, C)
    gy, gh = jnp.ones_like(y), jnp.ones_like(h0)
    g = lambda v: v[:, :, None]  # time-varying == one group

    def bwd(u, dl, A, B, C, subs, gy, gh):
        return _pallas_bwd.selective_bwd_call(
            u, dl, A, g(B), g(C), None, None, None, None, subs, gy, gh, softplus=True, tc=tc,
            nc=nc, sub=chunk, interpret=interpret,
        )  # fmt: skip

    return timeit(jax.jit(bwd), u, dl, A, B, C, subs, gy, gh)


def _grad_diff(g, ref) -> dict:
    """Per input: [max |g - ref|, max |ref|] (f32)."""
    f32 = lambda v: v.astype(jnp.float32)
    return {
        k: [float(jnp.max(jnp.abs(f32(a) - f32(b)))), float(jnp.max(jnp.abs(f32(b))))]
        for k, a, b in zip("u dl A B C".split(), g, ref)
    }


def bench_selective(bw: float, quick: bool, pallas: str) -> None:
    """Old (sequential) and new (chunked, fused) Pallas forward kernels and XLA "chunked", same
    run; forward+backward with the Pallas backward kernels (SELECTIVE_BACKWARD="pallas", the
    default on GPU) and the XLA chunked backward ("xla"), the Pallas one checked against the XLA
    one on the device first (grad_max_abs_diff_vs_xla_bwd: per input [max |diff|, max |ref|])."""
    shapes = [(2, 256, 64, 16)] if quick else [(2, 8192, 1024, 16), (8, 8192, 2048, 16)]
    base = _set()
    target, min_steps = base["CHUNKED_CONFIG"]
    chunked = {"SELECTIVE_KERNEL": "chunked"}
    xla_bwd = {**chunked, "SELECTIVE_BACKWARD": "xla"}
    pallas_bwd = {**chunked, "SELECTIVE_BACKWARD": "pallas"}
    runs_blocked_bwd = {"SELECTIVE_KERNEL": "blocked", "SELECTIVE_BACKWARD": "pallas"}
    start = len(RECORDS)
    for si, (bsz, length, dim, n) in enumerate(shapes):
        if si:  # the first shape's summary now: a run cut in the second one keeps it
            summarize(RECORDS[start:])
        start = len(RECORDS)
        d = _selective_inputs(bsz, length, dim, n)
        shape = {"B": bsz, "L": length, "D": dim, "N": n}
        ref = None
        # with D, z or not -> the reference gradient: the XLA "chunked" implementation's (first
        # shape) or the Pallas forward's with the XLA backward, whichever runs first
        ref_grad = {}
        # (impl, knob overrides, with D and z, time forward+backward too); XLA "chunked"
        # forward+backward and the old sequential kernel's only on the first shape. The
        # default chunked kernel, then the blocked single-pass kernel (session 6, not yet timed:
        # default tiling with the Pallas backward, then its neighbours forward only) come
        # first, so that a run cut by gpu_check's limit keeps them.
        blocked = {"SELECTIVE_KERNEL": "blocked"}
        runs = [("chunked", {}, False, si == 0), (pallas, pallas_bwd, False, True)]
        runs += [(pallas, runs_blocked_bwd, False, True)]
        if not quick and si == 0:
            # session 7's time-first tiles, ranked by triton_static.py's instruction-count
            # bound (sm_90a, offline; the default (32, 4, 1, 2) at 1024 programs first, 171 us
            # of bound vs the chunked default's 189): (config, target programs; 0 = one pass)
            runs += [(pallas, {**blocked, "SELECTIVE_BLOCKED_CONFIG": c,
                               "SELECTIVE_BLOCKED_PROGRAMS": p}, False, False)
                     for c, p in _BLOCKED_SWEEP]  # fmt: skip
        if si == 0:  # (the second shape: the two designs only, then the D, z runs)
            runs += [(pallas, {"SELECTIVE_KERNEL": "sequential"}, False, False)]
        runs += [(pallas, xla_bwd, False, si == 0)]
        sweep = [{"PREFETCH": 1}] if si == 0 else []
        bwd_sweep = []
        if not quick and si == 0:
            # session 5 (H200): (32, 1, 1) (now the default) fastest of (8|16|32, 1, 1),
            # (32, 2, 1), (16, 4, 1); grid targets 1024 / 4096 and PREFETCH 4 / 8 no faster
            sweep += [{"SELECTIVE_CHUNKED_CONFIG": c} for c in ((64, 1, 1), (64, 2, 1))]
            sweep += [{"CHUNKED_CONFIG": (t, min_steps)} for t in (4096,)]
            # (channels, warps, steps per unrolled block); chunk_size=16: states saved every 16
            # steps by the forward, so no recompute in the backward (4x the saved states).
            # Session 5: (32, 4, 16) (now the default) fastest of it, (16, 4|2|1, 16|8|8).
            # Session 7 (triton_static.py, sm_90a offline): the default spills (255 registers,
            # 159 STL/LDL); (32, 4, 8) does not, and has the lowest instruction bound of these
            bwd_cfgs = ((32, 4, 8), (64, 4, 16), (32, 8, 16))
            bwd_sweep = [{"SELECTIVE_BWD_CONFIG": c} for c in bwd_cfgs]
            bwd_sweep += [{"chunk_size": 16}]
        elif quick:
            bwd_sweep = [{"SELECTIVE_BWD_CONFIG": (16, 4, 4)}, {"chunk_size": 8}]
        runs += [(pallas, {**chunked, **o}, False, False) for o in sweep]
        runs += [(pallas, {**pallas_bwd, **o}, False, True) for o in bwd_sweep]
        runs += [(pallas, xla_bwd, True, True), (pallas, pallas_bwd, True, True)]
        runs += [("chunked", {}, True, False)]
        for impl, knobs, dz, with_bwd in runs:
            chunk = knobs.get("chunk_size")  # selective_scan's argument, not a module knob
            _set(**{**base, **{k: v for k, v in knobs.items() if k != "chunk_size"}})
            rec = {"case": "selective_scan bf16" + (" +D,z" if dz else ""), "impl": impl,
                   "knobs": knobs, **shape}  # fmt: skip
            try:
                args = [d[k] for k in ("u", "dl", "A", "B", "C")]
                extra = (d["D"], d["z"]) if dz else ()

                def fwd(u, dl, A, B, C, *e, impl=impl, chunk=chunk):
                    return selective_scan(u, dl, A, B, C, *e, delta_softplus=True,
                                          chunk_size=chunk, implementation=impl)  # fmt: skip

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
                if impl != "chunked" and _pallas.SELECTIVE_KERNEL == "chunked":
                    bd = _pallas._channel_block(dim, _pallas.SELECTIVE_CHUNKED_CONFIG[0])
                    rec["chunk_steps,chunks"] = _pallas._plan_chunks(
                        bsz * dim // bd, length, chunk or _scan_common.default_chunk(length)
                    )
                t = timeit(f, *args, *extra, reps=3 if impl == "chunked" else 10)
                rec.update(fwd_s=t, GBps=io / t / 1e9, fraction_of_copy=io / t / bw)
                if with_bwd:
                    loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
                    g = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4))).lower(*args, *extra).compile()
                    grad = g(*args, *extra)
                    xla = impl == "chunked" or knobs.get("SELECTIVE_BACKWARD") == "xla"
                    if xla and dz not in ref_grad:
                        ref_grad[dz] = grad
                    elif impl != "chunked" and dz in ref_grad:
                        rec["grad_max_abs_diff_vs_xla_bwd"] = _grad_diff(grad, ref_grad[dz])
                    rec["fwdbwd_s"] = timeit(g, *args, *extra, reps=3)
                    rec["fwdbwd_temp_MiB"] = _temp_mib(g)
                    if knobs == pallas_bwd and not dz:
                        rec["bwd_kernels_s"] = _selective_bwd_kernels_s(d, pallas != "pallas")
                    if knobs in (pallas_bwd, runs_blocked_bwd) and not dz:
                        # the profiler's per-kernel device seconds ({} off a GPU)
                        rec["fwd_profile_s"] = kernel_times(f, *args)
                        rec["fwdbwd_profile_s"] = kernel_times(g, *args)
                emit(rec)
            except Exception as e:  # report and go on: one failing kernel must not hide the rest
                traceback.print_exc(file=sys.stderr)
                emit({**rec, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    summarize(RECORDS[start:])
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


def _ssd_inputs(quick: bool):
    bsz, length, heads, p, n = (2, 256, 4, 16, 16) if quick else (2, 8192, 16, 64, 64)
    k = jax.random.split(jax.random.key(1), 5)
    bf = jnp.bfloat16
    x = jax.random.normal(k[0], (bsz, length, heads, p), bf)
    dt = jax.nn.softplus(jax.random.normal(k[1], (bsz, length, heads)) - 1.0).astype(bf)
    A = -jnp.exp(jax.random.normal(k[2], (heads,), jnp.float32))
    B = jax.random.normal(k[3], (bsz, length, 1, n), bf)
    C = jax.random.normal(k[4], (bsz, length, 1, n), bf)
    shape = {"B": bsz, "L": length, "H": heads, "P": p, "N": n}
    return (x, dt, A, B, C), shape


# Pallas ssd knobs timed (module-level settings of _ssd_pallas, read at trace time): SSD_KERNEL
# ("three_phase" or "fused"), SSD_CONFIG = (chunk, block, warps, stages), SSD_PASS_CONFIG =
# (state elements per program, warps, steps loaded ahead), SSD_HEADS_PER_PROGRAM (phase 3),
# SSD_FUSED_CONFIG = (chunk, P columns per program, warps, stages, target programs). {} is the
# module default. Session 5 (H200) measured the three-phase Q=128 (the default) fastest of
# Q=128/256/512 and 2 heads per program level with 1. The "fused" design (session 6, not yet
# timed) comes right after the default, then its neighbours, then the untried three-phase Q=64.
_FUSED = {"SSD_KERNEL": "fused"}
_SSD_SWEEP: list[dict] = [
    {},
    _FUSED,
    {**_FUSED, "SSD_FUSED_CONFIG": (64, 64, 8, 2, 512)},
    {**_FUSED, "SSD_FUSED_CONFIG": (64, 32, 4, 2, 512)},
    {**_FUSED, "SSD_FUSED_CONFIG": (64, 64, 4, 2, 1024)},
    {**_FUSED, "SSD_FUSED_CONFIG": (64, 64, 4, 2, 256)},
    {**_FUSED, "SSD_FUSED_CONFIG": (128, 64, 8, 2, 512)},
    {**_FUSED, "SSD_FUSED_CONFIG": (32, 64, 4, 2, 512)},
    {"SSD_CONFIG": (64, 64, 4, 2)},
]
_SSD_KNOBS = (
    "SSD_KERNEL", "SSD_CONFIG", "SSD_PASS_CONFIG", "SSD_HEADS_PER_PROGRAM", "SSD_FUSED_CONFIG"
)  # fmt: skip


def bench_ssd_pallas(bw: float, quick: bool, pallas: str) -> None:
    """ssd implementation="pallas": a few tilings, each checked against the sequential f32
    reference on the device before timing, then the three phases of the default timed apart."""
    args, shape = _ssd_inputs(quick)
    x = args[0]
    io = nbytes(*args) + nbytes(x)  # inputs read + y written
    ref = None
    try:  # the oracle, once: lax.scan over steps in f32 on the same bf16 inputs
        ref = jax.jit(lambda *a: ssd_reference(*a, return_final_state=True))(*args)
        ref = (ref[0].astype(jnp.float32), ref[1])
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        emit({"case": "ssd bf16 reference", **shape, "error": f"{type(e).__name__}: {e!s:.300}"})
    base = {k: getattr(_ssd_pallas, k) for k in _SSD_KNOBS}
    sweep = [_SSD_SWEEP[i] for i in (0, 1, 3)] if quick else _SSD_SWEEP
    for si, knobs in enumerate(sweep):
        for k, v in {**base, **knobs}.items():
            setattr(_ssd_pallas, k, v)
        rec = {"case": "ssd bf16", "impl": pallas, "knobs": {**base, **knobs}, **shape}
        try:
            f = jax.jit(lambda *a: ssd(*a, return_final_state=True, implementation=pallas))
            y, h = f(*args)
            if ref is not None:  # bf16 y: about 2^-8 of |y| from rounding alone
                err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref[0])))
                scale = float(jnp.max(jnp.abs(ref[0])))
                rec.update(max_abs_diff_vs_reference=err, max_abs_reference=scale,
                           state_max_abs_diff=float(jnp.max(jnp.abs(h - ref[1]))),
                           ok=bool(err <= 0.02 * scale))  # fmt: skip
            t = timeit_queued(f, *args)  # (io counts y only, as the XLA case; h is 0.5 MiB)
            rec.update(fwd_s=t, GBps=io / t / 1e9, fraction_of_copy=io / t / bw,
                       timing="queued calls")  # fmt: skip
            if si == 0:
                loss = lambda *a: jnp.sum(ssd(*a, implementation=pallas).astype(jnp.float32))
                # value_and_grad (a training step): the custom VJP's forward rule runs the XLA
                # form ("matmul") forward and backward, no Pallas kernel
                g = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4)))
                rec["fwdbwd_s"] = timeit(g, *args, reps=3)
                rec["phases_s"] = _ssd_phase_times(args, pallas)
            elif knobs is _FUSED:
                rec["phases_s"] = _ssd_fused_phase_times(args, pallas)
            if si < 2:  # the profiler's per-kernel device seconds ({} off a GPU)
                rec["profile_s"] = kernel_times(f, *args)
            emit(rec)
        except Exception as e:  # report and go on: one failing kernel must not hide the rest
            traceback.print_exc(file=sys.stderr)
            emit({**rec, "error": f"{type(e).__name__}: {e!s:.300}"})
    for k, v in base.items():
        setattr(_ssd_pallas, k, v)


def _ssd_static(args, pallas: str):
    """((B, L, H, P, N), the kernels' static config, state dtype, dot dtype) of the ssd inputs."""
    x, B = args[0], args[3]
    bsz, length, heads, p = x.shape
    n = B.shape[-1]
    cfg = _ssd_pallas.make_config(None, length, p, n, heads, B.shape[2],
                                  pallas == "pallas_interpret", "matmul")  # fmt: skip
    return (bsz, length, heads, p, n), cfg, *_ssd_pallas._dtypes(x)


def _ssd_phase_times(args, pallas: str) -> dict:
    """Seconds of each Pallas phase of the current config, jitted apart (no XLA prologue: the
    benchmark's L, P and N need no padding)."""
    x, dt, A, B, C = args
    (bsz, length, heads, p, n), cfg, acc, mm = _ssd_static(args, pallas)
    m = _ssd_pallas
    nc = length // cfg.q
    p1 = jax.jit(lambda *a: m._chunk_states(*a, None, cfg, acc, mm))
    states, log_decay = p1(x, B, dt, A)
    states = states.reshape(bsz, heads, nc, -1)
    p2 = jax.jit(lambda *a: m._pass_states(*a, None, cfg, acc, mm))
    starts = p2(states, log_decay)[0].reshape(bsz, heads, nc, p, n)
    p3 = jax.jit(lambda *a: m._outputs(*a, None, None, cfg, acc, mm))
    return {
        "chunk_states": timeit_queued(p1, x, B, dt, A),
        "state_passing": timeit_queued(p2, states, log_decay),
        "outputs": timeit_queued(p3, x, B, C, dt, A, starts),
    }


def _ssd_fused_phase_times(args, pallas: str) -> dict:
    """Seconds of each "fused" kernel of the current config, jitted apart (as above)."""
    x, dt, A, B, C = args
    (bsz, length, heads, p, n), cfg, acc, mm = _ssd_static(args, pallas)
    m = _ssd_pallas
    cps, nseg = m.segment_plan(bsz, length, heads, p, cfg)
    out = {"chunks_per_segment": cps, "segments": nseg}
    starts = final = None
    if nseg > 1:
        cfg_a = cfg._replace(q=cps * cfg.q, bm=min(cfg.bm, cfg.q))
        pa = jax.jit(lambda *a: m._chunk_states(*a, None, cfg_a, acc, mm, nseg - 1, True))
        states, log_decay = pa(x, B, dt, A)
        states = states.reshape(bsz, heads, nseg - 1, -1)
        pb = jax.jit(lambda *a: m._pass_states(*a, None, cfg, acc, acc))
        starts, final = pb(states, log_decay)
        starts = starts.reshape(bsz, heads, nseg - 1, p, n)
        final = final.reshape(bsz, heads, p, n)
        out["segment_states"] = timeit_queued(pa, x, B, dt, A)
        out["segment_passing"] = timeit_queued(pb, states, log_decay)
    pc = jax.jit(lambda *a: m._fused_outputs(*a, None, None, cfg, cps, acc, mm))
    out["fused_outputs"] = timeit_queued(pc, x, B, C, dt, A, starts, final)
    return out


def bench_ssd(bw: float, quick: bool) -> None:
    args, shape = _ssd_inputs(quick)
    x = args[0]
    io = nbytes(*args) + nbytes(x)
    impl = "matmul"  # the XLA form on GPU (the default there is "pallas": bench_ssd_pallas)
    for chunk in (64, 128, 256):
        try:
            f = jax.jit(lambda *a, c=chunk: ssd(*a, chunk_size=c, implementation=impl))
            g = jax.jit(
                jax.grad(
                    lambda *a, c=chunk: jnp.sum(
                        ssd(*a, chunk_size=c, implementation=impl).astype(jnp.float32)
                    ),
                    (0, 1, 2, 3, 4),
                )
            )
            t = timeit(f, *args)
            tb = timeit(g, *args, reps=5)
            emit({"case": "ssd bf16", "impl": impl, "chunk": chunk, **shape,
                  "fwd_s": t, "fwdbwd_s": tb, "GBps": io / t / 1e9,
                  "fraction_of_copy": io / t / bw})  # fmt: skip
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            emit({"case": "ssd bf16", "chunk": chunk, **shape,
                  "error": f"{type(e).__name__}: {str(e)[:300]}"})  # fmt: skip


CASES = ("ssd_pallas", "selective", "ssd", "linear")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run, any backend)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {CASES} (in this order)")  # fmt: skip
    args = p.parse_args()
    cases = args.cases.split(",")
    bad = sorted(set(cases) - set(CASES))
    if bad:
        p.error(f"--cases: unknown {bad}; expected a subset of {CASES}")
    dev = jax.devices()[0]
    emit({"benchmark": "gpu_scan", "jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(dev, "device_kind", str(dev))})  # fmt: skip
    pallas = "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"
    if args.quick:  # several chunks at L=256 too
        _pallas.CHUNKED_CONFIG = (_pallas.CHUNKED_CONFIG[0], 16)
    bw = copy_bandwidth(args.quick)
    # #5's open targets first (a run cut by gpu_check's limit keeps them): the Pallas ssd and
    # selective kernels; the XLA ssd (measured in session 5) and the linear scan after them.
    # Each part ends with its summary lines (the fastest device-checked forward per shape).
    parts = {"ssd_pallas": lambda: bench_ssd_pallas(bw, args.quick, pallas),
             "selective": lambda: bench_selective(bw, args.quick, pallas),
             "ssd": lambda: bench_ssd(bw, args.quick),
             "linear": lambda: bench_linear(bw, args.quick, pallas)}  # fmt: skip
    for name in CASES:
        if name in cases:
            start = len(RECORDS)
            parts[name]()
            if name != "selective":  # (which summarizes each of its shapes itself)
                summarize(RECORDS[start:])


if __name__ == "__main__":
    main()
