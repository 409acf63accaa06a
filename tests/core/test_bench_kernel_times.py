"""benchmarks/harness.py's kernel_times: per-event seconds per call from a profiler trace (on a
GPU, the kernels of each stream; here the CPU backend's host events stand in for them)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from harness import kernel_times  # noqa: E402


def test_kernel_times_reads_the_trace():
    x = jnp.ones((128, 128))
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    assert kernel_times(f, x) == {}  # no "/device:" process on the CPU backend
    host = kernel_times(f, x, calls=3, process="/host:CPU", top=1000)
    assert host and all(v >= 0 for v in host.values())
    # one event per call of the jitted function, keyed "thread | name"
    pjit = [k for k in host if k.endswith("| PjitFunction(<lambda>)")]
    assert len(pjit) == 1 and host[pjit[0]] > 0
    # an executable compiled ahead of time is run as it is (no second jit around it)
    assert kernel_times(f.lower(x).compile(), x, process="/host:CPU")
