"""PIM, GPU, BitSerial, StreamingDataflow, energy table, objective, bad input, monotonicity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxcore.hardware import (
    GPU,
    PIM,
    BitSerial,
    EnergyTable,
    Systolic,
    attention_pipeline,
    batch_designs,
    cost,
    cost_table,
    evaluate_designs,
    fifo_depths,
    gemm_workload,
    objective,
    project,
    trace,
)

GEMV = gemm_workload(1, 1024, 1024, bits=16)
GEMM = gemm_workload(256, 256, 256, bits=8)


def small_decode():
    from jaxcore.hardware import gpt2_decode_step

    fn, args = gpt2_decode_step(d_model=128, n_layers=2, context=64, vocab=512)
    return trace(fn, *args)


# -- energy table -----------------------------------------------------------------------------
def test_horowitz_points_reproduced():
    t = EnergyTable()
    for got, want in (
        (t.add_pj(8), 0.03),
        (t.add_pj(32), 0.1),
        (t.mul_pj(8), 0.2),
        (t.mul_pj(32), 3.1),
        (t.add_pj(16, floating=True), 0.4),
        (t.add_pj(32, floating=True), 0.9),
        (t.mul_pj(16, floating=True), 1.1),
        (t.mul_pj(32, floating=True), 3.7),
        (64 * t.sram_pj_per_bit(8.0), 10.0),
        (64 * t.sram_pj_per_bit(32.0), 20.0),
        (64 * t.sram_pj_per_bit(1024.0), 100.0),
    ):
        assert float(got) == pytest.approx(want, rel=1e-5)
    b = jnp.linspace(2.0, 32.0, 16)
    assert np.all(np.diff(np.asarray(t.mul_pj(b))) > 0)


def test_technology_scaling():
    t = EnergyTable()
    s = t.scale_to(22.5, vdd=0.9)
    assert float(s.int_mul_8) == pytest.approx(0.1, rel=1e-6)  # E ~ L at equal V
    assert float(s.area_int_mul_8) == pytest.approx(282.0 / 4, rel=1e-6)  # A ~ L^2
    assert float(s.dram_pj_per_bit) == float(t.dram_pj_per_bit)  # DRAM not scaled
    assert float(t.scale_to(7).int_add_8) < float(t.scale_to(16).int_add_8)
    with pytest.raises(ValueError, match="node_nm"):
        t.scale_to(0)
    mine = dataclasses.replace(t, int_mul_8=0.5)
    assert float(mine.mul_pj(8)) == 0.5


# -- PIM / GPU -----------------------------------------------------------------------------------
def test_pim_presets_peak():
    aim_chip = PIM.aim(channels=2.0)  # one AiM chip: 2 channels x 16 banks
    assert float(aim_chip.peak_flops()) == pytest.approx(1.024e12)
    assert float(PIM.hbm_pim().peak_flops()) == pytest.approx(1.2288e12)


def test_pim_gemv_hand_computed():
    hw = PIM(
        channels=1.0,
        banks_per_channel=2.0,
        macs_per_bank=16.0,
        row_bytes=2048.0,
        col_bytes=32.0,
        tRCD=10.0,
        tRP=10.0,
        tCCD=1.0,
        freq=1.0,
        io_bw=32.0,
    )
    c = cost(hw, gemm_workload(1, 64, 64, bits=16))
    # 8192 B of weights -> 4096 B per bank = 2 rows, 128 columns; 16 weights per column = 1 cycle
    t_bank = 2 * 20.0 + 128 * 1.0
    t_in = 64 * 2 / 32.0
    t_out = 64 * 2 / 32.0
    assert float(c.latency_s) == pytest.approx((t_bank + t_in + t_out) * 1e-9, rel=1e-5)


def test_gpu_roofline_regimes():
    g = GPU(launch_us=0.0)
    big = cost(g, gemm_workload(8192, 8192, 8192, bits=16))
    assert float(big.latency_s) == pytest.approx(2 * 8192**3 / (312e12 * 0.6), rel=1e-4)
    small = cost(g, GEMV)
    assert float(small.latency_s) == pytest.approx(2 * 1024 * 1026 / (1555e9 * 0.8), rel=1e-3)


def test_pim_beats_gpu_on_decode():
    from jaxcore.hardware import compare_pim_gpu

    wl = small_decode()
    r = compare_pim_gpu(wl, PIM.pim_gpt(), GPU())
    assert r["speedup"] > 1 and r["energy_ratio"] > 1
    assert {o.kind for o in wl.ops} >= {"matmul", "transcendental", "reduction"}


# -- bit-serial --------------------------------------------------------------------------------
def test_bitserial_latency_proportional_to_bits():
    hw = BitSerial(mem_bw=1e6)  # compute bound
    lat = [float(cost(hw, GEMM, precision=b).latency_s) for b in (2.0, 4.0, 8.0)]
    assert lat[1] == pytest.approx(2 * lat[0], rel=1e-6)
    assert lat[2] == pytest.approx(4 * lat[0], rel=1e-6)
    loom = BitSerial(mem_bw=1e6, serial="both")
    l4 = float(cost(loom, GEMM, precision=4.0).latency_s)
    assert l4 == pytest.approx(16 * float(cost(loom, GEMM, precision=1.0).latency_s), rel=1e-6)


def test_bitserial_per_group_bits():
    hw = BitSerial(mem_bw=1e6, bits_per_cycle=2.0)
    groups = jnp.array([3.0, 4.0, 4.0, 6.0])  # ceil(b/2) = 2, 2, 2, 3 -> mean 2.25
    lat_g = float(cost(hw, GEMM, precision={"dot_general": groups}).latency_s)
    lat_1 = float(cost(hw, GEMM, precision=2.0).latency_s)
    assert lat_g == pytest.approx(2.25 * lat_1, rel=1e-6)
    g = jax.grad(lambda b: cost(hw, GEMM, precision={"dot_general": b}).latency_s)(groups)
    assert np.all(np.asarray(g) > 0)


# -- streaming ---------------------------------------------------------------------------------
def test_streaming_attention_fifo_result():
    naive, deferred = attention_pipeline(64, "naive"), attention_pipeline(64, "deferred")
    fn = [sum(fifo_depths(naive, n).values()) for n in (64, 128, 256)]
    fd = [sum(fifo_depths(deferred, n).values()) for n in (64, 128, 256)]
    assert fd[0] == fd[1] == fd[2]  # O(1)
    assert fn[2] - fn[1] == 2 * (fn[1] - fn[0]) > 0 and fn[2] >= 2 * 256  # O(n)
    for sd in (naive, deferred):
        c = cost(sd, 256)
        assert float(c.breakdown["ii"]) == 1.0  # full throughput
    assert float(cost(deferred, 256).area_mm2) < float(cost(naive, 256).area_mm2)
    with pytest.raises(ValueError, match="variant"):
        attention_pipeline(64, "other")
    with pytest.raises(ValueError, match="stream length"):
        cost(naive, 0)
    with pytest.raises(ValueError, match="stream length"):
        cost(naive, GEMM)


# -- objective ---------------------------------------------------------------------------------
def test_objective_vmap_10k_designs_and_grad():
    wl = gemm_workload(64, 64, 64)
    designs = batch_designs(
        Systolic(), rows=jnp.linspace(4, 64, 10_000), dram_bw=jnp.linspace(4, 256, 10_000)
    )
    vals = evaluate_designs(designs, wl, area_budget_mm2=5.0)
    assert vals.shape == (10_000,) and np.all(np.isfinite(vals))
    g = jax.grad(lambda h: objective(h, wl, metric="latency"))(Systolic())
    assert float(g.dram_bw) <= 0
    base = float(objective(Systolic(), wl))
    assert float(objective(Systolic(), wl, area_budget_mm2=0.01)) > base
    with pytest.raises(ValueError, match="metric"):
        objective(Systolic(), wl, metric="speed")


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hw, name",
    [
        (Systolic(rows=-4.0), "rows"),
        (Systolic(dram_bw=0.0), "dram_bw"),
        (PIM(io_bw=0.0), "io_bw"),
        (GPU(mem_bw=-1.0), "mem_bw"),
        (BitSerial(pes=0.0), "pes"),
    ],
)
def test_unphysical_parameters_raise(hw, name):
    with pytest.raises(ValueError, match=name):
        cost(hw, GEMM)


def test_projection_inside_jit():
    f = jax.jit(lambda bw: cost(dataclasses.replace(Systolic(), dram_bw=bw), GEMM).latency_s)
    assert np.isfinite(float(f(0.0))) and float(f(0.0)) > float(f(64.0))
    p = project(Systolic(rows=-3.0, dram_bw=0.0))
    assert float(p.rows) == 1.0 and float(p.dram_bw) > 0
    with pytest.raises(ValueError, match="dataflow"):
        Systolic(dataflow="xs")
    with pytest.raises(TypeError, match="hw"):
        cost(object(), GEMM)


def test_cost_table_lists_ops_and_unknown():
    def f(a):
        return jnp.linalg.cholesky(a @ a.T + jnp.eye(8))

    wl = trace(f, jnp.ones((8, 8)), warn=False)
    s = cost_table(Systolic(), wl)
    assert "dot_general" in s and "NOT COSTED" in s and "cholesky" in s


# -- monotonicity (property tests) ---------------------------------------------------------------
MODELS = {
    "systolic": (Systolic(), "dram_bw"),
    "tpu_like": (Systolic.tpu_like(), "dram_bw"),
    "pim": (PIM(), "io_bw"),
    "gpu": (GPU(), "mem_bw"),
    "bitserial": (BitSerial(), "mem_bw"),
}
WL = gemm_workload(33, 70, 129, bits=8)


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(MODELS)), bw=st.floats(0.5, 2000.0), f=st.floats(1.01, 10.0))
def test_more_bandwidth_never_slower(name, bw, f):
    hw, field = MODELS[name]
    lo = cost(dataclasses.replace(hw, **{field: bw}), WL).latency_s
    hi = cost(dataclasses.replace(hw, **{field: bw * f}), WL).latency_s
    assert float(hi) <= float(lo) * (1 + 1e-6)


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(MODELS)), b=st.floats(1.0, 16.0), d=st.floats(0.5, 16.0))
def test_more_bits_never_cheaper(name, b, d):
    hw, _ = MODELS[name]
    lo = cost(hw, WL, precision=b)
    hi = cost(hw, WL, precision=b + d)
    assert float(hi.latency_s) >= float(lo.latency_s) * (1 - 1e-6)
    assert float(hi.energy_j) >= float(lo.energy_j) * (1 - 1e-6)


def test_bitmod_and_bitserial_dot_hooks():
    from jaxcore.hardware import bitmod_group_bits, bitserial_plane_cycles

    w = jax.random.normal(jax.random.key(0), (256, 4))
    g = bitmod_group_bits(w, bits=4, group_size=128, axis=0)
    assert g.shape == (2 * 4,) and float(g[0]) == pytest.approx(4 + 10 / 128)
    wl = gemm_workload(64, 64, 256, bits=8)
    hw = BitSerial(mem_bw=1e6)
    lat_bm = float(cost(hw, wl, precision={"dot_general": g}).latency_s)
    lat_4 = float(cost(hw, wl, precision={"dot_general": (4.0, 8.0)}).latency_s)
    assert lat_bm == pytest.approx(5 / 4 * lat_4, rel=1e-6)  # ceil(4.08) = 5 cycles per MAC
    codes = jnp.array([[1, 0], [2, 0], [0, 0]], jnp.int32)  # column 0 uses planes 0,1; col 1 none
    cyc = bitserial_plane_cycles(codes, 4)
    assert np.asarray(cyc).tolist() == [2.0, 0.0]
    flat = jnp.full((8,), 4.0)
    assert float(cost(hw, wl, precision={"dot_general": flat}).latency_s) == pytest.approx(
        lat_4, rel=1e-6
    )


def test_smooth_gradients_pim_and_bits(x64):
    from jax.test_util import check_grads

    wl = gemm_workload(1, 512, 512, bits=16)

    def pim_energy(e_act, e_col, e_io):
        hw = dataclasses.replace(PIM.pim_gpt(), e_act=e_act, e_col=e_col, e_io=e_io)
        return cost(hw, wl).energy_j * 1e6

    check_grads(pim_energy, (900.0, 0.5, 6.0), order=1, modes=["rev"], rtol=1e-4)

    def sys_energy(bits):  # MAC and SRAM energy are smooth power laws in the bit-width
        return cost(Systolic(), GEMM, precision=bits).energy_j * 1e6

    check_grads(sys_energy, (6.3,), order=1, modes=["rev"], rtol=1e-4)


def test_codesign_loop_with_projection():
    import optax

    wl = gemm_workload(128, 128, 128)
    hw0 = GPU(mem_bw=50.0, peak_tflops=5.0, launch_us=0.0)

    def loss(h):
        return objective(h, wl, metric="latency", power_budget_w=100.0)

    opt = optax.adam(0.1)

    @jax.jit
    def step(hw, state):
        val, g = jax.value_and_grad(loss)(hw)
        upd, state = opt.update(g, state)
        return project(optax.apply_updates(hw, upd)), state, val

    hw, state = hw0, opt.init(hw0)
    vals = []
    for _ in range(15):
        hw, state, val = step(hw, state)
        vals.append(float(val))
    assert vals[-1] < vals[0]
    assert all(float(x) >= 0 for x in jax.tree_util.tree_leaves(hw))
    assert float(hw.mem_bw) > 50.0  # the optimiser bought bandwidth


def test_pim_maps_a_left_matrix_gemv_like_its_transpose():
    """K_cache @ q (matrix on the left, decode attention) costs what q^T @ K_cache^T costs:
    the cache stays in the banks either way, only the vector crosses the I/O."""
    ctx, d = 1024, 64
    left = trace(
        lambda kc, q: kc @ q, jnp.ones((ctx, d), jnp.float16), jnp.ones((d, 1), jnp.float16)
    )
    right = trace(
        lambda q, kt: q @ kt, jnp.ones((1, d), jnp.float16), jnp.ones((d, ctx), jnp.float16)
    )
    hw = PIM.pim_gpt()
    a, b = cost(hw, left), cost(hw, right)
    np.testing.assert_allclose(float(a.latency_s), float(b.latency_s), rtol=1e-6)
    np.testing.assert_allclose(float(a.energy_j), float(b.energy_j), rtol=1e-6)
