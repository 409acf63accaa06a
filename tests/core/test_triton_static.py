"""benchmarks/triton_static.py: the Triton IR of jaxcore's Pallas kernels taken from a CUDA
export on the CPU, the SASS loop parser, the occupancy arithmetic, and (with the ``triton``
package, a test dependency on Linux x86-64) the sm_90a compile of real kernels."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jax._src.lib.triton")

HERE = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def ts():
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location("triton_static", HERE / "triton_static.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["triton_static"] = mod  # (its dataclass looks its module up)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("triton_static", None)
        sys.path.remove(str(HERE))


@pytest.fixture
def on_gpu(monkeypatch):
    """implementation="pallas" off a GPU: only the CUDA lowering runs."""
    from jaxcore import backend

    monkeypatch.setattr(backend, "platform", lambda: "gpu")


def _selective(ts, monkeypatch, config, programs, d=64, length=256):
    from jaxcore.kernels.scan import _pallas, selective_scan

    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", "blocked")
    monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_CONFIG", config)
    monkeypatch.setattr(_pallas, "SELECTIVE_BLOCKED_PROGRAMS", programs)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    args = (s(2, length, d), s(2, length, d), jax.ShapeDtypeStruct((d, 16), jnp.float32),
            s(2, length, 16), s(2, length, 16))  # fmt: skip
    f = lambda *a: selective_scan(*a, delta_softplus=True, implementation="pallas")  # noqa: E731
    return ts.triton_kernels(f, *args)


def test_kernels_from_a_cuda_export(ts, on_gpu, monkeypatch):
    """Two kernels (chunk ends, then outputs) with the grid, warps, stages and loop executions
    the blocked kernel's plan gives: 64 channels / 32 = 2 channel blocks, 256 steps / T=4 =
    64 blocks in 8 chunks (target 32 programs = 2 x 2 x 8)."""
    ks = _selective(ts, monkeypatch, (32, 4, 1, 2), 32)
    assert [k.name for k in ks] == [
        "jaxcore_selective_scan_blocked_chunk_ends",
        "jaxcore_selective_scan_blocked",
    ]
    ends, out = ks
    assert ends.grid == (2, 2, 7) and out.grid == (2, 2, 8)
    assert (out.num_warps, out.num_stages) == (1, 2)
    assert ends.loops == [8]  # 8 blocks of T=4 steps per chunk
    assert out.loops == [7, 8]  # the 7 earlier chunks folded in, then its 8 blocks
    assert "tt.scan" in out.ir and "tt.func" in out.ir
    one = _selective(ts, monkeypatch, (32, 4, 1, 2), 0)
    assert [k.name for k in one] == ["jaxcore_selective_scan_blocked"]
    assert one[0].grid == (2, 2, 1) and one[0].loops == [64]


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MUFU.EX2 R1, R2 ;
        /*0020*/                   FFMA R3, R1, R3, R4 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   LDS.128 R4, [R0] ;
        /*0050*/                   SHFL.BFLY PT, R5, R4, 0x1, 0x1f ;
        /*0060*/               @!P1 BRA 0x40 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_loops_and_histogram(ts):
    sass = ts.parse_sass(SASS)
    assert len(sass) == 9 and sass[1][1] == "MUFU.EX2"
    assert ts.innermost_loops(sass) == [(1, 3), (4, 6)]  # (BRA 0x80 to itself: no body)
    assert ts.histogram(sass[1:4]) == {"MUFU": 1, "FFMA": 1, "BRA": 1}
    assert ts._smem_bytes(sass) == 16


def test_dynamic_ops_pair_loops_in_order(ts):
    """Each SASS loop body runs executions - 1 more times, paired with the Triton IR's
    innermost loops in program order."""
    sass = ts.parse_sass(SASS)
    rec = {"_ops": ts.histogram(sass), "_smem_all": ts._smem_bytes(sass),
           "_bodies": [sass[1:4], sass[4:7]]}  # fmt: skip
    k = ts.TritonKernel("k", "", 1, 1, (1, 1, 1), loops=[10, 3])
    ops, smem, exact = ts.dynamic_ops(k, rec)
    assert exact and ops["MUFU"] == 10 and ops["SHFL"] == 3 and smem == 3 * 16
    k.loops = [None, 3]  # a bound that is not a constant: the longest body, the most executions
    ops, _, exact = ts.dynamic_ops(k, rec)
    assert not exact and ops["MUFU"] == 3


def test_occupancy(ts):
    # 255 registers -> 256 per thread, 8192 per warp: 8 one-warp blocks per SM
    assert ts.occupancy(255, 1, 0) == {"blocks_per_sm": 8, "warps_per_sm": 8}
    assert ts.occupancy(64, 4, 1024) == {"blocks_per_sm": 8, "warps_per_sm": 32}
    # shared memory binds: 100 KiB blocks, 2 per SM
    assert ts.occupancy(32, 4, 100 * 1024)["blocks_per_sm"] == 2
    assert ts.occupancy(16, 1, 0)["blocks_per_sm"] == 32  # the block-count limit


def test_issue_model_scales_with_the_grid(ts):
    """A grid that cannot fill the device is charged for it: 66 one-warp programs use half the
    SMs and one sub-partition of each, 8x the time of a full device."""
    rec = {"_ops": {"FFMA": 1000}, "_smem_all": 0, "_bodies": [], "warps_per_sm": 8}
    full = ts.TritonKernel("k", "", 4, 1, (132 * 2, 1, 1))
    thin = ts.TritonKernel("k", "", 1, 1, (66, 1, 1))
    t_full = ts.issue_model([(full, rec)], None)["issue_s"]
    t_thin = ts.issue_model([(thin, rec)], None)["issue_s"]
    work = lambda k: k.programs * k.num_warps  # noqa: E731
    assert t_thin / work(thin) == pytest.approx(8 * t_full / work(full))


# ------------------------------------------------------------------------------------------
# compiled for sm_90a with Triton's compiler (ptxas from the triton wheel)


def test_blocked_kernel_compiles_without_shuffles_or_spills(ts, on_gpu, monkeypatch):
    """The time-first blocked tiles keep each lane's steps in registers: the main loop of the
    one-warp (32, 4, 1, 2) kernels have one exp2 per element (4 x 16 per lane), no spill, and
    (nearly) no warp shuffle. The model's record has every resource."""
    pytest.importorskip("triton")
    ks = _selective(ts, monkeypatch, (32, 4, 1, 2), 32)
    recs = [ts.compile_sm90(k) for k in ks]
    for r in recs:
        assert r["stack_bytes"] == 0 and r["spill_instructions"] == 0 and r["registers"] <= 255
        # 4 x 16 exp2 of dt A, and at most an exp and a log per step for the softplus of dt
        assert 4 * 16 <= r["loop"]["ops"]["MUFU"] <= 4 * 16 + 2 * 4
    # the scan and the sum over N in-thread: no shuffle in the output kernel; the chunk-end
    # kernel sums dt over the block's steps across a few lanes (session 6's (channels, N, T)
    # tiles: 216 shuffles a block)
    assert "SHFL" not in recs[1]["loop"]["ops"]
    assert recs[0]["loop"]["ops"].get("SHFL", 0) <= 8
    model = ts.issue_model(list(zip(ks, recs)), 10**6)
    assert model["loops_paired"]
    assert set(model) >= {"issue_s", "mufu_s", "shfl_s", "smem_s", "memory_s", "bound_s"}
    assert model["bound_s"] == max(
        v for k, v in model.items() if k.endswith("_s") and k != "requested_s"
    )


def test_report_cli_case(ts, capsys):
    """The CLI path of one case (IR only: the benchmark shape, nothing compiled)."""
    ts.main(["--cases", "ssd_fused", "--ir-only"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["kernel"] for line in lines] == [
        "jaxcore_ssd_chunk_states", "jaxcore_ssd_state_passing", "jaxcore_ssd_fused_outputs"
    ]  # fmt: skip


def test_every_case_lowers(ts, capsys):
    """Every case (scans, ssd, attention, paged decode) at its benchmark shape lowers to Triton
    IR and finds its kernels, each with a grid and a loop."""
    ts.main(["--ir-only"])
    recs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {r["case"] for r in recs} == set(ts.CASES)
    for r in recs:
        assert r["kernel"].startswith("jaxcore_") and r["programs"] >= 1
        assert r["loop_executions"], r["kernel"]


def test_pallas_traffic_sums_the_cost_estimates(ts, on_gpu, monkeypatch):
    """The bytes the blocked kernels' cost estimates give, at least their inputs and outputs;
    None where a pallas_call carries no estimate."""
    from jax.experimental import pallas as pl
    from jaxcore.kernels.scan import _pallas, selective_scan

    monkeypatch.setattr(_pallas, "SELECTIVE_KERNEL", "blocked")
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    args = (s(2, 256, 64), s(2, 256, 64), jax.ShapeDtypeStruct((64, 16), jnp.float32),
            s(2, 256, 16), s(2, 256, 16))  # fmt: skip
    f = lambda *a: selective_scan(*a, delta_softplus=True, implementation="pallas")  # noqa: E731
    io = 3 * 2 * 256 * 64 * 2 + 2 * 2 * 256 * 16 * 2
    assert ts.pallas_traffic(f, *args) >= io

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    g = lambda x: pl.pallas_call(copy, out_shape=x, interpret=True)(x)  # noqa: E731
    assert ts.pallas_traffic(g, jnp.ones((8, 8))) is None
