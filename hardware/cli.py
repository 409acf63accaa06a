"""``jaxcore cost``: cost a built-in workload on a hardware model and print the per-op table.

Wire it into ``jaxcore/cli.py`` with ``from jaxcore.hardware.cli import register_cli`` and
``register_cli(sub)`` in ``build_parser`` (it adds the ``cost`` subparser).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["register_cli", "WORKLOADS", "MODELS", "run"]


def _mlp(batch: int, d: int):
    import jax
    import jax.numpy as jnp

    def f(p, x):
        return jax.nn.gelu(x @ p["w1"]) @ p["w2"]

    p = {"w1": jax.ShapeDtypeStruct((d, 4 * d), jnp.float32),
         "w2": jax.ShapeDtypeStruct((4 * d, d), jnp.float32)}  # fmt: skip
    return f, (p, jax.ShapeDtypeStruct((batch, d), jnp.float32))


def _attention(batch: int, d: int):
    import jax
    import jax.numpy as jnp

    def f(q, k, v):
        s = jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(jnp.float32(d))
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v)

    t = max(batch, 1)
    spec = jax.ShapeDtypeStruct((1, t, d), jnp.float32)
    return f, (spec, spec, spec)


def _decode(batch: int, d: int):
    from .workloads import gpt2_decode_step

    return gpt2_decode_step(d_model=d, n_layers=2, context=max(batch, 1))


def _gemm(batch: int, d: int):
    import jax
    import jax.numpy as jnp

    return (lambda a, b: a @ b), (
        jax.ShapeDtypeStruct((batch, d), jnp.float32),
        jax.ShapeDtypeStruct((d, d), jnp.float32),
    )


WORKLOADS: dict[str, Callable[[int, int], Any]] = {
    "gemm": _gemm,
    "mlp": _mlp,
    "attention": _attention,
    "decode": _decode,
}
MODELS = ("systolic", "tpu_like", "pim", "hbm_pim", "gpu", "bitserial")


def _model(name: str, args: argparse.Namespace):
    from . import GPU, PIM, BitSerial, Systolic

    if name == "systolic":
        return Systolic(rows=float(args.rows), cols=float(args.cols), dataflow=args.dataflow)
    if name == "tpu_like":
        return Systolic.tpu_like()
    if name == "pim":
        return PIM.pim_gpt()
    if name == "hbm_pim":
        return PIM.hbm_pim()
    if name == "gpu":
        return GPU()
    return BitSerial()


def run(args: argparse.Namespace) -> int:
    """Body of ``jaxcore cost``."""
    from . import cost, cost_table, trace

    if args.batch < 1 or args.dim < 1:
        raise ValueError(f"--batch/--dim: expected positive integers, got {args.batch}/{args.dim}")
    if args.bits is not None and not args.bits > 0:
        raise ValueError(f"--bits: expected a positive bit-width, got {args.bits}")
    fn, fargs = WORKLOADS[args.workload](args.batch, args.dim)
    wl = trace(fn, *fargs, warn=False)
    hw = _model(args.model, args)
    precision = None if args.bits is None else float(args.bits)
    if args.json:
        c = cost(hw, wl, precision=precision)
        print(json.dumps({"workload": args.workload, "model": args.model,
                          "latency_s": float(c.latency_s), "energy_j": float(c.energy_j),
                          "area_mm2": float(c.area_mm2), "ops": len(wl.ops),
                          "unknown": [u.name for u in wl.unknown]}))  # fmt: skip
    else:
        print(f"workload {args.workload} (batch {args.batch}, dim {args.dim}): {len(wl.ops)} ops, "
              f"{wl.flops:.4g} FLOP, {wl.bytes:.4g} B")  # fmt: skip
        print(cost_table(hw, wl, precision=precision, top=args.top))
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``cost`` subcommand to an ``argparse`` subparsers object; returns the parser."""
    s = subparsers.add_parser("cost", help="cost a built-in workload on a hardware model")
    s.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    s.add_argument("--model", choices=MODELS, default="systolic")
    s.add_argument("--batch", type=int, default=8, help="rows (tokens / context for decode)")
    s.add_argument("--dim", type=int, default=256, help="model width")
    s.add_argument("--bits", type=float, default=None, help="operand bit-width for every op")
    s.add_argument("--rows", type=int, default=32)
    s.add_argument("--cols", type=int, default=32)
    s.add_argument("--dataflow", choices=("os", "ws", "is"), default="ws")
    s.add_argument("--top", type=int, default=20, help="ops shown in the table")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_run_checked)
    return s


def _run_checked(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except ValueError as e:  # user error -> the main CLI's one-line error
        try:
            from jaxcore.cli import UsageError
        except ImportError:  # pragma: no cover
            raise
        raise UsageError(str(e)) from e
