"""Streaming dataflow: units with an initiation interval and a latency, connected by FIFOs.

A :class:`StreamingDataflow` is a DAG of :class:`Unit` s. A unit consumes one item per ``ii``
cycles from each input stream and emits its first output ``latency`` cycles after its first
inputs arrive; a *blocking* unit (``blocking=True``: a reduction whose result is needed
downstream, e.g. the max or the sum of a softmax) emits one value only after its whole input
stream, ``latency + (n - 1) * ii`` cycles after the first item. A unit starts when every input
has its first item, so an edge ``p -> v`` whose producer runs ahead must buffer
``ceil((start(v) - first_out(p)) / ii) + 1`` items: that FIFO is the memory cost of the schedule.
The pipeline sustains one item per ``max(ii)`` cycles.

``cost(sd, n_items)`` (the module-wide contract, with the stream length as the workload) returns
latency (s), energy (per item in every unit + FIFO writes and reads) and area (units + FIFO bits).

:func:`attention_pipeline` builds one query row of softmax attention over ``n`` keys:

* ``"naive"``: scores -> max (blocking) -> exp(s - max) -> sum (blocking) -> divide -> P @ V.
  The scores wait in a FIFO for the max, the exponentials for the sum: O(n) FIFO entries.
* ``"deferred"`` (reordered, deferred normalisation as in FlashAttention's online softmax): the
  running max, the rescaled running sum and the rescaled accumulator of P @ V update per item,
  one division at the end: O(1) FIFO entries, at the same full throughput (ii = 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from .cost import Cost, hardware_model, param, static, ste_ceil

__all__ = ["Unit", "StreamingDataflow", "attention_pipeline", "fifo_depths"]


@dataclasses.dataclass(frozen=True)
class Unit:
    """A pipeline unit: ``ii`` cycles per item, ``latency`` cycles, pJ per item, um^2 of area."""

    name: str
    ii: int = 1
    latency: int = 1
    e_item_pj: float = 1.0
    area_um2: float = 1000.0
    blocking: bool = False
    inputs: tuple[str, ...] = ()
    width: int = 1  # words per output item (a FIFO on this unit's output holds width words/item)

    def __post_init__(self) -> None:
        if self.ii < 1:
            raise ValueError(f"Unit {self.name!r}: ii: expected an integer >= 1, got {self.ii}")
        if self.latency < 0:
            raise ValueError(f"Unit {self.name!r}: latency: expected >= 0, got {self.latency}")


@hardware_model
class StreamingDataflow:
    """A DAG of units (static) with continuous clock/FIFO parameters (GHz, pJ/bit, um^2/bit)."""

    units: tuple[Unit, ...] = static(())
    freq: Any = param(1.0)
    word_bits: Any = param(16.0, lower=1.0)
    fifo_pj_per_bit: Any = param(0.01, lower=0.0, doc="write + read of one bit")
    fifo_um2_per_bit: Any = param(0.5, lower=0.0)

    def __post_init__(self) -> None:
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError(f"units: expected unique names, got {names}")
        seen: set[str] = set()
        for u in self.units:
            for i in u.inputs:
                if i not in seen:
                    raise ValueError(
                        f"units: {u.name!r} reads {i!r}, which is not an earlier unit "
                        "(list units in topological order)"
                    )
            seen.add(u.name)

    def schedule(self, n_items: int) -> dict[str, Any]:
        """Start/first-output cycles per unit and FIFO depth per edge, for ``n_items`` items."""
        if not (isinstance(n_items, int) and n_items >= 1):
            raise ValueError(f"n_items: expected a positive integer, got {n_items!r}")
        ii = max((u.ii for u in self.units), default=1)
        start: dict[str, int] = {}
        first: dict[str, int] = {}
        fifo: dict[tuple[str, str], int] = {}
        by = {u.name: u for u in self.units}
        for u in self.units:
            s = max((first[p] for p in u.inputs), default=0)
            start[u.name] = s
            first[u.name] = s + u.latency + ((n_items - 1) * ii if u.blocking else 0)
            for p in u.inputs:
                if by[p].blocking:
                    fifo[(p, u.name)] = 1  # one value, held while the consumer streams
                else:
                    fifo[(p, u.name)] = min(math.ceil((s - first[p]) / ii) + 1, n_items)
        sinks = [u for u in self.units if not any(u.name in v.inputs for v in self.units)]
        end = max(
            first[u.name] + (0 if u.blocking else (n_items - 1) * ii) for u in sinks
        ) if sinks else 0  # fmt: skip
        return {"start": start, "first_out": first, "fifo": fifo, "ii": ii, "cycles": end}

    def _cost_items(self, n_items: Any) -> Cost:
        if isinstance(n_items, np.integer):
            n_items = int(n_items)
        if not (isinstance(n_items, int) and n_items >= 1):
            raise ValueError(
                f"workload: a StreamingDataflow is costed on a stream length (positive int), "
                f"got {type(n_items).__name__} {n_items!r}"
            )
        n = n_items
        sch = self.schedule(n)
        by = {u.name: u for u in self.units}
        depth = sum(sch["fifo"].values())
        words = sum(d * by[p].width for (p, _v), d in sch["fifo"].items())
        fifo_bits = ste_ceil(jnp.asarray(float(words))) * self.word_bits
        cycles = jnp.asarray(float(sch["cycles"]))
        lat = cycles / (self.freq * 1e9)
        items = {u.name: (1 if u.blocking else n) for u in self.units}
        e_units = sum(n * u.e_item_pj for u in self.units)
        # every item crossing an edge is written to and read from that edge's FIFO
        moved = sum(items[p] * by[p].width for (p, _v) in sch["fifo"])
        e_fifo = moved * self.word_bits * self.fifo_pj_per_bit
        area = (sum(u.area_um2 for u in self.units) + fifo_bits * self.fifo_um2_per_bit) * 1e-6
        bd = {"cycles": cycles, "fifo_entries": jnp.asarray(float(depth)),
              "fifo_bits": fifo_bits, "ii": jnp.asarray(float(sch["ii"])),
              "energy_units_j": jnp.asarray(e_units) * 1e-12,
              "energy_fifo_j": e_fifo * 1e-12}  # fmt: skip
        return Cost(lat, (e_units + e_fifo) * 1e-12, area, bd)


def fifo_depths(sd: StreamingDataflow, n_items: int) -> dict[tuple[str, str], int]:
    """FIFO depth (items) per edge ``(producer, consumer)``."""
    return dict(sd.schedule(n_items)["fifo"])


def attention_pipeline(d: int = 64, variant: str = "deferred", **kw: Any) -> StreamingDataflow:
    """One query row of softmax attention over a stream of keys/values of head dim ``d``.

    ``variant="naive"``: max and sum are blocking reductions (O(n) FIFOs); ``"deferred"``:
    online softmax with deferred normalisation (O(1) FIFOs). Both run at ii = 1.
    """
    if variant not in ("naive", "deferred"):
        raise ValueError(f"variant: expected 'naive' or 'deferred', got {variant!r}")
    if not (isinstance(d, int) and d >= 1):
        raise ValueError(f"d: expected a positive integer, got {d!r}")
    tree = max(1, math.ceil(math.log2(d)))
    mac = 2.0 * d  # pJ-ish: d MACs per item at ~1 pJ each (16-bit), scaled by d
    kv = Unit("kv_in", latency=1, e_item_pj=0.0, area_um2=0.0, width=2 * d)
    score = Unit("score", latency=tree + 1, e_item_pj=mac, area_um2=2000.0 * d, inputs=("kv_in",))
    if variant == "naive":
        units = (
            kv,
            score,
            Unit("max", latency=1, e_item_pj=0.1, area_um2=200.0, blocking=True,
                 inputs=("score",)),
            Unit("exp", latency=4, e_item_pj=2.0, area_um2=3000.0, inputs=("score", "max")),
            Unit("sum", latency=1, e_item_pj=0.4, area_um2=1000.0, blocking=True,
                 inputs=("exp",)),
            Unit("normalise", latency=8, e_item_pj=1.5, area_um2=4000.0, inputs=("exp", "sum")),
            Unit("pv", latency=tree + 1, e_item_pj=mac, area_um2=2000.0 * d, blocking=True,
                 inputs=("normalise", "kv_in")),
        )  # fmt: skip
    else:
        units = (
            kv,
            score,
            Unit("online_softmax", latency=6, e_item_pj=3.0, area_um2=5000.0,
                 inputs=("score",)),
            Unit("pv_rescaled", latency=tree + 2, e_item_pj=mac + 0.5 * d,
                 area_um2=2500.0 * d, inputs=("online_softmax", "kv_in")),
            Unit("normalise", latency=8, e_item_pj=1.5 / 1.0, area_um2=4000.0, blocking=True,
                 inputs=("pv_rescaled",)),
        )  # fmt: skip
    return StreamingDataflow(units=units, **kw)
