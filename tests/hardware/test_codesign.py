"""Co-design: gradients reach all three groups, a tiny run improves the objective, Pareto
points are non-dominated, baselines use the stated budget, the CLI runs and rejects bad input."""

import argparse
import dataclasses
import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxcore.hardware.objective import objective
from jaxcore.hardware.trace import trace
from jaxcore.models import BitWidth, build_model, pure, tasks

from jaxcore.train import masked_metrics

# the module (robust to the package exporting the function ``codesign`` under the same name)
cd = importlib.import_module("jaxcore.hardware.codesign")

TASK = tasks.get_task("parity", min_len=2, max_len=4)


def _setup(hardware="bitserial"):
    net = build_model("lstm", TASK.vocab_size, d_model=8, learn_bits=True, init_bits=6.0)
    twin = build_model("lstm", TASK.vocab_size, d_model=8)
    fn, st = pure(twin)
    wl = trace(fn, st, jax.ShapeDtypeStruct((4, TASK.seq_len()), jnp.int32), warn=False)
    lp = cd._layer_params(net, wl)
    factory, choices, area, power = cd.HARDWARE[hardware]
    return net, wl, lp, factory(), tuple(choices), area, power


@pytest.mark.parametrize("hardware", ["bitserial", "systolic"])
def test_gradients_reach_all_three_groups(hardware):
    net, wl, lp, hw0, fields, area, power = _setup(hardware)
    g, params, bits, rest = nnx.split(net, nnx.Param, BitWidth, ...)
    theta = {f: jnp.asarray(math.log(cd.HARDWARE[hardware][1][f][2]), jnp.float32) for f in fields}
    batch = {k: jnp.asarray(v) for k, v in TASK.batch(4, step=0).items()}

    def loss(groups):
        m = nnx.merge(g, groups["weights"], groups["bits"], rest)
        task_loss, _ = masked_metrics(m(batch["inputs"]), batch)
        hw = dataclasses.replace(hw0, **{f: jnp.exp(groups["hw"][f]) for f in fields})
        c = objective(
            hw, wl, cd._precision(lp, cd._bits_array(m)), area_budget_mm2=area, power_budget_w=power
        )
        return task_loss + 0.1 * c

    grads = jax.grad(loss)({"weights": params, "bits": bits, "hw": theta})
    for group in ("weights", "bits", "hw"):
        leaves = jax.tree.leaves(grads[group])
        assert leaves, group
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), group
        assert sum(float(jnp.sum(jnp.abs(x))) for x in leaves) > 0, group
    # every bit-width (weight and activation of each layer) and every hw parameter moves
    assert all(float(jnp.abs(x)) > 0 for x in jax.tree.leaves(grads["bits"]))
    assert all(float(jnp.abs(grads["hw"][f])) > 0 for f in fields)


def test_bits_reach_the_cost():
    net, wl, lp, hw0, fields, *_ = _setup()
    from jaxcore.hardware import cost

    lo = cost(hw0, wl, precision=cd._precision(lp, np.full((len(lp), 2), 2.0)))
    hi = cost(hw0, wl, precision=cd._precision(lp, np.full((len(lp), 2), 8.0)))
    assert float(lo.latency_s) < float(hi.latency_s)
    assert float(lo.energy_j) < float(hi.energy_j)


def test_activation_ops_follow_layer_bits():
    """Elementwise ops between quantized layers are costed at the next layer's act width."""
    from jaxcore.hardware import cost

    net = cd._build("mlp", TASK.vocab_size, TASK.seq_len(), seed=0, learn_bits=True,
                    init_bits=8.0, d_model=4, d_hidden=16, num_layers=2, num_heads=1)  # fmt: skip
    twin = cd._build("mlp", TASK.vocab_size, TASK.seq_len(), seed=0, learn_bits=False,
                     init_bits=8.0, d_model=4, d_hidden=16, num_layers=2, num_heads=1)  # fmt: skip
    fn, st = pure(twin)
    wl = trace(fn, st, jax.ShapeDtypeStruct((4, TASK.seq_len()), jnp.int32), warn=False)
    lp = cd._layer_params(net, wl)
    assert list(lp) == ["layers.0", "layers.1", "layers.2"]
    ol = cd._op_act_layers(wl, lp)
    relu = [i for i, o in enumerate(wl.ops) if o.name == "max"]
    assert [ol[i] for i in relu] == [1, 2]  # ReLU outputs feed layers 1 and 2
    hw = cd.HARDWARE["bitserial"][0]()
    b8 = np.full((3, 2), 8.0)
    b4 = b8.copy()
    b4[1, 1] = 4.0  # only layer 1's activations narrower
    e = [cost(hw, wl, precision=cd._precision(lp, b, ol)).breakdown["per_op_energy_j"] for b in
         (b8, b4)]  # fmt: skip
    assert float(e[1][relu[0]]) < float(e[0][relu[0]])
    assert float(e[1][relu[1]]) == pytest.approx(float(e[0][relu[1]]))


def test_pareto_mask_non_dominated():
    rng = np.random.default_rng(0)
    acc, c = rng.random(50), rng.random(50)
    m = cd.pareto_mask(acc, c)
    assert m.any()
    for i in np.flatnonzero(m):
        dominated = (acc >= acc[i]) & (c <= c[i]) & ((acc > acc[i]) | (c < c[i]))
        assert not dominated.any()
    for i in np.flatnonzero(~m):  # every other point is dominated by someone
        assert ((acc >= acc[i]) & (c <= c[i]) & ((acc > acc[i]) | (c < c[i]))).any()
    assert cd.pareto_mask([0.5, 0.9, 0.9], [1.0, 2.0, 3.0]).tolist() == [True, True, False]


def test_grid_levels_budget():
    for dims, budget in (([7, 4, 3, 7, 7, 7, 7], 540), ([6, 6, 4], 20), ([3, 3], 100)):
        lv = cd.grid_levels(dims, budget)
        n = math.prod(len(x) for x in lv)
        assert n <= budget
        assert all(0 <= i < d for x, d in zip(lv, dims) for i in x)
        # adding one more level anywhere would exceed the budget (or the space is exhausted)
        assert n == math.prod(dims) or all(
            len(x) == d or n // len(x) * (len(x) + 1) > budget for x, d in zip(lv, dims)
        )
    with pytest.raises(ValueError, match="budget"):
        cd.grid_levels([3], 0)


def test_design_space_decode_and_bad_input():
    sp = cd.default_space("bitserial", ("a", "b"))
    assert sp.dims == [7, 4, 3, 5, 7, 7, 7, 7]
    hw, bits = sp.decode(np.array([[0, 3, 2, 1, 0, 6, 1, 2]]))
    assert hw.tolist() == [[16.0, 32.0, 4.0, 32.0]]
    assert bits.tolist() == [[[2.0, 8.0], [3.0, 4.0]]]
    tied = cd.default_space("bitserial", ("a", "b"), tied=True)
    assert tied.dims == [7, 4, 3, 5, 7, 7] and tied.size == sp.size // 49
    _, tb = tied.decode(np.array([[0, 0, 0, 0, 6, 1]]))
    assert tb.tolist() == [[[8.0, 8.0], [3.0, 3.0]]]
    with pytest.raises(ValueError, match="hardware"):
        cd.default_space("tpu9000", ("a",))
    with pytest.raises(ValueError, match="bits"):
        cd.DesignSpace((("pes", (1.0, 2.0)),), (1.0, 2.0), ("a",))


@pytest.fixture(scope="module")
def tiny_result():
    return cd.codesign(
        "lstm",
        "parity",
        "bitserial",
        lambdas=(0.1, 1.0),
        refine=1,
        polish=2,
        steps=12,
        pretrain_steps=40,
        batch_size=8,
        eval_size=32,
        d_model=8,
        num_layers=1,
        random_repeats=2,
        task_kwargs={"min_len": 2, "max_len": 4},
        log=None,
        log_every=4,
        seed=0,
        bit_choices=(2, 4, 8),
        exhaustive=True,
    )


def test_tiny_run_improves_objective_and_budgets(tiny_result):
    r = tiny_result
    for lam, hist in r.history.items():
        first, last = hist[0], hist[-1]
        obj0 = first["task_loss"] + lam * first["log_edp"]
        obj1 = last["task_loss"] + lam * last["log_edp"]
        assert obj1 < obj0, (lam, first, last)
    # gradient search: steps per lambda + 2**n_hw rounding neighbours per lambda, for the two
    # swept values and the one refine run (a bisection around the accuracy target)
    # (plus the polish rounds' evaluations, when the sweep reached the target)
    runs = len(r.history)
    assert runs == 3 and len(r.points) in (3, 4)
    assert r.evals >= runs * (12 + 2 ** len(r.space.hw))
    assert r.space.bits == (2.0, 4.0, 8.0)
    assert r.random.evals == r.evals
    assert len(r.random.edp) == r.evals
    assert r.grid.evals <= r.evals and len(r.grid.edp) == r.grid.evals
    assert r.grid.evals == math.prod(len(x) for x in cd.grid_levels(r.space.dims, r.evals))
    # Pareto points are non-dominated among the lambda points
    acc = np.array([p.accuracy for p in r.points])
    edp = np.array([p.edp for p in r.points])
    for i in r.pareto:
        assert not ((acc >= acc[i]) & (edp <= edp[i]) & ((acc > acc[i]) | (edp < edp[i]))).any()
    # discrete designs: bits and hardware values are choices of the space
    for p in r.points:
        assert all(w in r.space.bits and a in r.space.bits for w, a in p.bits.values())
        assert all(v in dict(r.space.hw)[k] for k, v in p.hw.items())
        assert math.isfinite(p.edp) and p.edp > 0
    for b in (r.random.best, r.grid.best, r.exhaustive.best, r.best):
        if b is not None:
            assert b.accuracy >= r.accuracy_target and b.feasible
    # the exhaustive grid sees every design (scored like random/grid): it is never beaten by them
    assert r.exhaustive.evals == r.space.size == 7 * 4 * 3 * 5 * 3**4
    ex = r.exhaustive.best
    assert ex is not None
    for b in (r.random.best, r.grid.best):
        assert b is None or ex.edp <= b.edp * (1 + 1e-6)
    assert "gradient" in r.table()
    # random/grid score accuracies lazily in EDP order: no scored feasible design cheaper than
    # the best reaches the target, and the best is the cheapest feasible design at the target
    for s in (r.random, r.grid):
        if s.best is not None:
            cheaper = s.feasible & (s.edp < s.best.edp * (1 - 1e-6))
            assert np.all(np.isfinite(s.accuracy[cheaper]))
            assert not np.any(s.accuracy[cheaper] >= r.accuracy_target)
    for p in r.points:
        assert p.ptq_accuracy is not None and 0.0 <= p.ptq_accuracy <= 1.0


def test_report_written(tiny_result, tmp_path):
    out = tiny_result.save(tmp_path / "rep")
    for f in ("result.json", "summary.md", "pareto.png", "curves.png"):
        assert (out / f).stat().st_size > 0
    data = json.loads((out / "result.json").read_text())
    assert data["cost_evaluations"] == tiny_result.evals
    assert len(data["points"]) == len(tiny_result.points) >= len(tiny_result.history)


def test_codesign_bad_arguments():
    with pytest.raises(ValueError, match="hardware"):
        cd.codesign(hardware="abacus", log=None)
    with pytest.raises(ValueError, match="lambdas"):
        cd.codesign(lambdas=(-1.0,), log=None)
    with pytest.raises(ValueError, match="steps"):
        cd.codesign(steps=0, log=None)
    with pytest.raises(ValueError, match="model"):
        cd.codesign(model="resnet", log=None)
    with pytest.raises(ValueError, match="task"):
        cd.codesign(task="chess", log=None)
    with pytest.raises(ValueError, match="bit_choices"):
        cd.codesign(bit_choices=(8, 4), log=None)


# ---------------------------------------------------------------------------------------------
# CLI


def _parser():
    p = argparse.ArgumentParser(prog="jaxcore")
    sub = p.add_subparsers(dest="command")
    cd.register_cli(sub)
    return p


def _run_cli(argv):
    from jaxcore.cli import UsageError

    args = _parser().parse_args(["codesign", *argv])
    try:
        return args.func(args)
    except UsageError as e:
        return f"error: {e}"


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    rc = _run_cli(
        [
            "--steps",
            "5",
            "--pretrain-steps",
            "10",
            "--lambdas",
            "0.1,1",
            "--d-model",
            "8",
            "--batch-size",
            "8",
            "--max-len",
            "4",
            "--hidden",
            "32",
            "--layers",
            "2",
            "--random-repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "pareto" in text and "random" in text and "grid" in text
    for f in ("result.json", "summary.md", "pareto.png", "curves.png"):
        assert (out / f).exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "resnet"], "--model"),
        (["--task", "chess"], "--task"),
        (["--hardware", "abacus"], "--hardware"),
        (["--lambdas", "a,b"], "--lambdas"),
        (["--lambdas", "-1"], "--lambdas"),
        (["--refine", "-1"], "--refine"),
        (["--steps", "0"], "--steps"),
        (["--metric", "speed"], "--metric"),
        (["--area-budget", "-2"], "--area-budget"),
        (["--accuracy-target", "2"], "--accuracy-target"),
        (["--max-len", "1"], "--max-len"),
        (["--bits", "8,4"], "--bits"),
        (["--bits", "x"], "--bits"),
        (["--hidden", "0"], "--hidden"),
        (["--random-repeats", "0"], "--random-repeats"),
    ],
)
def test_cli_bad_input_one_line(argv, needle):
    msg = _run_cli(argv)
    assert isinstance(msg, str) and msg.startswith("error:") and needle in msg
    assert "\n" not in msg


def test_cli_unwritable_out(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    msg = _run_cli(["--out", str(blocker / "report"), "--steps", "1"])
    assert isinstance(msg, str) and msg.startswith("error: --out") and "\n" not in msg


def test_cli_bad_flag_type_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["codesign", "--steps", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps" in err


def test_cli_via_main_if_wired(tmp_path, capsys):
    """Once the lead wires register_cli into jaxcore.cli, bad input there is rc 2, one line."""
    import inspect

    from jaxcore import cli

    if "hardware.codesign" not in inspect.getsource(cli):
        pytest.skip("jaxcore.cli does not register jaxcore.hardware.codesign.register_cli yet")
    rc = cli.main(["codesign", "--hardware", "abacus", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--hardware" in err and len(err.splitlines()) == 1


def _pt(lam, acc, feasible=True):
    return cd.DesignPoint("gradient", acc, 1.0, 1.0, 1.0, 1.0, feasible, {}, {}, lam=lam)


def test_refine_lambda_bisects_around_the_accuracy_target():
    pts = [_pt(0.01, 0.95), _pt(0.04, 0.93), _pt(0.16, 0.80)]
    assert cd._refine_lambda(pts, 0.9) == pytest.approx(0.08)  # between 0.04 (ok) and 0.16
    pts.append(_pt(0.08, 0.85))
    assert cd._refine_lambda(pts, 0.9) == pytest.approx(0.04 * 2**0.5)
    assert cd._refine_lambda([_pt(0.01, 0.95), _pt(0.1, 0.92)], 0.9) == pytest.approx(0.2)
    assert cd._refine_lambda([_pt(0.01, 0.5), _pt(0.1, 0.4)], 0.9) == pytest.approx(0.005)
    # an infeasible design does not count as reaching the target
    assert cd._refine_lambda([_pt(0.01, 0.95), _pt(0.1, 0.99, False)], 0.9) == pytest.approx(
        0.1**0.5 * 0.01**0.5
    )
    assert cd._refine_lambda([_pt(0.0, 0.95)], 0.9) is None
    assert cd._refine_lambda([_pt(0.1, 0.95), _pt(0.104, 0.5)], 0.9) is None


def test_polish_walks_to_the_cheapest_design_at_the_target():
    """Toy space: cost grows with every index; accuracy needs (w0 + w1) bit indices >= 3 and
    the weight of layer b at index >= 1. The optimum is reachable only through pair moves."""
    space = cd.DesignSpace((("pes", (1.0, 2.0, 4.0)),), (2.0, 3.0, 4.0, 5.0), ("a", "b"))
    weights = np.array([1.0, 2.0, 3.0, 5.0])

    def cost_many(hw, bits):
        lat = hw[:, 0] * (1 + (bits[..., 0] * weights[:2]).sum(-1) + bits[..., 1].sum(-1))
        return {"latency_s": lat, "energy_j": np.ones_like(lat), "area_mm2": hw[:, 0],
                "power_w": np.ones_like(lat)}  # fmt: skip

    def feasible(c):
        return np.ones(len(c["latency_s"]), bool)

    def acc_fn(bits):
        bi = np.searchsorted(np.asarray(space.bits), bits)
        return ((bi[:, 0, 0] + bi[:, 1, 0] >= 3) & (bi[:, 1, 0] >= 1)).astype(float)

    start = np.array([2, 0, 3, 3, 3])  # pes=4, a=(2,5), b=(5,5): at the target, expensive
    assert acc_fn(space.decode(start[None])[1])[0] == 1.0
    idx, evals, _ = cd._polish(space, start, acc_fn, cost_many, feasible, 0.5, rounds=20)
    # cheapest at the target: pes=1, activations at 2 bits, weights (a, b) = (4, 3): b's weight
    # bits cost twice a's, so precision moves from b to a (pair moves: no single move is both
    # cheaper and at the target from the start)
    hw, bits = space.decode(idx[None])
    assert hw[0].tolist() == [1.0]
    assert bits[0].tolist() == [[4.0, 2.0], [3.0, 2.0]], bits[0]
    assert evals > 1
    # neighbours stay in range and exclude the start
    nb = cd._neighbours(space, np.zeros(5, np.int64))
    assert (nb >= 0).all() and not (nb == 0).all(axis=1).any()
