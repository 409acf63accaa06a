"""Multi-process setup: a thin, documented layer over ``jax.distributed``.

jaxcore has no transport of its own. Several processes (one per host, or one per GPU) become one
JAX program through ``jax.distributed.initialize``; after that ``jax.devices()`` lists every
device of every process, a :class:`jax.sharding.Mesh` spans them, and ``jit`` / ``shard_map``
collectives cross process boundaries (NCCL on GPUs, ICI/DCN on TPUs, gloo over TCP on CPUs).

This module adds three things on top:

- :func:`initialize`: the same arguments as ``jax.distributed.initialize``, plus the CPU
  specifics (cross-process CPU collectives through gloo, a per-process CPU device count), and
  the ``JAXCORE_COORDINATOR`` / ``JAXCORE_NUM_PROCESSES`` / ``JAXCORE_PROCESS_ID`` environment
  variables that :func:`launch` sets. On managed clusters (SLURM, Open MPI, Kubernetes, Cloud
  TPU) call it with no arguments and JAX detects the cluster.
- :func:`barrier`: wait for every process at a named point through the coordinator service (no
  collective); :func:`abort` makes every pending or later barrier of the group raise at once.
  Gloo creates its communicator at the first collective and gives up if the processes arrive
  more than 30 s apart (e.g. one compiled slower); the training loop compiles each step ahead
  of time and meets at a barrier before running it.
- :func:`free_port`: a free TCP port for a local coordinator.
- :func:`launch`: start N local processes of one Python program with bounded wall time; all are
  always reaped, and the first that fails stops the others and raises with its stderr.

It must run before anything creates a JAX backend (``jax.devices()``, the first array).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import jax

ENV_COORDINATOR = "JAXCORE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXCORE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXCORE_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXCORE_LOCAL_DEVICE_COUNT"

CPU_COLLECTIVES = ("gloo", "mpi")


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public query for "has a backend been created"

    return bool(xla_bridge.backends_are_initialized())


def _parse_address(address: str, name: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}: expected 'HOST:PORT' with a port in 1..65535, got {address!r}")
    return address


def is_initialized() -> bool:
    """True once :func:`initialize` (or ``jax.distributed.initialize``) has run in this process."""
    return bool(jax.distributed.is_initialized())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    cpu_collectives: str = "gloo",
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
    **kwargs,
) -> dict:
    """Join this process to a multi-process JAX program; returns :func:`jaxcore.devices.describe`.

    Args:
      coordinator_address: "HOST:PORT" of process 0's coordinator service (every process passes
        the same value). ``None`` reads ``$JAXCORE_COORDINATOR``, and if that is unset too, lets
        JAX detect a managed cluster (SLURM, Open MPI, Kubernetes, Cloud TPU).
      num_processes: total number of processes (``None``: ``$JAXCORE_NUM_PROCESSES`` / detected).
      process_id: this process's rank in ``[0, num_processes)`` (``None``: ``$JAXCORE_PROCESS_ID``).
      local_device_count: CPU only: how many host devices this process exposes (sets
        ``jax_num_cpu_devices``; ``None``: ``$JAXCORE_LOCAL_DEVICE_COUNT`` or JAX's default).
        Ignored by GPU/TPU backends, which use the physical devices (see ``local_device_ids``).
      cpu_collectives: cross-process collectives for CPU devices: "gloo" (TCP, no extra
        dependency) or "mpi" (needs an MPI library; see JAX's docs). GPU/TPU backends use
        NCCL/ICI regardless.
      local_device_ids: GPU only: restrict this process to these local device ordinals (one
        process per GPU); passed to JAX.
      initialization_timeout: seconds to wait for all processes to connect.
      heartbeat_timeout_seconds: seconds without a heartbeat after which a peer is declared
        dead and the program aborts (so a crashed peer does not hang the others forever).
      **kwargs: passed to ``jax.distributed.initialize`` unchanged.

    Raises:
      RuntimeError: if a JAX backend already exists in this process (initialize first) or the
        process is already initialized.
      ValueError: on a malformed address, count or rank (naming the argument).
    """
    if is_initialized():
        raise RuntimeError("jaxcore.distributed.initialize: this process is already initialized")
    if _backends_started():
        raise RuntimeError(
            "jaxcore.distributed.initialize must run before JAX creates a backend "
            "(before jax.devices() or the first array); call it at the top of the program"
        )
    env = os.environ
    if coordinator_address is None and env.get(ENV_COORDINATOR):
        coordinator_address = env[ENV_COORDINATOR]
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    if local_device_count is None and env.get(ENV_LOCAL_DEVICES):
        local_device_count = int(env[ENV_LOCAL_DEVICES])
    if coordinator_address is not None:
        _parse_address(coordinator_address, "coordinator_address")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes: expected a positive int, got {num_processes}")
    if process_id is not None:
        if num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id: expected an int in [0, {num_processes}), got {process_id}"
            )
        if process_id < 0:
            raise ValueError(f"process_id: expected a non-negative int, got {process_id}")
    if cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(
            f"cpu_collectives: expected one of {CPU_COLLECTIVES}, got {cpu_collectives!r}"
        )

    # The CPU client reads these when it is created (after the coordinator is up). Setting
    # them is harmless on GPU/TPU hosts: they only concern the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if local_device_count is not None:
        if local_device_count < 1:
            raise ValueError(
                f"local_device_count: expected a positive int, got {local_device_count}"
            )
        jax.config.update("jax_num_cpu_devices", int(local_device_count))

    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        **kwargs,
    )
    from jaxcore import devices

    return devices.describe()


def shutdown() -> None:
    """Leave the multi-process program (``jax.distributed.shutdown``); a no-op if not joined."""
    if is_initialized():
        jax.distributed.shutdown()


_BARRIERS = itertools.count()


_ABORT_KEY = "jaxcore:abort"


def _client():
    from jax._src import distributed as _jd  # the coordinator client has no public handle

    return _jd.global_state.client


def _abort_message(client) -> str | None:
    try:
        return client.key_value_try_get(_ABORT_KEY)
    except Exception:  # NOT_FOUND: nobody aborted (the client raises for a missing key)
        return None


def abort(message: str) -> None:
    """Tell every process of the group that this one is giving up.

    Their :func:`barrier` calls (pending or later) then raise ``RuntimeError`` naming this
    process and ``message`` within ~0.1 s instead of waiting for their timeout. A no-op in a
    single process or before :func:`initialize`. The first abort of a group wins.
    """
    if not is_initialized() or jax.process_count() == 1:
        return
    client = _client()
    if client is None:
        return
    with contextlib.suppress(Exception):  # ALREADY_EXISTS: another process aborted first
        client.key_value_set(_ABORT_KEY, f"process {jax.process_index()}: {message}")


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Block until every process has reached ``barrier(name)``; a no-op in a single process.

    Uses the coordinator service of ``jax.distributed`` (each process writes a key, then polls
    the barrier's key directory; no device collective), so it works before any communicator
    exists. Every process must call the same barriers in the same order (a per-process counter
    keeps repeated names distinct). While waiting it also watches for :func:`abort`, so a
    process that fails after joining stops the others at once.

    Raises:
      RuntimeError: if more than one process exists but ``jax.distributed`` is not initialized,
        another process called :func:`abort` (its message is included), or ``timeout_s``
        passes first (the message names the barrier and how many processes arrived).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    if jax.process_count() == 1:
        return
    client = _client()
    if client is None:
        raise RuntimeError("jaxcore.distributed.barrier: jax.distributed is not initialized")
    n = jax.process_count()
    key = f"jaxcore:barrier:{name}:{next(_BARRIERS)}"
    client.key_value_set(f"{key}/{jax.process_index()}", "1")
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        arrived = len(client.key_value_dir_get(key))
        if arrived >= n:
            return
        why = _abort_message(client)
        if why is not None:
            raise RuntimeError(f"jaxcore.distributed.barrier({name!r}): aborted by {why}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"jaxcore.distributed.barrier({name!r}): timed out after {timeout_s} s with "
                f"{arrived} of {n} processes arrived"
            )
        time.sleep(delay)
        delay = min(2 * delay, 0.1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0, read, close)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """What one launched process left behind."""

    process_id: int
    returncode: int
    stdout: str
    stderr: str


class LaunchError(RuntimeError):
    """A launched process failed or the group ran out of time; carries every result so far."""

    def __init__(self, message: str, results: Sequence[ProcessResult]):
        super().__init__(message)
        self.results = tuple(results)


def launch(
    args: Sequence[str],
    num_processes: int,
    *,
    local_device_count: int | None = None,
    timeout: float = 120.0,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    python: str | None = None,
) -> list[ProcessResult]:
    """Run ``python *args`` as ``num_processes`` cooperating processes on this machine.

    Each process gets ``$JAXCORE_COORDINATOR=host:port``, ``$JAXCORE_NUM_PROCESSES``,
    ``$JAXCORE_PROCESS_ID`` (and ``$JAXCORE_LOCAL_DEVICE_COUNT`` if given), so a program that
    calls :func:`initialize` with no arguments joins the group. Stdout/stderr go to temporary
    files (no pipe can fill up and block a child).

    Bounded and always reaped: the call returns when every process has exited with status 0. If
    any exits non-zero, the others are killed at once and :class:`LaunchError` is raised with
    that process's stderr; if ``timeout`` seconds pass first, all are killed and it raises too.

    Args:
      args: the program and its arguments after the interpreter, e.g. ``["-m", "pkg.mod"]`` or
        ``["script.py", "--flag"]``.
      num_processes: how many processes (>= 1).
      local_device_count: CPU devices per process (``None``: JAX's default).
      timeout: wall seconds for the whole group.
      host, port: where process 0 runs the coordinator (``port=None``: :func:`free_port`).
      env: extra environment variables for every process.
      cwd: working directory of the processes.
      python: interpreter (default ``sys.executable``).

    Returns:
      One :class:`ProcessResult` per process, in rank order.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes: expected a positive int, got {num_processes}")
    if timeout <= 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout}")
    port = free_port(host) if port is None else port
    base = dict(os.environ)
    base.update(env or {})
    base[ENV_COORDINATOR] = f"{host}:{port}"
    base[ENV_NUM_PROCESSES] = str(num_processes)
    if local_device_count is not None:
        base[ENV_LOCAL_DEVICES] = str(local_device_count)
        # A forced host device count from a parent (e.g. a test session) would override ours.
        flags = [
            f
            for f in base.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        base["XLA_FLAGS"] = " ".join(flags)
    exe = python or sys.executable
    procs: list[subprocess.Popen] = []
    files: list[tuple] = []
    results: dict[int, ProcessResult] = {}

    def read(i: int) -> ProcessResult:
        out, err = files[i]
        out.seek(0)
        err.seek(0)
        return ProcessResult(i, procs[i].returncode, out.read(), err.read())

    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    try:
        for i in range(num_processes):
            penv = dict(base)
            penv[ENV_PROCESS_ID] = str(i)
            out = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
            err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
            files.append((out, err))
            procs.append(
                subprocess.Popen(
                    [exe, *args], stdout=out, stderr=err, env=penv, cwd=cwd, close_fds=True
                )
            )
        deadline = time.monotonic() + timeout
        while len(results) < num_processes:
            for i, p in enumerate(procs):
                if i in results or p.poll() is None:
                    continue
                results[i] = read(i)
                if p.returncode != 0:
                    kill_all()
                    everyone = [read(j) for j in range(num_processes)]
                    raise LaunchError(
                        f"process {i} of {num_processes} exited with status {p.returncode}; "
                        f"its stderr (last 4000 chars):\n{results[i].stderr[-4000:]}",
                        everyone,
                    )
            if len(results) == num_processes:
                break
            if time.monotonic() > deadline:
                kill_all()
                everyone = [read(j) for j in range(num_processes)]
                waiting = [i for i in range(num_processes) if i not in results]
                tails = "\n".join(
                    f"--- process {j} stderr:\n{everyone[j].stderr[-2000:]}" for j in waiting
                )
                raise LaunchError(
                    f"processes {waiting} still running after {timeout:g} s; killed\n{tails}",
                    everyone,
                )
            time.sleep(0.05)
        return [results[i] for i in range(num_processes)]
    finally:
        kill_all()
        for out, err in files:
            out.close()
            err.close()
