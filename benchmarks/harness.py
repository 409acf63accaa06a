"""Side-by-side benchmark harness: ours vs a named peer, in the same process, alternating.

Each case prints one JSON object per line (``{"case", "peer", "ours_s", "peer_s", "ratio",
"ours_temp_bytes", "peer_temp_bytes", ...}``; ``ratio`` = peer_s / ours_s, so > 1 means jaxcore is
faster), then a human table at the end. Times are wall clock medians after warm-up with
``block_until_ready``; memory is the compiled executable's temporary allocation
(``jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes``).

Usage in a benchmark script::

    from harness import Bench
    bench = Bench("matmul")
    bench.compare("dot 1024", ours=f, peer=g, peer_name="numpy", args=(a, b), flops=2 * n**3)
    bench.finish()
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def block(x: Any) -> Any:
    """Wait for every array leaf of ``x`` (numpy results pass through)."""
    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x
    )


def temp_bytes(fn: Callable, *args: Any) -> int | None:
    """Temporary bytes of ``jax.jit(fn)`` compiled for ``args`` (None if unavailable)."""
    try:
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        ma = jitted.lower(*args).compile().memory_analysis()
        return None if ma is None else int(ma.temp_size_in_bytes)
    except Exception as e:  # memory analysis is best effort on some backends
        print(f"# memory_analysis failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def compile_seconds(fn: Callable, *args: Any) -> float:
    """Wall seconds to lower and compile ``jax.jit(fn)`` for ``args``."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def kernel_times(fn: Callable, *args: Any, calls: int = 5, process: str = "/device:",
                 top: int = 12) -> dict[str, float]:  # fmt: skip
    """Seconds per call of each event ``jax.jit(fn)(*args)`` records in a profiler trace on
    the processes whose names start with ``process`` ("/device:GPU:0": its kernels, through
    CUPTI), keyed "thread | event" (a kernel on a stream, an XLA op or module line), summed over
    ``calls`` calls after a warm-up and divided by ``calls``; the ``top`` largest. Empty where
    the trace has no such process (the CPU backend records "/host:CPU" only). Best effort: a
    profiler failure prints to stderr and returns {}."""
    import collections
    import glob
    import gzip
    import shutil
    import tempfile

    compiled = hasattr(fn, "lower") or isinstance(fn, jax.stages.Compiled)
    jitted = fn if compiled else jax.jit(fn)
    block(jitted(*args))
    tmp = tempfile.mkdtemp(prefix="jaxcore_prof_")
    try:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                block(jitted(*args))
        (path,) = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz"))
        with gzip.open(path, "rb") as fp:
            events = json.load(fp)["traceEvents"]
    except Exception as e:  # no profiler plugin / CUPTI: the caller times as usual
        print(f"# kernel_times failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = [e for e in events if e.get("ph") == "M"]
    pids = {e["pid"] for e in meta if e.get("name") == "process_name"
            and str(e.get("args", {}).get("name", "")).startswith(process)}  # fmt: skip
    threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", ""))
               for e in meta if e.get("name") == "thread_name"}  # fmt: skip
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in pids:
            thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
            total[f"{thread} | {e.get('name')}"] += float(e.get("dur", 0.0)) * 1e-6 / calls
    return dict(total.most_common(top))


def time_alternating(
    fns: Sequence[Callable],
    args: Sequence[Any],
    *,
    reps: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
) -> list[float]:
    """Median wall seconds of each fn(*args), calls interleaved so drift hits all alike."""
    for f in fns:
        for _ in range(warmup):
            block(f(*args))
    samples: list[list[float]] = [[] for _ in fns]
    t_start = time.perf_counter()
    r = 0
    while r < reps or (time.perf_counter() - t_start < min_time and r < 100 * reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            block(f(*args))
            samples[i].append(time.perf_counter() - t0)
        r += 1
    return [statistics.median(s) for s in samples]


def time_blocks(
    fns: Sequence[Callable],
    args: Sequence[Any],
    *,
    reps: int = 5,
    stat: Callable[[list[float]], float] = statistics.median,
) -> list[float]:
    """``stat`` (median, or e.g. ``min``) of the wall seconds of each fn(*args): all warmed
    first, then each timed in its own block of ``reps`` consecutive calls.

    For functions whose memory churn (e.g. an eager peer allocating full-size temporaries, or a
    multi-GB reference) would otherwise slow the calls interleaved with them."""
    for f in fns:
        block(f(*args))
    out = []
    for f in fns:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            block(f(*args))
            ts.append(time.perf_counter() - t0)
        out.append(float(stat(ts)))
    return out


def machine() -> dict:
    """What the numbers came from."""
    dev = jax.devices()[0]
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
    }


class Bench:
    """Collects cases, prints JSON lines as they finish and a table at the end."""

    def __init__(self, name: str, argv: Sequence[str] | None = None):
        p = argparse.ArgumentParser(description=f"benchmark: {name}")
        p.add_argument("--reps", type=int, default=5, help="timed repetitions per function")
        p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
        p.add_argument("--json-out", default=None, help="also write all records to this file")
        self.parser = p
        self.name = name
        self.records: list[dict] = []
        self._argv = argv
        self.args: argparse.Namespace | None = None

    def parse(self, extra: Callable[[argparse.ArgumentParser], None] | None = None):
        if extra is not None:
            extra(self.parser)
        self.args = self.parser.parse_args(self._argv)
        print(json.dumps({"benchmark": self.name, "machine": machine()}), flush=True)
        return self.args

    @property
    def reps(self) -> int:
        return self.args.reps if self.args else 5

    def record(self, rec: dict) -> dict:
        rec = {"benchmark": self.name, **rec}
        self.records.append(rec)
        print(json.dumps(rec), flush=True)
        return rec

    def compare(
        self,
        case: str,
        *,
        ours: Callable,
        peer: Callable | None,
        peer_name: str,
        args: Sequence[Any],
        flops: float | None = None,
        items: float | None = None,
        memory: bool = True,
        reps: int | None = None,
        timing: str = "alternating",
        **extra: Any,
    ) -> dict:
        """Time ``ours`` and ``peer`` on ``args`` (alternately, or ``timing="blocks"``: each in
        its own block of reps); record ratio and memory."""
        fns = [ours] + ([peer] if peer is not None else [])
        if timing not in ("alternating", "blocks"):
            raise ValueError(f"timing: expected 'alternating' or 'blocks', got {timing!r}")
        timer = time_alternating if timing == "alternating" else time_blocks
        times = timer(fns, args, reps=reps or self.reps)
        rec: dict[str, Any] = {"case": case, "peer": peer_name, "ours_s": times[0]}
        if timing != "alternating":
            rec["timing"] = timing
        if peer is not None:
            rec["peer_s"] = times[1]
            rec["ratio"] = times[1] / times[0]
        if memory:
            rec["ours_temp_bytes"] = temp_bytes(ours, *args)
            if peer is not None and hasattr(peer, "lower"):
                rec["peer_temp_bytes"] = temp_bytes(peer, *args)
        if flops is not None:
            rec["ours_gflops"] = flops / times[0] / 1e9
            if peer is not None:
                rec["peer_gflops"] = flops / times[1] / 1e9
        if items is not None:
            rec["ours_mitems_s"] = items / times[0] / 1e6
            if peer is not None:
                rec["peer_mitems_s"] = items / times[1] / 1e6
        rec.update(extra)
        return self.record(rec)

    def finish(self) -> None:
        """Print the human table (and write --json-out)."""
        if self.args is not None and self.args.json_out:
            with open(self.args.json_out, "w") as f:
                json.dump({"machine": machine(), "records": self.records}, f, indent=1)
        cols = ["case", "peer", "ours_s", "peer_s", "ratio", "ours_temp_bytes", "peer_temp_bytes"]
        extra = sorted({k for r in self.records for k in r} - set(cols) - {"benchmark"})
        cols += extra
        rows = [[_fmt(r.get(c)) for c in cols] for r in self.records]
        widths = [
            max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
            for i, c in enumerate(cols)
        ]
        print()
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and v > 10**6:
        return f"{v / 2**20:.1f}MiB"
    return str(v)
