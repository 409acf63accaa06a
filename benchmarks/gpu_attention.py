"""GPU check of the flash-attention kernels (run by benchmarks/gpu_check.sh).

In this order, so that a run cut short by its time limit still has the headline figures: a smoke
check of the Mosaic kernel (one case), the speed rows (2.), the correctness cases (1.), then the
bias rows (3.).

1. Correctness: the compiled kernels (forward, lse and gradients) against the float32 reference.
   The Mosaic GPU kernel (Hopper only) on bf16/f16 problems with causal, window, GQA, ragged
   T/S, soft cap, Hv != H, key lengths and packed segment ids, with its default backward and
   again with ``MOSAIC_BACKWARD="mosaic"`` on every case; then the Triton kernel on bf16/f32
   problems with causal, window, GQA, segment ids, lengths, soft cap, bias (broadcast shapes,
   with its gradient) and boolean mask (``--parts split``: also with ``split_loops=True``).
2. Speed: bf16, B=4, N=16, H=128, T=8192, causal; forward and forward+backward TFLOP/s of the
   Mosaic GPU kernel and of the Triton kernel (default and split loops) vs
   ``jax.nn.dot_product_attention(implementation="cudnn")`` in the same run.
   Useful causal FLOPs: forward 2 matmuls * 2*B*N*T*T*H / 2, backward 2.5x that.
3. Speed with a bias: the same at T=4096 with a per-head bias (1, N, T, T) bf16 (relative
   position / ALiBi style), gradients w.r.t. q, k, v (and, in a second row, the bias too),
   against cuDNN with the same bias.
4. Forward mode (last, cheap): ``jax.jvp`` and a Hessian-vector product through the compiled
   Mosaic and Triton paths (their custom JVP: the XLA twin's JVP, the backward kernels
   differentiated through it) against the float32 reference, bf16, one causal GQA case.

``--parts`` picks a subset (default: smoke, speed, mosaic, mosaic_bwd, pallas, bias,
forward_mode); ``sweep``
adds the other Mosaic tilings, the Mosaic forward with the Triton backward and two spill-free
Triton backward tilings, ``split`` the Triton checks with ``split_loops=True``.
``--quick`` runs tiny shapes (on CPU the kernel runs in interpret mode, cuDNN is skipped).
"""

from __future__ import annotations

import contextlib
import sys
import traceback

import jax

# The Mosaic GPU interpreter (--quick off a GPU) needs a few CPU devices' worth of XLA host
# threads (see kernels/attention/_mosaic.py); harmless on a GPU machine.
jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import Bench, time_blocks  # noqa: E402
from jaxcore.kernels.attention import _mosaic, _pallas, dot_product_attention  # noqa: E402
from jaxcore.kernels.attention._api import is_hopper  # noqa: E402
from jaxcore.kernels.attention._common import normalize  # noqa: E402
from jaxcore.kernels.attention._mosaic import attention_mosaic  # noqa: E402
from jaxcore.kernels.attention._pallas import attention_pallas  # noqa: E402


def _time(fn, args, reps):
    """Median seconds of fn(*args) over ``reps`` calls after a warm-up."""
    return time_blocks([fn], args, reps=reps)[0]


def _speed_record(case, peer, tf, tfb, fwd_flops, bwd_flops) -> dict:
    """Our forward / forward+backward seconds and TFLOP/s (backward = the difference)."""
    return {
        "case": case,
        "peer": "jax.nn cudnn" if peer else "none",
        "fwd_s": tf,
        "fwdbwd_s": tfb,
        "fwd_tflops": fwd_flops / tf / 1e12,
        "bwd_tflops": bwd_flops / max(tfb - tf, 1e-9) / 1e12,
    }


@contextlib.contextmanager
def mosaic_backward(which: str | None):
    """Trace inside with ``_mosaic.MOSAIC_BACKWARD = which`` (None: leave it as it is)."""
    old = _mosaic.MOSAIC_BACKWARD
    if which is not None:
        _mosaic.MOSAIC_BACKWARD = which
    try:
        yield
    finally:
        _mosaic.MOSAIC_BACKWARD = old


@contextlib.contextmanager
def pallas_blocks(extra: dict | None):
    """Trace inside with ``extra`` added to the Triton kernel's default tiling (None: as is)."""
    old = _pallas.default_blocks
    if extra:
        _pallas.default_blocks = lambda *a, **k: {**old(*a, **k), **extra}
    try:
        yield
    finally:
        _pallas.default_blocks = old


_TRACEBACKS = [0]  # full tracebacks printed so far (the first few failures only)


def report_failure(label: str, e: Exception) -> str:
    """Print the first few failures' tracebacks to stderr (the log keeps them); the message."""
    if _TRACEBACKS[0] < 2:
        _TRACEBACKS[0] += 1
        traceback.print_exc(file=sys.stderr)
    msg = f"{type(e).__name__}: {str(e)[:600]}"
    print(f"# {label} failed: {msg}")
    return msg


def hopper() -> bool:
    """True on an NVIDIA GPU of compute capability >= 9 (wgmma / TMA: the Mosaic kernel)."""
    return is_hopper(jax.devices()[0])


MOSAIC_CASES = [
    dict(t=200, s=200, n=4, k=2, h=64, hv=64, kw=dict(is_causal=True)),
    dict(t=96, s=160, n=4, k=4, h=128, hv=64, kw=dict(local_window_size=(40, 8))),
    dict(t=256, s=384, n=8, k=1, h=128, hv=128, kw=dict(is_causal=True, logits_soft_cap=20.0)),
    dict(t=130, s=70, n=2, k=2, h=256, hv=128, kw={}),
    dict(t=200, s=300, n=4, k=1, h=128, hv=128, kw=dict(is_causal=True, kvlen=True)),
    dict(t=384, s=384, n=4, k=2, h=128, hv=128, kw=dict(is_causal=True, seg=True)),  # packed
]


def check(
    bench: Bench,
    on_gpu: bool,
    family: str = "pallas",
    backward: str | None = None,
    first_only: bool = False,
    blocks: dict | None = None,
) -> bool:
    """Compiled kernel vs reference; returns True when every case is within tolerance.

    ``first_only``: just the first case in the first dtype (a smoke check before timing).
    ``blocks``: added to the Triton kernel's default tiling (e.g. ``split_loops=True``).

    ``backward``: the Mosaic kernel's backward ("triton" / "mosaic", _mosaic.MOSAIC_BACKWARD;
    None: the default, "auto", which takes the Mosaic backward only where it has been checked
    on a GPU, _mosaic_bwd.CHECKED); "mosaic" runs every case with it (the evidence for widening
    CHECKED).
    """
    impl = family if on_gpu else f"{family}_interpret"
    rng = np.random.default_rng(0)
    dtypes = (jnp.bfloat16, jnp.float32)
    if family == "mosaic":
        dtypes = (jnp.bfloat16, jnp.float16)
    cases = (
        MOSAIC_CASES
        if family == "mosaic"
        else [
            dict(t=200, s=200, n=4, k=2, h=64, hv=64, kw=dict(is_causal=True)),
            dict(t=96, s=160, n=4, k=4, h=128, hv=64, kw=dict(local_window_size=(40, 8))),
            dict(
                t=128,
                s=128,
                n=8,
                k=1,
                h=64,
                hv=64,
                kw=dict(is_causal=True, logits_soft_cap=20.0, seg=True, kvlen=True),
            ),
            dict(t=200, s=136, n=4, k=2, h=64, hv=64, kw=dict(bias=(1, 4, 200, 136), mask=True)),
            dict(
                t=128,
                s=128,
                n=4,
                k=4,
                h=64,
                hv=32,
                kw=dict(is_causal=True, bias=(2, 1, 1, 128), seg=True, mask=True),
            ),
        ]
    )
    b = 2
    if not on_gpu and family == "mosaic":  # the Mosaic GPU interpreter is slow: one tiny case
        cases = [dict(t=128, s=96, n=2, k=1, h=64, hv=64, kw=dict(is_causal=True))]
        dtypes, b = (jnp.bfloat16,), 1
    # The second dtype on a few cases only (GPU time): Triton f32 on the H=128 window case and
    # the bias/mask cases (tiles shrunk to fit shared memory), Mosaic f16 on the first two.
    second = cases[1:2] + cases[3:] if family == "pallas" else cases[:2]
    runs = [(dtypes[0], c) for c in cases] + [(dt, c) for dt in dtypes[1:] for c in second]
    if first_only:
        runs = runs[:1]
    ok_all = True
    for dt, c in runs:
        q = jnp.asarray(rng.standard_normal((b, c["t"], c["n"], c["h"])), dt)
        k = jnp.asarray(rng.standard_normal((b, c["s"], c["k"], c["h"])), dt)
        v = jnp.asarray(rng.standard_normal((b, c["s"], c["k"], c["hv"])), dt)
        kw = dict(c["kw"])
        if kw.pop("seg", False):
            seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, c["t"])), axis=1))
            kw["segment_ids"] = seg
        if kw.pop("kvlen", False):
            kw["key_value_seq_lengths"] = jnp.array([c["s"], c["s"] // 2], jnp.int32)
        bshape = kw.pop("bias", None)
        bias = None if bshape is None else jnp.asarray(rng.standard_normal(bshape), dt)
        if kw.pop("mask", False):
            mask = rng.random((b, 1, c["t"], c["s"])) < 0.8
            mask[:, :, 5:9] = False  # fully masked rows: zeros, zero gradients
            kw["mask"] = jnp.asarray(mask)
        do = jnp.asarray(rng.standard_normal((b, c["t"], c["n"], c["hv"])), dt)

        def loss(q, k, v, bias, impl=impl, kw=kw, do=do):
            o = dot_product_attention(q, k, v, bias, implementation=impl, **kw)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

        def run(impl, q=q, k=k, v=v, bias=bias, kw=kw, loss=loss):
            argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
            f = jax.jit(
                lambda q, k, v, bias: (
                    dot_product_attention(q, k, v, bias, implementation=impl, **kw),
                    jax.grad(lambda *xs: loss(*xs, impl=impl), argnums=argnums)(q, k, v, bias),
                )
            )
            return f(q, k, v, bias)

        label = (
            f"check {family}{'' if backward is None else f' ({backward} backward)'}"
            f"{'' if not blocks else f' {blocks}'} "
            f"{jnp.dtype(dt).name} T={c['t']} S={c['s']} "
            f"N={c['n']} K={c['k']} H={c['h']} Hv={c['hv']} {sorted(c['kw'])}"
        )
        try:
            with mosaic_backward(backward), pallas_blocks(blocks):
                got = run(impl)
        except Exception as e:  # does not compile / run: report it, keep the other rows
            msg = report_failure(label, e)
            bench.record({"case": label, "ok": False, "error": msg})
            ok_all = False
            continue
        f32 = lambda x: None if x is None else x.astype(jnp.float32)
        want = run("reference", q=f32(q), k=f32(k), v=f32(v), bias=f32(bias))
        errs = []
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            a, w = np.asarray(f32(a)), np.asarray(w)
            errs.append(float(np.max(np.abs(a - w)) / (np.max(np.abs(w)) + 1e-6)))
        tol = {"bfloat16": 3e-2, "float16": 1e-2}.get(jnp.dtype(dt).name, 2e-3)
        ok = bool(np.all(np.isfinite(errs))) and max(errs) < tol
        ok_all &= ok
        bench.record(
            {
                "case": label,
                "max_rel_err": max(errs),
                "max_rel_err_grads": max(errs[1:]),  # leaves: out, then the gradients
                "tol": tol,
                "ok": ok,
            }
        )
    return ok_all


def speed(bench: Bench, on_gpu: bool, quick: bool, sweep: bool = False) -> None:
    b, n, h = (1, 2, 64) if quick else (4, 16, 128)
    t = 256 if quick else 8192
    dt = jnp.bfloat16
    rng = np.random.default_rng(1)
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, t, n, h)), dt) for _ in range(4))
    fwd_flops = 4.0 * b * n * t * t * h / 2  # causal: half the square
    bwd_flops = 2.5 * fwd_flops
    # Mosaic GPU first (Hopper only; the Triton kernel was measured in session 1), then Triton.
    configs = [("pallas", dict()), ("pallas", dict(split_loops=True))]
    if hopper() or not on_gpu:  # the default: block_k=128, 2 stages, ping-pong, Mosaic backward
        configs = [("mosaic", dict())] + configs
    if sweep and (hopper() or not on_gpu):  # measured in session 5 (BENCHMARKS.md)
        configs += [
            ("mosaic", dict(stages=3, block_k=64)),  # (stages=3 at block_k=128 needs 232568
            ("mosaic", dict(pingpong=False)),  # bytes of shared memory: 120 over an H200's)
            ("mosaic+triton_bwd", dict()),
        ]
    if sweep:  # session 7, sm_90a offline (triton_static.py): the default Triton dK/dV
        # backward spills at H=128 (255 registers, 221 STL/LDL); these two do not
        configs += [("pallas", dict(block_k_bwd=32)), ("pallas", dict(num_warps_bwd=8))]
    if quick:
        configs = [configs[0], configs[-1]]

    def ours_fns(kind, cfg):
        attend = attention_pallas if kind.startswith("pallas") else attention_mosaic

        def fwd(q, k, v):
            return attend(normalize(q, k, v, is_causal=True), interpret=not on_gpu, blocks=cfg)[0]

        def loss(q, k, v):
            return jnp.sum(fwd(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

        return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def cudnn_fns():
        def fwd(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        def loss(q, k, v):
            return jnp.sum(fwd(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

        return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    reps = bench.reps
    peer = None
    if on_gpu:
        try:
            pf, pfb = cudnn_fns()
            peer = (_time(pf, (q, k, v), reps), _time(pfb, (q, k, v), reps))
        except Exception as e:  # cuDNN missing or shape unsupported: report, keep ours
            print(f"# cudnn failed: {type(e).__name__}: {str(e)[:200]}")
    best = {}
    for kind, cfg in configs:
        try:
            f, fb = ours_fns(kind, cfg)
            with mosaic_backward("triton" if kind.endswith("triton_bwd") else None):
                tf, tfb = _time(f, (q, k, v), reps), _time(fb, (q, k, v), reps)
        except Exception as e:  # a tiling that does not compile: report, try the next
            report_failure(f"{kind} config {cfg}", e)
            continue
        case = f"{kind} bf16 B={b} N={n} H={h} T={t} causal {cfg}"
        rec = _speed_record(case, peer, tf, tfb, fwd_flops, bwd_flops)
        if peer:
            rec.update(
                peer_fwd_s=peer[0],
                peer_fwdbwd_s=peer[1],
                peer_fwd_tflops=fwd_flops / peer[0] / 1e12,
                peer_bwd_tflops=bwd_flops / max(peer[1] - peer[0], 1e-9) / 1e12,
                fwd_ratio=peer[0] / tf,
                bwd_ratio=(peer[1] - peer[0]) / max(tfb - tf, 1e-9),
            )
        bench.record(rec)
        if kind not in best or tf < best[kind][0]:
            best[kind] = (tf, rec)
    for kind, (_, rec) in best.items():
        bench.record({**rec, "case": f"best {kind} config: {rec['case']}"})


def bias_speed(bench: Bench, on_gpu: bool, quick: bool) -> None:
    """Causal attention with a per-head bias (1, N, T, T): ours vs cuDNN with the same bias."""
    b, n, h = (1, 2, 64) if quick else (4, 16, 128)
    t = 256 if quick else 4096
    dt = jnp.bfloat16
    rng = np.random.default_rng(2)
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, t, n, h)), dt) for _ in range(4))
    bias = jnp.asarray(rng.standard_normal((1, n, t, t)), dt)
    fwd_flops = 4.0 * b * n * t * t * h / 2
    bwd_flops = 2.5 * fwd_flops

    def fns(attend):
        def loss(q, k, v, bias):
            return jnp.sum(attend(q, k, v, bias).astype(jnp.float32) * do.astype(jnp.float32))

        return (
            jax.jit(attend),
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
            jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))),
        )

    impl = "pallas" if on_gpu else "pallas_interpret"
    ours = fns(
        lambda q, k, v, bias: dot_product_attention(
            q, k, v, bias, is_causal=True, implementation=impl
        )
    )
    peer = None
    if on_gpu:
        peer = fns(
            lambda q, k, v, bias: jax.nn.dot_product_attention(
                q, k, v, bias, is_causal=True, implementation="cudnn"
            )
        )
    args = (q, k, v, bias)
    reps = bench.reps

    def timed(f):
        try:
            return _time(f, args, reps)
        except Exception as e:  # unsupported on this peer / backend: report, go on
            report_failure("bias case", e)
            return None

    for label, idx in (("grad q,k,v", 1), ("grad q,k,v,bias", 2)):
        tf, tfb = timed(ours[0]), timed(ours[idx])
        if tf is None or tfb is None:
            continue
        case = f"pallas+bias bf16 B={b} N={n} H={h} T={t} causal bias(1,N,T,T) {label}"
        rec = _speed_record(case, peer, tf, tfb, fwd_flops, bwd_flops)
        if peer is not None:
            pf, pfb = timed(peer[0]), timed(peer[idx])
            if pf is not None:
                rec.update(peer_fwd_s=pf, fwd_ratio=pf / tf)
            if pf is not None and pfb is not None:
                rec.update(
                    peer_fwdbwd_s=pfb,
                    bwd_ratio=(pfb - pf) / max(tfb - tf, 1e-9),
                    fwdbwd_ratio=pfb / tfb,
                )
        bench.record(rec)


PARTS = ("smoke", "speed", "mosaic", "mosaic_bwd", "pallas", "bias", "forward_mode")
EXTRA = ("sweep", "split")  # only when named: more Mosaic tilings; Triton split_loops checks


def forward_mode(bench: Bench, on_gpu: bool, family: str) -> bool:
    """jvp and HVP of the compiled kernel (bf16) vs the float32 reference; True when close."""
    impl = family if on_gpu else f"{family}_interpret"
    rng = np.random.default_rng(1)
    b, t, n, kh, h = (2, 256, 4, 2, 64) if on_gpu else (1, 128, 2, 1, 64)
    shapes = ((b, t, n, h), (b, t, kh, h), (b, t, kh, h))
    prim = tuple(jnp.asarray(rng.standard_normal(sh), jnp.bfloat16) for sh in shapes)
    tan = tuple(jnp.asarray(rng.standard_normal(sh), jnp.bfloat16) for sh in shapes)
    f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731

    def parts(impl):
        def f(q, k, v):
            return dot_product_attention(q, k, v, is_causal=True, implementation=impl)

        def loss(q, k, v):
            return jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))

        jvp = lambda p, t: jax.jvp(f, p, t)[1]  # noqa: E731
        hvp = lambda p, t: jax.jvp(jax.grad(loss, argnums=(0, 1, 2)), p, t)[1]  # noqa: E731
        return jax.jit(lambda p, t: (jvp(p, t), hvp(p, t)))

    label = f"forward mode {family} bf16 B={b} T={t} N={n} K={kh} H={h} causal: jvp, hvp"
    try:
        got = parts(impl)(prim, tan)
    except Exception as e:
        bench.record({"case": label, "ok": False, "error": report_failure(label, e)})
        return False
    want = parts("reference")(f32(prim), f32(tan))
    errs = [
        float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(w))) / np.max(np.abs(w)))
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ]
    ok = bool(np.all(np.isfinite(errs))) and max(errs) < 5e-2
    bench.record({"case": label, "max_rel_err_jvp": errs[0], "max_rel_err_hvp": max(errs[1:]),
                  "tol": 5e-2, "ok": ok})  # fmt: skip
    return ok


def main() -> None:
    bench = Bench("gpu_attention")
    args = bench.parse(
        lambda p: p.add_argument(
            "--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS + EXTRA}"
        )
    )
    parts = set(args.parts.split(","))
    if parts - set(PARTS + EXTRA):
        raise SystemExit(f"--parts: unknown {sorted(parts - set(PARTS + EXTRA))}")
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.quick:
        print("# no GPU: running --quick shapes in interpret mode")
        args.quick = True
    ok = {}
    mosaic = hopper() or not on_gpu
    # Order for a bounded run (gpu_check.sh's timeout keeps what was printed): one smoke check,
    # then the headline timings vs cuDNN, then every correctness case, then the bias rows.
    if mosaic and "smoke" in parts:
        ok["mosaic (smoke)"] = check(bench, on_gpu, "mosaic", first_only=True)
    if "speed" in parts or "sweep" in parts:
        speed(bench, on_gpu, args.quick, sweep="sweep" in parts)
    if mosaic and "mosaic" in parts:
        ok["mosaic"] = check(bench, on_gpu, "mosaic")
    if mosaic and "mosaic_bwd" in parts:
        ok["mosaic (mosaic backward)"] = check(bench, on_gpu, "mosaic", backward="mosaic")
    if "pallas" in parts:
        ok["pallas"] = check(bench, on_gpu, "pallas")
    if "split" in parts:  # the Triton forward's three-loop variant (not yet the default)
        ok["pallas split_loops"] = check(bench, on_gpu, "pallas", blocks=dict(split_loops=True))
    if "bias" in parts:
        bias_speed(bench, on_gpu, args.quick)
    if "forward_mode" in parts:
        for family in ("mosaic", "pallas") if mosaic else ("pallas",):
            ok[f"{family} forward mode"] = forward_mode(bench, on_gpu, family)
    bench.finish()
    bad = [kind for kind, good in ok.items() if not good]
    if bad:
        raise SystemExit(f"kernels that do not match the reference: {bad}")


if __name__ == "__main__":
    main()
