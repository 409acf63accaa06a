"""The training loop: ``jaxcore.train``.

An optax loop over a Flax NNX model and a generated task (anything with
``batch(batch_size, *, step, seed, split) -> dict`` and ``seq_len(split)``, e.g.
:mod:`jaxcore.models.tasks`):

* any optax optimiser (by name or as a ``GradientTransformation``), global-norm clipping and a
  learning-rate schedule (:func:`make_optimizer`);
* one ``jax.jit``-compiled step; data parallel over every device with ``jax.sharding``
  (batch sharded along a ``"data"`` mesh axis with ``NamedSharding``, parameters replicated; XLA
  inserts the gradient all-reduce), no ``pmap``;
* periodic evaluation on the task's ``"test"`` and ``"ood"`` (length-generalisation) splits;
* a tqdm progress bar with loss, accuracy and throughput; metrics as JSON lines;
* orbax checkpoints: a run killed at any point and started again with the same ``out_dir``
  resumes from the last checkpoint and ends with bit-identical parameters and metrics (batches
  are a pure function of ``(seed, split, step)``);
* matplotlib plots of the curves (:func:`plot_metrics`).

This is a core module: it imports no model. The CLI hook (:func:`register_cli`) imports
:mod:`jaxcore.models` lazily inside the subcommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcore import devices

SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train` (all keyword-only, all JSON-serialisable).

    ``optimizer`` names an optax optimiser factory (``"adamw"``, ``"adam"``, ``"sgd"``,
    ``"lion"``, ...); ``schedule`` is one of :data:`SCHEDULES`; ``clip_norm=None`` turns
    clipping off; ``checkpoint_every=0`` saves only at the end (when ``out_dir`` is set).
    """

    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "warmup_cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    eval_every: int = 0
    eval_batches: int = 2
    eval_splits: tuple[str, ...] = ("test", "ood")
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str | None = None
    resume: bool = True
    data_parallel: bool = True
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        if not (isinstance(self.learning_rate, int | float) and self.learning_rate > 0):
            raise ValueError(
                f"learning_rate: expected a positive number, got {self.learning_rate!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(
                f"clip_norm: expected None or a positive number, got {self.clip_norm!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        _optimizer_factory(self.optimizer)


def _optimizer_factory(name: str) -> Callable[..., optax.GradientTransformation]:
    fn = getattr(optax, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if fn is None or not callable(fn) or "learning_rate" not in _params(fn):
        raise ValueError(
            f"optimizer: expected the name of an optax optimiser taking a learning_rate "
            f"(e.g. 'adamw', 'adam', 'sgd', 'lion'), got {name!r}"
        )
    return fn


def _params(fn: Callable) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule of ``config`` (a function of the step)."""
    lr, n, w = float(config.learning_rate), config.steps, min(config.warmup_steps, config.steps)
    if config.schedule == "constant":
        return optax.constant_schedule(lr) if w == 0 else optax.linear_schedule(0.0, lr, w)
    if config.schedule == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, max(w, 1)),
                optax.linear_schedule(lr, 0.0, max(n - w, 1)),
            ],
            [max(w, 1)],
        )
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(n, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, w, max(n, w + 1), end_value=0.1 * lr)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if set) then ``config.optimizer`` with the schedule."""
    factory = _optimizer_factory(config.optimizer)
    kw: dict[str, Any] = {"learning_rate": make_schedule(config)}
    if config.weight_decay and "weight_decay" in _params(factory):
        kw["weight_decay"] = config.weight_decay
    elif config.weight_decay:
        raise ValueError(f"weight_decay: optimizer {config.optimizer!r} takes no weight decay")
    parts = [factory(**kw)]
    if config.clip_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(config.clip_norm))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
def masked_metrics(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Loss and accuracies of ``logits`` (B, T, V) against a task batch.

    Returns ``(loss, metrics)``: ``loss`` is the mean cross-entropy (nats) over ``loss_mask``;
    ``token_accuracy`` is over ``answer_mask``; ``accuracy`` is the fraction of sequences whose
    answer tokens are all right.
    """
    logits = logits.astype(jnp.float32)
    targets = batch["targets"]
    lmask = batch["loss_mask"].astype(jnp.float32)
    amask = batch["answer_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = jnp.sum(ce * lmask) / jnp.maximum(jnp.sum(lmask), 1.0)
    right = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    tok_acc = jnp.sum(right * amask) / jnp.maximum(jnp.sum(amask), 1.0)
    has = jnp.sum(amask, -1) > 0
    seq_ok = jnp.all((right > 0) | (amask == 0), axis=-1) & has
    seq_acc = jnp.sum(seq_ok.astype(jnp.float32)) / jnp.maximum(
        jnp.sum(has.astype(jnp.float32)), 1.0
    )
    return loss, {"loss": loss, "accuracy": seq_acc, "token_accuracy": tok_acc}


def default_loss(model: nnx.Module, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """``masked_metrics(model(batch["inputs"]), batch)``."""
    return masked_metrics(model(batch["inputs"]), batch)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (updated in place too) and the metrics."""

    model: nnx.Module
    history: list[dict]
    final: dict[str, dict]
    out_dir: str | None
    resumed_from: int | None


class _Placement:
    """Where arrays go: a 1-axis ``"data"`` mesh over all devices, or the first device."""

    def __init__(self, data_parallel: bool, batch_size: int):
        n = jax.device_count()
        self.parallel = data_parallel and n > 1
        if self.parallel:
            if batch_size % n:
                raise ValueError(
                    f"batch_size: expected a multiple of the {n} devices for data parallel "
                    f"training, got {batch_size} (or set data_parallel=False)"
                )
            self.mesh = devices.make_mesh(None, ("data",))
            self.replicated = NamedSharding(self.mesh, P())
            self.batch = NamedSharding(self.mesh, P("data"))
        else:
            d = jax.devices()[0]
            self.replicated = self.batch = jax.sharding.SingleDeviceSharding(d)

    def put_state(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        return {k: jax.device_put(np.asarray(v), self.batch) for k, v in batch.items()}


class _SyncedStep:
    """A jitted step that, in a multi-process run, is compiled ahead of time for each new input
    signature and then waits at a :func:`jaxcore.distributed.barrier` before its first run: gloo
    builds its communicator at the first collective and fails if the processes arrive more than
    30 s apart (one process compiling slower on a loaded machine is enough)."""

    def __init__(self, fn: Any, name: str):
        self.fn, self.name = fn, name
        self.compiled: dict[Any, Any] = {}

    def __call__(self, *args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        exe = self.compiled.get(key)
        if exe is None:
            from jaxcore import distributed

            exe = self.compiled[key] = self.fn.lower(*args).compile()
            distributed.barrier(f"{self.name}:{len(self.compiled)}")
        return exe(*args)


def train(
    model: nnx.Module,
    task: Any,
    config: TrainConfig | None = None,
    *,
    optimizer: optax.GradientTransformation | None = None,
    wrt: Any = nnx.Param,
    loss_fn: Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict]] = default_loss,
    callback: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``task`` for ``config.steps`` steps; returns a :class:`TrainResult`.

    ``wrt`` filters the trained variables (an NNX filter; the rest are carried, unchanged).
    ``optimizer`` overrides the one built from ``config`` (the checkpointed optimizer state must
    then come from the same transformation). ``callback(step, metrics)`` is called after each
    logged step with plain floats. With ``config.out_dir`` set, metrics go to
    ``out_dir/metrics.jsonl``, checkpoints to ``out_dir/checkpoints`` and plots to
    ``out_dir/curves.png``; an existing checkpoint there is resumed (``config.resume``).
    """
    config = config or TrainConfig()
    tx = optimizer if optimizer is not None else make_optimizer(config)
    schedule = make_schedule(config)
    place = _Placement(config.data_parallel, config.batch_size)
    if jax.process_count() > 1:
        # device_put to a multi-process sharding runs a collective (a cross-process equality
        # check): meet first, so gloo's 30 s set-up window is not spent waiting for a late rank.
        from jaxcore import distributed

        distributed.barrier("train:start")

    graphdef, params, rest = nnx.split(model, wrt, ...)
    params, rest = place.put_state(params), place.put_state(rest)
    opt_state = place.put_state(tx.init(params))
    start = 0
    history: list[dict] = []

    out = Path(config.out_dir) if config.out_dir else None
    # Multi-process runs: every process checkpoints (orbax coordinates), process 0 alone writes
    # metrics, config, plots and shows progress.
    primary = jax.process_index() == 0
    log_dir = out if primary else None
    manager = None
    resumed_from = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        manager = _checkpoint_manager(out / "checkpoints", config.keep_checkpoints)
        latest = manager.latest_step() if config.resume else None
        if latest is not None:
            params, opt_state, rest = _restore(manager, latest, (params, opt_state, rest), place)
            start = resumed_from = int(latest)
        history = _read_history(out / "metrics.jsonl", upto=start, final=config.steps)
        if primary:
            _write_history(out / "metrics.jsonl", history)
            meta = {"config": dataclasses.asdict(config), "task": _describe(task)}
            (out / "config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

    def loss_of(p, r, batch):
        m = nnx.merge(graphdef, p, r)
        return loss_fn(m, batch)

    @jax.jit
    def train_step(p, o, r, batch):
        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(p, r, batch)
        updates, o = tx.update(grads, o, p)
        p = optax.apply_updates(p, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return p, o, metrics

    @jax.jit
    def eval_step(p, r, batch):
        return loss_of(p, r, batch)[1]

    if jax.process_count() > 1:
        train_step = _SyncedStep(train_step, "train_step")
        eval_step = _SyncedStep(eval_step, "eval_step")

    def evaluate(p, r, step: int) -> dict[str, dict]:
        res = {}
        for split in config.eval_splits:
            acc: dict[str, float] = {}
            for i in range(config.eval_batches):
                b = place.put_batch(
                    task.batch(config.batch_size, step=i, seed=config.seed, split=split)
                )
                for k, v in eval_step(p, r, b).items():
                    acc[k] = acc.get(k, 0.0) + float(v) / config.eval_batches
            res[split] = acc
            rec = {"step": step, "split": split, **acc}
            history.append(rec)
            _append(log_dir, rec)
        return res

    bar = _progress(config, start) if primary else None
    t_last, tokens = time.perf_counter(), 0
    final: dict[str, dict] = {}
    try:
        for step in range(start, config.steps):
            batch = place.put_batch(task.batch(config.batch_size, step=step, seed=config.seed))
            params, opt_state, metrics = train_step(params, opt_state, rest, batch)
            tokens += int(np.prod(batch["inputs"].shape))
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                vals = {k: float(v) for k, v in metrics.items()}
                now = time.perf_counter()
                vals["tokens_per_s"] = tokens / max(now - t_last, 1e-9)
                vals["lr"] = float(schedule(step))
                t_last, tokens = now, 0
                if not all(math.isfinite(vals[k]) for k in ("loss", "grad_norm")):
                    raise FloatingPointError(
                        f"training diverged at step {done}: loss={vals['loss']}, "
                        f"grad_norm={vals['grad_norm']} (lower learning_rate or set clip_norm)"
                    )
                rec = {"step": done, "split": "train", **vals}
                history.append(rec)
                _append(log_dir, rec)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{vals['loss']:.4f}",
                        acc=f"{vals['accuracy']:.3f}",
                        tok_s=f"{vals['tokens_per_s']:.3g}",
                    )
                if callback is not None:
                    callback(done, vals)
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                evaluate(params, rest, done)
            if (
                manager is not None
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
            ):
                _save(manager, done, (params, opt_state, rest))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
            bar = None
        if config.eval_splits:
            final = evaluate(params, rest, config.steps)
        if manager is not None and manager.latest_step() != config.steps:
            _save(manager, config.steps, (params, opt_state, rest))
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()

    nnx.update(model, params, rest)
    if log_dir is not None and config.plot:
        plot_metrics(out / "metrics.jsonl", out / "curves.png")
    return TrainResult(model, history, final, str(out) if out else None, resumed_from)


def _describe(task: Any) -> Any:
    d = getattr(task, "describe", None)
    return d() if callable(d) else repr(task)


def _progress(config: TrainConfig, start: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _append(out: Path | None, rec: dict) -> None:
    if out is not None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def _read_history(path: Path, upto: int, final: int) -> list[dict]:
    """Records of a previous run up to step ``upto`` (later ones, and the final evaluation at
    step ``final``, are redone after a resume)."""
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if rec.get("step", 0) <= upto and not (
            rec.get("step") == final and rec.get("split") != "train"
        ):
            recs.append(rec)
    return recs


def _write_history(path: Path, recs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


# ---------------------------------------------------------------------------------------------
# Checkpoints: the (params, opt_state, rest) pytree is saved as a flat dict of its leaves, and
# restored into the structure of the live state (the model and optimizer are rebuilt the same way).


def _checkpoint_manager(path: Path, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        path.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )


def _save(manager, step: int, tree: Any) -> None:
    import orbax.checkpoint as ocp

    leaves = jax.tree.leaves(tree)
    manager.save(step, args=ocp.args.StandardSave({f"{i:05d}": x for i, x in enumerate(leaves)}))


def _restore(manager, step: int, like: Any, place: _Placement) -> Any:
    import orbax.checkpoint as ocp

    leaves, treedef = jax.tree.flatten(like)
    abstract = {
        f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=place.replicated)
        for i, x in enumerate(leaves)
    }
    got = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    if len(got) != len(leaves):
        raise ValueError(
            f"checkpoint at step {step}: expected {len(leaves)} arrays, got {len(got)} "
            "(was it written by a different model or optimizer?)"
        )
    return jax.tree.unflatten(treedef, [got[f"{i:05d}"] for i in range(len(leaves))])


# ---------------------------------------------------------------------------------------------
def plot_metrics(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Loss and accuracy curves (train and every eval split) from a metrics JSONL file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for split in dict.fromkeys(r["split"] for r in recs):
        rs = [r for r in recs if r["split"] == split]
        steps = [r["step"] for r in rs]
        style = "-" if split == "train" else "o--"
        axes[0].plot(steps, [r["loss"] for r in rs], style, label=split)
        axes[1].plot(steps, [r["accuracy"] for r in rs], style, label=split)
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", yscale="log")
    axes[1].set(xlabel="step", ylabel="sequence accuracy", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------
# CLI: ``jaxcore train --model mamba --task s5 --steps 2000 ...``


def _usage_error(msg: str) -> Exception:
    from jaxcore.cli import UsageError

    return UsageError(msg)


class _OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    s = subparsers.add_parser(
        "train",
        help="train a model on a generated task",
        description="Train a jaxcore model on a generated task (metrics, checkpoints, plots).",
    )
    s.__class__ = _OneLineParser
    s.add_argument("--model", default="transformer", help="model name (see jaxcore.models.MODELS)")
    s.add_argument("--task", default="parity", help="task name (see jaxcore.models.tasks.TASKS)")
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--optimizer", default="adamw", help="an optax optimiser name")
    s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    s.add_argument("--schedule", default="warmup_cosine", help="|".join(SCHEDULES))
    s.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--clip", type=float, default=1.0, help="global-norm clip; 0 disables")
    s.add_argument("--eval-every", type=int, default=0)
    s.add_argument("--log-every", type=int, default=10)
    s.add_argument("--checkpoint-every", type=int, default=0)
    s.add_argument("--out", default="runs/train", help="output directory")
    s.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    s.add_argument("--single-device", action="store_true", help="no data parallelism")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--cot", action="store_true", help="chain-of-thought traces")
    s.add_argument("--min-len", type=int, default=None)
    s.add_argument("--max-len", type=int, default=None)
    s.add_argument("--ood-max-len", type=int, default=None)
    s.add_argument("--d-model", type=int, default=64)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--remat", default="none", help="none|full|selective")
    s.add_argument("--weight-format", default=None, help="low-precision weight format name")
    s.add_argument("--act-format", default=None, help="low-precision activation format name")
    g = s.add_argument_group(
        "multi-process (data parallel over processes; see docs/distributed.md)"
    )
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=None, help="total number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's rank")
    g.add_argument("--local-device-count", type=int, default=None, help="CPU devices per process")
    s.set_defaults(func=_cmd_train)
    return s


def _cmd_train(args: argparse.Namespace) -> int:
    import jaxcore.models as models
    from jaxcore.models import tasks

    if args.model not in models.MODELS:
        raise _usage_error(f"--model: expected one of {tuple(models.MODELS)}, got {args.model!r}")
    if args.task not in tasks.TASKS:
        raise _usage_error(f"--task: expected one of {tuple(tasks.TASKS)}, got {args.task!r}")
    task_kw = {"cot": args.cot}
    for flag, key in (
        ("min_len", "min_len"),
        ("max_len", "max_len"),
        ("ood_max_len", "ood_max_len"),
    ):
        if getattr(args, flag) is not None:
            task_kw[key] = getattr(args, flag)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # one probe per process: the ranks of a multi-process run share --out
        probe = out / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise _usage_error(f"--out: cannot write to {str(out)!r}: {e.strerror or e}") from None

    # Join the multi-process group only after the checks that need no device, so a usage error
    # exits at once instead of leaving the other ranks waiting at the first barrier.
    multi = (args.coordinator, args.num_processes, args.process_id, args.local_device_count)
    if any(v is not None for v in multi) or os.environ.get("JAXCORE_COORDINATOR"):
        from jaxcore import distributed

        try:  # before anything touches a device
            distributed.initialize(
                args.coordinator,
                args.num_processes,
                args.process_id,
                local_device_count=args.local_device_count,
            )
        except (ValueError, RuntimeError) as e:
            raise _usage_error(str(e)) from None
        try:
            return _train_joined(args, out, task_kw)
        except BaseException as e:  # the other ranks stop at their next barrier, not at a timeout
            distributed.abort(f"{type(e).__name__}: {e}")
            raise
    return _train_joined(args, out, task_kw)


def _train_joined(args: argparse.Namespace, out: Path, task_kw: dict) -> int:
    """The part of ``jaxcore train`` after joining the process group (if any)."""
    import jaxcore.models as models
    from jaxcore.models import tasks

    try:
        task = tasks.get_task(args.task, **task_kw)
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            optimizer=args.optimizer,
            learning_rate=args.lr,
            schedule=args.schedule,
            warmup_steps=args.warmup,
            weight_decay=args.weight_decay,
            clip_norm=args.clip if args.clip > 0 else None,
            eval_every=args.eval_every,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            out_dir=str(out),
            resume=not args.no_resume,
            data_parallel=not args.single_device,
            progress=not args.no_progress,
        )
        if config.data_parallel and args.batch_size % jax.device_count():
            raise ValueError(
                f"batch_size: expected a multiple of the {jax.device_count()} devices, "
                f"got {args.batch_size} (or pass --single-device)"
            )
        model = models.build_model(
            args.model,
            vocab_size=task.vocab_size,
            d_model=args.d_model,
            num_layers=args.layers,
            num_heads=args.heads,
            remat=args.remat,
            weight_format=args.weight_format,
            act_format=args.act_format,
            seed=args.seed,
        )
    except (ValueError, TypeError) as e:
        raise _usage_error(_flagify(str(e))) from None
    result = train(model, task, config)
    if result.resumed_from is not None:
        print(f"resumed from the checkpoint at step {result.resumed_from}")
    for split, m in result.final.items():
        print(
            f"{split:>6}: loss {m['loss']:.4f}  accuracy {m['accuracy']:.3f}  "
            f"token accuracy {m['token_accuracy']:.3f}"
        )
    print(f"metrics, checkpoints and curves in {out}")
    return 0


def _flagify(msg: str) -> str:
    """Name CLI flags in messages from the library (``batch_size:`` -> ``--batch-size:``)."""
    names = {
        "learning_rate": "lr",
        "warmup_steps": "warmup",
        "clip_norm": "clip",
        "num_layers": "layers",
        "num_heads": "heads",
    }
    head, sep, tail = msg.partition(":")
    if sep and head.isidentifier():
        return f"--{names.get(head, head).replace('_', '-')}:{tail}"
    return msg
