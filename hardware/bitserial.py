"""Bit-serial accelerators (Stripes / Loom / BitMoD style): latency proportional to bits.

Each of ``pes`` processing elements holds ``lanes`` bit-parallel inputs and consumes
``bits_per_cycle`` bits of the serial operand per cycle, so one pass over a MAC takes
``ceil(bits / bits_per_cycle)`` cycles:

* ``serial="weights"`` (BitMoD, Stripes with weights serial): cycles ~ ceil(w_bits / bpc),
* ``serial="activations"`` (Stripes): cycles ~ ceil(a_bits / bpc),
* ``serial="both"`` (Loom): cycles ~ ceil(w_bits / bpc) * ceil(a_bits / bpc).

Mapping: PEs hold output neurons (``n``), lanes the reduction (``k``); activations are
broadcast to all PEs. A matmul op (batch, m, k, n) takes
``batch * m * ceil(n / pes) * ceil(k / lanes) * bit_cycles`` cycles (so a layer narrower than the
array leaves PEs idle), or its DRAM time if larger. Per-group bit-widths (BitMoD: every group of
weights carries its own datatype and width) are given as a 1-D array in ``precision`` (see
:func:`jaxcore.hardware.resolve_precision`); the op's bit cycles are then the mean over groups of
``ceil(bits_g / bpc)``. Energy per active PE-cycle (idle PEs are clock-gated) scales with the lane
width and the datapath width from the energy table (``lanes`` partial products of the
bit-parallel operand times a ``bpc``-bit slice, plus an adder tree); PE area likewise, at the
widest bit-parallel operand of the workload (activations when weights are serial, weights when
activations are serial, ``bpc`` when both are), so narrower bit-widths buy smaller PEs.

Memory: operands move at their bit-widths. Every operand crosses the SRAM once; DRAM traffic is
compulsory when the weights (or the activations) fit in ``sram_kb``, else the better of the two
loop orders re-streams the other operand once per SRAM-sized chunk:
``min(W + A * ceil(W / S), A + W * ceil(A / S)) + O`` bytes. A larger SRAM costs area and energy
per access and saves DRAM refetches.
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
    ste_ceil,
    ste_round,
    vector_unit,
)
from .energy import EnergyTable

__all__ = ["BitSerial", "bitmod_group_bits", "bitserial_plane_cycles"]


@hardware_model
class BitSerial:
    """``pes`` bit-serial PEs x ``lanes`` lanes; ``freq`` GHz, ``mem_bw`` GB/s, SRAM in KiB."""

    pes: Any = param(256.0, lower=1.0)
    bits_per_cycle: Any = param(1.0, lower=1.0)
    lanes: Any = param(16.0, lower=1.0)
    freq: Any = param(1.0)
    mem_bw: Any = param(64.0)
    sram_kb: Any = param(1024.0)
    vector_lanes: Any = param(64.0, lower=1.0)
    table: EnergyTable = EnergyTable()
    serial: str = static("weights")

    def __post_init__(self) -> None:
        if self.serial not in ("weights", "activations", "both"):
            raise ValueError(
                f"serial: expected 'weights', 'activations' or 'both', got {self.serial!r}"
            )

    def datapath_bits(self, a_bits: Any, w_bits: Any) -> Any:
        """Width of the bit-parallel operand that each lane multiplies by a ``bpc``-bit slice."""
        if self.serial == "weights":
            return a_bits
        if self.serial == "activations":
            return w_bits
        return jnp.broadcast_to(self.bits_per_cycle, jnp.shape(a_bits))

    def _pe_cycle_pj(self, par_bits) -> jax.Array:
        bpc = self.bits_per_cycle
        # lanes partial products of (par_bits x bpc) bits + an adder tree over them
        mul = self.table.mul_pj(jnp.sqrt(par_bits * bpc))
        add = self.table.add_pj(par_bits + bpc + jnp.log2(self.lanes))
        return self.lanes * (mul + add)

    def area_mm2(self, a_bits: Any = 16.0) -> jax.Array:
        """PEs built for a ``a_bits``-wide bit-parallel operand (see :meth:`datapath_bits`) plus
        the SRAM (mm^2)."""
        bpc = self.bits_per_cycle
        per_pe = self.lanes * (
            self.table.mac_area_um2(jnp.sqrt(a_bits * bpc))
        )  # lanes small multipliers + accumulators
        return ste_round(self.pes) * per_pe * 1e-6 + self.table.sram_area_mm2(self.sram_kb)

    def bit_cycles(self, a_bits, w_bits, groups: dict[int, jax.Array], n_ops: int) -> jax.Array:
        """Per-op cycles per MAC pass, ``ceil(bits / bits_per_cycle)`` (mean over groups)."""
        bpc = self.bits_per_cycle
        wc = ste_ceil(w_bits / bpc)
        if groups:
            idx = jnp.arange(n_ops)
            for i, g in groups.items():
                wc = jnp.where(idx == i, jnp.mean(ste_ceil(g / bpc)), wc)
        ac = ste_ceil(a_bits / bpc)
        if self.serial == "weights":
            return wc
        if self.serial == "activations":
            return ac
        return wc * ac

    def _cost(self, ops: dict[str, jax.Array], a_bits, w_bits, groups) -> Cost:
        """Per-op arrays (see ``cost.op_arrays``) and bit-widths -> Cost."""
        is_mm = ops["is_matmul"]
        b, m, n, k = ops["batch"], ops["m"], ops["n"], ops["k"]
        pes, lanes_ = ste_round(self.pes), ste_round(self.lanes)
        bc = self.bit_cycles(a_bits, w_bits, groups, ops["m"].shape[0])
        passes = b * m * ceil_div(k, lanes_)  # cycles of one PE per output neuron per bit-pass
        cycles = passes * ceil_div(n, pes) * bc
        hz = self.freq * 1e9
        w_b, a_b, o_b = k * n * w_bits / 8, m * k * a_bits / 8, m * n * a_bits / 8
        cap = self.sram_kb * 1024.0
        refetch = -soft_max(-(w_b + a_b * ceil_div(w_b, cap)), -(a_b + w_b * ceil_div(a_b, cap)))
        dram = b * (refetch + o_b)
        onchip = b * (w_b + a_b + o_b)
        t_mem = dram / (self.mem_bw * 1e9)
        lat_mm = soft_max(cycles / hz, t_mem)
        sram_bit = self.table.sram_pj_per_bit(self.sram_kb)
        par_bits = self.datapath_bits(a_bits, w_bits)
        e_pe = passes * n * bc * self._pe_cycle_pj(par_bits)  # active PE-cycles only
        e_mem = 8 * (onchip * sram_bit + dram * self.table.dram_pj_per_bit)
        en_mm = (e_pe + e_mem) * 1e-12
        lanes = ste_round(self.vector_lanes)
        v_lat, v_en = vector_unit(
            ops,
            a_bits,
            lanes=lanes,
            freq_hz=hz,
            e_op_pj=self.table.add_pj(16.0, floating=True),
            onchip_kb=self.sram_kb,
            onchip_bw=lanes * 8 * hz,
            e_onchip_pj_per_bit=sram_bit,
            offchip_bw=self.mem_bw * 1e9,
            e_offchip_pj_per_bit=self.table.dram_pj_per_bit,
        )
        cnt = ops["count"]
        comps = {
            "cycles": jnp.sum(jnp.where(is_mm, cycles, 0.0) * cnt),
            "energy_pe_j": jnp.sum(jnp.where(is_mm, e_pe, 0.0) * cnt) * 1e-12,
            "energy_mem_j": jnp.sum(jnp.where(is_mm, e_mem, 0.0) * cnt) * 1e-12,
            "dram_bytes": jnp.sum(jnp.where(is_mm, dram, 0.0) * cnt),
        }
        widest = jnp.max(jnp.where(is_mm, par_bits, 0.0))
        area = self.area_mm2(jnp.where(jnp.any(is_mm), widest, 16.0))
        return finish(jnp.where(is_mm, lat_mm, v_lat), jnp.where(is_mm, en_mm, v_en), cnt, area,
                      **comps)  # fmt: skip


def bitmod_group_bits(
    w: jax.Array, bits: int = 4, group_size: int = 128, *, axis: int = -1, scale_bits: float = 8.0
) -> jax.Array:
    """Per-group effective weight bit-widths of BitMoD quantisation of ``w``, flattened.

    Quantises with :func:`jaxcore.kernels.lowp.bitmod_quantize` (one datatype variant and one
    scale per group of ``group_size`` along ``axis``) and charges each group ``bits`` per element
    plus its metadata (``scale_bits`` + ``ceil(log2(variants))`` bits) amortised over the group.
    Pass the result as ``precision={"<param>": groups}`` to cost BitMoD on :class:`BitSerial`.
    """
    import math

    from jaxcore.kernels.lowp import bitmod_quantize, bitmod_tables

    r = bitmod_quantize(w, bits, group_size, axis=axis)
    n_var = bitmod_tables(bits).shape[0]
    meta = scale_bits + math.ceil(math.log2(max(n_var, 2)))
    return jnp.full((r.variant.size,), bits + meta / group_size, jnp.result_type(float))


def bitserial_plane_cycles(w_codes: jax.Array, bits: int, *, signed: bool = True) -> jax.Array:
    """Cycles per output column of a 1-bit-per-cycle unit that skips all-zero weight planes.

    Measured by :func:`jaxcore.kernels.lowp.bitserial_dot` (``skip_zero_planes=True``) on the
    integer weight codes ``w_codes`` (K, N); pass as per-group widths with ``bits_per_cycle=1``.
    """
    from jaxcore.kernels.lowp import bitserial_dot

    w = jnp.asarray(w_codes)
    probe = jnp.zeros((1, w.shape[0]), jnp.int32)
    res = bitserial_dot(probe, w, bits, signed=signed, skip_zero_planes=True)
    return res.cycles.astype(jnp.result_type(float))
