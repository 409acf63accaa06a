"""Static GPU report of jaxcore's Pallas Triton kernels, on any machine: no GPU needed.

Each case exports a jitted jaxcore call for CUDA (``jax.export`` with ``platforms=["cuda"]``:
the Pallas -> Triton IR lowering runs on the CPU). It takes the Triton IR of every Pallas kernel
out of the exported module, from the ``__gpu$xla.gpu.triton`` custom calls (name, grid, warps,
stages and the IR, as XLA would receive them). Then it compiles each kernel for sm_90a with the
``triton`` package: Triton's own compiler and the ptxas of its wheel, the nearest thing to XLA's
Triton pipeline off a GPU (XLA pins its own Triton revision). Per kernel it reports:

- registers per thread, local stack bytes and spill instructions (STL/LDL), shared memory;
- occupancy on an H100/H200 SM (blocks and warps per SM) and waves of the grid over 132 SMs;
- the SASS of the kernel's loop: instructions per iteration, MUFU (exp2), SHFL (warp shuffles),
  BAR (block barriers), shared-memory loads/stores, and per element of the kernel's work;
- an issue model: each resource's busy time if the whole kernel ran on it at the sm_90
  per-SM rates (4 warp instructions per clock, 16 MUFU lanes, 32 SHFL lanes, 128 bytes of
  shared memory per clock; 132 SMs at 1.98 GHz), next to the time the case's bytes, and all
  the bytes the kernels move by their cost estimates, take at the copy bandwidth session 5
  measured on an H200 (2.58 TB/s).

The model is a lower bound from instruction counts, **not a timing**. It ranks designs before
a GPU is lent; only ``gpu_scan.py`` on a GPU measures.

Needs ``pip install triton`` (Linux x86-64 wheel, about 290 MB; its ptxas, cuobjdump and
nvdisasm are in the wheel). Without it, ``--ir-only`` still lists the kernels and their grids.

    python benchmarks/triton_static.py                    # the scan cases at gpu_scan's shapes
    python benchmarks/triton_static.py --cases selective_blocked --sass-out /tmp/sass
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

TRITON_TARGET = "__gpu$xla.gpu.triton"

# sm_90 (H100 SXM / H200): per SM
SM90 = dict(
    sms=132,
    clock_hz=1.98e9,
    regs=65536,
    smem=233472,  # 228 KiB, of which a block may use 227 KiB (+1 KiB reserved per block)
    warps=64,
    blocks=32,
    issue=4.0,  # warp instructions per clock (4 schedulers)
    mufu=0.5,  # 16 lanes per clock
    shfl=1.0,  # 32 lanes per clock
    smem_bytes_per_clock=128.0,
)
COPY_BYTES_PER_S = 2.58e12  # session 5, H200: x + 1 on 1 GiB of bf16 (2537-2629 GB/s)


@dataclass
class TritonKernel:
    """One Pallas Triton kernel as XLA receives it."""

    name: str
    ir: str  # Triton IR (MLIR text)
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    loops: list[int | None] = field(default_factory=list)  # innermost scf.for executions

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def triton_kernels(fn: Callable, *args: Any) -> list[TritonKernel]:
    """The Pallas Triton kernels of ``jax.jit(fn)(*args)`` lowered for CUDA, in call order.

    ``args`` may be ``jax.ShapeDtypeStruct``s. Runs on any backend: only the lowering runs."""
    from jax import export
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    checks = [export.DisabledSafetyCheck.custom_call(TRITON_TARGET)]
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    ctx = jax_mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    calls = []

    def find(op):
        if op.name == "stablehlo.custom_call":
            if ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_TARGET:
                calls.append(op)
        return ir.WalkResult.ADVANCE

    out = []
    with ctx:
        module = ir.Module.parse(exported.mlir_module())  # (kept alive: calls point into it)
        module.operation.walk(find)
        for op in calls:
            cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
            i32 = lambda k, cfg=cfg: ir.IntegerAttr(cfg[k]).value  # noqa: E731
            kernel = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)
            out.append(
                TritonKernel(
                    name=ir.StringAttr(cfg["name"]).value,
                    ir=kernel.operation.get_asm(),
                    num_warps=i32("num_warps"),
                    num_stages=i32("num_stages"),
                    grid=(i32("grid_x"), i32("grid_y"), i32("grid_z")),
                    loops=_trip_counts(kernel, ir),
                )
            )
    return out


def _trip_counts(module, ir) -> list[int | None]:
    """Executions of the body of every innermost scf.for of ``module``, in program order: its
    constant trip count times those of the loops around it (None where a bound is not a
    constant)."""
    folds = {"arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b,
             "arith.muli": lambda a, b: a * b}  # fmt: skip

    def const(value) -> int | None:  # (Pallas writes a fori_loop's bound as lower + count)
        owner = value.owner
        if isinstance(owner, ir.Block):
            return None
        if owner.name == "arith.constant":
            return ir.IntegerAttr(owner.attributes["value"]).value
        if owner.name in folds:
            a, b = (const(owner.operands[i]) for i in range(2))
            return None if a is None or b is None else folds[owner.name](a, b)
        return None

    def trips(op) -> int | None:
        lo, hi, step = (const(op.operands[i]) for i in range(3))
        if None in (lo, hi, step) or step <= 0:
            return None
        return max(0, -(-(hi - lo) // step))

    out: list[int | None] = []

    def visit(op, outer: int | None) -> bool:  # True if op is or holds an scf.for
        here = op.name == "scf.for"
        n = outer
        if here:
            t = trips(op)
            n = None if t is None or outer is None else outer * t
        inner = False
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    inner |= visit(child, n)
        if here and not inner:
            out.append(n)
        return here or inner

    visit(module.operation, 1)
    return out


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of each SASS instruction (cuobjdump -sass)."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def innermost_loops(sass: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each loop: a backward branch and its target, keeping
    loops that contain no other loop."""
    index = {addr: i for i, (addr, _, _) in enumerate(sass)}
    loops = []
    for i, (addr, op, operands) in enumerate(sass):
        m = re.match(r"(0x[0-9a-f]+)", operands)
        if op.startswith("BRA") and m and int(m.group(1), 16) < addr:
            target = index.get(int(m.group(1), 16))
            if target is not None:
                loops.append((target, i))
    return [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]


def histogram(sass: list[tuple[int, str, str]]) -> dict[str, int]:
    return dict(collections.Counter(op.split(".")[0] for _, op, _ in sass).most_common())


def _smem_bytes(sass: list[tuple[int, str, str]]) -> int:
    """Bytes per lane moved by shared-memory loads and stores (LDS/STS/LDSM/STSM)."""
    total = 0
    for _, op, _ in sass:
        base, *mods = op.split(".")
        if base in ("LDS", "STS"):
            width = next((int(m) for m in mods if m.isdigit()), 32)
            total += width // 8
        elif base in ("LDSM", "STSM"):  # (a warp moves 8x8 b16 matrices: 16 bytes a lane each)
            total += 16 * next((int(m[1:]) for m in mods if m in ("x2", "x4")), 1)
    return total


# Run in a child process: Triton's compiler brings its own LLVM and MLIR, which stay out of the
# process that holds JAX's; each compile also gets a fresh Triton cache.
_CHILD = """
import json, os, subprocess, sys
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
src, warps, stages, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
opts = {"num_warps": warps, "num_stages": stages}
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
cubin = os.path.join(out, "k.cubin")
with open(cubin, "wb") as f:
    f.write(k.asm["cubin"])
tool = knobs.nvidia.cuobjdump.path
run = lambda *a: subprocess.run([tool, *a, cubin], capture_output=True, text=True, check=True)
json.dump({"usage": run("--dump-resource-usage").stdout, "sass": run("-sass").stdout,
           "ttgir": k.asm["ttgir"], "shared": int(k.metadata.shared)},
          open(os.path.join(out, "result.json"), "w"))
"""


def compile_sm90(kernel: TritonKernel, sass_dir: str | None = None) -> dict:
    """Compile ``kernel`` for sm_90a with the triton package (in a child process); its
    resources and loop SASS. Raises RuntimeError with Triton's message if it does not compile."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(src, "w") as f:
            f.write(kernel.ir)
        args = [src, str(kernel.num_warps), str(kernel.num_stages), tmp]
        env = {**os.environ, "TRITON_CACHE_DIR": os.path.join(tmp, "cache")}
        child = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True,
                               text=True, env=env)  # fmt: skip
        if child.returncode != 0:
            raise RuntimeError(f"triton did not compile {kernel.name}: {child.stderr[-2000:]}")
        with open(os.path.join(tmp, "result.json")) as f:
            got = json.load(f)
    usage, text = got["usage"], got["sass"]
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        for ext, body in (("sass", text), ("ttgir", got["ttgir"])):
            with open(os.path.join(sass_dir, f"{kernel.name}.{ext}"), "w") as f:
                f.write(body)
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    sass = parse_sass(text)
    loops = innermost_loops(sass)
    rec = {
        "registers": res.get("REG"),
        # spills live on the thread's local stack: its size, and the local stores and loads
        # (STL / LDL: Triton kernels have no local arrays, so these are register spills)
        "stack_bytes": res.get("STACK", 0) + res.get("LOCAL", 0),
        "spill_instructions": sum(op.split(".")[0] in ("STL", "LDL") for _, op, _ in sass),
        "shared_bytes": got["shared"],
        "sass_instructions": len(sass),
    }
    rec.update(occupancy(rec["registers"] or 0, kernel.num_warps, rec["shared_bytes"]))
    rec["waves"] = round(kernel.programs / max(1, rec["blocks_per_sm"] * SM90["sms"]), 2)
    bodies = [sass[first : last + 1] for first, last in sorted(loops)]
    if bodies:
        body = max(bodies, key=len)  # the longest innermost loop: the kernel's main loop
        rec["loop"] = {
            "instructions": len(body),
            "ops": {k: v for k, v in histogram(body).items() if v >= 2},
            "smem_bytes_per_lane": _smem_bytes(body),
            "innermost_loops": len(bodies),
        }
    rec["_bodies"] = bodies
    rec["_ops"] = histogram(sass)
    rec["_smem_all"] = _smem_bytes(sass)
    return rec


def occupancy(regs: int, warps: int, shared: int, sm: dict = SM90) -> dict:
    """Blocks and warps per SM for ``regs`` registers per thread (allocated in units of 8 per
    thread, 256 per warp), ``warps`` per block and ``shared`` bytes per block."""
    regs_per_warp = 256 * math.ceil(max(regs, 1) * 32 / 256)
    by_regs = sm["regs"] // (regs_per_warp * warps)
    by_smem = sm["smem"] // (shared + 1024) if shared else sm["blocks"]
    blocks = min(by_regs, by_smem, sm["warps"] // warps, sm["blocks"])
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps}


def dynamic_ops(kernel: TritonKernel, rec: dict) -> tuple[collections.Counter, int, bool]:
    """(estimated SASS instructions one warp executes, by opcode; shared-memory bytes per
    lane; exact pairing): every instruction once, plus each innermost SASS loop's body
    ``executions - 1`` more times, where the SASS loops and the innermost scf.for loops of the
    Triton IR are paired in program order when their counts agree (else, approximately, the
    longest SASS loop gets the most executed scf.for; Triton unrolls or peels some loops, and
    the pipeliner's peeled iterations are counted once)."""
    ops = collections.Counter(rec["_ops"])
    smem = rec["_smem_all"]
    bodies, execs = rec["_bodies"], [n for n in kernel.loops]
    exact = len(bodies) == len(execs) and None not in execs
    if not exact:  # the longest body, the most executions
        body = max(bodies, key=len, default=None)
        bodies, execs = ([body], [max((n for n in execs if n), default=1)]) if body else ([], [])
    for body, n in zip(bodies, execs):
        for op, count in histogram(body).items():
            ops[op] += (n - 1) * count
        smem += (n - 1) * _smem_bytes(body)
    return ops, smem, exact


def issue_model(kernels: list[tuple[TritonKernel, dict]], io_bytes: int | None,
                sm: dict = SM90, traffic: int | None = None) -> dict:  # fmt: skip
    """Seconds each SM resource is busy for the kernels' estimated instructions (dynamic_ops
    of every warp of every program), summed over the kernels (run one after another): issue
    (all instructions), MUFU, SHFL, shared-memory bytes; the copy time of ``io_bytes`` (the
    case's inputs and outputs: memory_s). requested_s: the copy time of ``traffic``, every
    byte the kernels load or store by their cost estimates. It is reported, not part of the
    bound: L2 serves repeated reads (ssd's B and C tiles, read once per head), and for the
    three-phase ssd it exceeds session 5's measured time (139 vs 124 us).

    A kernel gets min(132, programs) SMs, and of each SM's 4 sub-partitions (each with its own
    scheduler, MUFU and shuffle share) only as many as it has resident warps: a grid of 64
    one-warp programs runs at 64/132 of the SMs and 1/4 of each. bound_s is the largest;
    fraction_of_copy = memory_s / bound_s (what gpu_scan measures, under this model)."""
    busy = collections.Counter()
    approx = False
    for k, r in kernels:
        ops, smem, exact = dynamic_ops(k, r)
        approx |= not exact
        warps = k.programs * k.num_warps
        active = min(sm["sms"], k.programs)
        resident = min(r["warps_per_sm"], math.ceil(k.programs / active) * k.num_warps)
        rate = active * min(4, resident) / 4 * sm["clock_hz"]  # SM-clocks per second, scaled
        busy["issue"] += warps * sum(ops.values()) / sm["issue"] / rate
        busy["mufu"] += warps * ops["MUFU"] / sm["mufu"] / rate
        busy["shfl"] += warps * ops["SHFL"] / sm["shfl"] / rate
        busy["smem"] += warps * 32 * smem / sm["smem_bytes_per_clock"] / rate
    out = {f"{k}_s": v for k, v in busy.items()}
    if io_bytes:
        out["memory_s"] = io_bytes / COPY_BYTES_PER_S
    out["bound_s"] = max(out.values())
    if traffic:
        out["requested_s"] = traffic / COPY_BYTES_PER_S
    if io_bytes:
        out["fraction_of_copy"] = out["memory_s"] / out["bound_s"]
    out["loops_paired"] = not approx
    return out


def pallas_traffic(fn: Callable, *args: Any) -> int | None:
    """Bytes every pallas_call of ``fn`` moves by its cost estimate (jaxcore's kernels carry
    one, tested against their bodies in tests/kernels/test_scan_cost_estimate.py), read with
    the workload tracer of jaxcore.hardware; None if a kernel has none."""
    from jaxcore.hardware import trace

    w = trace(fn, *args, warn=False)
    if any("without cost_estimate" in u.reason for u in w.unknown):
        return None
    return int(sum((o.bytes_read + o.bytes_written) * o.count for o in w.ops if o.kind == "custom"))


# ------------------------------------------------------------------------------------------
# cases: gpu_scan's shapes (B=2 L=8192 D=1024 N=16 selective; B=2 L=8192 H=16 P=64 N=64 ssd)


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _selective_case():
    from jaxcore.kernels.scan import selective_scan

    b, length, d, n = 2, 8192, 1024, 16
    args = (_sds((b, length, d)), _sds((b, length, d)), _sds((d, n), jnp.float32),
            _sds((b, length, n)), _sds((b, length, n)))  # fmt: skip
    f = lambda *a: selective_scan(*a, delta_softplus=True, implementation="pallas")  # noqa: E731
    return f, args, 3 * b * length * d * 2 + 2 * b * length * n * 2  # u, delta, y; B, C


def _selective_grad_case():
    """Forward + backward (the saved-state forward, then the Pallas backward kernels)."""
    f, args, io = _selective_case()
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))  # noqa: E731
    return jax.grad(loss, (0, 1, 2, 3, 4)), args, None


def _ssd_case():
    from jaxcore.kernels.scan import ssd

    b, length, h, p, n = 2, 8192, 16, 64, 64
    args = (_sds((b, length, h, p)), _sds((b, length, h)), _sds((h,), jnp.float32),
            _sds((b, length, 1, n)), _sds((b, length, 1, n)))  # fmt: skip
    f = lambda *a: ssd(*a, return_final_state=True, implementation="pallas")  # noqa: E731
    return f, args, 2 * b * length * h * p * 2 + b * length * h * 2 + 2 * b * length * n * 2


def _linear_grad_case():
    """linear_scan h_t = a_t h_{t-1} + b_t (bf16, B=2 L=8192 S=1024, gpu_scan's shape), forward
    and the adjoint scan."""
    from jaxcore.kernels.scan import linear_scan

    args = (_sds((2, 8192, 1024)), _sds((2, 8192, 1024)))
    loss = lambda a, b: jnp.sum(linear_scan(a, b, implementation="pallas").astype(jnp.float32))  # noqa: E731
    return jax.grad(loss, (0, 1)), args, None


def _attention_grad_case():
    """The Triton flash attention (implementation="pallas"), forward and backward; bf16
    B=4 T=4096 N=16 H=128 causal (the matmuls run on tensor cores: the issue model counts their
    instructions, not their tensor-core time, so read registers, spills and occupancy here)."""
    from jaxcore.kernels.attention import dot_product_attention

    shape = (4, 4096, 16, 128)
    args = (_sds(shape), _sds(shape), _sds(shape))

    def loss(q, k, v):
        o = dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
        return jnp.sum(o.astype(jnp.float32))

    return jax.grad(loss, (0, 1, 2)), args, None


def _paged_decode_case():
    """The Triton paged decode: bf16 B=8 N=32 K=8 H=128, 16-token pages, 8192 positions."""
    from jaxcore.kernels.attention import paged_decode_attention

    b, n, kh, h, ps, pages = 8, 32, 8, 128, 16, 8192 // 16
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    pool = _sds((b * pages, ps, kh, h))
    args = (_sds((b, 1, n, h)), pool, pool, i32(b, pages), i32(b))
    f = lambda *a: paged_decode_attention(*a, implementation="pallas")  # noqa: E731
    return f, args, None


# name -> (builder of (fn, args, bytes read + written), module, its knobs for the case)
CASES: dict[str, tuple[Callable, str, dict]] = {
    "selective_chunked": (_selective_case, "_pallas", {"SELECTIVE_KERNEL": "chunked"}),
    "selective_blocked": (_selective_case, "_pallas", {"SELECTIVE_KERNEL": "blocked"}),
    "selective_blocked_one_pass": (
        _selective_case,
        "_pallas",
        {
            "SELECTIVE_KERNEL": "blocked",
            "SELECTIVE_BLOCKED_CONFIG": (8, 16, 4, 2),
            "SELECTIVE_BLOCKED_PROGRAMS": 0,
        },
    ),  # fmt: skip
    "selective_chunked_grad": (
        _selective_grad_case,
        "_pallas",
        {"SELECTIVE_KERNEL": "chunked", "SELECTIVE_BACKWARD": "pallas"},
    ),  # fmt: skip
    "selective_sequential": (_selective_case, "_pallas", {"SELECTIVE_KERNEL": "sequential"}),
    "linear_chunked_grad": (_linear_grad_case, "_pallas", {"LINEAR_KERNEL": "chunked"}),
    "ssd_three_phase": (_ssd_case, "_ssd_pallas", {"SSD_KERNEL": "three_phase"}),
    "ssd_fused": (_ssd_case, "_ssd_pallas", {"SSD_KERNEL": "fused"}),
    "attention_triton_grad": (_attention_grad_case, "attention._pallas", {}),
    "paged_decode": (_paged_decode_case, "attention._paged", {}),
}


@contextlib.contextmanager
def knobs_set(module: str, knobs: dict):
    """Set module-level kernel knobs of ``jaxcore.kernels.<module>`` (``scan.`` where the name
    has no package; read at trace time) and restore them after."""
    mod = importlib.import_module(
        f"jaxcore.kernels.{module if '.' in module else 'scan.' + module}"
    )
    old = {k: getattr(mod, k) for k in knobs}
    try:
        for k, v in knobs.items():
            setattr(mod, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(mod, k, v)


def report(name: str, compile_kernels: bool, sass_dir: str | None = None,
           overrides: dict | None = None) -> list[dict]:  # fmt: skip
    """One JSON record per kernel of case ``name`` (its knobs, then ``overrides``), then one
    with the case's issue model."""
    from jaxcore import backend

    build, module, knobs = CASES[name]
    knobs = {**knobs, **(overrides or {})}
    platform = backend.platform
    backend.platform = lambda: "gpu"  # implementation="pallas" off a GPU: lowering only
    try:
        with knobs_set(module, knobs):
            fn, args, io_bytes = build()
            kernels = triton_kernels(fn, *args)
            traffic = pallas_traffic(fn, *args)
    finally:
        backend.platform = platform
    recs, compiled = [], []
    for k in kernels:
        rec = {"case": name, "knobs": overrides or {}, "kernel": k.name, "grid": list(k.grid),
               "programs": k.programs, "warps": k.num_warps, "stages": k.num_stages,
               "loop_executions": k.loops}  # fmt: skip
        if compile_kernels:
            try:
                r = compile_sm90(k, sass_dir)
                compiled.append((k, r))
                rec.update({key: v for key, v in r.items() if not key.startswith("_")})
            except Exception as e:  # report and go on: one failing kernel must not hide the rest
                rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        recs.append(rec)
    if compile_kernels and len(compiled) == len(kernels):
        model = issue_model(compiled, io_bytes, traffic=traffic)
        recs.append({"case": name, "knobs": overrides or {}, "io_bytes": io_bytes,
                     "traffic_bytes": traffic, "model": model})  # fmt: skip
    return recs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {list(CASES)}")  # fmt: skip
    p.add_argument("--ir-only", action="store_true", help="list the kernels; compile nothing")
    p.add_argument("--sass-out", default=None, help="write each kernel's SASS and TTGIR here")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="override a module knob of the cases (a Python literal), e.g. "
                   "--set 'SELECTIVE_BLOCKED_CONFIG=(32, 8, 4, 2)'; repeatable")  # fmt: skip
    a = p.parse_args(argv)
    overrides = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            p.error(f"--set: expected KNOB=<Python literal>, got {item!r}")
    names = a.cases.split(",")
    bad = sorted(set(names) - set(CASES))
    if bad:
        p.error(f"--cases: unknown {bad}; expected a subset of {list(CASES)}")
    if not a.ir_only:
        # (only its version here: Triton itself runs in child processes, see _CHILD)
        if importlib.util.find_spec("triton") is None:
            p.error("the triton package is needed to compile (pip install triton), or --ir-only")
        print(json.dumps({"benchmark": "triton_static", "jax": jax.__version__, "target": "sm_90a",
                          "triton": importlib.metadata.version("triton")}), flush=True)  # fmt: skip
    for name in names:
        for rec in report(name, not a.ir_only, a.sass_out, overrides):
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
