"""Validate ``jaxcore.hardware.Systolic`` against SCALE-Sim v3 (compute cycles, SRAM accesses).

Two halves:

* ``--collect`` runs SCALE-Sim (PyPI ``scalesim`` 3.0.0, in its own venv because it needs
  ``numpy<2.4``; default ``/work/venv-scalesim/bin/python``) on the GEMM shapes below x 3
  dataflows x arrays {8, 16, 32}^2 in ``InterfaceBandwidth: CALC`` mode and caches every report
  item, with the seconds SCALE-Sim took, in ``benchmarks/data/scalesim_gemm.json``.
* the default run (jaxcore's venv) evaluates ``Systolic`` on every cached case and prints the
  error per case; exit status 1 if any compute-cycle or SRAM count differs.

The worker half (``--worker``) imports only scalesim and the standard library, so it runs in the
peer's venv. ``tests/hardware/test_hw_systolic.py`` checks the same cache without SCALE-Sim.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "data" / "scalesim_gemm.json"
ARRAYS = (8, 16, 32)
DATAFLOWS = ("os", "ws", "is")
SIZES = (1, 64, 100, 128, 256, 512)
# Aligned large shapes added beyond the cheapest ones (SCALE-Sim costs ~60 us per simulated cycle).
EXTRA = [(128, 128, 128), (256, 256, 256), (100, 128, 256), (512, 128, 64), (256, 100, 128)]


def _est_cycles(m: int, n: int, k: int, r: int, c: int, df: str) -> int:
    sr, sc, t, kk = {"os": (m, n, k, 1), "ws": (k, n, m, 2), "is": (k, m, n, 2)}[df]
    return math.ceil(sr / r) * math.ceil(sc / c) * (kk * r + c + t - 2) - 1


def shapes(n_cheap: int = 64) -> list[tuple[int, int, int]]:
    """The GEMM (M, N, K) list: the ``n_cheap`` cheapest to simulate from SIZES^3, plus EXTRA."""

    def total(s):
        return sum(_est_cycles(*s, a, a, df) for a in ARRAYS for df in DATAFLOWS)

    cheap = sorted(itertools.product(SIZES, SIZES, SIZES), key=lambda s: (total(s), s))[:n_cheap]
    return list(cheap) + [s for s in EXTRA if s not in cheap]


_CFG = """[general]
run_name = jaxcore
[architecture_presets]
ArrayHeight : {r}
ArrayWidth : {c}
IfmapSramSzkB : {kb}
FilterSramSzkB : {kb}
OfmapSramSzkB : {kb}
IfmapOffset : 0
FilterOffset : 10000000
OfmapOffset : 20000000
Bandwidth : 10
Dataflow : {df}
MemoryBanks : 1
ReadRequestBuffer : 32
WriteRequestBuffer : 32
[layout]
IfmapCustomLayout : False
IfmapSRAMBankBandwidth : 10
IfmapSRAMBankNum : 10
IfmapSRAMBankPort : 2
FilterCustomLayout : False
FilterSRAMBankBandwidth : 10
FilterSRAMBankNum : 10
FilterSRAMBankPort : 2
[sparsity]
SparsitySupport : false
SparseRep : ellpack_block
OptimizedMapping : false
BlockSize : 8
RandomNumberGeneratorSeed : 40
[run_presets]
InterfaceBandwidth : CALC
UseRamulatorTrace : False
"""
_LAYOUT_HEADER = (
    "Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, "
    "Num Filter, Stride Height, Stride Width,\n"
)
COMPUTE_KEYS = (
    "overall_cycles",
    "compute_cycles",
    "stall_cycles",
    "overall_util",
    "mapping_eff",
    "compute_util",
)
DETAIL_KEYS = tuple(
    f"{op}_{mem}_{what}"
    for mem in ("sram", "dram")
    for op in ("ifmap", "filter", "ofmap")
    for what in ("start", "stop", "count")
)


def _run_one(m: int, n: int, k: int, r: int, c: int, df: str, kb: int, tmp: str) -> dict:
    from scalesim.scale_sim import scalesim  # peer venv only

    d = os.path.join(tmp, f"{m}_{n}_{k}_{r}_{c}_{df}")
    os.makedirs(d, exist_ok=True)
    Path(d, "c.cfg").write_text(_CFG.format(r=r, c=c, df=df, kb=kb))
    Path(d, "t.csv").write_text(f"Layer Name, M, N, K,\nL0, {m}, {n}, {k},\n")
    Path(d, "l.csv").write_text(_LAYOUT_HEADER)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        sim = scalesim(
            save_disk_space=True,
            verbose=False,
            config=f"{d}/c.cfg",
            topology=f"{d}/t.csv",
            layout=f"{d}/l.csv",
            input_type_gemm=True,
        )
        sim.run_scale(top_path=d)
        layer = sim.runner.single_layer_sim_object_list[0]
        comp = layer.get_compute_report_items()
        det = layer.get_detail_report_items()
    secs = time.perf_counter() - t0
    rec = {"M": m, "N": n, "K": k, "rows": r, "cols": c, "dataflow": df, "sram_kb": kb}
    rec.update({key: float(v) for key, v in zip(COMPUTE_KEYS, comp)})
    rec.update({key: float(v) for key, v in zip(DETAIL_KEYS, det)})
    rec["seconds"] = secs
    return rec


def worker(out: str, kb: int, n_cheap: int) -> None:
    """Run SCALE-Sim on every case (peer venv); write JSON incrementally so a crash keeps data."""
    from importlib.metadata import version

    import scalesim  # noqa: F401  (fail early with a clear ImportError)

    cases = [(s, a, df) for s in shapes(n_cheap) for a in ARRAYS for df in DATAFLOWS]
    recs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, ((m, n, k), a, df) in enumerate(cases):
            recs.append(_run_one(m, n, k, a, a, df, kb, tmp))
            print(
                f"[{i + 1}/{len(cases)}] {m}x{n}x{k} {a}x{a} {df}: "
                f"{recs[-1]['compute_cycles']:.0f} cycles, {recs[-1]['seconds']:.2f} s",
                flush=True,
            )
            if (i + 1) % 20 == 0 or i + 1 == len(cases):
                meta = {
                    "peer": "scalesim",
                    "version": version("scalesim"),
                    "mode": "CALC",
                    "numpy": version("numpy"),
                    "cases": recs,
                }
                Path(out).write_text(json.dumps(meta, indent=0))


def compare(cache: Path = CACHE) -> int:
    """Evaluate jaxcore's Systolic on every cached case; print errors; return #mismatches."""
    import numpy as np
    from jaxcore.hardware import Systolic, systolic_counts

    data = json.loads(cache.read_text())
    bad = 0
    keys = (
        ("compute_cycles", "compute_cycles"),
        ("ifmap_sram_count", "ifmap_sram_reads"),
        ("filter_sram_count", "filter_sram_reads"),
        ("ofmap_sram_count", "ofmap_sram_writes"),
    )
    print(f"{'case':<28}{'peer cycles':>12}{'ours':>12}  sram (peer/ours) ifmap filter ofmap")
    for rec in data["cases"]:
        hw = Systolic(rows=rec["rows"], cols=rec["cols"], dataflow=rec["dataflow"])
        ours = systolic_counts(hw, rec["M"], rec["N"], rec["K"])
        errs = {pk: float(np.asarray(ours[ok])) - rec[pk] for pk, ok in keys}
        ok = all(e == 0 for e in errs.values())
        bad += not ok
        name = f"{rec['M']}x{rec['N']}x{rec['K']} {rec['rows']}^2 {rec['dataflow']}"
        print(
            f"{name:<28}{rec['compute_cycles']:>12.0f}{float(ours['compute_cycles']):>12.0f}  "
            + " ".join(f"{rec[pk]:.0f}/{float(ours[ok_]):.0f}" for pk, ok_ in keys[1:])
            + ("" if ok else f"  MISMATCH {errs}")
        )
    n = len(data["cases"])
    print(
        f"\n{n - bad}/{n} cases exact (compute cycles and SRAM ifmap/filter/ofmap counts); "
        f"SCALE-Sim {data['version']} took {sum(r['seconds'] for r in data['cases']):.1f} s"
    )
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collect", action="store_true", help="run SCALE-Sim and rewrite the cache")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scalesim-python", default="/work/venv-scalesim/bin/python")
    p.add_argument("--sram-kb", type=int, default=64)
    p.add_argument("--n-cheap", type=int, default=64)
    p.add_argument("--out", default=str(CACHE))
    a = p.parse_args(argv)
    if a.worker:
        worker(a.out, a.sram_kb, a.n_cheap)
        return 0
    if a.collect:
        cmd = [
            a.scalesim_python,
            __file__,
            "--worker",
            "--out",
            a.out,
            "--sram-kb",
            str(a.sram_kb),
            "--n-cheap",
            str(a.n_cheap),
        ]
        rc = subprocess.call(cmd)
        if rc:
            return rc
    return 1 if compare(Path(a.out)) else 0


if __name__ == "__main__":
    sys.exit(main())
