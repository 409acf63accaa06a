"""Energy and area per operation and per access: Horowitz ISSCC'14 (45 nm) by default.

M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V:

=====================  ========  =====================  =========
operation              pJ        operation              pJ
=====================  ========  =====================  =========
int8 add               0.03      fp16 add               0.4
int32 add              0.1       fp32 add               0.9
int8 mul               0.2       fp16 mul               1.1
int32 mul              3.1       fp32 mul               3.7
SRAM 64b read, 8 KB    10        SRAM 64b read, 32 KB   20
SRAM 64b read, 1 MB    100       DRAM 64b access        1300-2600
=====================  ========  =====================  =========

Areas (um^2, same talk): int8 add 36, int32 add 137, int8 mul 282, int32 mul 3495, fp16 add 1360,
fp32 add 4184, fp16 mul 1640, fp32 mul 7700.

Between and beyond the table points the energy is a power law in the bit-width (log-log
interpolation; e.g. integer multiply ~ bits^1.98, add ~ bits^0.87), so it is smooth and
differentiable in the bit-width. SRAM energy per 64-bit access is a power law in capacity through
the three points. :meth:`EnergyTable.scale_to` moves a table to another technology node with the
first-order rule E ~ C V^2 (C ~ feature size) and area ~ feature size^2; DRAM is not scaled.
Users pass their own numbers with ``EnergyTable(...)`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .cost import hardware_model, log_interp, param

__all__ = ["EnergyTable", "horowitz_45nm", "VDD_BY_NODE"]

# Nominal supply voltage per node (V), used by EnergyTable.scale_to.
VDD_BY_NODE: dict[int, float] = {
    45: 0.9,
    40: 0.9,
    32: 0.9,
    28: 0.9,
    22: 0.8,
    20: 0.8,
    16: 0.8,
    14: 0.8,
    12: 0.75,
    10: 0.75,
    7: 0.7,
    5: 0.65,
    3: 0.6,
}


@hardware_model
class EnergyTable:
    """Energy (pJ) and area (um^2) per operation/access; a pytree (differentiable numbers).

    Integer ops are given at 8 and 32 bits, float ops at 16 and 32 bits; ``dram_pj_per_bit``
    defaults to the low end of Horowitz's 1.3-2.6 nJ per 64 bits. ``sram_mm2_per_mb`` is an
    estimate (45 nm 6T cell ~0.35 um^2 plus ~40 % periphery), not from the talk.
    """

    int_add_8: jax.Array = param(0.03)
    int_add_32: jax.Array = param(0.1)
    int_mul_8: jax.Array = param(0.2)
    int_mul_32: jax.Array = param(3.1)
    fp_add_16: jax.Array = param(0.4)
    fp_add_32: jax.Array = param(0.9)
    fp_mul_16: jax.Array = param(1.1)
    fp_mul_32: jax.Array = param(3.7)
    sram_8kb_64b: jax.Array = param(10.0)
    sram_32kb_64b: jax.Array = param(20.0)
    sram_1mb_64b: jax.Array = param(100.0)
    dram_pj_per_bit: jax.Array = param(1300.0 / 64)
    area_int_add_8: jax.Array = param(36.0)
    area_int_add_32: jax.Array = param(137.0)
    area_int_mul_8: jax.Array = param(282.0)
    area_int_mul_32: jax.Array = param(3495.0)
    area_fp_add_16: jax.Array = param(1360.0)
    area_fp_add_32: jax.Array = param(4184.0)
    area_fp_mul_16: jax.Array = param(1640.0)
    area_fp_mul_32: jax.Array = param(7700.0)
    sram_mm2_per_mb: jax.Array = param(4.0)
    node_nm: jax.Array = param(45.0)

    # -- energies -------------------------------------------------------------------------------
    def _pow(self, bits, lo_b, lo, hi_b, hi):
        b = jnp.asarray(bits, jnp.result_type(float))
        slope = jnp.log(hi / lo) / jnp.log(hi_b / lo_b)
        return lo * (jnp.maximum(b, 1e-3) / lo_b) ** slope

    def add_pj(self, bits, *, floating: bool = False) -> jax.Array:
        """Energy of one add at ``bits`` (pJ)."""
        if floating:
            return self._pow(bits, 16.0, self.fp_add_16, 32.0, self.fp_add_32)
        return self._pow(bits, 8.0, self.int_add_8, 32.0, self.int_add_32)

    def mul_pj(self, bits, *, floating: bool = False) -> jax.Array:
        """Energy of one multiply at ``bits`` x ``bits`` (pJ)."""
        if floating:
            return self._pow(bits, 16.0, self.fp_mul_16, 32.0, self.fp_mul_32)
        return self._pow(bits, 8.0, self.int_mul_8, 32.0, self.int_mul_32)

    def mac_pj(self, w_bits, a_bits=None, *, floating: bool = False, acc_bits=None) -> jax.Array:
        """One multiply (geometric-mean width of the operands) plus one accumulate (pJ).

        The accumulator defaults to 4x the operand width for integers, 2x for floats (fp32 for
        fp16 inputs), capped at 32 bits.
        """
        a = w_bits if a_bits is None else a_bits
        mb = jnp.sqrt(jnp.asarray(w_bits, jnp.result_type(float)) * a)
        acc = jnp.minimum((2.0 if floating else 4.0) * mb, 32.0) if acc_bits is None else acc_bits
        return self.mul_pj(mb, floating=floating) + self.add_pj(acc, floating=floating)

    def sram_pj_per_bit(self, capacity_kb) -> jax.Array:
        """Energy per bit read from an SRAM of ``capacity_kb`` KiB (power law through 3 points)."""
        c = jnp.asarray(capacity_kb, jnp.result_type(float))
        # log_interp needs static anchors; the anchor energies themselves stay differentiable by
        # rescaling the interpolated curve at the 32 KB point.
        shape = log_interp(c, (8.0, 32.0, 1024.0), (10.0, 20.0, 100.0))
        lo = jnp.where(c < 32.0, self.sram_8kb_64b / 10.0, self.sram_32kb_64b / 20.0)
        hi = jnp.where(c < 32.0, self.sram_32kb_64b / 20.0, self.sram_1mb_64b / 100.0)
        w = jnp.clip(jnp.where(c < 32.0, (c - 8.0) / 24.0, (c - 32.0) / 992.0), 0.0, 1.0)
        return shape * (lo * (1 - w) + hi * w) / 64.0

    # -- areas ----------------------------------------------------------------------------------
    def mac_area_um2(self, bits, *, floating: bool = False) -> jax.Array:
        """Area of one multiplier plus accumulator at ``bits`` (um^2)."""
        b = jnp.asarray(bits, jnp.result_type(float))
        if floating:
            mul = self._pow(b, 16.0, self.area_fp_mul_16, 32.0, self.area_fp_mul_32)
            add = self._pow(
                jnp.minimum(2 * b, 32.0), 16.0, self.area_fp_add_16, 32.0, self.area_fp_add_32
            )
        else:
            mul = self._pow(b, 8.0, self.area_int_mul_8, 32.0, self.area_int_mul_32)
            add = self._pow(
                jnp.minimum(4 * b, 32.0), 8.0, self.area_int_add_8, 32.0, self.area_int_add_32
            )
        return mul + add

    def sram_area_mm2(self, capacity_kb) -> jax.Array:
        """SRAM macro area (mm^2) for ``capacity_kb`` KiB."""
        return self.sram_mm2_per_mb * jnp.asarray(capacity_kb, jnp.result_type(float)) / 1024.0

    # -- technology scaling ---------------------------------------------------------------------
    def scale_to(self, node_nm: float, vdd: float | None = None) -> EnergyTable:
        """This table moved to ``node_nm`` (logic and SRAM energies ~ L V^2, areas ~ L^2)."""
        if not node_nm > 0:
            raise ValueError(f"node_nm: expected a positive feature size, got {node_nm}")
        base_v = VDD_BY_NODE.get(45)
        if vdd is None:
            near = min(VDD_BY_NODE, key=lambda n: abs(n - node_nm))
            vdd = VDD_BY_NODE[near]
        if not vdd > 0:
            raise ValueError(f"vdd: expected a positive voltage, got {vdd}")
        l_ratio = node_nm / self.node_nm
        e_f = l_ratio * (vdd / base_v) ** 2
        a_f = l_ratio**2
        upd = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "node_nm":
                upd[f.name] = jnp.asarray(node_nm, jnp.result_type(float))
            elif f.name == "dram_pj_per_bit":
                upd[f.name] = v
            elif f.name.startswith("area_") or f.name == "sram_mm2_per_mb":
                upd[f.name] = v * a_f
            else:
                upd[f.name] = v * e_f
        return dataclasses.replace(self, **upd)


def horowitz_45nm() -> EnergyTable:
    """The default table (Horowitz ISSCC'14, 45 nm)."""
    return EnergyTable()
