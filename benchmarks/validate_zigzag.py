"""Validate ``jaxcore.hardware.Systolic.tpu_like()`` against ZigZag's ``tpu_like`` preset.

* ``--collect`` runs ZigZag (PyPI ``zigzag-dse`` 3.9.1 + ``six``, its own venv; default
  ``/work/venv-zigzag/bin/python``) on the GEMMs below (8-bit inputs and weights, 16-bit partial
  sums, 8-bit outputs; ``opt="latency"``) and caches energy (pJ), latency (cycles), the
  breakdown and the seconds ZigZag took in ``benchmarks/data/zigzag_gemm.json``.
* the default run evaluates jaxcore's model on the cached cases and prints the error per case.
  Target (issue 7): energy within 10 %, latency within 5 % on aligned shapes >= 256^3; exit status
  1 if one of those misses.

ZigZag names a GEMM ``O[d][k] += I[d][c] * W[c][k]``: D = M (rows), C = K (reduction), K = N.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "data" / "zigzag_gemm.json"
ALIGNED = [
    (256, 256, 256),
    (512, 512, 512),
    (256, 512, 256),
    (512, 256, 512),
    (1024, 256, 256),
    (256, 1024, 512),
    (512, 512, 1024),
    (1024, 1024, 256),
    (384, 384, 384),
    (768, 256, 512),
    (1024, 1024, 1024),
]
OTHER = [
    (64, 64, 64),
    (128, 128, 128),
    (100, 100, 100),
    (1, 512, 512),
    (512, 1, 512),
    (100, 256, 300),
    (200, 300, 500),
    (64, 512, 64),
    (1000, 100, 10),
    (128, 128, 1024),
    (33, 65, 97),
    (1, 1024, 1024),
]
PRECISION = {"I": 8, "W": 8, "O": 16, "O_final": 8}


def is_target(m: int, n: int, k: int) -> bool:
    """Shapes the issue's target applies to: aligned to the 32x32 array and >= 256 each."""
    return all(d >= 256 and d % 32 == 0 for d in (m, n, k))


def worker(out: str) -> None:
    """Run ZigZag on every GEMM (peer venv only)."""
    from importlib.metadata import version

    import zigzag
    from zigzag.api import get_hardware_performance_zigzag

    logging.disable(logging.CRITICAL)
    base = Path(zigzag.__file__).parent / "inputs"
    recs = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, n, k in ALIGNED + OTHER:
            wl = [
                {
                    "id": 0,
                    "name": "gemm",
                    "operator_type": "Gemm",
                    "equation": "O[d][k]+=I[d][c]*W[c][k]",
                    "loop_dims": ["D", "C", "K"],
                    "loop_sizes": [m, k, n],
                    "operand_precision": dict(PRECISION),
                    "operand_source": {"I": 0},
                }
            ]
            t0 = time.perf_counter()
            energy, latency, cmes = get_hardware_performance_zigzag(
                wl,
                str(base / "hardware/tpu_like.yaml"),
                str(base / "mapping/tpu_like.yaml"),
                opt="latency",
                dump_folder=os.path.join(tmp, f"{m}_{n}_{k}"),
                loma_show_progress_bar=False,
            )
            secs = time.perf_counter() - t0
            cme = cmes[0][0]
            rec = {
                "M": m,
                "N": n,
                "K": k,
                "energy_pj": float(energy),
                "latency_cycles": float(latency),
                "mac_energy_pj": float(cme.mac_energy),
                "mem_energy_pj": float(cme.mem_energy),
                "ideal_cycles": float(cme.ideal_cycle),
                "onload_cycles": float(cme.data_onloading_cycle),
                "offload_cycles": float(cme.data_offloading_cycle),
                "drain_cycles": float(cme.systolic_drain_cycle),
                "mem_energy_breakdown": {
                    str(op): [float(x) for x in v] for op, v in cme.mem_energy_breakdown.items()
                },
                "seconds": secs,
            }
            recs.append(rec)
            print(f"{m}x{n}x{k}: {energy:.4g} pJ {latency:.0f} cycles ({secs:.2f} s)", flush=True)
    meta = {
        "peer": "zigzag-dse",
        "version": version("zigzag-dse"),
        "preset": "tpu_like",
        "precision": PRECISION,
        "opt": "latency",
        "cases": recs,
    }
    Path(out).write_text(json.dumps(meta, indent=0))


def compare(cache: Path = CACHE) -> int:
    """Evaluate jaxcore on the cached cases; print errors; return #target misses."""
    from jaxcore.hardware import Systolic, gemm_workload
    from jaxcore.hardware import cost as hw_cost

    data = json.loads(cache.read_text())
    hw = Systolic.tpu_like()
    misses = 0
    print(
        f"{'GEMM MxNxK':<18}{'E peer pJ':>12}{'E ours':>12}{'err%':>7}"
        f"{'L peer':>10}{'L ours':>10}{'err%':>7}  target"
    )
    e_errs, l_errs = [], []
    for r in data["cases"]:
        c = hw_cost(hw, gemm_workload(r["M"], r["N"], r["K"], bits=8))
        e = float(c.energy_j) * 1e12
        lat = float(c.breakdown["cycles"])
        ee = 100 * (e - r["energy_pj"]) / r["energy_pj"]
        le = 100 * (lat - r["latency_cycles"]) / r["latency_cycles"]
        tgt = is_target(r["M"], r["N"], r["K"])
        miss = tgt and (abs(ee) > 10 or abs(le) > 5)
        misses += miss
        if tgt:
            e_errs.append(abs(ee))
            l_errs.append(abs(le))
        print(
            f"{r['M']}x{r['N']}x{r['K']:<10}{r['energy_pj']:>12.4g}{e:>12.4g}{ee:>7.2f}"
            f"{r['latency_cycles']:>10.0f}{lat:>10.0f}{le:>7.2f}  "
            + ("MISS" if miss else ("ok" if tgt else "-"))
        )
    print(
        f"\ntarget shapes: max |energy err| {max(e_errs):.2f} %, max |latency err| "
        f"{max(l_errs):.2f} %; ZigZag {data['version']} took "
        f"{sum(r['seconds'] for r in data['cases']):.1f} s for {len(data['cases'])} layers"
    )
    return misses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collect", action="store_true", help="run ZigZag and rewrite the cache")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zigzag-python", default="/work/venv-zigzag/bin/python")
    p.add_argument("--out", default=str(CACHE))
    a = p.parse_args(argv)
    if a.worker:
        worker(a.out)
        return 0
    if a.collect:
        rc = subprocess.call([a.zigzag_python, __file__, "--worker", "--out", a.out])
        if rc:
            return rc
    return 1 if compare(Path(a.out)) else 0


if __name__ == "__main__":
    sys.exit(main())
