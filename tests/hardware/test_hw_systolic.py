"""Systolic against cached SCALE-Sim v3 and ZigZag outputs; gradients; jit/vmap."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from jaxcore.hardware import Systolic, cost, gemm_workload, systolic_counts, trace

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


def _load(name):
    return json.loads((DATA / name).read_text())


def test_scalesim_cache_exact(x64):
    data = _load("scalesim_gemm.json")
    cases = data["cases"]
    assert data["mode"] == "CALC" and len(cases) >= 540
    assert len({(c["M"], c["N"], c["K"]) for c in cases}) >= 60
    groups = {}
    for c in cases:
        groups.setdefault((c["rows"], c["cols"], c["dataflow"]), []).append(c)
    assert {k[2] for k in groups} == {"os", "ws", "is"} and {k[0] for k in groups} == {8, 16, 32}
    for (r, col, df), cs in groups.items():
        hw = Systolic(rows=float(r), cols=float(col), dataflow=df)
        m, n, k = (jnp.array([c[d] for c in cs], jnp.float64) for d in "MNK")
        got = systolic_counts(hw, m, n, k)
        for peer, ours in (
            ("compute_cycles", "compute_cycles"),
            ("ifmap_sram_count", "ifmap_sram_reads"),
            ("filter_sram_count", "filter_sram_reads"),
            ("ofmap_sram_count", "ofmap_sram_writes"),
        ):
            want = np.array([c[peer] for c in cs])
            np.testing.assert_array_equal(np.asarray(got[ours]), want, err_msg=f"{df} {r} {peer}")


def test_zigzag_cache_within_target():
    data = _load("zigzag_gemm.json")
    hw = Systolic.tpu_like()
    n_target = 0
    for c in data["cases"]:
        res = cost(hw, gemm_workload(c["M"], c["N"], c["K"], bits=8))
        e_err = abs(float(res.energy_j) * 1e12 / c["energy_pj"] - 1)
        l_err = abs(float(res.breakdown["cycles"]) / c["latency_cycles"] - 1)
        if all(d >= 256 and d % 32 == 0 for d in (c["M"], c["N"], c["K"])):
            n_target += 1
            assert e_err < 0.10 and l_err < 0.05, (c["M"], c["N"], c["K"], e_err, l_err)
        else:  # documented, looser: misaligned/small shapes (ZigZag picks other loop orders)
            assert e_err < 0.02 and l_err < 0.40, (c["M"], c["N"], c["K"], e_err, l_err)
    assert n_target >= 10 and len(data["cases"]) >= 20


def test_latency_is_cycles_over_freq_and_roofline():
    wl = gemm_workload(64, 64, 64, bits=8)
    hw = Systolic(rows=8.0, cols=8.0, dataflow="os", dram_bw=1e6)
    c = cost(hw, wl)
    assert float(c.breakdown["compute_cycles"]) == 4991  # SCALE-Sim (measured)
    assert float(c.latency_s) == pytest.approx(4991 / 1e9, rel=1e-6)
    slow = cost(dataclasses.replace(hw, dram_bw=0.01), wl)  # 10 MB/s: DRAM bound
    assert float(slow.latency_s) == pytest.approx((3 * 64 * 64) / 0.01e9, rel=1e-4)


def test_jit_vmap_grad():
    x = jnp.ones((4, 64))
    wl = trace(lambda w, x: jax.nn.relu(x @ w), jnp.ones((64, 32)), x)
    hw = Systolic(rows=16.0, cols=16.0)
    hws = jax.tree_util.tree_map(lambda v: jnp.full((5,), v), hw)
    hws = dataclasses.replace(hws, rows=jnp.arange(4.0, 24.0, 4.0))
    lat = jax.vmap(lambda h: cost(h, wl).latency_s)(hws)
    assert lat.shape == (5,)
    one = cost(dataclasses.replace(hw, rows=12.0), wl).latency_s
    assert float(lat[2]) == pytest.approx(float(one), rel=1e-6)
    g = jax.grad(lambda h: cost(h, wl).latency_s)(hw)
    assert np.isfinite(float(g.rows)) and float(g.rows) < 0  # straight-through ceil
    assert float(g.freq) < 0


def test_gradients_match_finite_differences(x64):
    wl = gemm_workload(100, 64, 128, bits=8)
    base = Systolic.tpu_like(timing="scalesim")

    def energy(e_dram, e_sram, mac):
        hw = dataclasses.replace(
            base, dram_rd_pj_per_bit=e_dram, sram_rd_pj_per_bit=e_sram, mac_pj=mac
        )
        return cost(hw, wl).energy_j * 1e6

    check_grads(energy, (10.9, 0.2, 0.04), order=1, modes=["rev"], rtol=1e-4)

    def latency(freq):
        return cost(dataclasses.replace(base, freq=freq, dram_bw=1e4), wl).latency_s * 1e6

    check_grads(latency, (1.3,), order=1, modes=["rev"], rtol=1e-4)


def test_energy_components_sum():
    c = cost(Systolic(), gemm_workload(128, 128, 128))
    parts = sum(float(v) for k, v in c.breakdown.items() if k.startswith("energy_"))
    assert parts == pytest.approx(float(c.energy_j), rel=1e-5)
