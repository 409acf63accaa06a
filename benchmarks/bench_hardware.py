"""Hardware cost models: evaluation speed vs SCALE-Sim / ZigZag, PIM vs GPU, streaming FIFOs.

1. Speed: ``jit(vmap(cost))`` over B design points of a workload with N ops, in
   (design point x op) evaluations per second (target >= 1e6 on this CPU), next to SCALE-Sim and
   ZigZag layers per second measured in the same run (their own venvs, a few layers each; the
   cached per-layer seconds of the validation runs are reported beside them).
2. PIM vs GPU on a GPT-2-class decode step, beside PIM-GPT's paper numbers: (a) the stand-in
   jnp step of ``jaxcore.hardware.workloads``; (b) the real ``jaxcore.models.Transformer``
   ``decode_step`` (GPT-2-small dims, traced from abstract weights: nothing is allocated), priced
   at 16-bit operands like (a); (c) the same trace with its attention GEMVs written weight-side
   and its zero-width pads dropped (see :func:`reorient_gemvs`), which isolates what those two
   artefacts of the traced kernel cost on PIM.
3. The streaming-dataflow attention result: FIFO words for naive vs deferred normalisation.

    python benchmarks/bench_hardware.py [--quick] [--no-peers] [--json-out out.json]
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from harness import Bench
from jaxcore.hardware import (
    GPT2_SIZES,
    GPU,
    PIM,
    BitSerial,
    Systolic,
    Workload,
    attention_pipeline,
    batch_designs,
    compare_pim_gpu,
    cost,
    fifo_depths,
    gpt2_decode_step,
    trace,
)

from jaxcore import models

HERE = Path(__file__).resolve().parent
PAPER = {"speedup_gpu": (41, 137), "energy_gpu": (123, 383)}  # PIM-GPT (v2 of the paper)


def speed(bench: Bench, designs: int, quick: bool) -> None:
    fn, args = gpt2_decode_step(d_model=256, n_layers=2, context=128, vocab=1024)
    wl = trace(fn, *args)
    n_ops = len(wl.ops)
    base = {"systolic": Systolic(), "pim": PIM.pim_gpt(), "gpu": GPU(), "bitserial": BitSerial()}
    field = {"systolic": "rows", "pim": "banks_per_channel", "gpu": "mem_bw", "bitserial": "pes"}
    for name, hw in base.items():
        lo = float(getattr(hw, field[name]))
        ds = batch_designs(hw, **{field[name]: jnp.linspace(lo / 2, lo * 2, designs)})
        f = jax.jit(jax.vmap(lambda h: cost(h, wl).latency_s))
        t0 = time.perf_counter()
        f(ds).block_until_ready()
        compile_s = time.perf_counter() - t0
        reps = 3 if quick else 5
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(ds).block_until_ready()
            ts.append(time.perf_counter() - t0)
        t = float(np.median(ts))
        bench.record(
            {
                "case": f"vmap(cost) {name}",
                "peer": "-",
                "ours_s": t,
                "designs": designs,
                "ops": n_ops,
                "design_points_per_s": designs / t,
                "design_op_evals_per_s": designs * n_ops / t,
                "compile_s": compile_s,
            }
        )
    # one design, many GEMM layers: the peers' unit of work
    m = jnp.asarray(np.random.default_rng(0).choice([64, 100, 128, 256, 512], 4096), jnp.float32)
    from jaxcore.hardware.systolic import gemm_cost

    hw = Systolic.tpu_like()
    g = jax.jit(lambda m: gemm_cost(hw, m, m, m, 8.0, 8.0, 8.0)["energy_pj"])
    g(m).block_until_ready()
    t0 = time.perf_counter()
    g(m).block_until_ready()
    t = time.perf_counter() - t0
    bench.record(
        {"case": "GEMM layers, tpu_like", "peer": "-", "ours_s": t, "layers_per_s": m.shape[0] / t}
    )


def _peer(python: str, code: str) -> dict | None:
    if not os.path.exists(python):
        print(f"# {python} missing: peer not run live", file=sys.stderr)
        return None
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=600
    )
    if out.returncode:
        print(f"# peer failed: {out.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def peers(bench: Bench, live: bool) -> None:
    for name, cache in (("scalesim", "scalesim_gemm.json"), ("zigzag", "zigzag_gemm.json")):
        data = json.loads((HERE / "data" / cache).read_text())
        secs = [c["seconds"] for c in data["cases"]]
        bench.record(
            {
                "case": f"{name} cached validation run",
                "peer": name,
                "peer_s": float(sum(secs)),
                "layers": len(secs),
                "peer_layers_per_s": len(secs) / sum(secs),
                "peer_median_s_per_layer": float(np.median(secs)),
            }
        )
    if not live:
        return
    ss = _peer(
        "/work/venv-scalesim/bin/python",
        (
            "import json,tempfile,time,validate_scalesim as v\n"
            "t=time.perf_counter()\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "  [v._run_one(m,m,m,16,16,'ws',64,d) for m in (64,100,128)]\n"
            "print(json.dumps({'s':time.perf_counter()-t,'n':3}))"
        ),
    )
    if ss:
        bench.record(
            {
                "case": "scalesim live (64^3,100^3,128^3 on 16x16 ws)",
                "peer": "scalesim",
                "peer_s": ss["s"],
                "peer_layers_per_s": ss["n"] / ss["s"],
            }
        )
    zz = _peer(
        "/work/venv-zigzag/bin/python",
        (
            "import json,time,logging,tempfile,zigzag\n"
            "from pathlib import Path\n"
            "from zigzag.api import get_hardware_performance_zigzag as g\n"
            "logging.disable(logging.CRITICAL)\n"
            "b=Path(zigzag.__file__).parent/'inputs'\n"
            "t=time.perf_counter()\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "  for m in (256,512):\n"
            "    wl=[{'id':0,'name':'g','operator_type':'Gemm',"
            "'equation':'O[d][k]+=I[d][c]*W[c][k]',"
            "'loop_dims':['D','C','K'],'loop_sizes':[m,m,m],"
            "'operand_precision':{'I':8,'W':8,'O':16,'O_final':8},'operand_source':{'I':0}}]\n"
            "    g(wl,str(b/'hardware/tpu_like.yaml'),str(b/'mapping/tpu_like.yaml'),opt='latency',"
            "dump_folder=d+f'/{m}',loma_show_progress_bar=False)\n"
            "print(json.dumps({'s':time.perf_counter()-t,'n':2}))"
        ),
    )
    if zz:
        bench.record(
            {
                "case": "zigzag live (256^3, 512^3 tpu_like)",
                "peer": "zigzag",
                "peer_s": zz["s"],
                "peer_layers_per_s": zz["n"] / zz["s"],
            }
        )


def transformer_decode_workload(
    *, d_model: int, n_layers: int, n_heads: int, context: int, vocab: int = 50257
) -> Workload:
    """``jaxcore.models.Transformer.decode_step`` (batch 1, a KV cache of ``context`` tokens)
    traced from ``ShapeDtypeStruct`` weights and cache (``nnx.eval_shape``: no FLOPs run)."""
    model = nnx.eval_shape(
        lambda: models.Transformer(
            vocab, d_model=d_model, num_layers=n_layers, num_heads=n_heads, rngs=nnx.Rngs(0)
        )
    )
    fn, state = models.pure(model, "decode_step")
    cache = jax.eval_shape(lambda: model.init_cache(1, context))
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    with warnings.catch_warnings():  # the uncosted ops are printed once below instead
        warnings.simplefilter("ignore", UserWarning)
        wl = trace(fn, state, token, cache)
    if wl.unknown:  # reported, not dropped: see the "uncosted" field of the records
        names = sorted({u.name for u in wl.unknown})
        print(f"# Transformer decode: {len(wl.unknown)} op(s) not costed: {names}", file=sys.stderr)
    return wl


def reorient_gemvs(workload: Workload) -> tuple[Workload, int, int]:
    """Two benchmark-side rewrites of a traced decode step, to show what they cost on PIM.

    1. Matmuls traced as ``(M, K) @ (K, 1)`` with M > 1 become ``(1, K) @ (K, M)``: same MACs
       and bytes, roles swapped. The PIM model streams the RIGHT operand from the banks and
       broadcasts the LEFT one over the I/O, so a decode-attention kernel that puts the KV cache
       on the left (``cache @ q``) is priced as if the cache crossed the I/O.
    2. ``pad`` ops whose output shape equals their input shape (zero-width pads, which XLA
       elides) are dropped: the tracer prices them as moving the whole tensor.

    A diagnostic, not a change to the cost model. Returns (workload, reoriented, pads dropped).
    """
    ops, n_mm, n_pad = [], 0, 0
    for o in workload.ops:
        if o.name == "pad" and o.in_shapes[:1] == o.out_shapes[:1]:
            n_pad += 1
            continue
        if o.kind == "matmul" and o.n == 1 and o.m > 1:
            o = dataclasses.replace(
                o,
                m=1,
                n=o.m,
                a_bits=o.w_bits,
                w_bits=o.a_bits,
                lhs_params=o.rhs_params,
                rhs_params=o.lhs_params,
            )
            n_mm += 1
        ops.append(o)
    return dataclasses.replace(workload, ops=tuple(ops)), n_mm, n_pad


def pim_vs_gpu(
    bench: Bench, workload: Workload, label: str, *, precision: Any = None, **extra: Any
) -> None:
    """PIM vs GPU for any traced workload (e.g. jaxcore.models.Transformer's decode step);
    ``precision`` (e.g. 16) overrides the traced operand bit-widths as in ``cost``."""
    gpus = {"A100 eager": GPU(), "A100 fused": GPU(fused=True), "T4 eager": GPU.t4()}
    pims = {"PIM-GPT-like": PIM.pim_gpt(), "AiM x8 chips": PIM.aim(), "HBM-PIM": PIM.hbm_pim()}
    for pn, p in pims.items():
        for gn, g in gpus.items():
            r = compare_pim_gpu(workload, p, g, precision=precision)
            bench.record(
                {
                    "case": f"{label}: {pn} vs {gn}",
                    "peer": gn,
                    "ours_s": r["pim_latency_s"],
                    "peer_s": r["gpu_latency_s"],
                    "ratio": r["speedup"],
                    "energy_ratio": r["energy_ratio"],
                    "paper_speedup": "41-137x",
                    "paper_energy": "123-383x",
                    "ops": len(workload.ops),
                    "uncosted": len(workload.unknown),
                    **extra,
                }
            )


def streaming(bench: Bench) -> None:
    for n in (128, 1024, 8192):
        for v in ("naive", "deferred"):
            sd = attention_pipeline(64, v)
            c = cost(sd, n)
            bench.record(
                {
                    "case": f"attention row n={n} {v}",
                    "peer": "-",
                    "ours_s": float(c.latency_s),
                    "fifo_entries": int(sum(fifo_depths(sd, n).values())),
                    "fifo_kbit": float(c.breakdown["fifo_bits"]) / 1e3,
                    "ii": float(c.breakdown["ii"]),
                    "area_mm2": float(c.area_mm2),
                }
            )


def main() -> None:
    bench = Bench("hardware")
    args = bench.parse(
        lambda p: (
            p.add_argument("--no-peers", action="store_true"),
            p.add_argument("--designs", type=int, default=10_000),
        )
    )
    speed(bench, 1000 if args.quick else args.designs, args.quick)
    peers(bench, live=not args.no_peers)
    sizes = ["small"] if args.quick else ["small", "medium"]
    for s in sizes:
        d, L, h = GPT2_SIZES[s]
        fn, fargs = gpt2_decode_step(d_model=d, n_layers=L, n_heads=h, context=1024)
        pim_vs_gpu(bench, trace(fn, *fargs), f"GPT-2 {s} decode (ctx 1024)")
    # The real model: jaxcore.models.Transformer (RoPE, RMSNorm, SwiGLU 4x, untied head, float32
    # weights) at GPT-2-small dims, priced at 16-bit operands like the fp16 stand-in above.
    d, L, h = GPT2_SIZES["small"]
    wl = transformer_decode_workload(d_model=d, n_layers=L, n_heads=h, context=1024)
    label = "Transformer small decode (ctx 1024, 16b)"
    pim_vs_gpu(bench, wl, label, precision=16)
    wl_r, n_r, n_p = reorient_gemvs(wl)
    pim_vs_gpu(
        bench,
        wl_r,
        label + " attn GEMVs weight-side, no-op pads free",
        precision=16,
        reoriented=n_r,
        pads_dropped=n_p,
    )
    streaming(bench)
    bench.finish()


if __name__ == "__main__":
    main()
