"""``jaxcore train``: a tiny run end to end; bad input gives one line and a non-zero exit."""

import json
import subprocess
import sys

import pytest

from jaxcore import cli


def _run(capsys, *argv):
    try:
        rc = cli.main(["train", *argv])
    except SystemExit as e:  # argparse errors exit through SystemExit
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt9"], "--model: expected one of"),
        (["--task", "sudoku"], "--task: expected one of"),
        (["--steps", "0"], "--steps: expected a positive integer"),
        (["--steps", "many"], "argument --steps: invalid int value"),
        (["--lr", "-1"], "--lr: expected a positive number"),
        (["--optimizer", "adamz"], "--optimizer: expected the name of an optax optimiser"),
        (["--schedule", "step"], "--schedule: expected one of"),
        (["--batch-size", "6"], "--batch-size: expected a multiple of the 8 devices"),
        (["--remat", "most"], "--remat: expected one of"),
        (["--heads", "3"], "--heads: expected a divisor of d_model=64"),
        (["--weight-format", "fp3"], "--weight-format: expected a format name"),
        (["--max-len", "1", "--min-len", "4"], "--max-len: expected an integer >= min_len=4"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, argv, message):
    rc, err = _run(capsys, "--out", str(tmp_path / "o"), "--no-progress", *argv)
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, err = _run(capsys, "--out", str(blocker / "run"), "--steps", "2")
    assert rc == 2 and len(err.splitlines()) == 1 and "--out: cannot write to" in err


def test_tiny_run_end_to_end(capsys, tmp_path):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--model",
            "gru",
            "--task",
            "parity",
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--d-model",
            "16",
            "--layers",
            "1",
            "--log-every",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--max-len",
            "4",
        ]
    )
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == [2, 4]
    assert {r["split"] for r in recs} == {"train", "test", "ood"}
    assert (out / "curves.png").exists() and (out / "checkpoints" / "4").is_dir()
    assert "accuracy" in capsys.readouterr().out


def test_exit_status_in_a_real_process(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "jaxcore", "train", "--model", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--model: expected one of" in p.stderr


def test_two_process_cli_run_agrees(tmp_path):
    """`jaxcore train` over 2 processes x 2 CPU devices (gloo): both ranks finish with the same
    final metrics, and only rank 0 writes metrics."""
    from jaxcore import distributed

    out = tmp_path / "run"
    results = distributed.launch(
        ["-m", "jaxcore", "train", "--model", "transformer", "--task", "parity", "--steps", "3",
         "--batch-size", "8", "--d-model", "16", "--layers", "1", "--heads", "2",
         "--no-progress", "--out", str(out), "--eval-every", "0"],
        2, local_device_count=2, timeout=240, env={"XLA_FLAGS": ""},
    )  # fmt: skip
    finals = [[ln for ln in r.stdout.splitlines() if "accuracy" in ln] for r in results]
    assert finals[0] and finals[0] == finals[1], finals
    assert (out / "metrics.jsonl").exists()


def _records(path):
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    for r in recs:
        r.pop("tokens_per_s", None)  # wall-clock dependent
    return recs


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """A real kill: SIGKILL the training process mid-run (possibly mid-checkpoint), run the same
    command again; it resumes from the last complete checkpoint and ends with the same metrics
    and checkpoint as a run that was never interrupted."""
    import os
    import signal
    import time

    common = ["-m", "jaxcore", "train", "--model", "lstm", "--task", "parity", "--steps", "150",
              "--batch-size", "8", "--d-model", "16", "--layers", "1", "--log-every", "1",
              "--eval-every", "0", "--checkpoint-every", "5", "--single-device",
              "--no-progress"]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run([sys.executable, *common, "--out", str(a)], env=env, check=True, timeout=300)

    proc = subprocess.Popen(
        [sys.executable, *common, "--out", str(b)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = b / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 23:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 150

    done = subprocess.run(
        [sys.executable, *common, "--out", str(b)], env=env, timeout=300, capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = [ln for ln in done.stdout.decode().splitlines() if ln.startswith("resumed from")]
    assert resumed, done.stdout
    step = int(resumed[0].split()[-1])
    assert 0 < step <= killed_at and step % 5 == 0, (step, killed_at)
    config = json.loads((b / "config.json").read_text())
    assert config["config"]["steps"] == 150
    assert _records(b / "metrics.jsonl") == _records(a / "metrics.jsonl")
    assert sorted(p.name for p in (b / "checkpoints").iterdir() if p.name.isdigit())[-1] == "150"
