"""Processing-in-memory (PIM-GPT / SK hynix AiM / Samsung HBM-PIM) and a GPU roofline.

PIM: every bank has ``macs_per_bank`` multiply-accumulate lanes beside its row buffer. A matmul
op's right operand (weights, or a KV cache) is spread evenly over all ``channels x
banks_per_channel`` banks, one output row per bank row (so no cross-bank reduction). For each
group of ``vectors_per_pass`` input vectors (the bank-side input buffer) every bank:

* activates ``ceil(bank bytes / row_bytes)`` rows (``tRCD + tRP`` each),
* streams ``ceil(bank bytes / col_bytes)`` columns (``tCCD`` each) into the MACs, which need
  ``ceil(bank weights / macs_per_bank)`` cycles at ``freq``: the slower of the two sets the time
  (narrow weights shorten the column stream, never the MAC work),
* after the host broadcast the input vector(s) over each channel's I/O (``K * a_bits / 8`` bytes
  at ``io_bw`` GB/s per channel, channels in parallel); outputs return to the host the same way.

Non-matmul ops (softmax, layer norm, GELU, residual adds) run on the host (an ASIC vector unit
with ``host_lanes`` lanes at ``host_freq`` GHz and ``host_sram_kb`` of SRAM, as in PIM-GPT), and
their operands cross the PIM I/O. Energy: ``e_act`` per row activation, ``e_col`` per bit read
inside a bank, one MAC from the energy table per multiply, ``e_io`` per bit over the I/O.

GPU: a roofline per op, ``max(flops / (peak * util), bytes / (bw * bw_util)) + launch`` (one
kernel per op, as eager frameworks run a batch-1 decode step), energy ``e_flop * flops + e_byte *
bytes + static_w * latency``. See docs/hardware.md for the parameters of each preset.
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
from .trace import Workload

__all__ = ["PIM", "GPU", "compare_pim_gpu"]


@hardware_model
class PIM:
    """A PIM memory system plus a host vector unit. Times in ns, bandwidths in GB/s, GHz clocks.

    Default = :meth:`aim` (SK hynix AiM-class GDDR6, 16 channels: 8 chips x 2 channels).
    """

    channels: Any = param(16.0, lower=1.0)
    banks_per_channel: Any = param(16.0, lower=1.0)
    macs_per_bank: Any = param(16.0, lower=1.0)
    row_bytes: Any = param(2048.0, lower=1.0)
    col_bytes: Any = param(32.0, lower=1.0)
    tRCD: Any = param(14.0, lower=0.0)
    tRP: Any = param(14.0, lower=0.0)
    tCCD: Any = param(1.0)
    freq: Any = param(1.0)
    io_bw: Any = param(32.0)
    vectors_per_pass: Any = param(1.0, lower=1.0)
    e_act: Any = param(909.0, lower=0.0, doc="pJ per row activation + precharge")
    e_col: Any = param(0.5, lower=0.0, doc="pJ per bit read inside a bank")
    e_io: Any = param(6.0, lower=0.0, doc="pJ per bit over the I/O")
    host_lanes: Any = param(256.0, lower=1.0)
    host_freq: Any = param(1.0)
    host_sram_kb: Any = param(512.0)
    table: EnergyTable = EnergyTable()

    @classmethod
    def aim(cls, **kw: Any) -> PIM:
        """SK hynix AiM-class: GDDR6, 16 BF16 MACs per bank at 1 GHz, 32 banks per chip.

        One chip (2 channels x 16 banks) peaks at 32 x 16 x 2 FLOP x 1 GHz = 1.02 TFLOP/s.
        Default system: 8 chips (16 channels), 32 GB/s I/O per channel.
        """
        return cls(**kw)

    @classmethod
    def hbm_pim(cls, **kw: Any) -> PIM:
        """Samsung HBM-PIM (Aquabolt-XL)-class: one 16-wide FP16 unit per 2 banks at 300 MHz.

        16 pseudo-channels x 8 PIM units x 16 lanes x 2 FLOP x 0.3 GHz = 1.23 TFLOP/s per cube;
        HBM2 I/O ~ 19 GB/s per pseudo-channel, ~3.9 pJ/bit.
        """
        d = dict(channels=16.0, banks_per_channel=8.0, macs_per_bank=16.0, row_bytes=1024.0,
                 col_bytes=32.0, tCCD=1 / 0.3, freq=0.3, io_bw=19.2, e_io=3.9)  # fmt: skip
        d.update(kw)
        return cls(**d)

    @classmethod
    def pim_gpt(cls, **kw: Any) -> PIM:
        """PIM-GPT-like: 8 GDDR6 channels x 16 banks, 16 MACs per bank at 1 GHz, host ASIC."""
        d = dict(channels=8.0, banks_per_channel=16.0)
        d.update(kw)
        return cls(**d)

    def peak_flops(self) -> jax.Array:
        """Peak in-bank FLOP/s (2 per MAC)."""
        return 2 * self.channels * self.banks_per_channel * self.macs_per_bank * self.freq * 1e9

    def area_mm2(self) -> jax.Array:
        """Area of the added MAC lanes (Horowitz 45 nm fp16 MACs) plus the host SRAM (mm^2)."""
        lanes = ste_round(self.channels) * ste_round(self.banks_per_channel) * self.macs_per_bank
        return lanes * self.table.mac_area_um2(16.0, floating=True) * 1e-6 + (
            self.table.sram_area_mm2(self.host_sram_kb)
        )

    def _cost(self, ops: dict[str, jax.Array], a_bits, w_bits, groups) -> Cost:
        """Per-op arrays (see ``cost.op_arrays``) and bit-widths -> Cost."""
        is_mm = ops["is_matmul"]
        one = jnp.ones_like(ops["m"])
        m = jnp.where(is_mm, ops["m"], one)
        n = jnp.where(is_mm, ops["n"], one)
        k = jnp.where(is_mm, ops["k"], one)
        b = jnp.where(is_mm, ops["batch"], 0.0)
        o_bits = ops["out_bits"] * a_bits / jnp.maximum(ops["a_bits"], 1.0)
        # The big stored operand lives in the banks and the few vectors stream in. A skinny
        # product whose matrix is on the LEFT (e.g. K_cache @ q in decode attention: m = context,
        # n = 1) is mapped as its transpose, (q^T K^T)^T: swap m/n and the operand bit-widths.
        swap = (n < m) & (n <= self.vectors_per_pass)
        m, n = jnp.where(swap, n, m), jnp.where(swap, m, n)
        a_bits, w_bits = jnp.where(swap, w_bits, a_bits), jnp.where(swap, a_bits, w_bits)
        banks = ste_round(self.channels) * ste_round(self.banks_per_channel)
        w_bytes = b * k * n * w_bits / 8
        bank_bytes = w_bytes / banks
        rows = ceil_div(bank_bytes, self.row_bytes)
        cols = ceil_div(bank_bytes, self.col_bytes)
        per_bank = b * k * n / banks  # weights per bank
        t_stream = soft_max(cols * self.tCCD, ceil_div(per_bank, self.macs_per_bank) / self.freq)
        passes = ceil_div(m, self.vectors_per_pass)
        t_bank = rows * (self.tRCD + self.tRP) + t_stream
        vec = jnp.minimum(self.vectors_per_pass, m)
        t_in = b * k * a_bits / 8 * vec / self.io_bw  # ns (GB/s = B/ns), per channel, parallel
        t_out = b * m * n * o_bits / 8 / (self.io_bw * self.channels)
        lat_mm = (passes * (t_bank + t_in) + t_out) * 1e-9
        macs = b * m * n * k
        e_mac = macs * self.table.mac_pj(w_bits, a_bits, floating=True)
        e_act = passes * rows * banks * self.e_act
        e_col = passes * cols * banks * self.col_bytes * 8 * self.e_col
        e_io = (passes * b * k * a_bits * vec * self.channels + b * m * n * o_bits) * self.e_io
        en_mm = (e_mac + e_act + e_col + e_io) * 1e-12
        hz = self.host_freq * 1e9
        lanes = ste_round(self.host_lanes)
        v_lat, v_en = vector_unit(
            ops,
            a_bits,
            lanes=lanes,
            freq_hz=hz,
            e_op_pj=self.table.add_pj(16.0, floating=True),
            onchip_kb=self.host_sram_kb,
            onchip_bw=lanes * 8 * hz,
            e_onchip_pj_per_bit=self.table.sram_pj_per_bit(self.host_sram_kb),
            offchip_bw=self.io_bw * 1e9 * self.channels,
            e_offchip_pj_per_bit=self.e_io + self.e_col,
        )
        cnt = ops["count"]
        mm = lambda x: jnp.sum(jnp.where(is_mm, x, 0.0) * cnt) * 1e-12
        comps = {"energy_mac_j": mm(e_mac), "energy_act_j": mm(e_act),
                 "energy_col_j": mm(e_col), "energy_io_j": mm(e_io),
                 "energy_host_j": jnp.sum(v_en * cnt),
                 "latency_pim_s": jnp.sum(jnp.where(is_mm, lat_mm, 0.0) * cnt),
                 "latency_host_s": jnp.sum(v_lat * cnt)}  # fmt: skip
        return finish(jnp.where(is_mm, lat_mm, v_lat), jnp.where(is_mm, en_mm, v_en), cnt,
                      self.area_mm2(), **comps)  # fmt: skip


@hardware_model
class GPU:
    """A GPU roofline (default: A100-40GB-class, BF16 tensor cores, eager batch-1 launches)."""

    peak_tflops: Any = param(312.0)
    mem_bw: Any = param(1555.0, doc="GB/s")
    flop_util: Any = param(0.6, lower=1e-3)
    bw_util: Any = param(0.8, lower=1e-3)
    launch_us: Any = param(5.0, lower=0.0, doc="per-kernel launch/framework overhead")
    e_flop: Any = param(0.8, lower=0.0, doc="pJ per FLOP")
    e_byte: Any = param(31.0, lower=0.0, doc="pJ per DRAM byte (HBM2 ~3.9 pJ/bit)")
    static_w: Any = param(60.0, lower=0.0, doc="W drawn while busy beyond the dynamic energy")
    die_mm2: Any = param(826.0)
    fused: bool = static(False, doc="XLA-style fusion: elementwise ops pay no launch/traffic")

    @classmethod
    def a100(cls, **kw: Any) -> GPU:
        """NVIDIA A100-40GB-class (312 TFLOP/s BF16 dense, 1555 GB/s)."""
        return cls(**kw)

    @classmethod
    def t4(cls, **kw: Any) -> GPU:
        """NVIDIA T4-class (65 TFLOP/s FP16, 320 GB/s, 70 W)."""
        d = dict(peak_tflops=65.0, mem_bw=320.0, static_w=30.0, die_mm2=545.0, e_byte=40.0)
        d.update(kw)
        return cls(**d)

    def area_mm2(self) -> jax.Array:
        return jnp.asarray(self.die_mm2, jnp.result_type(float))

    def _cost(self, ops: dict[str, jax.Array], a_bits, w_bits, groups) -> Cost:
        """Per-op arrays (see ``cost.op_arrays``) and bit-widths -> Cost."""
        scale_a = a_bits / jnp.maximum(ops["a_bits"], 1.0)
        scale_w = w_bits / jnp.maximum(ops["w_bits"], 1.0)
        is_mm = ops["is_matmul"]
        # matmul bytes: split traced bytes into the two operands' shares
        lhs = ops["batch"] * ops["m"] * ops["k"] * ops["a_bits"] / 8
        nbytes = jnp.where(
            is_mm,
            lhs * scale_a + (ops["bytes_read"] - lhs) * scale_w + ops["bytes_written"] * scale_a,
            (ops["bytes_read"] + ops["bytes_written"]) * scale_a,
        )
        t_c = ops["flops"] / (self.peak_tflops * 1e12 * self.flop_util)
        t_m = nbytes / (self.mem_bw * 1e9 * self.bw_util)
        free = ops["is_view"]
        if self.fused:
            fusable = ops["is_elementwise"] | ops["is_transcendental"] | ops["is_movement"]
            t_m = jnp.where(fusable, 0.0, t_m)
            nbytes = jnp.where(fusable, 0.0, nbytes)
            launch = jnp.where(fusable, 0.0, self.launch_us * 1e-6)
        else:
            launch = self.launch_us * 1e-6
        lat = jnp.where(free, 0.0, soft_max(t_c, t_m) + launch)
        en = jnp.where(free, 0.0, (ops["flops"] * self.e_flop + nbytes * self.e_byte) * 1e-12)
        en = en + self.static_w * lat
        cnt = ops["count"]
        return finish(lat, en, cnt, self.area_mm2(),
                      latency_launch_s=jnp.sum(jnp.where(free, 0.0, launch * cnt)),
                      bytes=jnp.sum(nbytes * cnt), flops=jnp.sum(ops["flops"] * cnt))  # fmt: skip


def compare_pim_gpu(workload: Workload, pim: PIM | None = None, gpu: GPU | None = None, *,
                    precision: Any = None) -> dict[str, float]:  # fmt: skip
    """PIM vs GPU on any traced workload: speedup (GPU time / PIM time) and energy ratio."""
    from .cost import cost

    pim = PIM.pim_gpt() if pim is None else pim
    gpu = GPU() if gpu is None else gpu
    cp = cost(pim, workload, precision=precision)
    cg = cost(gpu, workload, precision=precision)
    return {"pim_latency_s": float(cp.latency_s), "gpu_latency_s": float(cg.latency_s),
            "pim_energy_j": float(cp.energy_j), "gpu_energy_j": float(cg.energy_j),
            "speedup": float(cg.latency_s / cp.latency_s),
            "energy_ratio": float(cg.energy_j / cp.energy_j)}  # fmt: skip
