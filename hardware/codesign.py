"""Differentiable hardware/model co-design: ``jaxcore.hardware.codesign``.

One optax loop over three parameter groups at once:

* ``weights``: the model's ``nnx.Param`` s,
* ``bits``: its per-layer weight and activation bit-widths (:class:`jaxcore.models.BitWidth`, a
  continuous relaxation of integer quantization, see :mod:`jaxcore.models.quant`),
* ``hw``: the log of the chosen hardware parameters (e.g. ``pes``, ``lanes``, ``bits_per_cycle``
  of a :class:`~jaxcore.hardware.BitSerial`),

minimising ``task_loss + lam * objective(hw, workload, precision)`` where ``workload`` is
:func:`~jaxcore.hardware.trace` of the model's forward step (a float twin of the model, so each
matmul's weight operand is a named parameter), ``precision`` maps every quantized layer's weight
parameter to its current ``(weight_bits, act_bits)`` (so the bit-widths reach the cost), and
:func:`~jaxcore.hardware.objective` is ``log(EDP)`` (or latency/energy) plus quadratic area and
power penalties. After each update the bits are clipped to the design space's range and the
hardware parameters to their choice range (the documented projection).

Each value of ``lam`` gives one design; after training the design is made discrete: bits rounded
to the nearest choice, each hardware parameter to its floor or ceiling choice (the best feasible
of the ``2**n_hw`` neighbours, by EXACT cost), and its accuracy measured with the rounded
bit-widths (exact integer quantizers): the better of the fine-tuned weights and the pretrained
weights (the latter is also reported alone as ``ptq_accuracy``, the baselines' measure). The
non-dominated (accuracy, EDP) points form the Pareto front. Baselines search the same discrete
design space (hardware choices x per-layer bit choices) with the same number of cost
evaluations: (a) uniform random search (several seeds, the median reported), (b) the largest
full-factorial grid that fits the budget; optionally (c) the exhaustive grid. Baseline designs
are scored with the pretrained weights quantized to the design's bits (post-training
quantization): retraining the model for every sampled design would cost a training run per
evaluation.

The built-in default (``jaxcore codesign``): a causal MLP language model (:data:`LOCAL_MODELS`;
three hidden layers of 256 and a head, 4 quantized layers, 8 bit-widths in 2..8) on 2-3 digit
addition, co-designed with a weight-serial :class:`~jaxcore.hardware.BitSerial` accelerator
(``pes`` x ``lanes`` x ``bits_per_cycle`` x ``sram_kb``, 420 choices) under 1 mm^2 and 1 W: a
design space of 2.4e9 points. Non-matmul ops between layers are costed at the next layer's
activation width (:func:`_op_act_layers`); only the logits stay at float32.

Counting: one cost evaluation = one call of the cost model on one design (a gradient step counts
one; the rounding neighbourhood counts ``2**n_hw`` per ``lam``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "HARDWARE",
    "DesignSpace",
    "DesignPoint",
    "SearchResult",
    "CodesignResult",
    "default_space",
    "codesign",
    "pareto_mask",
    "grid_levels",
    "register_cli",
]

# ----------------------------------------------------------------------------------------------
# hardware models and their discrete design spaces

BIT_CHOICES: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)


def _bitserial():
    from .bitserial import BitSerial

    return BitSerial(sram_kb=128.0)


def _systolic():
    from .systolic import Systolic

    return Systolic(ifmap_sram_kb=64.0, filter_sram_kb=64.0, ofmap_sram_kb=64.0)


def _pim():
    from .pim import PIM

    return PIM()


# name -> (factory of the base model, {field: choices}, area budget mm^2, power budget W)
HARDWARE: dict[str, tuple[Callable[[], Any], dict[str, tuple[float, ...]], float, float]] = {
    "bitserial": (
        _bitserial,
        {
            "pes": (16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0),
            "lanes": (4.0, 8.0, 16.0, 32.0),
            "bits_per_cycle": (1.0, 2.0, 4.0),
            "sram_kb": (16.0, 32.0, 64.0, 128.0, 256.0),
        },
        1.0,
        1.0,
    ),
    "systolic": (
        _systolic,
        {
            "rows": (4.0, 8.0, 16.0, 32.0, 64.0, 128.0),
            "cols": (4.0, 8.0, 16.0, 32.0, 64.0, 128.0),
            "dram_bw": (8.0, 16.0, 32.0, 64.0),
            "ifmap_sram_kb": (16.0, 32.0, 64.0, 128.0, 256.0),
        },
        1.0,
        10.0,
    ),
    "pim": (
        _pim,
        {
            "channels": (4.0, 8.0, 16.0, 32.0),
            "banks_per_channel": (4.0, 8.0, 16.0),
            "macs_per_bank": (4.0, 8.0, 16.0, 32.0),
        },
        4.0,
        10.0,
    ),
}


@dataclasses.dataclass(frozen=True)
class DesignSpace:
    """The discrete design space: hardware choices x per-layer (weight, act) bit choices.

    ``hw``: ``((field, (choice, ...)), ...)`` sorted ascending; ``bits``: bit-width choices;
    ``layers``: the quantized layers (each has a weight and an activation bit-width);
    ``tied``: one bit-width per layer for both its weights and its activations (a reduced space,
    e.g. for the exhaustive check).
    """

    hw: tuple[tuple[str, tuple[float, ...]], ...]
    bits: tuple[float, ...]
    layers: tuple[str, ...]
    tied: bool = False

    def __post_init__(self) -> None:
        for name, ch in self.hw:
            if not ch or any(c <= 0 for c in ch) or list(ch) != sorted(ch):
                raise ValueError(f"hw[{name!r}]: expected ascending positive choices, got {ch}")
        if not self.bits or list(self.bits) != sorted(self.bits) or self.bits[0] < 2:
            raise ValueError(f"bits: expected ascending choices >= 2, got {self.bits}")

    @property
    def dims(self) -> list[int]:
        """Number of choices per dimension: hardware fields, then (layer, weight/act) bits."""
        per_layer = 1 if self.tied else 2
        return [len(c) for _, c in self.hw] + [len(self.bits)] * (per_layer * len(self.layers))

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def hw_fields(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.hw)

    def decode(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer indices (..., n_dims) -> hardware values (..., n_hw), bits (..., L, 2)."""
        idx = np.asarray(idx)
        nh = len(self.hw)
        hw = np.stack([np.asarray(c)[idx[..., i]] for i, (_, c) in enumerate(self.hw)], -1)
        b = np.asarray(self.bits)[idx[..., nh:]]
        if self.tied:
            return hw, np.stack([b, b], -1)
        return hw, b.reshape(*b.shape[:-1], len(self.layers), 2)


def default_space(
    hardware: str,
    layers: Sequence[str],
    bits: Sequence[float] = BIT_CHOICES,
    *,
    tied: bool = False,
) -> DesignSpace:
    """The built-in design space of ``hardware`` for a model with quantized ``layers``."""
    if hardware not in HARDWARE:
        raise ValueError(f"hardware: expected one of {tuple(HARDWARE)}, got {hardware!r}")
    return DesignSpace(
        tuple(HARDWARE[hardware][1].items()),
        tuple(float(b) for b in bits),
        tuple(layers),
        bool(tied),
    )


# ----------------------------------------------------------------------------------------------
# the co-design model built here: a causal MLP language model (several quantized layers)

#: models this module builds itself (besides ``jaxcore.models.MODEL_NAMES``)
LOCAL_MODELS: tuple[str, ...] = ("mlp",)


def _causal_mlp_class():
    from flax import nnx
    from jaxcore.models import QDense

    class CausalMLP(nnx.Module):
        """A causal MLP language model (Bengio et al. 2003 style, over the whole prefix).

        Tokens (B, T) -> embeddings (B, T, E); position t reads the concatenation of the
        embeddings of positions <= t (zeros after t), shape (B, T, T*E); then ``num_layers``
        hidden :class:`~jaxcore.models.QDense` layers of width ``d_hidden`` with ReLU and a
        QDense head -> logits (B, T, vocab). Every matmul is a quantized layer with its own
        weight and activation bit-widths.
        """

        def __init__(self, vocab_size, seq_len, *, d_model, d_hidden, num_layers, quant, rngs):
            self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
            widths = (seq_len * d_model, *([d_hidden] * num_layers), vocab_size)
            self.layers = nnx.List(
                [QDense(a, b, quant=quant, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
            )
            # biases here, added with explicit ranks (QDense's bias add relies on rank promotion)
            self.biases = nnx.List(
                [nnx.Param(jnp.zeros((1, 1, b), jnp.float32)) for b in widths[1:]]
            )

        def __call__(self, tokens):
            bsz, t = tokens.shape
            e = self.embed(tokens)
            mask = jnp.tril(jnp.ones((t, t), e.dtype))
            x = (mask[None, :, :, None] * e[:, None, :, :]).reshape(bsz, t, -1)
            for i, (layer, b) in enumerate(zip(self.layers, self.biases)):
                x = layer(x) + b[...]
                if i + 1 < len(self.layers):
                    x = jax.nn.relu(x)
            return x

    return CausalMLP


def _build(name: str, vocab: int, seq_len: int, *, seed: int, learn_bits: bool, init_bits: float,
           d_model: int, d_hidden: int, num_layers: int, num_heads: int) -> Any:  # fmt: skip
    from flax import nnx
    from jaxcore.models import QuantConfig, build_model

    if name == "mlp":
        quant = QuantConfig(learn_bits=True, init_bits=init_bits) if learn_bits else None
        return _causal_mlp_class()(
            vocab,
            seq_len,
            d_model=d_model,
            d_hidden=d_hidden,
            num_layers=num_layers,
            quant=quant,
            rngs=nnx.Rngs(seed),
        )
    kw = dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads)
    if learn_bits:
        kw.update(learn_bits=True, init_bits=init_bits)
    return build_model(name, vocab, seed=seed, **kw)


# ----------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class DesignPoint:
    """One discrete design and its exact cost; ``edp`` in J*s, ``bits`` {layer: (w, a)}."""

    method: str
    accuracy: float
    latency_s: float
    energy_j: float
    area_mm2: float
    power_w: float
    feasible: bool
    hw: dict[str, float]
    bits: dict[str, tuple[float, float]]
    lam: float | None = None
    # gradient designs: accuracy of the pretrained weights at these bits (PTQ, as the baselines
    # are scored); ``accuracy`` is the better of that and the fine-tuned weights'
    ptq_accuracy: float | None = None

    @property
    def edp(self) -> float:
        return self.latency_s * self.energy_j

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["edp"] = self.edp
        d["bits"] = {k: list(v) for k, v in self.bits.items()}
        return d


@dataclasses.dataclass
class SearchResult:
    """A baseline search: its evaluations, all (accuracy, EDP, feasible) samples, its best."""

    method: str
    evals: int
    accuracy: np.ndarray
    edp: np.ndarray
    feasible: np.ndarray
    best: DesignPoint | None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "evals": self.evals,
            "best": None if self.best is None else self.best.to_json(),
            "n_feasible": int(self.feasible.sum()),
            "n_accuracy_scored": int(np.isfinite(self.accuracy).sum()),
        }


@dataclasses.dataclass
class CodesignResult:
    """What :func:`codesign` returns.

    ``points``: one :class:`DesignPoint` per lambda (discrete, exact cost, measured accuracy);
    ``pareto``: indices of the non-dominated points; ``best``: the gradient search's lowest-EDP
    feasible point at ``accuracy_target``; ``random``/``grid``/``exhaustive``: baselines;
    ``history``: per lambda, per logged step, the relaxed training metrics; ``evals``: the
    gradient search's cost evaluations (the baselines' budget).
    """

    config: dict[str, Any]
    space: DesignSpace
    points: list[DesignPoint]
    pareto: list[int]
    best: DesignPoint | None
    accuracy_target: float
    base_accuracy: float
    evals: int
    random: SearchResult | None
    grid: SearchResult | None
    exhaustive: SearchResult | None
    history: dict[float, list[dict[str, float]]]
    seconds: float
    random_runs: list[SearchResult] = dataclasses.field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        """Best EDP of each baseline divided by the gradient search's (> 1: gradient wins)."""
        out: dict[str, float | None] = {}
        for name in ("random", "grid", "exhaustive"):
            r = getattr(self, name)
            ok = r is not None and r.best is not None and self.best is not None
            out[name] = (r.best.edp / self.best.edp) if ok else None
        return out

    def table(self) -> str:
        """The Pareto/design table as text."""
        hdr = (
            f"{'method':<10}{'lambda':>8}{'acc':>7}{'latency':>11}{'energy':>11}"
            f"{'EDP':>11}{'area':>8}{'power':>8} {'pareto':<7}hw / bits (w,a per layer)"
        )
        lines = [hdr]

        def row(p: DesignPoint, par: str) -> str:
            lam = "" if p.lam is None else f"{p.lam:g}"
            hw = " ".join(f"{k}={v:g}" for k, v in p.hw.items())
            bits = " ".join(f"{int(w)}/{int(a)}" for w, a in p.bits.values())
            feas = "" if p.feasible else " INFEASIBLE"
            return (
                f"{p.method:<10}{lam:>8}{p.accuracy:>7.3f}{p.latency_s:>11.3e}"
                f"{p.energy_j:>11.3e}{p.edp:>11.3e}{p.area_mm2:>8.3f}{p.power_w:>8.3f} "
                f"{par:<7}{hw} | {bits}{feas}"
            )

        for i, p in enumerate(self.points):
            lines.append(row(p, "*" if i in self.pareto else ""))
        for r in (self.random, self.grid, self.exhaustive):
            if r is not None and r.best is not None:
                lines.append(row(r.best, ""))
        lines.append(
            f"accuracy target {self.accuracy_target:.3f} (base model "
            f"{self.base_accuracy:.3f}); cost evaluations per method: {self.evals}"
        )
        best = "none" if self.best is None else f"{self.best.edp:.4g} J*s"
        if self.best is not None and self.best.ptq_accuracy is not None:
            best += f" (acc {self.best.accuracy:.3f}; PTQ of the pretrained weights "
            best += f"{self.best.ptq_accuracy:.3f})"
        rs = ", ".join(f"{k} {v:.3g}x" for k, v in self.ratios().items() if v is not None)
        lines.append(f"gradient search best EDP at target: {best}; baseline/gradient EDP: {rs}")
        runs = [r.best.edp for r in self.random_runs if r.best is not None]
        if len(self.random_runs) > 1:
            lines.append(
                f"random search over {len(self.random_runs)} seeds: best EDP median "
                f"{self.random.best.edp if self.random and self.random.best else math.nan:.4g}, "
                f"min {min(runs, default=math.nan):.4g}, max {max(runs, default=math.nan):.4g} "
                f"J*s ({len(self.random_runs) - len(runs)} reached no design at the target)"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "design_space": {
                "hw": {k: list(v) for k, v in self.space.hw},
                "bits": list(self.space.bits),
                "layers": list(self.space.layers),
                "size": self.space.size,
            },
            "accuracy_target": self.accuracy_target,
            "base_accuracy": self.base_accuracy,
            "cost_evaluations": self.evals,
            "points": [p.to_json() for p in self.points],
            "pareto": self.pareto,
            "best": None if self.best is None else self.best.to_json(),
            "baselines": {
                n: (None if r is None else r.to_json())
                for n, r in (
                    ("random", self.random),
                    ("grid", self.grid),
                    ("exhaustive", self.exhaustive),
                )
            },
            "edp_ratio_baseline_over_gradient": self.ratios(),
            "random_runs_best_edp": [r.best.edp if r.best else None for r in self.random_runs],
            "history": {str(k): v for k, v in self.history.items()},
            "seconds": self.seconds,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``result.json``, ``summary.md``, ``pareto.png`` and ``curves.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        md = [
            "# jaxcore co-design report",
            "",
            "```",
            json.dumps(self.config, indent=1),
            "```",
            "",
            "## Designs (discrete, exact cost; `*` = Pareto-optimal)",
            "",
            "```",
            self.table(),
            "```",
            "",
            "Baselines search the same discrete space with the same number of cost evaluations; "
            "their accuracy is that of the pretrained weights quantized to the design's bits.",
            "",
            "![Pareto front](pareto.png)",
            "",
            "![Training curves](curves.png)",
            "",
        ]
        (out / "summary.md").write_text("\n".join(md))
        self._plot(out)
        return out

    def _plot(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r, c in ((self.random, "tab:gray"), (self.grid, "tab:green")):
            if r is not None and len(r.edp):
                m = r.feasible & np.isfinite(r.accuracy)
                ax.scatter(
                    r.edp[m],
                    r.accuracy[m],
                    s=6,
                    c=c,
                    alpha=0.35,
                    label=f"{r.method} ({r.evals} evals, {int(m.sum())} scored)",
                )
        xs = np.array([p.edp for p in self.points])
        ys = np.array([p.accuracy for p in self.points])
        ax.scatter(xs, ys, c="tab:red", marker="o", zorder=3, label="gradient co-design")
        if self.pareto:
            o = sorted(self.pareto, key=lambda i: xs[i])
            ax.plot(xs[o], ys[o], "r-", zorder=3)
        for k, p in enumerate(self.points):  # labels staggered: designs often coincide
            ax.annotate(
                f"λ={p.lam:g}",
                (p.edp, p.accuracy),
                fontsize=7,
                xytext=(4, -12 + 9 * (k % 4)),
                textcoords="offset points",
            )
        for r, mk in ((self.random, "s"), (self.grid, "^"), (self.exhaustive, "*")):
            if r is not None and r.best is not None:
                ax.scatter(
                    [r.best.edp],
                    [r.best.accuracy],
                    marker=mk,
                    s=90,
                    edgecolor="k",
                    zorder=4,
                    label=f"best {r.method}",
                )
        ax.axhline(self.accuracy_target, ls="--", c="k", lw=0.8, label="accuracy target")
        ax.set_xscale("log")
        ax.set_xlabel("EDP (J·s, exact cost of the discrete design)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)

        fig, axs = plt.subplots(1, 3, figsize=(12, 3.5))
        for lam, hist in self.history.items():
            if not hist:
                continue
            st = [h["step"] for h in hist]
            axs[0].plot(st, [h["task_loss"] for h in hist], label=f"λ={lam:g}")
            axs[1].plot(st, [h["log_edp"] for h in hist])
            axs[2].plot(st, [h["mean_bits"] for h in hist])
        for a, t in zip(axs, ("task loss (nats)", "log EDP (relaxed)", "mean bit-width")):
            a.set_title(t)
            a.set_xlabel("step")
        axs[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# helpers


def pareto_mask(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated points (maximise ``accuracy``, minimise ``cost``)."""
    a, c = np.asarray(accuracy, float), np.asarray(cost, float)
    keep = np.ones(len(a), bool)
    for i in range(len(a)):
        dom = (a >= a[i]) & (c <= c[i]) & ((a > a[i]) | (c < c[i]))
        keep[i] = not dom.any()
    return keep


def grid_levels(dims: Sequence[int], budget: int) -> list[list[int]]:
    """Per dimension the choice indices of the largest full-factorial grid with <= ``budget``
    points: levels are added one at a time to the dimension with the fewest levels (ties: the
    earliest), evenly spaced over its choices (one level = the middle choice)."""
    if budget < 1:
        raise ValueError(f"budget: expected a positive integer, got {budget}")
    lv = [1] * len(dims)
    while True:
        cand = [i for i in range(len(dims)) if lv[i] < dims[i]]
        if not cand:
            break
        i = min(cand, key=lambda j: (lv[j], j))
        if math.prod(lv) // lv[i] * (lv[i] + 1) > budget:
            break
        lv[i] += 1
    out = []
    for n, k in zip(dims, lv):
        out.append(
            [n // 2] if k == 1 else sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})
        )
    return out


def _layer_params(model: Any, wl: Any) -> dict[str, list[str]]:
    """Quantized layer path -> the traced parameter names of its matmul weights."""
    from jaxcore.models.quant import bit_widths

    used = set()
    for o in wl.ops:
        if o.kind == "matmul":
            used.update(o.lhs_params)
            used.update(o.rhs_params)
    out: dict[str, list[str]] = {}
    for layer in bit_widths(model):
        prefix = "arg0/" + layer.replace(".", "/") + "/"
        out[layer] = sorted(n for n in used if n.startswith(prefix))
        if not out[layer]:
            raise ValueError(f"layer {layer!r}: no traced matmul reads its weights")
    return out


def _op_act_layers(wl: Any, layer_params: Mapping[str, list[str]]) -> dict[int, int]:
    """Non-matmul op index -> the quantized layer whose activation width it runs at.

    The activations between two quantized layers are stored at the next layer's activation
    bit-width (what it quantizes them to), so the elementwise, reduction and data-movement ops
    that produce them (bias, ReLU, the causal concatenation, ...) are costed at that width: an op
    maps to the first weight matmul after it in program order. Ops after the last one (the
    logits) keep their traced width.
    """
    owner = {n: li for li, names in enumerate(layer_params.values()) for n in names}
    mm_layer = {}
    for i, o in enumerate(wl.ops):
        if o.kind == "matmul":
            hit = [owner[n] for n in (*o.rhs_params, *o.lhs_params) if n in owner]
            if hit:
                mm_layer[i] = hit[0]
    out: dict[int, int] = {}
    nxt = None
    for i in range(len(wl.ops) - 1, -1, -1):
        if i in mm_layer:
            nxt = mm_layer[i]
        elif wl.ops[i].kind != "matmul" and nxt is not None:
            out[i] = nxt
    return out


def _precision(
    layer_params: Mapping[str, list[str]], bits: Any, op_layers: Mapping[int, int] | None = None
) -> dict[Any, Any]:
    """``bits`` (L, 2) (weight, act per layer) -> a precision mapping for :func:`cost`; with
    ``op_layers`` (:func:`_op_act_layers`) the non-matmul ops run at their layer's act width."""
    prec: dict[Any, Any] = {}
    for i, li in (op_layers or {}).items():
        prec[int(i)] = bits[li, 1]
    for i, names in enumerate(layer_params.values()):
        for n in names:
            prec[n] = (bits[i, 0], bits[i, 1])
    return prec


def _bits_state(state: Any, layers: Sequence[str], bits: Any) -> Any:
    """A copy of the BitWidth ``state`` holding ``bits`` (L, 2) (weight, act per ``layers``)."""
    index = {layer: i for i, layer in enumerate(layers)}

    def put(path: tuple, leaf: Any) -> Any:
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        layer, var = ".".join(str(k) for k in keys[:-1]), keys[-1]
        col = {"weight_bits": 0, "act_bits": 1}[var]
        return jnp.asarray(bits[index[layer], col], jnp.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(put, state)


def _leaf_key(path: tuple) -> tuple[str, int]:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    return ".".join(str(k) for k in keys[:-1]), {"weight_bits": 0, "act_bits": 1}[keys[-1]]


def _tie_state(state: Any, layers: Sequence[str]) -> Any:
    """The BitWidth ``state`` with every layer's activation bits set to its weight bits
    (differentiable: the weight bit-width receives both gradients)."""
    index = {layer: i for i, layer in enumerate(layers)}
    w = [None] * len(layers)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        layer, col = _leaf_key(path)
        if col == 0:
            w[index[layer]] = leaf
    return _bits_state(state, layers, jnp.stack([jnp.stack([v, v]) for v in w]))


def _bits_array(model: Any) -> jax.Array:
    from jaxcore.models.quant import bit_widths

    bw = bit_widths(model)
    return jnp.stack([jnp.stack([v["weight"], v["act"]]) for v in bw.values()])


# ----------------------------------------------------------------------------------------------
# the main job


#: per-task defaults of the built-in co-design setting (task lengths)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "addition": {"min_len": 2, "max_len": 3},
    "parity": {"min_len": 2, "max_len": 8},
}


def codesign(
    model: str = "mlp",
    task: str = "addition",
    hardware: str = "bitserial",
    *,
    lambdas: Sequence[float] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1),
    refine: int = 0,
    polish: int = 5,
    steps: int = 200,
    pretrain_steps: int = 1500,
    batch_size: int = 32,
    eval_size: int = 512,
    d_model: int = 16,
    d_hidden: int = 256,
    num_layers: int = 3,
    num_heads: int = 2,
    task_kwargs: Mapping[str, Any] | None = None,
    metric: str = "edp",
    area_budget_mm2: float | None = None,
    power_budget_w: float | None = None,
    penalty: float = 10.0,
    accuracy_target: float | None = None,
    target_fraction: float = 0.95,
    lr: float | None = None,
    bits_lr: float = 0.1,
    hw_lr: float = 0.1,
    baselines: bool = True,
    random_repeats: int = 5,
    exhaustive: bool | None = False,
    exhaustive_limit: int = 400_000,
    exhaustive_bit_configs: int = 20_000,
    bit_choices: Sequence[float] = BIT_CHOICES,
    tied_bits: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 25,
) -> CodesignResult:
    """Co-design ``model`` (trained on ``task``), its per-layer bit-widths and ``hardware``.

    Args:
      model, task, hardware: names (``"mlp"`` (:data:`LOCAL_MODELS`, the default: a causal MLP
        LM with ``num_layers`` hidden layers of width ``d_hidden`` over ``d_model``-wide
        embeddings) or ``jaxcore.models.MODEL_NAMES``; ``tasks.TASKS``; :data:`HARDWARE`).
        Models are built with ``d_model``/``num_layers``/``num_heads`` and learnable
        bit-widths; the task with ``task_kwargs`` (default :data:`TASK_DEFAULTS`, else lengths
        2..8).
      lambdas: cost weights; one co-design run (``steps`` optax steps) per value, each starting
        from the model pretrained for ``pretrain_steps`` at the largest bit choice.
      refine: extra co-design runs after the sweep, each at the geometric mean of the largest
        ``lam`` whose design reaches the accuracy target and the next larger ``lam`` run (the
        best design at the target sits between them; beyond the ends: x2 or /2). They count in
        the cost-evaluation budget like every other run.
      polish: rounds of discrete local search from the gradient search's best design at the
        target (:func:`_polish`: every +-1 move of one dimension and every +1/-1 pair of two
        bit-widths, the cheapest feasible move that keeps the accuracy target taken, until none
        improves, at most ``polish`` rounds); its cost evaluations count in the budget. 0 turns
        it off.
      metric: "edp" | "latency" | "energy" (the cost term is ``log(metric)``).
      area_budget_mm2, power_budget_w: constraints (quadratic penalties with weight ``penalty``
        in training; a discrete design violating them is infeasible). Defaults per hardware.
      accuracy_target: accuracy a design must reach to count; default ``target_fraction`` x the
        pretrained model's accuracy.
      lr, bits_lr, hw_lr: Adam learning rates of weights (None: 2e-3 for the MLP, 1e-2 for the
        other models), bit-widths, log hardware parameters.
      baselines: run random and grid search with the same number of cost evaluations.
      random_repeats: independent random searches (seeds ``[seed, i]``); ``random`` is the one
        with the median best EDP, all are in ``random_runs``.
      exhaustive: also search the full grid (None: when its size <= ``exhaustive_limit``); it
        is skipped when it has more than ``exhaustive_bit_configs`` bit-width configurations
        (one accuracy evaluation each).
      bit_choices: the discrete bit-widths of the design space (default 2..8); the model
        starts (and is pretrained) at the largest.
      tied_bits: one bit-width per layer for its weights and activations (a smaller space).
      log: progress printer (None for silence).
    Returns a :class:`CodesignResult`.
    """
    from flax import nnx
    from jaxcore.models import MODEL_NAMES, tasks

    from jaxcore.train import masked_metrics

    from .objective import objective as hw_objective
    from .trace import trace

    t0 = time.perf_counter()
    say0 = log or (lambda s: None)

    def say(msg: str) -> None:
        say0(f"[{time.perf_counter() - t0:6.1f}s] {msg}")

    # ---------------- argument checks (before any work) ----------------
    names = (*LOCAL_MODELS, *MODEL_NAMES)
    if model not in names:
        raise ValueError(f"model: expected one of {names}, got {model!r}")
    if hardware not in HARDWARE:
        raise ValueError(f"hardware: expected one of {tuple(HARDWARE)}, got {hardware!r}")
    lambdas = [float(v) for v in lambdas]
    if not lambdas or any(not (v >= 0 and math.isfinite(v)) for v in lambdas):
        raise ValueError(f"lambdas: expected one or more finite values >= 0, got {lambdas}")
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine: expected an int >= 0, got {refine!r}")
    if not isinstance(polish, int) or isinstance(polish, bool) or polish < 0:
        raise ValueError(f"polish: expected an int >= 0, got {polish!r}")
    for name, v in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("eval_size", eval_size),
        ("d_model", d_model),
        ("d_hidden", d_hidden),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("log_every", log_every),
        ("exhaustive_bit_configs", exhaustive_bit_configs),
    ):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    bc = [float(b) for b in bit_choices]
    if not bc or bc != sorted(set(bc)) or bc[0] < 2 or bc[-1] > 16:
        raise ValueError(f"bit_choices: expected ascending distinct values in [2, 16], got {bc}")
    if not isinstance(random_repeats, (int, np.integer)) or random_repeats < 1:
        raise ValueError(f"random_repeats: expected a positive integer, got {random_repeats!r}")
    if not isinstance(pretrain_steps, (int, np.integer)) or pretrain_steps < 0:
        raise ValueError(f"pretrain_steps: expected an integer >= 0, got {pretrain_steps!r}")
    if lr is None:
        lr = 2e-3 if model == "mlp" else 1e-2
    for name, v in (("lr", lr), ("bits_lr", bits_lr), ("hw_lr", hw_lr), ("penalty", penalty)):
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name}: expected a finite value >= 0, got {v}")
    if accuracy_target is not None and not 0.0 <= accuracy_target <= 1.0:
        raise ValueError(f"accuracy_target: expected a value in [0, 1], got {accuracy_target}")
    if not 0.0 < target_fraction <= 1.0:
        raise ValueError(f"target_fraction: expected a value in (0, 1], got {target_fraction}")
    factory, choices, def_area, def_power = HARDWARE[hardware]
    area_budget = def_area if area_budget_mm2 is None else float(area_budget_mm2)
    power_budget = def_power if power_budget_w is None else float(power_budget_w)
    if not (area_budget > 0 and power_budget > 0):
        raise ValueError(
            f"area_budget_mm2/power_budget_w: expected positive numbers, got "
            f"{area_budget}/{power_budget}"
        )
    if task_kwargs is not None:
        tkw = dict(task_kwargs)
    else:
        tkw = dict(TASK_DEFAULTS.get(task, {"min_len": 2, "max_len": 8}))
    the_task = tasks.get_task(task, **tkw)
    T = the_task.seq_len("train")
    mkw = dict(d_model=d_model, d_hidden=d_hidden, num_layers=num_layers, num_heads=num_heads)
    hi = float(max(bit_choices))
    net = _build(model, the_task.vocab_size, T, seed=seed, learn_bits=True, init_bits=hi, **mkw)
    # float twin, for tracing (each matmul's weight operand is a named parameter)
    twin = _build(model, the_task.vocab_size, T, seed=seed, learn_bits=False, init_bits=hi, **mkw)
    base_hw = factory()

    # ---------------- trace the model step; map layers to traced weights ----------------
    from jaxcore.models import pure

    fn, tstate = pure(twin)
    wl = trace(fn, tstate, jax.ShapeDtypeStruct((batch_size, T), jnp.int32), warn=False)
    if wl.unknown:
        say(f"warning: {len(wl.unknown)} op(s) not costed: {[u.name for u in wl.unknown]}")
    layer_params = _layer_params(net, wl)
    op_layers = _op_act_layers(wl, layer_params)
    space = default_space(hardware, tuple(layer_params), bit_choices, tied=tied_bits)
    fields = space.hw_fields
    lo_b, hi_b = space.bits[0], space.bits[-1]
    say(
        f"codesign: {model} on {task} (seq {T}), {hardware}; traced step: {len(wl.ops)} ops, "
        f"{wl.flops:.3g} FLOP; {len(space.layers)} quantized layers; design space "
        f"{space.size:.3g} points"
    )

    obj_kw = dict(
        metric=metric, area_budget_mm2=area_budget, power_budget_w=power_budget, penalty=penalty
    )

    def make_hw(values: Any) -> Any:
        return dataclasses.replace(base_hw, **{f: values[i] for i, f in enumerate(fields)})

    def exact_cost(hw_vals: jax.Array, bits: jax.Array) -> dict[str, jax.Array]:
        from .cost import cost

        c = cost(make_hw(hw_vals), wl, precision=_precision(layer_params, bits, op_layers))
        return {
            "latency_s": c.latency_s,
            "energy_j": c.energy_j,
            "area_mm2": c.area_mm2,
            "power_w": c.power_w,
        }

    exact_batch = jax.jit(jax.vmap(exact_cost))
    chunk = 4096

    def cost_many(hw_vals: np.ndarray, bits: np.ndarray) -> dict[str, np.ndarray]:
        n = len(hw_vals)
        outs: list[dict[str, np.ndarray]] = []
        for s in range(0, n, chunk):
            h, b = hw_vals[s : s + chunk], bits[s : s + chunk]
            pad = chunk - len(h) if n > chunk else 0
            if pad:
                h = np.concatenate([h, np.repeat(h[-1:], pad, 0)])
                b = np.concatenate([b, np.repeat(b[-1:], pad, 0)])
            r = exact_batch(jnp.asarray(h, jnp.float32), jnp.asarray(b, jnp.float32))
            outs.append({k: np.asarray(v)[: len(v) - pad] for k, v in r.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def feasible(c: Mapping[str, np.ndarray]) -> np.ndarray:
        ok = np.isfinite(c["latency_s"]) & np.isfinite(c["energy_j"])
        return ok & (c["area_mm2"] <= area_budget) & (c["power_w"] <= power_budget)

    # ---------------- model functions ----------------
    graphdef, params, bits_state, rest = nnx.split(net, nnx.Param, _bitwidth_type(), ...)
    ev = {
        k: jnp.asarray(v)
        for k, v in the_task.batch(eval_size, step=0, seed=seed + 1, split="test").items()
    }

    def merged(p, b, r):
        return nnx.merge(graphdef, p, b, r)

    def acc_at(p, r, bits):
        m = merged(p, _bits_state(bits_state, space.layers, bits), r)
        return masked_metrics(m(ev["inputs"]), ev)[1]["accuracy"]

    acc_one = jax.jit(acc_at)
    acc_many_j = jax.jit(lambda p, r, bb: jax.lax.map(lambda x: acc_at(p, r, x), bb))

    def acc_many(p, r, bits: np.ndarray) -> np.ndarray:
        """Accuracy for many (L, 2) bit configs (unique ones computed once)."""
        flat = bits.reshape(len(bits), -1)
        uniq, inv = np.unique(flat, axis=0, return_inverse=True)
        vals = []
        n = _ACC_CHUNK
        for s in range(0, len(uniq), n):
            u = uniq[s : s + n]
            pad = n - len(u)
            u = np.concatenate([u, np.repeat(u[-1:], pad, 0)]) if pad else u
            a = acc_many_j(p, r, jnp.asarray(u.reshape(n, -1, 2), jnp.float32))
            vals.append(np.asarray(a)[: n - pad])
        return np.concatenate(vals)[np.ravel(inv)]

    def tie(b):
        return _tie_state(b, space.layers) if space.tied else b

    def loss_fn(groups, r, batch, lam):
        m = merged(groups["weights"], tie(groups["bits"]), r)
        task_loss, met = masked_metrics(m(batch["inputs"]), batch)
        bits = _bits_array(m)
        hw = make_hw([jnp.exp(groups["hw"][f]) for f in fields])
        c = hw_objective(hw, wl, _precision(layer_params, bits, op_layers), **obj_kw)
        aux = {
            "task_loss": task_loss,
            "accuracy": met["accuracy"],
            "log_edp": c,
            "mean_bits": jnp.mean(bits),
        }
        return task_loss + lam * c, aux

    tx = optax.multi_transform(
        {
            "weights": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr)),
            "bits": optax.adam(bits_lr),
            "hw": optax.adam(hw_lr),
        },
        {"weights": "weights", "bits": "bits", "hw": "hw"},
    )
    log_lo = {f: math.log(c[0]) for f, c in space.hw}
    log_hi = {f: math.log(c[-1]) for f, c in space.hw}

    def project(groups):
        b = jax.tree.map(lambda x: jnp.clip(x, lo_b, hi_b), groups["bits"])
        h = {f: jnp.clip(v, log_lo[f], log_hi[f]) for f, v in groups["hw"].items()}
        return {"weights": groups["weights"], "bits": b, "hw": h}

    @jax.jit
    def step_fn(groups, opt, r, batch, lam, train_hw_bits):
        (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(groups, r, batch, lam)
        # pretraining (train_hw_bits=0) moves the weights only
        g = {
            "weights": g["weights"],
            "bits": jax.tree.map(lambda x: x * train_hw_bits, g["bits"]),
            "hw": jax.tree.map(lambda x: x * train_hw_bits, g["hw"]),
        }
        upd, opt = tx.update(g, opt, groups)
        return project(optax.apply_updates(groups, upd)), opt, aux

    def batch_at(i: int) -> dict[str, jax.Array]:
        return {k: jnp.asarray(v) for k, v in the_task.batch(batch_size, step=i, seed=seed).items()}

    theta0 = {f: jnp.asarray(math.log(c[len(c) // 2]), jnp.float32) for f, c in space.hw}
    groups0 = {"weights": params, "bits": bits_state, "hw": theta0}

    # ---------------- pretraining (weights only, 8-bit) ----------------
    groups, opt = groups0, tx.init(groups0)
    for i in range(pretrain_steps):
        groups, opt, aux = step_fn(groups, opt, rest, batch_at(i), 0.0, 0.0)
        if (i + 1) % max(log_every * 4, 1) == 0 or i + 1 == pretrain_steps:
            say(
                f"pretrain step {i + 1}/{pretrain_steps}: loss {float(aux['task_loss']):.4f} "
                f"acc {float(aux['accuracy']):.3f}"
            )
    pre = groups
    init_bits = np.full((len(space.layers), 2), hi_b)
    base_acc = float(acc_one(pre["weights"], rest, jnp.asarray(init_bits, jnp.float32)))
    target = accuracy_target if accuracy_target is not None else target_fraction * base_acc
    say(f"pretrained accuracy {base_acc:.3f} at {hi_b:g} bits; accuracy target {target:.3f}")

    # ---------------- gradient co-design, one run per lambda ----------------
    nh = len(fields)
    corners = np.array(list(itertools.product((0, 1), repeat=nh)), np.int64)
    hw_ch = [np.asarray(c) for _, c in space.hw]
    points: list[DesignPoint] = []
    history: dict[float, list[dict[str, float]]] = {}
    evals = 0

    tuned: dict[float, Any] = {}  # fine-tuned weights of each lambda's run

    def run_lambda(lam: float) -> None:
        nonlocal evals
        groups, opt = pre, tx.init(pre)
        hist = []
        for i in range(steps):
            groups, opt, aux = step_fn(groups, opt, rest, batch_at(pretrain_steps + i), lam, 1.0)
            evals += 1
            # aux holds the metrics of the parameters BEFORE update i (step 0 = the start)
            if i % log_every == 0 or i + 1 == steps:
                rec = {"step": i, **{k: float(v) for k, v in aux.items()}}
                hist.append(rec)
                say(
                    f"λ={lam:g} step {i}/{steps}: loss {rec['task_loss']:.4f} acc "
                    f"{rec['accuracy']:.3f} log-cost {rec['log_edp']:.3f} mean bits "
                    f"{rec['mean_bits']:.2f}"
                )
        history[lam] = hist
        tuned[lam] = groups["weights"]
        # discretise: bits to nearest choice, hw to the best feasible floor/ceil neighbour
        m = merged(groups["weights"], tie(groups["bits"]), rest)
        bits_c = np.asarray(_bits_array(m))
        bch = np.asarray(space.bits)
        bits_r = bch[np.abs(bits_c[..., None] - bch).argmin(-1)]
        hw_c = np.array([math.exp(float(groups["hw"][f])) for f in fields])
        lo_i = [
            int(np.clip(np.searchsorted(ch, v, side="right") - 1, 0, len(ch) - 1))
            for ch, v in zip(hw_ch, hw_c)
        ]
        cand = np.stack(
            [
                [hw_ch[d][min(lo_i[d] + corners[j, d], len(hw_ch[d]) - 1)] for d in range(nh)]
                for j in range(len(corners))
            ]
        )
        cres = cost_many(cand, np.repeat(bits_r[None], len(cand), 0))
        evals += len(cand)
        feas = feasible(cres)
        edp = cres["latency_s"] * cres["energy_j"]
        j = (
            int(np.argmin(np.where(feas, edp, np.inf)))
            if feas.any()
            else int(np.argmin(cres["area_mm2"] / area_budget + cres["power_w"] / power_budget))
        )
        acc_ft = float(acc_one(groups["weights"], rest, jnp.asarray(bits_r, jnp.float32)))
        ptq = float(acc_one(pre["weights"], rest, jnp.asarray(bits_r, jnp.float32)))
        # the search holds both weight sets: the design's accuracy is the better of the two
        acc = max(acc_ft, ptq)
        p = _point(
            "gradient",
            acc,
            {k: v[j] for k, v in cres.items()},
            bool(feas[j]),
            fields,
            cand[j],
            space.layers,
            bits_r,
            lam,
        )
        p.ptq_accuracy = ptq
        points.append(p)
        say(
            f"λ={lam:g} design: acc {acc:.3f} (fine-tuned {acc_ft:.3f}, PTQ {ptq:.3f}) "
            f"EDP {p.edp:.3e} J*s "
            f"area {p.area_mm2:.3f} "
            f"power {p.power_w:.3f} {'' if p.feasible else '(infeasible) '}"
            f"hw {p.hw} bits {bits_r.reshape(-1).astype(int).tolist()}"
        )

    for lam in lambdas:
        run_lambda(lam)
    for _ in range(refine):
        lam = _refine_lambda(points, target)
        if lam is None:
            break
        say(f"refining λ between the sweep's designs around the accuracy target: λ={lam:.4g}")
        run_lambda(lam)
    start = [p for p in points if p.feasible and p.accuracy >= target]
    if polish and start:
        p0 = min(start, key=lambda p: p.edp)
        w_ft = tuned[p0.lam]

        def acc_fn(bits: np.ndarray) -> np.ndarray:  # as the gradient designs: the better of both
            return np.maximum(acc_many(w_ft, rest, bits), acc_many(pre["weights"], rest, bits))

        idx0 = _point_index(space, p0)
        idx, n_eval, row = _polish(space, idx0, acc_fn, cost_many, feasible, target, polish)
        evals += n_eval
        if row is not None:
            hw_v, bits_v = space.decode(idx[None])
            acc_ft = float(acc_one(w_ft, rest, jnp.asarray(bits_v[0], jnp.float32)))
            ptq = float(acc_one(pre["weights"], rest, jnp.asarray(bits_v[0], jnp.float32)))
            q = _point(
                "gradient",
                max(acc_ft, ptq),
                row,
                True,  # polish moves only to feasible designs
                fields,
                hw_v[0],
                space.layers,
                bits_v[0],
                p0.lam,
            )
            q.ptq_accuracy = ptq
            points.append(q)
            say(
                f"polish ({n_eval} evals) from λ={p0.lam:g}: EDP {p0.edp:.3e} -> {q.edp:.3e} "
                f"J*s, acc {q.accuracy:.3f}, hw {q.hw} bits "
                f"{bits_v[0].reshape(-1).astype(int).tolist()}"
            )
        else:
            say(f"polish ({n_eval} evals): no cheaper neighbour keeps the accuracy target")

    pts_acc = np.array([p.accuracy for p in points])
    pts_edp = np.array([p.edp if p.feasible else np.inf for p in points])
    pareto = [i for i in np.flatnonzero(pareto_mask(pts_acc, pts_edp)) if points[i].feasible]
    ok = [p for p in points if p.feasible and p.accuracy >= target]
    best = min(ok, key=lambda p: p.edp) if ok else None

    # ---------------- baselines at the same budget ----------------
    rnd = grd = exh = None
    random_runs: list[SearchResult] = []
    if baselines:
        dims = space.dims
        for rep in range(random_repeats):
            rng = np.random.default_rng([seed, rep])
            idx = np.stack([rng.integers(0, d, evals) for d in dims], -1)
            random_runs.append(
                _search("random", space, idx, pre, rest, cost_many, acc_many, feasible, target)
            )
            say(
                f"random search #{rep} ({evals} evals): best EDP at target "
                f"{_fmt(random_runs[-1].best)}"
            )
        # the run with the median best EDP represents random search
        ranked = sorted(random_runs, key=lambda r: r.best.edp if r.best else math.inf)
        rnd = ranked[(len(ranked) - 1) // 2]
        lv = grid_levels(dims, evals)
        gidx = np.array(list(itertools.product(*lv)), np.int64)
        grd = _search("grid", space, gidx, pre, rest, cost_many, acc_many, feasible, target)
        say(
            f"grid search ({len(gidx)} evals, levels {[len(x) for x in lv]}): best EDP at "
            f"target {_fmt(grd.best)}"
        )
        do_ex = exhaustive if exhaustive is not None else space.size <= exhaustive_limit
        n_bit_cfg = math.prod(dims[len(fields) :])
        if do_ex and n_bit_cfg > exhaustive_bit_configs:
            say(f"exhaustive grid skipped: {n_bit_cfg} bit-width configurations to evaluate")
        elif do_ex:
            exh = _exhaustive(space, pre, rest, cost_many, acc_many, feasible, target)
            say(f"exhaustive grid ({exh.evals} evals): best EDP at target {_fmt(exh.best)}")

    cfg = dict(
        model=model,
        task=task,
        task_kwargs=tkw,
        hardware=hardware,
        lambdas=[p.lam for p in points],
        refine=refine,
        polish=polish,
        steps=steps,
        pretrain_steps=pretrain_steps,
        batch_size=batch_size,
        eval_size=eval_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        metric=metric,
        area_budget_mm2=area_budget,
        power_budget_w=power_budget,
        penalty=penalty,
        lr=lr,
        bits_lr=bits_lr,
        hw_lr=hw_lr,
        seed=seed,
        traced_ops=len(wl.ops),
        traced_flops=wl.flops,
    )
    return CodesignResult(
        cfg,
        space,
        points,
        [int(i) for i in pareto],
        best,
        float(target),
        base_acc,
        evals,
        rnd,
        grd,
        exh,
        history,
        time.perf_counter() - t0,
        random_runs,
    )


def _point_index(space: DesignSpace, p: DesignPoint) -> np.ndarray:
    """The design-space index vector (hardware choices, then bit choices) of a design point."""
    hw = [int(np.argmin(np.abs(np.asarray(ch) - p.hw[f]))) for f, ch in space.hw]
    bch = np.asarray(space.bits)
    bits = []
    for layer in space.layers:
        w, a = p.bits[layer]
        bits.append(int(np.argmin(np.abs(bch - w))))
        if not space.tied:
            bits.append(int(np.argmin(np.abs(bch - a))))
    return np.asarray(hw + bits, np.int64)


def _neighbours(space: DesignSpace, idx: np.ndarray) -> np.ndarray:
    """+-1 on each dimension, and +1 on one bit dimension with -1 on another (moving precision
    between layers), within range; unique, without ``idx`` itself."""
    dims = np.asarray(space.dims)
    nh = len(space.hw)
    moves = []
    for d in range(len(dims)):
        for s in (-1, 1):
            m = np.zeros(len(dims), np.int64)
            m[d] = s
            moves.append(m)
    for i in range(nh, len(dims)):
        for j in range(nh, len(dims)):
            if i != j:
                m = np.zeros(len(dims), np.int64)
                m[i], m[j] = 1, -1
                moves.append(m)
    cand = idx[None] + np.stack(moves)
    ok = np.all((cand >= 0) & (cand < dims), axis=1)
    return np.unique(cand[ok], axis=0)


def _first_at_target(
    order: np.ndarray, score: Callable[[np.ndarray], np.ndarray], target: float
) -> int | None:
    """The first of ``order`` (designs in increasing EDP) whose accuracy reaches ``target``.

    ``score(indices)`` returns their accuracies; it is called a batch of ``_ACC_CHUNK`` at a
    time and never for the designs after the answer (they cannot have a lower EDP), so the result
    equals scoring all of them at a fraction of the accuracy evaluations."""
    for s in range(0, len(order), _ACC_CHUNK):
        sel = order[s : s + _ACC_CHUNK]
        ok = sel[score(sel) >= target]
        if len(ok):
            return int(ok[0])
    return None


def _polish(
    space, idx, acc_fn, cost_many, feasible, target, rounds
) -> tuple[np.ndarray, int, dict[str, float] | None]:
    """Greedy local search in the discrete space from ``idx`` (a design at the target).

    Each round costs every neighbour (:func:`_neighbours`) exactly, then moves to the cheapest
    feasible one below the current EDP that reaches ``target`` (:func:`_first_at_target` with
    ``acc_fn``); it stops when none does or after ``rounds`` rounds. Returns (final index
    vector, cost evaluations used, the final design's cost or None when it did not move)."""
    hw, bits = space.decode(idx[None])
    c = cost_many(hw, bits)
    cur_edp = float(c["latency_s"][0] * c["energy_j"][0])
    evals, row = 1, None
    for _ in range(rounds):
        cand = _neighbours(space, idx)
        hw, bits = space.decode(cand)
        c = cost_many(hw, bits)
        evals += len(cand)
        edp = c["latency_s"] * c["energy_j"]
        sel = np.flatnonzero(feasible(c) & (edp < cur_edp))
        sel = sel[np.argsort(edp[sel], kind="stable")]
        j = _first_at_target(sel, lambda b, bits=bits: acc_fn(bits[b]), target)
        if j is None:
            break
        idx, cur_edp, row = cand[j], float(edp[j]), {k: v[j] for k, v in c.items()}
    return idx, evals, row


def _refine_lambda(points: Sequence[DesignPoint], target: float) -> float | None:
    """The next ``lam`` to try: the geometric mean of the largest ``lam`` whose design is
    feasible and reaches ``target`` and the smallest larger ``lam`` already run (x2 past the
    largest; /2 below the smallest positive one when no design reaches the target). None when
    the bracket has collapsed (ratio < 1.05) or no positive ``lam`` was run."""
    lams = sorted({float(p.lam) for p in points if p.lam is not None and p.lam > 0})
    if not lams:
        return None
    good = [
        float(p.lam)
        for p in points
        if p.lam is not None and p.lam > 0 and p.feasible and p.accuracy >= target
    ]
    if not good:
        return lams[0] / 2
    lo = max(good)
    above = [v for v in lams if v > lo]
    if not above:
        return lo * 2
    hi = above[0]
    if hi / lo < 1.05:
        return None
    return math.sqrt(lo * hi)


def _bitwidth_type():
    from jaxcore.models.quant import BitWidth

    return BitWidth


_ACC_CHUNK = 32  # bit configurations per batched accuracy evaluation


def _fmt(p: DesignPoint | None) -> str:
    return "none reached the target" if p is None else f"{p.edp:.3e} J*s (acc {p.accuracy:.3f})"


def _point(method, acc, c, feas, fields, hw_vals, layers, bits, lam=None) -> DesignPoint:
    return DesignPoint(
        method=method,
        accuracy=float(acc),
        latency_s=float(c["latency_s"]),
        energy_j=float(c["energy_j"]),
        area_mm2=float(c["area_mm2"]),
        power_w=float(c["power_w"]),
        feasible=bool(feas),
        hw={f: float(v) for f, v in zip(fields, hw_vals)},
        bits={layer: (float(bits[i, 0]), float(bits[i, 1])) for i, layer in enumerate(layers)},
        lam=lam,
    )


def _grid_point(method, acc, c, j, space, hw, bits) -> DesignPoint:
    """Design ``j`` of a batch of feasible discrete designs (costs ``c``, ``hw``, ``bits``)."""
    row = {k: v[j] for k, v in c.items()}
    return _point(method, acc, row, True, space.hw_fields, hw[j], space.layers, bits[j])


def _search(method, space, idx, pre, rest, cost_many, acc_many, feasible, target) -> SearchResult:
    """Best feasible design at the accuracy target among the designs ``idx``.

    Every design is costed; accuracies are then computed in increasing-EDP order among the
    feasible designs, a batch at a time, until one reaches the target: the answer is the same
    as scoring them all (designs after it cannot have a lower EDP), at a fraction of the
    accuracy evaluations. Unscored designs have accuracy NaN.
    """
    hw, bits = space.decode(idx)
    c = cost_many(hw, bits)
    feas = feasible(c)
    edp = c["latency_s"] * c["energy_j"]
    acc = np.full(len(idx), np.nan)
    order = np.flatnonzero(feas)[np.argsort(edp[feas], kind="stable")]

    def score(sel: np.ndarray) -> np.ndarray:
        acc[sel] = acc_many(pre["weights"], rest, bits[sel])
        return acc[sel]

    j = _first_at_target(order, score, target)
    best = None
    if j is not None:
        best = _grid_point(method, acc[j], c, j, space, hw, bits)
    return SearchResult(method, len(idx), acc, edp, feas, best)


def _exhaustive(space, pre, rest, cost_many, acc_many, feasible, target) -> SearchResult:
    """Every design: accuracy per bit config once, then every hardware choice costed for each
    bit config that reaches the target (in large batches); the cheapest feasible one wins."""
    nh = len(space.hw)
    bdims = space.dims[nh:]
    bidx = np.array(list(itertools.product(*[range(d) for d in bdims])), np.int64)
    _, bits_all = space.decode(np.concatenate([np.zeros((len(bidx), nh), np.int64), bidx], 1))
    acc = acc_many(pre["weights"], rest, bits_all)
    hidx = np.array(list(itertools.product(*[range(d) for d in space.dims[:nh]])), np.int64)
    hw_all = np.stack([np.asarray(c)[hidx[:, i]] for i, (_, c) in enumerate(space.hw)], -1)
    evals = len(bidx) * len(hidx)
    good = np.flatnonzero(acc >= target)
    best_edp, best = np.inf, None
    per = max(1, 32768 // len(hw_all))  # bit configs per batch
    for s in range(0, len(good), per):
        g = good[s : s + per]
        hw = np.tile(hw_all, (len(g), 1))
        bits = np.repeat(bits_all[g], len(hw_all), 0)
        c = cost_many(hw, bits)
        edp = np.where(feasible(c), c["latency_s"] * c["energy_j"], np.inf)
        j = int(np.argmin(edp))
        if edp[j] < best_edp:
            best_edp = edp[j]
            best = _grid_point("exhaustive", acc[g[j // len(hw_all)]], c, j, space, hw, bits)
    # designs whose accuracy misses the target cannot be best: their costs are not needed for
    # the optimum, but they count as evaluations of the exhaustive grid (it enumerates them).
    return SearchResult(
        "exhaustive", evals, acc, np.full(len(acc), np.nan), np.zeros(len(acc), bool), best
    )


# ----------------------------------------------------------------------------------------------
# CLI: ``jaxcore codesign``


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``codesign`` subcommand to ``subparsers`` (``ArgumentParser.add_subparsers()``)."""
    s = subparsers.add_parser(
        "codesign",
        help="co-design a model, its bit-widths and an accelerator",
        description="Gradient co-design of model weights, per-layer bit-widths and hardware "
        "parameters; lambda sweep -> Pareto front; random and grid search baselines.",
    )
    s.__class__ = _OneLineParser
    s.add_argument(
        "--model", default="mlp", help="mlp (causal MLP LM) or a jaxcore.models.MODEL_NAMES name"
    )
    s.add_argument("--task", default="addition", help="task name (jaxcore.models.tasks.TASKS)")
    s.add_argument("--hardware", default="bitserial", help="|".join(HARDWARE))
    s.add_argument(
        "--lambdas", default="0.005,0.01,0.02,0.03,0.05,0.1", help="comma-separated cost weights"
    )
    s.add_argument(
        "--refine", type=int, default=0, help="extra lambda runs bisecting around the target"
    )
    s.add_argument(
        "--polish", type=int, default=5, help="rounds of local search from the best design"
    )
    s.add_argument("--steps", type=int, default=200, help="co-design steps per lambda")
    s.add_argument(
        "--pretrain-steps", type=int, default=1500, help="pretraining steps at the top bit-width"
    )
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--d-model", type=int, default=16, help="width (MLP: embedding width)")
    s.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
    s.add_argument("--layers", type=int, default=3, help="layers (MLP: hidden layers)")
    s.add_argument("--heads", type=int, default=2)
    s.add_argument("--min-len", type=int, default=None, help="task length (default per task)")
    s.add_argument("--max-len", type=int, default=None, help="task length (default per task)")
    s.add_argument("--bits", default=None, help="comma-separated bit-width choices (2..8)")
    s.add_argument(
        "--tied-bits", action="store_true", help="one bit-width per layer (weights = acts)"
    )
    s.add_argument("--random-repeats", type=int, default=5, help="random search seeds")
    s.add_argument("--metric", default="edp", help="edp|latency|energy")
    s.add_argument("--area-budget", type=float, default=None, help="mm^2")
    s.add_argument("--power-budget", type=float, default=None, help="W")
    s.add_argument("--accuracy-target", type=float, default=None)
    s.add_argument("--exhaustive", action="store_true", help="also search the full grid")
    s.add_argument("--no-baselines", action="store_true")
    s.add_argument("--out", default="runs/codesign", help="report directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=_cmd_codesign)
    return s


def _usage_error(msg: str) -> Exception:
    from jaxcore.cli import UsageError

    return UsageError(msg)


def _check_out(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise _usage_error(f"--out: cannot write to {str(path)!r} ({e.strerror or e})") from None


def _cmd_codesign(args: argparse.Namespace) -> int:
    from jaxcore.models import MODEL_NAMES
    from jaxcore.models.tasks import TASKS

    from .objective import METRICS

    names = (*LOCAL_MODELS, *MODEL_NAMES)
    if args.model not in names:
        raise _usage_error(f"--model: expected one of {names}, got {args.model!r}")
    if args.task not in TASKS:
        raise _usage_error(f"--task: expected one of {tuple(TASKS)}, got {args.task!r}")
    if args.hardware not in HARDWARE:
        raise _usage_error(f"--hardware: expected one of {tuple(HARDWARE)}, got {args.hardware!r}")
    if args.metric not in METRICS:
        raise _usage_error(f"--metric: expected one of {METRICS}, got {args.metric!r}")
    try:
        lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    except ValueError:
        raise _usage_error(
            f"--lambdas: expected comma-separated numbers, got {args.lambdas!r}"
        ) from None
    if not lambdas or any(not (v >= 0 and math.isfinite(v)) for v in lambdas):
        raise _usage_error(f"--lambdas: expected finite values >= 0, got {args.lambdas!r}")
    for flag, v in (
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--d-model", args.d_model),
        ("--hidden", args.hidden),
        ("--layers", args.layers),
        ("--heads", args.heads),
        ("--random-repeats", args.random_repeats),
    ):
        if v < 1:
            raise _usage_error(f"{flag}: expected a positive integer, got {v}")
    if args.refine < 0:
        raise _usage_error(f"--refine: expected an integer >= 0, got {args.refine}")
    if args.polish < 0:
        raise _usage_error(f"--polish: expected an integer >= 0, got {args.polish}")
    tkw = dict(TASK_DEFAULTS.get(args.task, {"min_len": 2, "max_len": 8}))
    if args.min_len is not None:
        tkw["min_len"] = args.min_len
    if args.max_len is not None:
        tkw["max_len"] = args.max_len
    if tkw["min_len"] < 1:
        raise _usage_error(f"--min-len: expected a positive integer, got {tkw['min_len']}")
    if tkw["max_len"] < tkw["min_len"]:
        raise _usage_error(
            f"--max-len: expected >= --min-len={tkw['min_len']}, got {tkw['max_len']}"
        )
    bits = BIT_CHOICES
    if args.bits is not None:
        try:
            bits = tuple(float(v) for v in args.bits.split(",") if v.strip())
        except ValueError:
            raise _usage_error(
                f"--bits: expected comma-separated numbers, got {args.bits!r}"
            ) from None
        if not bits or list(bits) != sorted(set(bits)) or bits[0] < 2 or bits[-1] > 16:
            raise _usage_error(
                f"--bits: expected ascending distinct values in [2, 16], got {args.bits!r}"
            )
    pre = args.pretrain_steps
    if pre < 0:
        raise _usage_error(f"--pretrain-steps: expected an integer >= 0, got {pre}")
    for flag, v in (("--area-budget", args.area_budget), ("--power-budget", args.power_budget)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise _usage_error(f"{flag}: expected a positive number, got {v}")
    if args.accuracy_target is not None and not 0 <= args.accuracy_target <= 1:
        raise _usage_error(
            f"--accuracy-target: expected a value in [0, 1], got {args.accuracy_target}"
        )
    out = Path(args.out)
    _check_out(out)
    try:
        res = codesign(
            args.model,
            args.task,
            args.hardware,
            lambdas=lambdas,
            refine=args.refine,
            polish=args.polish,
            steps=args.steps,
            pretrain_steps=pre,
            batch_size=args.batch_size,
            d_model=args.d_model,
            d_hidden=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            task_kwargs=tkw,
            bit_choices=bits,
            tied_bits=args.tied_bits,
            random_repeats=args.random_repeats,
            metric=args.metric,
            area_budget_mm2=args.area_budget,
            power_budget_w=args.power_budget,
            accuracy_target=args.accuracy_target,
            baselines=not args.no_baselines,
            exhaustive=args.exhaustive,
            seed=args.seed,
            log=None if args.quiet else (lambda s: print(s, flush=True)),
        )
    except ValueError as e:
        raise _usage_error(str(e)) from None
    print(res.table())
    try:
        res.save(out)
    except OSError as e:
        raise _usage_error(f"--out: cannot write the report to {str(out)!r} ({e})") from None
    print(f"report: {out}/summary.md, result.json, pareto.png, curves.png ({res.seconds:.1f} s)")
    return 0
