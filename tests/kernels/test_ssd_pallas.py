"""ssd implementation="pallas_interpret" (the Pallas kernels of _ssd_pallas) vs the sequential
reference, and the Triton lowering of implementation="pallas" for CUDA, checked on CPU.

SSD_CONFIG's block is lowered to 16 so that chunks of 32 steps run two row blocks (the loop over
column blocks k <= m) and SSD_PASS_CONFIG's state block to 64 so that phase 2 has several blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.scan import _ssd_pallas, ssd, ssd_reference

from jaxcore import backend
from jaxcore.testing import assert_close

PI = "pallas_interpret"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_ssd_pallas, "SSD_CONFIG", (32, 16, 4, 2))
    monkeypatch.setattr(_ssd_pallas, "SSD_PASS_CONFIG", (64, 4, 2))


def make(dtype, bsz=2, length=37, heads=4, p=3, n=5, groups=2, seed=0):
    k = jax.random.split(jax.random.key(seed), 8)
    r = lambda i, s: jax.random.normal(k[i], s, jnp.float32)  # noqa: E731
    bc = (bsz, length, n) if groups is None else (bsz, length, groups, n)
    state = jnp.float64 if dtype == jnp.float64 else jnp.float32
    return dict(
        x=r(0, (bsz, length, heads, p)).astype(dtype),
        dt=jax.nn.softplus(r(1, (bsz, length, heads)) - 1.0).astype(dtype),
        A=(-jnp.exp(r(2, (heads,)))).astype(state),
        B=r(3, bc).astype(dtype),
        C=r(4, bc).astype(dtype),
        initial_state=r(5, (bsz, heads, p, n)).astype(state),
        D=r(6, (heads, p)).astype(state),
    )


def drop_optional(d, with_state: bool, d_shape: str | None) -> dict:
    """Without the initial state unless ``with_state``; D (H, P) ("hp"), (H,) ("h") or none."""
    d = dict(d)
    if not with_state:
        del d["initial_state"]
    if d_shape is None:
        del d["D"]
    elif d_shape == "h":
        d["D"] = d["D"][:, 0]
    return d


def run(d, impl, chunk_size=None, **kw):
    """jit of ssd with the final state; a fresh trace per call (the knobs are read at trace)."""
    d = dict(d)
    args = [d.pop(k) for k in ("x", "dt", "A", "B", "C")]
    f = functools.partial(ssd, chunk_size=chunk_size, implementation=impl,
                          return_final_state=True, **kw)  # fmt: skip
    return jax.jit(f)(*args, **d)


@pytest.mark.parametrize(
    "length, groups, chunk, with_state, d_shape",
    [
        (64, 2, 16, True, "hp"),  # L a multiple of the chunk, 4 chunks
        (37, None, 32, True, "h"),  # ragged L, B/C shared by all heads, two row blocks
        (37, 1, None, False, None),  # default chunk (SSD_CONFIG: 32 here), no D, no initial state
        (1, 4, 16, True, "hp"),  # L = 1, one group per head
    ],
)
def test_matches_reference_f64(x64, length, groups, chunk, with_state, d_shape):
    d = drop_optional(make(jnp.float64, length=length, groups=groups), with_state, d_shape)
    y, h = run(d, PI, chunk)
    y_ref, h_ref = run(d, "reference")
    assert y.dtype == jnp.float64 and h.dtype == jnp.float64
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_low_precision(dtype):
    check_low_precision(make(dtype, length=45, p=16, n=16), dtype)


def check_low_precision(d, dtype):
    """bf16/f32 inputs, f32 state; the reference runs on the same inputs upcast to f32."""
    y, h = run(d, PI, 16)
    d32 = {k: v.astype(jnp.float32) for k, v in d.items()}
    y_ref, h_ref = run(d32, "reference")
    assert y.dtype == dtype and h.dtype == jnp.float32
    # bf16: the dot operands (decay-weighted C B^T, the chunk start states) are rounded to bf16
    assert_close(y, y_ref, dtype=dtype, scale=4)
    assert_close(h, h_ref, dtype=dtype, scale=4 if dtype == jnp.bfloat16 else 20)


# resets: inside a chunk, at a chunk's first step, a chunk entirely inside one segment, several
# resets in one chunk, and (batch 1) a segment running through the padded tail
SEG = np.array([[0] * 5 + [1] * 11 + [2] * 16 + [3] * 3 + [4] * 2 + [5] * 8,
                [7] * 20 + [2] * 25])  # fmt: skip


@pytest.mark.parametrize("chunk", [16, 32])
def test_segment_ids_match_reference(x64, chunk):
    d = make(jnp.float64, length=45, groups=2)
    y, h = run(d, PI, chunk, segment_ids=SEG)
    y_ref, h_ref = run(d, "reference", segment_ids=SEG)
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)


@pytest.mark.parametrize("knob, groups, want_hb", [(2, 2, 2), (4, None, 4), (3, None, 2)])
def test_heads_per_program(x64, monkeypatch, knob, groups, want_hb):
    """Phase 3 with several heads of a group per program (each C B^T block shared by them)."""
    monkeypatch.setattr(_ssd_pallas, "SSD_HEADS_PER_PROGRAM", knob)
    cfg = _ssd_pallas.make_config(None, 45, 3, 5, 4, groups or 1, True, "chunked")
    assert cfg.hb == want_hb  # the largest divisor of the heads per group <= the knob
    d = make(jnp.float64, length=45, groups=groups)
    if groups is None:
        d["D"] = d["D"][:, 0]  # D per head, (H,)
    seg = None if knob == 3 else SEG
    y, h = run(d, PI, 16, segment_ids=seg)
    y_ref, h_ref = run(d, "reference", segment_ids=seg)
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)


def test_gradients_match_reference(x64):
    d = make(jnp.float64, length=21, groups=2)
    names = ("x", "dt", "A", "B", "C", "initial_state", "D")
    seg = np.array([[0] * 7 + [1] * 14, [3] * 21])

    def grads(impl):
        def loss(*vals):
            y, h = run(dict(zip(names, vals)), impl, 16, segment_ids=seg)
            return jnp.sum(jnp.sin(y)) + jnp.sum(h**2)

        return jax.jit(jax.grad(loss, tuple(range(len(names)))))(*(d[k] for k in names))

    for name, g, g_ref in zip(names, grads(PI), grads("reference")):
        assert_close(g, g_ref, scale=100, err_msg=name)


def test_forward_mode_matches_reference(x64):
    """jvp in every input (with resets, D, initial and final state) equals the reference's: the
    Pallas path's custom JVP is the XLA ssd's."""
    d = make(jnp.float64, length=21, groups=2)
    t = make(jnp.float64, length=21, groups=2, seed=1)
    names = ("x", "dt", "A", "B", "C", "initial_state", "D")
    seg = np.array([[0] * 7 + [1] * 14, [3] * 21])

    def f(impl):
        return lambda *vals: run(dict(zip(names, vals)), impl, 16, segment_ids=seg)

    primals, tangents = tuple(d[k] for k in names), tuple(t[k] for k in names)
    got = jax.jit(lambda *p: jax.jvp(f(PI), p, tangents))(*primals)
    want = jax.jvp(f("reference"), primals, tangents)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, scale=100)


def test_jit_vmap_and_nan_stays_in_later_chunks():
    d = make(jnp.float32, bsz=3, length=40)
    one = lambda x, dt, B, C: ssd(  # noqa: E731
        x[None], dt[None], d["A"], B[None], C[None], D=d["D"], chunk_size=16, implementation=PI
    )[0]
    got = jax.jit(jax.vmap(one))(d["x"], d["dt"], d["B"], d["C"])
    want = ssd_reference(d["x"], d["dt"], d["A"], d["B"], d["C"], D=d["D"])
    assert_close(got, want, scale=20)
    # a NaN in x (batch 0, step 20 in chunk 1 = steps 16..31, head 1, column 0) reaches that
    # column from its step on (and may reach its chunk's earlier steps: 0 * NaN in the
    # intra-chunk matmul), never chunk 0 nor any other batch, head or column
    x = d["x"].at[0, 20, 1, 0].set(jnp.nan)
    y = np.asarray(ssd(x, d["dt"], d["A"], d["B"], d["C"], chunk_size=16, implementation=PI))
    assert np.isnan(y[0, 20:, 1, 0]).all()
    nan = np.isnan(y)
    nan[0, 16:, 1, 0] = False
    assert not nan.any()


def test_bad_arguments(monkeypatch):
    d = make(jnp.float32, length=8)
    args = [d[k] for k in ("x", "dt", "A", "B", "C")]
    for bad in (24, 8, 0):
        with pytest.raises(ValueError, match="chunk_size"):
            ssd(*args, chunk_size=bad, implementation=PI)
    with pytest.raises(ValueError, match="segment_ids"):
        ssd(*args, segment_ids=jnp.zeros((2, 9), jnp.int32), implementation=PI)
    with pytest.raises(ValueError, match="pallas"):
        ssd(*args, implementation="pallas")  # CPU backend
    monkeypatch.setattr(_ssd_pallas, "SSD_HEADS_PER_PROGRAM", 0)
    with pytest.raises(ValueError, match="SSD_HEADS_PER_PROGRAM"):
        ssd(*args, implementation=PI)
    with pytest.raises(ValueError, match="x: expected"):
        ssd(args[0][..., 0], *args[1:], implementation=PI)


# ----------------------------------------------------------------------------------------------
# SSD_KERNEL="fused": segment states, segment passing, then one program per (P block, head,
# segment, batch) walking its segment's chunks with the state in registers. SSD_FUSED_CONFIG's
# target program count sets the segments: (chunks per segment, segments) asserted per case.


def use_fused(monkeypatch, programs: int, q: int = 16) -> None:
    monkeypatch.setattr(_ssd_pallas, "SSD_KERNEL", "fused")
    monkeypatch.setattr(_ssd_pallas, "SSD_FUSED_CONFIG", (q, 16, 4, 2, programs))


def plan(length, p, chunk, bsz=2, heads=4):
    cfg = _ssd_pallas.make_config(chunk, length, p, 5, heads, 1, True, "chunked")
    return _ssd_pallas.segment_plan(bsz, length, heads, p, cfg)


@pytest.mark.parametrize(
    "length, groups, chunk, p, programs, want, with_state, d_shape",
    [
        (64, 2, 16, 3, 8, (4, 1), True, "hp"),  # one segment of 4 chunks
        (64, 2, 16, 3, 64, (1, 4), True, "hp"),  # a segment per chunk
        (100, 2, 16, 40, 96, (3, 3), True, "hp"),  # 4 P blocks, 3 x 3 chunks (L padded to 144)
        (37, None, None, 3, 16, (2, 2), False, "h"),  # default chunk (16 here), ragged, no h0
        (1, 4, 16, 3, 64, (1, 1), True, None),  # L = 1
    ],
)
def test_fused_matches_reference_f64(
    x64, monkeypatch, length, groups, chunk, p, programs, want, with_state, d_shape
):
    use_fused(monkeypatch, programs)
    assert plan(length, p, chunk) == want
    d = drop_optional(make(jnp.float64, length=length, groups=groups, p=p), with_state, d_shape)
    y, h = run(d, PI, chunk)
    y_ref, h_ref = run(d, "reference")
    assert y.dtype == jnp.float64 and h.dtype == jnp.float64
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)


@pytest.mark.parametrize("programs, want", [(24, (1, 3)), (16, (2, 2)), (8, (3, 1))])
def test_fused_segment_ids_match_reference(x64, monkeypatch, programs, want):
    """Resets inside chunks and segments, at their first steps, and in the padded tail."""
    use_fused(monkeypatch, programs)
    assert plan(45, 3, 16) == want
    d = make(jnp.float64, length=45, groups=2)
    y, h = run(d, PI, 16, segment_ids=SEG)
    y_ref, h_ref = run(d, "reference", segment_ids=SEG)
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_low_precision_and_nan_locality(monkeypatch, dtype):
    use_fused(monkeypatch, 48)
    assert plan(48, 32, 16) == (1, 3)  # 2 P blocks x 4 heads x 2 batch x 3 segments
    d = make(dtype, length=48, p=32, n=16)
    check_low_precision(d, dtype)
    # a NaN in x (batch 0, step 20: chunk 1 = segment 1, head 1, column 0) reaches that column
    # from its chunk on (0 * NaN in the intra-chunk matmul) and the final state's row 0 of
    # head 1, nothing else: not the other P block (columns 16..31), heads or batch
    x = d["x"].at[0, 20, 1, 0].set(jnp.nan)
    y, h = (np.asarray(v) for v in run({**d, "x": x}, PI, 16))
    assert np.isnan(y[0, 20:, 1, 0]).all() and np.isnan(h[0, 1, 0]).all()
    nan = np.isnan(y)
    nan[0, 16:, 1, 0] = False
    assert not nan.any()
    nan = np.isnan(h)
    nan[0, 1, 0] = False
    assert not nan.any()


def test_fused_bad_config(monkeypatch):
    d = make(jnp.float32, length=8)
    args = [d[k] for k in ("x", "dt", "A", "B", "C")]
    monkeypatch.setattr(_ssd_pallas, "SSD_KERNEL", "one_pass")
    with pytest.raises(ValueError, match="SSD_KERNEL"):
        ssd(*args, implementation=PI)
    use_fused(monkeypatch, 8, q=24)
    with pytest.raises(ValueError, match="SSD_FUSED_CONFIG"):
        ssd(*args, implementation=PI)


# ----------------------------------------------------------------------------------------------
# the GPU lowering, checked without a GPU: export for CUDA runs the Pallas -> Triton IR lowering
# (power-of-two shapes, supported primitives, loops), not Triton's compiler


def test_lowers_to_triton_ir(monkeypatch):
    pytest.importorskip("jax._src.lib.triton")
    from jax import export

    monkeypatch.setattr(backend, "platform", lambda: "gpu")  # allow implementation="pallas"
    monkeypatch.setattr(_ssd_pallas, "SSD_CONFIG", (128, 64, 4, 2))
    monkeypatch.setattr(_ssd_pallas, "SSD_PASS_CONFIG", (512, 4, 2))
    # the benchmark's shape family (bf16 inputs, f32 state, P = N = 64, one group), L shortened
    # (with D (H, P) and an initial state, then D (H,), segment_ids and no initial state)
    d = make(jnp.bfloat16, length=300, heads=4, p=64, n=64, groups=1)
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    seg = np.repeat(np.array([[0, 1, 1], [2, 2, 2]]), 100, axis=1)

    def loss(*vals, seg=None):
        y, h = run(dict(zip(names, vals)), "pallas", segment_ids=seg)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    vals = [d[k] for k in names]
    with_seg = lambda *v: loss(*v, None, seg=seg)  # noqa: E731
    seg_args = [*vals[:5], vals[5][:, 0]]
    cases = [(loss, vals, 3), (with_seg, seg_args, 3)]  # the three phases, once
    # differentiated: the custom VJP's forward rule runs the XLA form (no Pallas kernel at all)
    cases += [(jax.value_and_grad(with_seg, (0, 1, 3)), seg_args, 0)]
    for knob, (fn, args, want) in zip((1, 4, 4), cases):  # 4 heads per phase-3 program later
        monkeypatch.setattr(_ssd_pallas, "SSD_HEADS_PER_PROGRAM", knob)
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)
        text = exp(*args).mlir_module()
        assert text.count("xla.gpu.triton") == want


@pytest.mark.parametrize("programs, calls", [(512, 3), (8, 1)])
def test_fused_lowers_to_triton_ir(monkeypatch, programs, calls):
    """ "fused" at the benchmark's tiles (Q=64, a 64-column P block, f32 state in registers):
    segment states + passing + fused outputs, or the fused outputs alone (one segment)."""
    pytest.importorskip("jax._src.lib.triton")
    from jax import export

    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    monkeypatch.setattr(_ssd_pallas, "SSD_KERNEL", "fused")
    monkeypatch.setattr(_ssd_pallas, "SSD_FUSED_CONFIG", (64, 64, 4, 2, programs))
    d = make(jnp.bfloat16, length=300, heads=4, p=64, n=64, groups=1)
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    seg = np.repeat(np.array([[0, 1, 1], [2, 2, 2]]), 100, axis=1)

    def loss(*vals):
        y, h = run(dict(zip(names, vals)), "pallas", segment_ids=seg)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(jax.jit(loss), platforms=["cuda"], disabled_checks=checks)
    text = exp(*(d[k] for k in names)).mlir_module()
    assert text.count("xla.gpu.triton") == calls
    assert ("jaxcore_ssd_chunk_states" in text) == (calls == 3)


@pytest.mark.parametrize("kernel", ["three_phase", "fused"])
def test_shard_map_over_batch_with_gradients(monkeypatch, kernel):
    """Under shard_map, in interpret mode with check_vma=False (JAX's Pallas interpreter trips
    over varying-axis types; the compiled kernels do not: next test). "fused": 2 segments per
    shard (1 batch x 4 heads x 2 segments = the 8 programs asked for)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P_

    if kernel == "fused":
        use_fused(monkeypatch, 8)

    d = make(jnp.float32, bsz=2, length=20)
    names = ("x", "dt", "A", "B", "C")
    args = [d[k] for k in names]
    mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])
    specs = (P_("batch"), P_("batch"), P_(), P_("batch"), P_("batch"))
    f = lambda impl: lambda *a: ssd(*a, chunk_size=16, implementation=impl)  # noqa: E731
    sm = jax.shard_map(f(PI), mesh=mesh, in_specs=specs, out_specs=P_("batch"), check_vma=False)
    sharded = [jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip(args, specs)]
    assert_close(jax.jit(sm)(*sharded), f("reference")(*args), scale=20)
    loss = lambda g: lambda *a: jnp.sum(g(*a) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(loss(sm), tuple(range(5))))(*sharded)  # dA: summed over shards
    want = jax.grad(loss(f("reference")), tuple(range(5)))(*args)
    for a, b, name in zip(got, want, names):
        assert_close(a, b, scale=100, err_msg=name)


@pytest.mark.parametrize("kernel", ["three_phase", "fused"])
def test_compiled_kernels_lower_inside_shard_map_with_check_vma(monkeypatch, kernel):
    """The three forward kernels' output types take the inputs' varying mesh axes, so on a GPU
    they run inside jax.shard_map with check_vma=True (lowered for 'cuda' here); "fused": its
    three kernels (segment states, passing, fused outputs: 4 segments of 16 steps)."""
    import re

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P_

    if kernel == "fused":
        use_fused(monkeypatch, 16)
    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    d = make(jnp.bfloat16, bsz=2, length=64)
    names = ("x", "dt", "A", "B", "C")
    mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])
    specs = (P_("batch"), P_("batch"), P_(), P_("batch"), P_("batch"))
    f = lambda *a: ssd(*a, chunk_size=16, implementation="pallas")  # noqa: E731
    sm = jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P_("batch"))
    args = [
        jax.ShapeDtypeStruct(d[k].shape, d[k].dtype, sharding=NamedSharding(mesh, s))
        for k, s in zip(names, specs)
    ]
    text = jax.jit(sm).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3
    assert ("jaxcore_ssd_fused_outputs" in text) == (kernel == "fused")


@pytest.mark.parametrize(
    "config", [(64, 64, 8, 2, 512), (64, 32, 4, 2, 512), (128, 64, 8, 2, 512), (32, 64, 4, 2, 16)]
)
def test_fused_tilings(x64, monkeypatch, config):
    """The "fused" tilings benchmarks/gpu_scan.py sweeps on a GPU (chunk 32-128, P blocks of
    32-64 columns, one segment or several), at P = 64, N = 16, L = 300 (ragged), with resets."""
    monkeypatch.setattr(_ssd_pallas, "SSD_KERNEL", "fused")
    monkeypatch.setattr(_ssd_pallas, "SSD_FUSED_CONFIG", config)
    d = make(jnp.float64, length=300, heads=2, p=64, n=16, groups=1)
    seg = np.repeat(np.array([[0, 1, 1], [2, 2, 3]]), 100, axis=1)
    y, h = run(d, PI, segment_ids=seg)
    y_ref, h_ref = run(d, "reference", segment_ids=seg)
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)
