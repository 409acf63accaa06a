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
  collective); :func:`abort` makes every pending or later barrier of the group raise at once,
  and a per-process heartbeat (a daemon thread writing a counter to the coordinator every
  :data:`HEARTBEAT_INTERVAL_S`) lets a barrier name a peer that died without raising
  (SIGKILL, out of memory, host lost) after ``peer_timeout_s`` instead of waiting out its
  timeout.
  Gloo creates its communicator at the first collective and gives up if the processes arrive
  more than 30 s apart (e.g. one compiled slower); the training loop compiles each step ahead
  of time and meets at a barrier before running it.
- :func:`free_port`: a free TCP port for a local coordinator.
- :func:`launch`: start N local processes of one Python program with bounded wall time; all are
  always reaped, and the first that fails stops the others and raises with its stderr.

It must run before anything creates a JAX backend (``jax.devices()``, the first array).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import itertools
import math
import numbers
import os
import socket
import subprocess
import sys
import tempfile
import threading
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
      heartbeat_timeout_seconds: JAX's own liveness limit: seconds without a heartbeat after
        which the coordination service declares a peer dead and terminates every process with
        a fatal error. :func:`barrier` notices a dead peer sooner (``peer_timeout_s``) and
        raises a ``RuntimeError`` naming it; keep this one larger.
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
    _SEEN.clear()
    _DEAD.clear()
    _start_heartbeat()
    from jaxcore import devices

    return devices.describe()


def shutdown() -> None:
    """Leave the multi-process program (``jax.distributed.shutdown``); a no-op if not joined.

    Stops this process's heartbeat and marks it as having left, so a peer still waiting at a
    barrier this process will never reach raises at once ("left the group") rather than
    reporting it dead. ``jax.distributed.shutdown`` then waits until every process has shut
    down or exited. If a :func:`barrier` of this process found a dead peer, that handshake
    could only end in JAX's heartbeat timeout and a fatal error, so it is skipped: the JAX
    client is detached instead (the same happens at interpreter exit).
    """
    _stop_heartbeat(left=True)
    if _DEAD and is_initialized():
        _detach()
    if is_initialized():
        jax.distributed.shutdown()


_BARRIERS = itertools.count()


_ABORT_KEY = "jaxcore:abort"


def _client():
    from jax._src import distributed as _jd  # the coordinator client has no public handle

    return _jd.global_state.client


# --- liveness ------------------------------------------------------------------------------
# Each process writes ``jaxcore:alive/<process index>`` = an increasing counter every
# HEARTBEAT_INTERVAL_S from a daemon thread, and "left" when it shuts down or exits. A waiting
# barrier reads the directory now and then and records, with its own monotonic clock, when it
# first saw each peer's current value (no clock is compared across machines). A peer that has
# not arrived and whose value has not changed for peer_timeout_s is reported dead.

HEARTBEAT_INTERVAL_S = 1.0
"""Seconds between two heartbeats of a process (one small key-value write each)."""

MIN_PEER_TIMEOUT_S = 3 * HEARTBEAT_INTERVAL_S
"""The smallest ``peer_timeout_s`` :func:`barrier` accepts (two missed heartbeats)."""

_ALIVE_DIR = "jaxcore:alive"
_LEFT = "left"
_LIVENESS_POLL_S = 0.5  # a waiting barrier reads the heartbeats at most this often

_SEEN: dict[int, tuple[str, float]] = {}  # peer -> (its heartbeat value, monotonic s first seen)
_DEAD: set[int] = set()  # peers a barrier of this process declared dead


class _Heartbeat:
    """A daemon thread that keeps ``jaxcore:alive/<rank>`` changing while this process lives.

    It never raises: a failed write is dropped silently (the next one may succeed; if the
    coordinator is gone JAX terminates the process anyway), and it stops quietly when asked or
    when the JAX client it was started with has been shut down.
    """

    def __init__(self, client, rank: int, interval: float):
        self.client = client
        self.key = f"{_ALIVE_DIR}/{rank}"
        self.interval = interval
        self.count = 0
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # held for each write, so no beat lands after "left"
        self._beat()  # peers see this process as soon as initialize returns
        self.thread = threading.Thread(target=self._run, name="jaxcore-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        self.count += 1
        with contextlib.suppress(Exception):
            self.client.key_value_set(self.key, str(self.count), allow_overwrite=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                if self.stopped.is_set() or _client() is not self.client:
                    return
                self._beat()

    def stop(self, *, left: bool) -> None:
        self.stopped.set()
        # A write stuck on an unreachable coordinator must not hang shutdown or exit.
        if self.lock.acquire(timeout=5.0):
            try:
                if left and _client() is self.client:
                    with contextlib.suppress(Exception):
                        self.client.key_value_set(self.key, _LEFT, allow_overwrite=True)
            finally:
                self.lock.release()
        self.thread.join(timeout=1.0)


_HEARTBEAT: _Heartbeat | None = None
_AT_EXIT_REGISTERED = False


def _start_heartbeat() -> None:
    """Start this process's heartbeat (once per joined group; a no-op in a single process)."""
    global _HEARTBEAT, _AT_EXIT_REGISTERED
    from jax._src import distributed as _jd

    state = _jd.global_state
    client = state.client
    if client is None or state.num_processes <= 1:
        return
    if _HEARTBEAT is not None:
        if _HEARTBEAT.client is client and not _HEARTBEAT.stopped.is_set():
            return
        _HEARTBEAT.stop(left=False)
    _HEARTBEAT = _Heartbeat(client, state.process_id, HEARTBEAT_INTERVAL_S)
    if not _AT_EXIT_REGISTERED:  # after jax's own atexit hook, so it runs before it
        atexit.register(_at_exit)
        _AT_EXIT_REGISTERED = True


def _stop_heartbeat(*, left: bool) -> None:
    global _HEARTBEAT
    if _HEARTBEAT is not None:
        _HEARTBEAT.stop(left=left)
        _HEARTBEAT = None


def _detach() -> None:
    """Drop JAX's coordinator client (and service) without the shutdown handshake.

    The handshake is a barrier over every process; with a dead peer it ends only at JAX's
    heartbeat timeout, in a fatal error. The objects are kept alive on purpose (their
    destructors would run the same handshake); the OS reclaims them at exit.
    """
    from jax._src import distributed as _jd

    state = _jd.global_state
    for attr in ("preemption_sync_manager", "client", "service"):
        obj = getattr(state, attr)
        if obj is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))  # never destroyed
            setattr(state, attr, None)


def _at_exit() -> None:
    """Interpreter exit: mark this process as gone; skip the handshake if a peer is dead."""
    with contextlib.suppress(Exception):
        _stop_heartbeat(left=True)
        if _DEAD and is_initialized():
            _detach()


def _read_heartbeats(client) -> tuple[dict[int, str], float]:
    """Every process's heartbeat value and the monotonic time read; updates ``_SEEN``."""
    entries = client.key_value_dir_get(_ALIVE_DIR)
    now = time.monotonic()
    values = {}
    for key, value in entries:
        with contextlib.suppress(ValueError):
            values[int(key.rsplit("/", 1)[1])] = value
    for rank, value in values.items():
        if rank not in _SEEN or _SEEN[rank][0] != value:
            _SEEN[rank] = (value, now)
    return values, now


def _fmt_ranks(ranks: Sequence[int]) -> str:
    return ("process " if len(ranks) == 1 else "processes ") + ", ".join(map(str, ranks))


def _check_peers(
    name: str,
    beats: dict[int, str],
    read_at: float,
    missing: Sequence[int],
    arrived: int,
    n: int,
    peer_timeout_s: float,
) -> None:
    """Raise if a process that has not arrived at barrier ``name`` left the group or is dead.

    ``beats`` must have been read before the barrier's key directory that gave ``missing``: a
    peer missing there had not arrived when its heartbeat was read, so a "left" marker means
    it left without arriving.
    """
    where = f"jaxcore.distributed.barrier({name!r})"
    left = [r for r in missing if beats.get(r) == _LEFT]
    if left:
        raise RuntimeError(
            f"{where}: {_fmt_ranks(left)} left the group (distributed.shutdown or process exit) "
            f"without reaching this barrier; {arrived} of {n} processes arrived"
        )
    silent = {
        r: read_at - _SEEN[r][1]
        for r in missing
        if r in beats and r in _SEEN and read_at - _SEEN[r][1] > peer_timeout_s
    }
    if silent:
        _DEAD.update(silent)
        ranks = sorted(silent)
        ages = ", ".join(f"{silent[r]:.1f} s" for r in ranks)
        raise RuntimeError(
            f"{where}: {_fmt_ranks(ranks)} sent no heartbeat for {ages} "
            f"(peer_timeout_s={peer_timeout_s:g}) and did not arrive: presumably dead "
            f"(killed, out of memory, host lost); {arrived} of {n} processes arrived"
        )


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


def barrier(name: str, timeout_s: float = 600.0, *, peer_timeout_s: float | None = 30.0) -> None:
    """Block until every process has reached ``barrier(name)``; a no-op in a single process.

    Uses the coordinator service of ``jax.distributed`` (each process writes a key, then polls
    the barrier's key directory; no device collective), so it works before any communicator
    exists. Every process must call the same barriers in the same order (a per-process counter
    keeps repeated names distinct). While waiting it also watches for :func:`abort`, so a
    process that fails after joining stops the others at once, and the heartbeats of the
    processes that have not arrived: one whose heartbeat has not changed for
    ``peer_timeout_s`` seconds (as timed by this process's clock) is reported dead, and one
    that called :func:`shutdown` or exited is reported as gone at once.

    The heartbeat comes from a daemon thread started by :func:`initialize` (or by the first
    barrier, if the group was joined with ``jax.distributed.initialize``; a peer that has
    never written one is not judged). Python switches threads every few milliseconds and XLA
    compilation, execution and ``time.sleep`` release the GIL, so a busy but live process keeps
    beating; a C extension call that holds the GIL for longer than ``peer_timeout_s`` (or a
    process stopped with SIGSTOP / a debugger) would be reported dead: raise
    ``peer_timeout_s`` or pass ``None`` for such programs.

    Args:
      name: what the processes are waiting for (in messages and the coordinator's keys).
      timeout_s: seconds to wait in all.
      peer_timeout_s: seconds without a heartbeat after which a peer that has not arrived is
        declared dead (>= :data:`MIN_PEER_TIMEOUT_S`); ``None`` disables the check. Keep it
        below ``initialize(heartbeat_timeout_seconds=...)`` (100 s), after which JAX itself
        terminates every process with a fatal error.

    Raises:
      ValueError: on a non-positive ``timeout_s`` or a ``peer_timeout_s`` below the minimum.
      RuntimeError: if more than one process exists but ``jax.distributed`` is not initialized,
        another process called :func:`abort` (its message is included), a process that has not
        arrived left the group or fell silent for ``peer_timeout_s`` (the message names the
        barrier, the process indices and how long they were silent), the coordinator cannot be
        reached, or ``timeout_s`` passes first (the message names the barrier and how many
        processes arrived). After a dead peer, exiting this process skips JAX's shutdown
        handshake (which would wait for the dead peer).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    if peer_timeout_s is not None and (
        isinstance(peer_timeout_s, bool)
        or not isinstance(peer_timeout_s, numbers.Real)
        or not peer_timeout_s >= MIN_PEER_TIMEOUT_S
    ):
        raise ValueError(
            f"peer_timeout_s: expected None or a number of seconds >= {MIN_PEER_TIMEOUT_S:g} "
            f"(3 heartbeat intervals of {HEARTBEAT_INTERVAL_S:g} s), got {peer_timeout_s!r}"
        )
    if jax.process_count() == 1:
        return
    client = _client()
    if client is None:
        raise RuntimeError("jaxcore.distributed.barrier: jax.distributed is not initialized")
    _start_heartbeat()  # a no-op after jaxcore's initialize
    n = jax.process_count()
    me = jax.process_index()
    key = f"jaxcore:barrier:{name}:{next(_BARRIERS)}"
    client.key_value_set(f"{key}/{me}", "1")
    start = time.monotonic()
    deadline = start + timeout_s
    next_liveness = start + _LIVENESS_POLL_S if peer_timeout_s is not None else math.inf
    delay = 0.001
    while True:
        try:
            beats = None
            if time.monotonic() >= next_liveness:  # read before the barrier's directory
                beats, read_at = _read_heartbeats(client)
                next_liveness = read_at + _LIVENESS_POLL_S
            entries = client.key_value_dir_get(key)
        except Exception as e:  # the coordinator (process 0) is gone or unreachable
            raise RuntimeError(
                f"jaxcore.distributed.barrier({name!r}): lost the coordination service: {e}"
            ) from e
        if len(entries) >= n:
            return
        why = _abort_message(client)
        if why is not None:
            raise RuntimeError(f"jaxcore.distributed.barrier({name!r}): aborted by {why}")
        if beats is not None:
            here = set()
            for k, _ in entries:
                with contextlib.suppress(ValueError):
                    here.add(int(k.rsplit("/", 1)[1]))
            missing = [r for r in range(n) if r not in here and r != me]
            _check_peers(name, beats, read_at, missing, len(entries), n, peer_timeout_s)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"jaxcore.distributed.barrier({name!r}): timed out after {timeout_s} s with "
                f"{len(entries)} of {n} processes arrived"
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
