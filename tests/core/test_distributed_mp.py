"""Multi-process JAX on one machine: 2 processes x 2 CPU devices over gloo == 1 process x 4.

Run as a script with ``--worker`` this file is the program each launched process runs.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import numpy as np

STEPS = 4
LR = 0.1
GLOBAL_BATCH = 16
FEATURES = 6
HIDDEN = 8


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH, FEATURES)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal((FEATURES, 1)).astype(np.float32))
    w1 = (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32)
    return x, y, {"w1": w1, "b1": np.zeros((HIDDEN,), np.float32), "w2": w2}


def data_parallel_sgd(devices) -> dict:
    """A few SGD steps of a tiny MLP, data parallel over ``devices`` (any number of processes).

    The batch is sharded over a 1-D mesh axis "data"; gradients are averaged with ``lax.pmean``
    inside ``shard_map`` (the collective crosses processes when the mesh does). Also checks a
    psum and an all-gather of the device ranks. Returns plain lists (replicated values).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("data",))
    x_np, y_np, p_np = _data()
    shard = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())

    def put(a, sharding):
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    x, y = put(x_np, shard), put(y_np, shard)
    params = {k: put(v, repl) for k, v in p_np.items()}
    ranks = put(np.arange(len(devices), dtype=np.float32), shard)

    def loss(p, xb, yb):
        h = jnp.tanh(xb @ p["w1"] + p["b1"][None, :])
        return jnp.mean((h @ p["w2"] - yb) ** 2)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()))
    def step(p, xb, yb):
        val, g = jax.value_and_grad(loss)(p, xb, yb)
        g = jax.lax.pmean(g, "data")
        val = jax.lax.pmean(val, "data")
        return jax.tree.map(lambda a, b: a - LR * b, p, g), val

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=(P(), P("data")))
    def collectives(r):  # all_gather's result stays device-varying: every device's copy comes back
        return jax.lax.psum(r, "data"), jax.lax.all_gather(r, "data", tiled=True)

    total, gathered = collectives(ranks)
    losses = []
    for _ in range(STEPS):
        params, val = step(params, x, y)
        losses.append(float(val.addressable_data(0)))

    def local(a):
        return np.asarray(a.addressable_data(0)).tolist()

    return {
        "psum": local(total),
        "all_gather": np.asarray(gathered.addressable_data(0)).tolist(),
        "all_gather_shape": list(gathered.shape),
        "losses": losses,
        "params": {k: local(v) for k, v in params.items()},
    }


def train_with_jaxcore() -> dict:
    """A few steps of ``jaxcore.train`` (data parallel over every device of every process)."""
    import jax
    from flax import nnx
    from jaxcore.models import tasks

    from jaxcore import models
    from jaxcore import train as jtrain

    task = tasks.get_task("parity")
    model = models.build_model(
        "transformer", vocab_size=task.vocab_size, d_model=16, num_layers=1, num_heads=2, seed=0
    )
    config = jtrain.TrainConfig(
        steps=STEPS,
        batch_size=8,
        optimizer="sgd",
        learning_rate=LR,
        schedule="constant",
        clip_norm=None,
        log_every=1,
        eval_splits=(),
        progress=False,
        plot=False,
    )
    result = jtrain.train(model, task, config)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {
        "losses": [h["loss"] for h in result.history if h.get("split") == "train"],
        "params": [np.asarray(x.addressable_data(0)).ravel().tolist() for x in params],
    }


SKEW_S = 35.0  # > gloo's 30 s communicator set-up timeout


def _worker(skewed: bool = False) -> None:
    from jaxcore import distributed

    info = distributed.initialize()
    import jax

    if skewed:  # rank 1 reaches the training loop 35 s late; no collective has run before
        if jax.process_index() == 1:
            time.sleep(SKEW_S)
        print("RESULT " + json.dumps({"train": train_with_jaxcore()}), flush=True)
        distributed.shutdown()
        return
    out = data_parallel_sgd(jax.devices())
    out["train"] = train_with_jaxcore()
    out["process_count"] = info["process_count"]
    out["device_count"] = info["device_count"]
    out["local_device_count"] = info["local_device_count"]
    print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(skewed="--skewed" in sys.argv)
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# tests (the pytest session has 8 host devices from conftest)

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxcore import distributed  # noqa: E402


def _result(res) -> dict:
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"process {res.process_id} printed no RESULT; stderr:\n{res.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_two_processes_equal_one_process_four_devices():
    """2 processes x 2 CPU devices (gloo) give the parameters of 1 process x 4 devices."""
    env = {"JAX_PLATFORMS": "cpu"}
    worker = [__file__, "--worker"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both groups at once
        one = pool.submit(distributed.launch, worker, 1, local_device_count=4, timeout=150, env=env)
        two = pool.submit(distributed.launch, worker, 2, local_device_count=2, timeout=150, env=env)
        (single,), pair = one.result(), two.result()
    want = _result(single)
    assert want["process_count"] == 1 and want["device_count"] == 4
    for res in pair:
        got = _result(res)
        assert got["process_count"] == 2
        assert got["device_count"] == 4
        assert got["local_device_count"] == 2
        assert got["psum"] == [6.0]
        assert got["all_gather"] == [0.0, 1.0, 2.0, 3.0]  # device 0's gathered copy
        assert got["all_gather_shape"] == [16]
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6, atol=1e-7)
        assert got["losses"][-1] < got["losses"][0]
        for k, v in want["params"].items():
            np.testing.assert_allclose(got["params"][k], v, rtol=1e-6, atol=1e-7)
        # the project's training loop, data parallel over the two processes
        tr, tw = got["train"], want["train"]
        assert len(tr["losses"]) == STEPS and all(np.isfinite(tr["losses"]))
        np.testing.assert_allclose(tr["losses"], tw["losses"], rtol=1e-5, atol=1e-6)
        assert len(tr["params"]) == len(tw["params"]) > 0
        for a, b in zip(tr["params"], tw["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_survives_ranks_arriving_35s_apart():
    """Without the compile-then-barrier step in jaxcore.train, gloo's communicator set-up at the
    first collective times out after 30 s ("Gloo context initialization failed")."""
    env = {"JAX_PLATFORMS": "cpu"}
    pair = distributed.launch(
        [__file__, "--worker", "--skewed"], 2, local_device_count=1, timeout=200, env=env
    )
    a, b = (_result(r)["train"] for r in pair)
    assert len(a["losses"]) == STEPS and a["losses"] == b["losses"]


def test_barrier_is_a_noop_in_one_process():
    distributed.barrier("solo")
    distributed.barrier("solo", peer_timeout_s=None)
    distributed.barrier("solo", peer_timeout_s=distributed.MIN_PEER_TIMEOUT_S)
    with pytest.raises(ValueError, match="timeout_s"):
        distributed.barrier("solo", timeout_s=0)


@pytest.mark.parametrize("bad", [0, -1.0, 1.0, float("nan"), True, "30"])
def test_barrier_peer_timeout_is_checked(bad):
    with pytest.raises(ValueError, match=r"peer_timeout_s: expected None or a number of seconds"):
        distributed.barrier("solo", peer_timeout_s=bad)


def test_hand_written_data_parallel_matches_in_process():
    """The same hand-written DP steps in this process (4 of its 8 devices) as in the workers."""
    got = data_parallel_sgd(jax.devices()[:4])
    assert got["psum"] == [6.0]
    assert got["losses"][-1] < got["losses"][0]


def test_dying_process_fails_fast_with_its_stderr():
    prog = (
        "import os, sys, time\n"
        "if os.environ['JAXCORE_PROCESS_ID'] == '1':\n"
        "    sys.stderr.write('worker one is broken\\n'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(distributed.LaunchError, match="worker one is broken") as e:
        distributed.launch(["-c", prog], 2, timeout=50)
    assert time.monotonic() - t0 < 20
    assert "status 3" in str(e.value)
    assert [r.returncode for r in e.value.results][1] == 3
    assert e.value.results[0].returncode != 0  # the sleeper was killed, not left running


ABORT_PROG = """
import os, sys, time
from jaxcore import distributed
distributed.initialize(local_device_count=1)
from jax._src import distributed as jd
client = jd.global_state.client
if os.environ["JAXCORE_PROCESS_ID"] == "1":
    distributed.barrier("first")  # both meet once: the group works
    distributed.abort("ValueError: --data: no such file")
    client.blocking_key_value_get("rank0-done", 60_000)  # stay alive until rank 0 has seen it
else:
    distributed.barrier("first")
    t0 = time.monotonic()
    try:
        distributed.barrier("second", timeout_s=120)
    except RuntimeError as e:
        print(f"RAISED after {time.monotonic() - t0:.2f} s: {e}", flush=True)
    try:
        distributed.barrier("third", timeout_s=120)  # later barriers raise at once too
    except RuntimeError:
        print("LATER BARRIER RAISED", flush=True)
    client.key_value_set("rank0-done", "1")
"""


def test_abort_stops_the_other_ranks_barriers_at_once():
    """A rank that fails after joining (distributed.abort, as `jaxcore train` does) makes the
    others' barriers raise with its message in well under a second, not after the 600 s timeout."""
    res = distributed.launch(["-c", ABORT_PROG], 2, timeout=100)
    out = res[0].stdout
    assert "RAISED after" in out, (out, res[0].stderr[-2000:])
    assert "aborted by process 1: ValueError: --data: no such file" in out
    waited = float(out.split("RAISED after ")[1].split(" s")[0])
    assert waited < 5.0, out
    assert "LATER BARRIER RAISED" in out


def test_barrier_timeout_names_the_barrier_and_the_count():
    prog = (
        "import os\n"
        "from jaxcore import distributed\n"
        "distributed.initialize(local_device_count=1)\n"
        "from jax._src import distributed as jd\n"
        "c = jd.global_state.client\n"
        "if os.environ['JAXCORE_PROCESS_ID'] == '0':\n"
        "    try:\n"
        "        distributed.barrier('lonely', timeout_s=1.0)\n"
        "    except RuntimeError as e:\n"
        "        print('TIMEOUT', e, flush=True)\n"
        "    c.key_value_set('done', '1')\n"
        "else:\n"
        "    c.blocking_key_value_get('done', 60_000)\n"
    )
    res = distributed.launch(["-c", prog], 2, timeout=100)
    assert "TIMEOUT" in res[0].stdout, res[0].stderr[-2000:]
    assert "barrier('lonely'): timed out after 1.0 s with 1 of 2 processes arrived" in res[0].stdout


def test_timeout_kills_every_process():
    t0 = time.monotonic()
    with pytest.raises(distributed.LaunchError, match="still running after"):
        distributed.launch(["-c", "import time; time.sleep(60)"], 2, timeout=1.0)
    assert time.monotonic() - t0 < 15


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_processes"):
        distributed.launch(["-c", "pass"], 0)
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed._parse_address("localhost", "coordinator_address")
    # This pytest process already has a backend: initialize must refuse, not half-work.
    jax.devices()
    with pytest.raises(RuntimeError, match="before JAX creates a backend"):
        distributed.initialize("127.0.0.1:1234", 1, 0)
    assert not distributed.is_initialized()
    assert 0 < distributed.free_port() < 65536


# A rank that dies without raising: launch() stops the whole group when a process exits
# non-zero, so rank 1's launched process runs the victim as a child (same environment, so the
# child joins as rank 1), reports how it ended and exits 0.
DEAD_PEER_PROG = """
import os, signal, subprocess, sys, time
if os.environ["JAXCORE_PROCESS_ID"] == "1" and not os.environ.get("VICTIM"):
    r = subprocess.run([sys.executable, __file__], env={**os.environ, "VICTIM": "1"})
    print(f"CHILD STATUS {r.returncode}", flush=True)
    sys.exit(0)
from jaxcore import distributed
distributed.initialize(local_device_count=1)
distributed.barrier("joined")
if os.environ.get("VICTIM"):
    os.kill(os.getpid(), signal.SIGKILL)
t0 = time.monotonic()
try:
    distributed.barrier("after-kill", timeout_s=120, peer_timeout_s=3.0)
except RuntimeError as e:
    print(f"RAISED after {time.monotonic() - t0:.2f} s: {e}", flush=True)
t0 = time.monotonic()
try:
    distributed.barrier("later", timeout_s=120, peer_timeout_s=3.0)
except RuntimeError as e:
    print(f"LATER after {time.monotonic() - t0:.2f} s: {e}", flush=True)
# exiting now must not wait in JAX's shutdown handshake for the dead rank (100 s heartbeat)
"""


def test_barrier_names_a_peer_killed_without_raising(tmp_path):
    """Rank 1 is SIGKILLed after joining: rank 0's barrier raises naming it after ~peer_timeout_s
    (3 s), not after timeout_s (120 s) or JAX's 100 s heartbeat, and rank 0 then exits at once."""
    prog = tmp_path / "dead_peer.py"
    prog.write_text(DEAD_PEER_PROG)
    t0 = time.monotonic()
    res = distributed.launch([str(prog)], 2, timeout=80, env={"JAX_PLATFORMS": "cpu"})
    total = time.monotonic() - t0
    out = res[0].stdout
    assert "CHILD STATUS -9" in res[1].stdout, (res[1].stdout, res[1].stderr[-2000:])
    assert "RAISED after" in out, (out, res[0].stderr[-2000:])
    assert "barrier('after-kill'): process 1 sent no heartbeat for " in out
    assert "(peer_timeout_s=3) and did not arrive: presumably dead" in out
    assert "1 of 2 processes arrived" in out
    waited = float(out.split("RAISED after ")[1].split(" s")[0])
    assert 3.0 <= waited < 10.0, out  # silent >= 3 s, reported well before timeout_s
    silent = float(out.split("sent no heartbeat for ")[1].split(" s")[0])
    assert silent >= 3.0, out
    assert "barrier('later'): process 1 sent no heartbeat" in out  # later barriers: at once
    assert float(out.split("LATER after ")[1].split(" s")[0]) < 2.0, out
    assert total < 60, total  # not held up by the shutdown handshake with the dead rank


LATE_PEER_PROG = """
import os, time
from jaxcore import distributed
distributed.initialize(local_device_count=1)
distributed.barrier("joined")
if os.environ["JAXCORE_PROCESS_ID"] == "1":
    time.sleep(3.0)  # alive but late: asleep, then busy in Python (holding the GIL by turns)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        pass
    distributed.barrier("late", timeout_s=60, peer_timeout_s=3.0)
    distributed.shutdown()  # marks rank 1 as gone; waits for rank 0 to shut down too
else:
    t0 = time.monotonic()
    distributed.barrier("late", timeout_s=60, peer_timeout_s=3.0)
    print(f"WAITED {time.monotonic() - t0:.2f} s", flush=True)
    t0 = time.monotonic()
    try:
        distributed.barrier("never", timeout_s=60, peer_timeout_s=3.0)
    except RuntimeError as e:
        print(f"GONE after {time.monotonic() - t0:.2f} s: {e}", flush=True)
    distributed.shutdown()
"""


def test_a_late_live_peer_is_not_declared_dead_and_a_shut_down_one_is_gone():
    """Rank 1 reaches the barrier 6 s late (> peer_timeout_s = 3 s) while alive: rank 0 waits
    for it. Then rank 1 shuts down: rank 0's next barrier says it left, not that it died."""
    res = distributed.launch(["-c", LATE_PEER_PROG], 2, timeout=80, env={"JAX_PLATFORMS": "cpu"})
    out = res[0].stdout
    assert "WAITED" in out, (out, res[0].stderr[-2000:])
    assert float(out.split("WAITED ")[1].split(" s")[0]) > 4.0, out
    assert "GONE after" in out, (out, res[0].stderr[-2000:])
    assert (
        "barrier('never'): process 1 left the group (distributed.shutdown or process exit) "
        "without reaching this barrier; 1 of 2 processes arrived" in out
    )
    assert "heartbeat" not in out
    assert float(out.split("GONE after ")[1].split(" s")[0]) < 10.0, out


def test_peer_check_reads_heartbeats_by_this_process_clock(monkeypatch):
    """The liveness verdict alone: a peer is dead once the value it last wrote has been the same
    for peer_timeout_s by this process's monotonic clock; a peer never seen is not judged."""
    monkeypatch.setattr(distributed, "_SEEN", {})
    monkeypatch.setattr(distributed, "_DEAD", set())

    class Client:
        beats = [("jaxcore:alive/0", "9"), ("jaxcore:alive/1", "5"), ("jaxcore:alive/2", "7")]

        def key_value_dir_get(self, key):
            assert key == "jaxcore:alive"
            return list(self.beats)

    client = Client()
    beats, t = distributed._read_heartbeats(client)
    assert beats == {0: "9", 1: "5", 2: "7"}
    distributed._check_peers("b", beats, t + 2.0, [1, 2, 3], 1, 4, 3.0)  # 2 s: still alive
    for rank, (value, seen) in list(distributed._SEEN.items()):  # as if read 4 s ago
        distributed._SEEN[rank] = (value, seen - 4.0)
    client.beats[2] = ("jaxcore:alive/2", "8")  # rank 2 beat again since, rank 1 did not
    beats, t4 = distributed._read_heartbeats(client)
    assert distributed._SEEN[2] == ("8", t4)
    with pytest.raises(RuntimeError, match=r"process 1 sent no heartbeat for 4\.0 s"):
        distributed._check_peers("b", beats, t4, [1, 2, 3], 1, 4, 3.0)
    assert distributed._DEAD == {1}
    distributed._check_peers("b", beats, t4, [2, 3], 2, 4, 3.0)  # rank 1 arrived: fine
    beats[2] = "left"
    with pytest.raises(RuntimeError, match=r"process 2 left the group"):
        distributed._check_peers("b", beats, t4, [2, 3], 2, 4, 3.0)
