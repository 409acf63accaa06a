"""Differentiable hardware cost models and co-design (source in ``hardware/``).

``trace(fn, *args)`` turns any JAX function into a :class:`Workload`; ``cost(hw, workload,
precision=...)`` prices it on a hardware model (a pytree of continuous parameters) as a pure,
differentiable JAX function returning :class:`Cost` (latency s, energy J, area mm^2, breakdown).
Models: :class:`Systolic` (SCALE-Sim-exact cycles and SRAM counts, ZigZag-calibrated energy),
:class:`PIM` and :class:`GPU` (PIM-GPT / AiM / HBM-PIM vs a GPU roofline), :class:`BitSerial`
(latency proportional to bits, BitMoD per-group bit-widths) and :class:`StreamingDataflow`
(units + FIFOs). :func:`objective` gives a jit/vmap-able scalar for co-design; the co-design
loop itself is ``jaxcore.hardware.codesign.codesign(...)`` (module :mod:`jaxcore.hardware.codesign`,
CLI ``jaxcore codesign``).
"""

from . import codesign
from .bitserial import BitSerial, bitmod_group_bits, bitserial_plane_cycles
from .codesign import HARDWARE as CODESIGN_HARDWARE
from .codesign import (
    CodesignResult,
    DesignPoint,
    DesignSpace,
    SearchResult,
    default_space,
    grid_levels,
    pareto_mask,
)
from .cost import (
    Cost,
    cost,
    cost_table,
    project,
    resolve_precision,
    soft_max,
    ste_ceil,
    ste_round,
    validate,
)
from .energy import EnergyTable, horowitz_45nm
from .objective import METRICS, batch_designs, evaluate_designs, objective
from .pim import GPU, PIM, compare_pim_gpu
from .streaming import StreamingDataflow, Unit, attention_pipeline, fifo_depths
from .systolic import DATAFLOWS, Systolic, systolic_counts
from .trace import KINDS, Op, UnknownOp, Workload, gemm_workload, trace
from .workloads import GPT2_SIZES, gpt2_decode_step

__all__ = [
    "codesign",
    "CODESIGN_HARDWARE",
    "CodesignResult",
    "DesignPoint",
    "DesignSpace",
    "SearchResult",
    "default_space",
    "grid_levels",
    "pareto_mask",
    "Cost",
    "cost",
    "cost_table",
    "project",
    "validate",
    "resolve_precision",
    "soft_max",
    "ste_ceil",
    "ste_round",
    "BitSerial",
    "bitmod_group_bits",
    "bitserial_plane_cycles",
    "PIM",
    "GPU",
    "compare_pim_gpu",
    "StreamingDataflow",
    "Unit",
    "attention_pipeline",
    "fifo_depths",
    "objective",
    "batch_designs",
    "evaluate_designs",
    "METRICS",
    "EnergyTable",
    "horowitz_45nm",
    "DATAFLOWS",
    "Systolic",
    "systolic_counts",
    "KINDS",
    "Op",
    "UnknownOp",
    "Workload",
    "gemm_workload",
    "trace",
    "gpt2_decode_step",
    "GPT2_SIZES",
]
