"""Systolic array (SCALE-Sim / ZigZag style): GEMM mapping, cycles, SRAM/DRAM accesses, energy.

A GEMM (M, K) @ (K, N) maps to (Sr, Sc, T) per dataflow (SCALE-Sim's convention):

==========  =====  =====  =====  ==================================
dataflow    Sr     Sc     T      stationary in the PEs
==========  =====  =====  =====  ==================================
``"os"``    M      N      K      outputs
``"ws"``    K      N      M      weights (the right operand)
``"is"``    K      M      N      inputs (the left operand)
==========  =====  =====  =====  ==================================

Compute cycles (SCALE-Sim v3, exact): ``ceil(Sr/R) * ceil(Sc/C) * (k*R + C + T - 2) - 1`` with
k = 1 for os, 2 for ws/is (each fold fills, computes and drains without overlap). SRAM access
counts (SCALE-Sim v3, exact; elements):

* os: ifmap reads ``ceil(N/C)*M*K``, filter reads ``ceil(M/R)*K*N``, ofmap writes
  ``M*N + ceil(M/R)*ceil(N/C)*(R + C)`` (SCALE-Sim adds R + C per fold),
* ws: ifmap ``ceil(N/C)*M*K``, filter ``K*N``, ofmap ``ceil(K/R)*M*N`` (partial sums per fold),
* is: ifmap ``M*K``, filter ``ceil(M/C)*K*N``, ofmap ``ceil(K/R)*M*N``.

``timing="scalesim"`` (default): latency cycles = max(compute cycles, DRAM cycles) (double-buffered
SRAMs overlap DRAM traffic with compute; SCALE-Sim's CALC mode reports no stalls, so its compute
cycles are the first argument). ``timing="zigzag"``: ZigZag's model: the streamed operand is
staged from DRAM first (``M*K*a_bits / DRAM bits per cycle``), then folds run back to back
(``M*ceil(N/C)*ceil(K/R)`` for ws) overlapped with the remaining DRAM traffic, then the array
drains (``R + C - 2``) and writes back (2 cycles).

Energy (pJ): MACs; PE register files (stationary operand: one read per MAC, one write per load;
partial sums: read + write per MAC plus one read-out per output per array row); SRAM (the
streamed operands' reads as counted above, one write per element filled, final outputs written
and read once: partial sums accumulate in the array, the loop order ZigZag finds); DRAM
(compulsory traffic, times a refetch factor when an operand does not fit its SRAM). Non-matmul
ops run on a vector unit of ``vector_lanes`` lanes beside the array.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .cost import (
    Cost,
    ceil_div,
    finish,
    hardware_model,
    param,
    soft_max,
    static,
    ste_round,
    vector_unit,
)
from .energy import EnergyTable

__all__ = ["Systolic", "systolic_counts", "DATAFLOWS"]

DATAFLOWS = ("os", "ws", "is")


@hardware_model
class Systolic:
    """A rows x cols systolic array with three SRAMs, DRAM, and a vector unit.

    Units: SRAM sizes in KiB, ``dram_bw`` in GB/s, ``freq`` in GHz, energies in pJ (per bit for
    memories). ``None`` energies come from ``table`` (Horowitz 45 nm by default).
    """

    rows: Any = param(32.0, lower=1.0, doc="array rows R")
    cols: Any = param(32.0, lower=1.0, doc="array columns C")
    ifmap_sram_kb: Any = param(512.0, lower=1e-3)
    filter_sram_kb: Any = param(512.0, lower=1e-3)
    ofmap_sram_kb: Any = param(256.0, lower=1e-3)
    dram_bw: Any = param(64.0, doc="GB/s")
    freq: Any = param(1.0, doc="GHz")
    vector_lanes: Any = param(32.0, lower=1.0)
    mac_pj: Any = None
    rf_pj_per_bit: Any = param(0.095 / 8)
    psum_rf_pj_per_bit: Any = param(0.021 / 16)
    psum_bits: Any = param(32.0, lower=1.0)
    sram_rd_pj_per_bit: Any = None
    sram_wr_pj_per_bit: Any = None
    dram_rd_pj_per_bit: Any = None
    dram_wr_pj_per_bit: Any = None
    table: EnergyTable = EnergyTable()
    dataflow: str = static("ws")
    timing: str = static("scalesim")
    weights_via_sram: bool = static(True)
    floating: bool = static(False)

    def __post_init__(self) -> None:
        if self.dataflow not in DATAFLOWS:
            raise ValueError(f"dataflow: expected one of {DATAFLOWS}, got {self.dataflow!r}")
        if self.timing not in ("scalesim", "zigzag"):
            raise ValueError(f"timing: expected 'scalesim' or 'zigzag', got {self.timing!r}")

    @classmethod
    def tpu_like(cls, **kw: Any) -> Systolic:
        """ZigZag 3.9's ``tpu_like`` preset: 32x32 ws, 0.04 pJ/MAC, 2 MB SRAM, 64-bit DRAM.

        Per-access energies of its YAML converted to per bit: weight RF 0.095 pJ / 8 b, psum RF
        0.021 pJ / 16 b, SRAM 416.16 / 378.4 pJ per 2048 b read / write, DRAM 700 / 750 pJ per
        64 b read / write; DRAM 64 bits per cycle; weights go DRAM -> PE register files.
        """
        d = dict(
            rows=32.0,
            cols=32.0,
            ifmap_sram_kb=1024.0,
            filter_sram_kb=1024.0,
            ofmap_sram_kb=1024.0,
            dram_bw=8.0,
            freq=1.0,
            mac_pj=0.04,
            rf_pj_per_bit=0.095 / 8,
            psum_rf_pj_per_bit=0.021 / 16,
            psum_bits=16.0,
            sram_rd_pj_per_bit=416.16 / 2048,
            sram_wr_pj_per_bit=378.4 / 2048,
            dram_rd_pj_per_bit=700.0 / 64,
            dram_wr_pj_per_bit=750.0 / 64,
            dataflow="ws",
            timing="zigzag",
            weights_via_sram=False,
        )
        d.update(kw)
        return cls(**d)

    # ------------------------------------------------------------------------------------------
    def area_mm2(self, bits: Any = 8.0) -> jax.Array:
        """Array (MACs at ``bits``, the geometric mean of weight and activation widths) + SRAMs,
        from ``table`` (mm^2)."""
        pe = self.table.mac_area_um2(bits, floating=self.floating) * 1e-6
        sram = self.table.sram_area_mm2(
            self.ifmap_sram_kb + self.filter_sram_kb + self.ofmap_sram_kb
        )
        return ste_round(self.rows) * ste_round(self.cols) * pe + sram

    def _cost(self, ops: dict[str, jax.Array], a_bits, w_bits, groups) -> Cost:
        """Per-op arrays (see ``cost.op_arrays``) and bit-widths -> Cost."""
        is_mm = ops["is_matmul"]
        one = jnp.ones_like(ops["m"])
        m = jnp.where(is_mm, ops["m"], one)
        n = jnp.where(is_mm, ops["n"], one)
        k = jnp.where(is_mm, ops["k"], one)
        b = jnp.where(is_mm, ops["batch"], 0.0)
        o_bits = jnp.where(is_mm, ops["out_bits"] * a_bits / jnp.maximum(ops["a_bits"], 1), 0.0)
        c = gemm_cost(self, m, n, k, a_bits, w_bits, o_bits)
        hz = self.freq * 1e9
        lat_mm = b * c["cycles"] / hz
        en_mm = b * c["energy_pj"] * 1e-12
        t = self.table
        sram_bit = (
            self.sram_rd_pj_per_bit
            if self.sram_rd_pj_per_bit is not None
            else (t.sram_pj_per_bit(self.ifmap_sram_kb))
        )
        lanes = ste_round(self.vector_lanes)
        v_lat, v_en = vector_unit(
            ops,
            a_bits,
            lanes=lanes,
            freq_hz=hz,
            e_op_pj=t.add_pj(16.0, floating=True),
            onchip_kb=self.ofmap_sram_kb,
            onchip_bw=lanes * 2 * 4 * hz,
            e_onchip_pj_per_bit=sram_bit,
            offchip_bw=self.dram_bw * 1e9,
            e_offchip_pj_per_bit=_dram_rd(self),
        )
        per_lat = jnp.where(is_mm, lat_mm, v_lat)
        per_en = jnp.where(is_mm, en_mm, v_en)
        cnt = ops["count"]
        # MACs sized for the widest (weight x activation) product (geometric-mean width, as in
        # ``EnergyTable.mac_pj``)
        area = self.area_mm2(jnp.max(jnp.where(is_mm, jnp.sqrt(w_bits * a_bits), 0.0)))
        comps = {k_: jnp.sum(b * v * cnt) for k_, v in c.items() if k_.startswith("e_")}
        comps = {f"energy_{k_[2:]}_j": v * 1e-12 for k_, v in comps.items()}
        comps["cycles"] = (
            jnp.sum(b * c["cycles"] * cnt) + jnp.sum(jnp.where(is_mm, 0.0, v_lat) * cnt) * hz
        )
        comps["compute_cycles"] = jnp.sum(b * c["compute_cycles"] * cnt)
        comps["macs"] = jnp.sum(b * m * n * k * cnt * is_mm)
        return finish(per_lat, per_en, cnt, area, **comps)


def _dram_rd(hw: Systolic):
    return hw.dram_rd_pj_per_bit if hw.dram_rd_pj_per_bit is not None else hw.table.dram_pj_per_bit


def _dram_wr(hw: Systolic):
    return hw.dram_wr_pj_per_bit if hw.dram_wr_pj_per_bit is not None else hw.table.dram_pj_per_bit


def _mapping(hw: Systolic, m, n, k):
    r, c = ste_round(hw.rows), ste_round(hw.cols)
    if hw.dataflow == "os":
        sr, sc, t, kk = m, n, k, 1.0
    elif hw.dataflow == "ws":
        sr, sc, t, kk = k, n, m, 2.0
    else:
        sr, sc, t, kk = k, m, n, 2.0
    return r, c, sr, sc, t, kk


def systolic_counts(hw: Systolic, m, n, k) -> dict[str, jax.Array]:
    """SCALE-Sim v3's compute cycles and SRAM element counts for one GEMM (exact forward)."""
    r, c, sr, sc, t, kk = _mapping(hw, m, n, k)
    fr, fc = ceil_div(sr, r), ceil_div(sc, c)
    cycles = fr * fc * (kk * r + c + t - 2) - 1
    if hw.dataflow == "os":
        i = ceil_div(n, c) * m * k
        f = ceil_div(m, r) * k * n
        o = m * n + fr * fc * (r + c)
    elif hw.dataflow == "ws":
        i, f, o = ceil_div(n, c) * m * k, k * n, ceil_div(k, r) * m * n
    else:
        i, f, o = m * k, ceil_div(m, c) * k * n, ceil_div(k, r) * m * n
    return {
        "compute_cycles": cycles,
        "ifmap_sram_reads": i,
        "filter_sram_reads": f,
        "ofmap_sram_writes": o,
        "row_folds": fr,
        "col_folds": fc,
    }


def _refetch(nbytes, cap_kb, folds):
    """DRAM re-reads of an operand reused across ``folds`` when it overflows its SRAM."""
    over = jnp.clip((nbytes - cap_kb * 1024.0) / jnp.maximum(nbytes, 1.0), 0.0, 1.0)
    return 1.0 + (folds - 1.0) * over


def gemm_cost(hw: Systolic, m, n, k, a_bits, w_bits, o_bits) -> dict[str, jax.Array]:
    """Cycles and energy (pJ, by component) of one (m,k)@(k,n) GEMM; broadcasts over arrays."""
    cnt = systolic_counts(hw, m, n, k)
    r, c, sr, sc, t, kk = _mapping(hw, m, n, k)
    macs = m * n * k
    tab = hw.table
    # --- energy ---
    mac = hw.mac_pj if hw.mac_pj is not None else tab.mac_pj(w_bits, a_bits, floating=hw.floating)
    e_mac = macs * mac
    if hw.dataflow == "os":
        stat_el, stat_bits = m * n, hw.psum_bits  # outputs stay: psum RF only
        e_rf = macs * 2 * hw.psum_bits * hw.psum_rf_pj_per_bit
    else:
        stat_el, stat_bits = (k * n, w_bits) if hw.dataflow == "ws" else (m * k, a_bits)
        e_rf = (macs + stat_el) * stat_bits * hw.rf_pj_per_bit + (
            2 * macs + m * n * jnp.minimum(r, k)
        ) * hw.psum_bits * hw.psum_rf_pj_per_bit
    srd = hw.sram_rd_pj_per_bit
    swr = hw.sram_wr_pj_per_bit
    srd_i = srd if srd is not None else tab.sram_pj_per_bit(hw.ifmap_sram_kb)
    srd_f = srd if srd is not None else tab.sram_pj_per_bit(hw.filter_sram_kb)
    srd_o = srd if srd is not None else tab.sram_pj_per_bit(hw.ofmap_sram_kb)
    swr_i = swr if swr is not None else srd_i
    swr_f = swr if swr is not None else srd_f
    swr_o = swr if swr is not None else srd_o
    e_sram = (
        cnt["ifmap_sram_reads"] * a_bits * srd_i
        + m * k * a_bits * swr_i
        + m * n * o_bits * (swr_o + srd_o)
    )
    if hw.weights_via_sram:
        e_sram = e_sram + cnt["filter_sram_reads"] * w_bits * srd_f + k * n * w_bits * swr_f
    # DRAM: compulsory, with refetch when the reused streamed operand overflows its SRAM
    a_b, w_b, o_b = m * k * a_bits / 8, k * n * w_bits / 8, m * n * o_bits / 8
    if hw.dataflow == "os":
        a_b = a_b * _refetch(a_b, hw.ifmap_sram_kb, ceil_div(n, c))
        w_b = w_b * _refetch(w_b, hw.filter_sram_kb, ceil_div(m, r))
    elif hw.dataflow == "ws":
        a_b = a_b * _refetch(a_b, hw.ifmap_sram_kb, ceil_div(n, c))
    else:
        w_b = w_b * _refetch(w_b, hw.filter_sram_kb, ceil_div(m, c))
    e_dram = (a_b + w_b) * 8 * _dram_rd(hw) + o_b * 8 * _dram_wr(hw)
    # --- time ---
    bytes_per_cycle = hw.dram_bw / hw.freq
    dram_cycles = (a_b + w_b + o_b) / bytes_per_cycle
    if hw.timing == "scalesim":
        cycles = soft_max(cnt["compute_cycles"], dram_cycles)
    else:
        ideal = cnt["row_folds"] * cnt["col_folds"] * t
        onload = a_b / bytes_per_cycle
        rest = (w_b + o_b) / bytes_per_cycle
        cycles = onload + soft_max(ideal, rest) + r + c
    return {
        "cycles": cycles,
        "compute_cycles": cnt["compute_cycles"],
        "dram_cycles": dram_cycles,
        "energy_pj": e_mac + e_rf + e_sram + e_dram,
        "e_mac": e_mac,
        "e_rf": e_rf,
        "e_sram": e_sram,
        "e_dram": e_dram,
    }
