"""jaxcore.train: loss goes down, kill-and-resume is exact, 8-device data parallel == 1 device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jaxcore.models import build_model, tasks

from jaxcore import train as T


class TinyLM(nnx.Module):
    """A causal bag-of-prefix model: enough to learn parity of the prefix sum."""

    def __init__(self, vocab: int, d: int = 32, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.mlp1 = nnx.Linear(2 * d, 64, rngs=rngs)
        self.mlp2 = nnx.Linear(64, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        pref = (
            jnp.cumsum(x, axis=1) / jnp.arange(1, tokens.shape[1] + 1, dtype=x.dtype)[None, :, None]
        )
        return self.mlp2(jax.nn.gelu(self.mlp1(jnp.concatenate([x, pref], -1))))


TASK = tasks.Addition(min_len=2, max_len=3)


def _cfg(**kw):
    base = dict(
        steps=12,
        batch_size=8,
        learning_rate=3e-3,
        log_every=2,
        progress=False,
        eval_batches=1,
        plot=False,
    )
    base.update(kw)
    return T.TrainConfig(**base)


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_tiny_run_lowers_loss():
    model = build_model("transformer", TASK.vocab_size, d_model=32, num_layers=1, num_heads=2)
    res = T.train(
        model, TASK, _cfg(steps=40, log_every=1, learning_rate=1e-2, eval_splits=("ood",))
    )
    train = [r["loss"] for r in res.history if r["split"] == "train"]
    assert np.mean(train[-5:]) < 0.8 * train[0], train
    assert set(res.final) == {"ood"}
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in res.final.values())


class Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg(checkpoint_every=4, eval_every=4, plot=True, eval_splits=("ood",))
    ref = T.train(
        TinyLM(TASK.vocab_size, rngs=nnx.Rngs(1)),
        TASK,
        dataclasses_replace(cfg, out_dir=str(tmp_path / "a"), plot=False),
    )

    def kill_at_10(step, _):
        if step == 10:
            raise Killed

    out = str(tmp_path / "b")
    with pytest.raises(Killed):
        T.train(
            TinyLM(TASK.vocab_size, rngs=nnx.Rngs(1)),
            TASK,
            dataclasses_replace(cfg, out_dir=out),
            callback=kill_at_10,
        )
    # A fresh process would rebuild the model from scratch; different init proves the restore.
    res = T.train(
        TinyLM(TASK.vocab_size, rngs=nnx.Rngs(99)), TASK, dataclasses_replace(cfg, out_dir=out)
    )
    assert res.resumed_from == 8
    for a, b in zip(_leaves(ref.model), _leaves(res.model)):
        np.testing.assert_array_equal(a, b)

    def strip(path):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]

    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_data_parallel_8_devices_equals_single_device():
    assert jax.device_count() == 8
    a = T.train(TinyLM(TASK.vocab_size, rngs=nnx.Rngs(2)), TASK, _cfg(steps=5, data_parallel=True))
    b = T.train(TinyLM(TASK.vocab_size, rngs=nnx.Rngs(2)), TASK, _cfg(steps=5, data_parallel=False))
    p = nnx.state(a.model, nnx.Param)
    assert len(jax.tree.leaves(p)[0].sharding.device_set) == 8
    for x, y in zip(_leaves(a.model), _leaves(b.model)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)
    la = [r["loss"] for r in a.history if r["split"] == "train"]
    lb = [r["loss"] for r in b.history if r["split"] == "train"]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_any_optax_optimizer_and_schedules():
    for sched in T.SCHEDULES:
        lr = T.make_schedule(_cfg(steps=10, schedule=sched, warmup_steps=2))
        assert 0 < float(lr(5)) <= 3.0001e-3
    for name in ("sgd", "lion", "adamw", "adafactor"):
        assert isinstance(T.make_optimizer(_cfg(optimizer=name)), optax.GradientTransformation)
    cfg = _cfg(steps=3, optimizer="lion", schedule="cosine", clip_norm=None, eval_splits=())
    T.train(TinyLM(TASK.vocab_size, rngs=nnx.Rngs(0)), TASK, cfg)
    tx = optax.chain(optax.clip(1.0), optax.adafactor(1e-2))
    res = T.train(
        TinyLM(TASK.vocab_size, rngs=nnx.Rngs(0)), TASK, _cfg(steps=3, eval_splits=()), optimizer=tx
    )
    assert res.final == {}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps: expected a positive integer"),
        (dict(optimizer="nope"), "optimizer: expected the name of an optax optimiser"),
        (dict(schedule="exp"), "schedule: expected one of"),
        (dict(learning_rate=-1.0), "learning_rate: expected a positive number"),
        (dict(clip_norm=0.0), "clip_norm"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_batch_must_split_over_devices():
    with pytest.raises(ValueError, match="batch_size: expected a multiple of the 8 devices"):
        T.train(TinyLM(TASK.vocab_size, rngs=nnx.Rngs(0)), TASK, _cfg(batch_size=6))


def test_divergence_is_reported_not_silent():
    with pytest.raises(FloatingPointError, match="diverged"):
        T.train(
            TinyLM(TASK.vocab_size, rngs=nnx.Rngs(0)),
            TASK,
            _cfg(learning_rate=1e30, clip_norm=None, optimizer="sgd", schedule="constant"),
        )


def test_masked_metrics_exact_match():
    logits = jnp.log(jax.nn.one_hot(jnp.array([[1, 2, 3], [1, 2, 0]]), 4) + 1e-6)
    batch = {
        "targets": jnp.array([[1, 2, 3], [1, 2, 3]]),
        "loss_mask": jnp.ones((2, 3)),
        "answer_mask": jnp.array([[0.0, 1, 1], [0, 1, 1]]),
    }
    _, m = T.masked_metrics(logits, batch)
    assert float(m["accuracy"]) == 0.5
    assert float(m["token_accuracy"]) == 0.75
