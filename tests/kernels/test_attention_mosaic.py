"""Mosaic GPU (Hopper) flash attention: the kernel in JAX's Mosaic GPU interpreter, and lowered.

The interpreter runs the kernel's three warpgroups as threads with its barriers, TMA copies,
block ranges, masks and base-2 softmax (matmuls as dot_general: see ``_mosaic.py``); values and
lse are held to the reference computed in float32 from the same bf16/f16 inputs, gradients (the
Triton backward, interpreted) too. The compiled path (wgmma, register layouts) is lowered to a
Mosaic GPU module for the 'cuda' platform on this CPU, which catches layout and shape errors
without a GPU.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.attention import dot_product_attention
from jaxcore.kernels.attention._common import normalize
from jaxcore.kernels.attention._mosaic import attention_mosaic
from jaxcore.kernels.attention._reference import attention_reference

from jaxcore import backend
from jaxcore.testing import assert_close, attention_inputs, attention_loss

# If one thread of JAX's Mosaic GPU interpreter raises, the others wait at their barriers forever:
# a broken kernel would hang the run instead of failing. The thread method kills the worker with
# every thread's stack on stderr (pytest-xdist reports the test and starts a new worker).
pytestmark = pytest.mark.timeout(600, method="thread")

_inputs = attention_inputs


def _f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


_loss = attention_loss


def _attend(impl, q, k, v, kw):
    """(out, lse): the reference, or the Mosaic kernel interpreted with 64-key blocks."""
    inp = normalize(q, k, v, **kw)
    if impl == "reference":
        return attention_reference(inp)
    return attention_mosaic(inp, interpret=True, blocks=dict(block_k=64))


CASES = [
    # (b, t, s, n, k, h, hv), dtype, options, blocks
    ((1, 128, 256, 2, 1, 64, 64), jnp.bfloat16, dict(is_causal=True), dict(block_k=64)),
    ((1, 100, 200, 4, 2, 64, 64), jnp.float16, {}, {}),
    ((1, 200, 300, 2, 2, 32, 96), jnp.bfloat16, dict(local_window_size=(70, 20)), dict(stages=3)),
    ((1, 130, 130, 2, 1, 64, 64), jnp.bfloat16, dict(is_causal=True, logits_soft_cap=5.0), {}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_values_and_lse(case):
    shape, dtype, kw, blocks = CASES[case]
    q, k, v = _inputs(*shape, dtype, seed=case)

    def run(q, k, v):
        return attention_mosaic(normalize(q, k, v, **kw), interpret=True, blocks=blocks)

    out, lse = jax.jit(run)(q, k, v)
    ro, rl = attention_reference(normalize(*_f32(q, k, v), **kw))
    assert out.dtype == dtype and out.shape == ro.shape
    assert lse.dtype == jnp.float32 and lse.shape == rl.shape
    assert_close(out, ro, dtype=dtype, scale=2.0)
    assert_close(lse, rl, dtype=jnp.float32, scale=100.0)


def test_key_value_lengths():
    # per-sequence key lengths: 0 (every row fully masked), ragged, and the full length
    q, k, v = _inputs(3, 128, 200, 2, 1, 64, 64, jnp.bfloat16, seed=5)
    lens = jnp.array([0, 77, 200], jnp.int32)
    kw = dict(is_causal=False, key_value_seq_lengths=lens)

    def f(impl, q, k, v):
        inp = normalize(q, k, v, **kw)
        if impl == "reference":
            out, lse = attention_reference(inp)
        else:
            out, lse = attention_mosaic(inp, interpret=True)
        return _loss(out, lse), (out, lse)

    vg = lambda impl, *a: jax.value_and_grad(  # noqa: E731
        lambda *x: f(impl, *x), argnums=(0, 1, 2), has_aux=True
    )(*a)
    (_, (out, lse)), grads = jax.jit(lambda *a: vg("mosaic", *a))(q, k, v)
    (_, (ro, rl)), rgrads = vg("reference", *_f32(q, k, v))
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[0])))
    assert_close(out, ro, dtype=jnp.bfloat16, scale=2.0)
    assert_close(lse[1:], rl[1:], dtype=jnp.float32, scale=100.0)
    for name, g, w in zip("qkv", grads, rgrads):
        scale = 4.0 * float(jnp.max(jnp.abs(w)))
        assert_close(g, w, dtype=jnp.bfloat16, scale=max(scale, 1.0), err_msg=name)
    np.testing.assert_array_equal(np.asarray(grads[1][2, 200:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[1][1, 77:], np.float32), 0.0)


def test_pingpong_off_is_the_same_kernel():
    q, k, v = _inputs(1, 128, 192, 2, 2, 64, 64, jnp.bfloat16)

    def run(pp):
        inp = normalize(q, k, v, is_causal=True)
        return attention_mosaic(inp, interpret=True, blocks=dict(pingpong=pp, block_k=64))

    a, b = run(True), run(False)
    np.testing.assert_array_equal(np.asarray(a[0], np.float32), np.asarray(b[0], np.float32))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_fully_masked_rows_are_zero_with_zero_grads():
    # T > S with a (0, 0) window: query t sees key t only, so rows t >= S see nothing.
    q, k, v = _inputs(1, 192, 64, 2, 1, 64, 64, jnp.bfloat16)
    kw = dict(local_window_size=(0, 0))

    def f(q, k, v):
        out, lse = attention_mosaic(normalize(q, k, v, **kw), interpret=True)
        return _loss(out, lse), (out, lse)

    (_, (out, lse)), (dq, dk, dv) = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    np.testing.assert_array_equal(np.asarray(out[:, 64:], np.float32), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, 64:])))
    assert np.all(np.isfinite(np.asarray(lse[:, :64])))
    np.testing.assert_array_equal(np.asarray(dq[:, 64:], np.float32), 0.0)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(local_window_size=(40, 8))])
def test_gradients_against_reference(kw):
    q, k, v = _inputs(1, 96, 160, 4, 2, 64, 64, jnp.bfloat16, seed=3)

    def f(impl, q, k, v):
        return _loss(*_attend(impl, q, k, v, kw))

    got = jax.jit(jax.grad(lambda *a: f("mosaic", *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: f("reference", *a), argnums=(0, 1, 2))(*_f32(q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == jnp.bfloat16
        scale = 4.0 * float(jnp.max(jnp.abs(w)))  # bf16 inputs: relative to the gradient's size
        assert_close(g, w, dtype=jnp.bfloat16, scale=max(scale, 1.0), err_msg=name)


def _packed_ids(b: int, t: int, cuts) -> jnp.ndarray:
    """(b, t) int32 ids of packed sequences: row i's id steps up at each of cuts[i]."""
    ids = np.zeros((b, t), np.int32)
    for i, cs in enumerate(cuts):
        for c in cs:
            ids[i, c:] += 1
    return jnp.asarray(ids)


@pytest.mark.parametrize(
    "kw",
    [
        dict(is_causal=True),
        dict(local_window_size=(40, 10), kvlen=True),
    ],
)
def test_segment_ids_values_lse_and_gradients(kw):
    # Packed sequences (a 1-row sequence, one spanning several key blocks, an empty tail),
    # with causal or window + key lengths on top; values, lse and gradients vs the reference.
    kw = dict(kw)
    q, k, v = _inputs(2, 136, 136, 2, 1, 64, 64, jnp.bfloat16, seed=7)
    seg = _packed_ids(2, 136, [(40, 41, 100), (90,)])
    if kw.pop("kvlen", False):
        kw["key_value_seq_lengths"] = jnp.array([120, 136], jnp.int32)

    def f(impl, q, k, v):
        out, lse = _attend(impl, q, k, v, dict(kw, segment_ids=seg))
        return _loss(out, lse), (out, lse)

    vg = lambda impl, *a: jax.value_and_grad(  # noqa: E731
        lambda *x: f(impl, *x), argnums=(0, 1, 2), has_aux=True
    )(*a)
    (_, (out, lse)), grads = jax.jit(lambda *a: vg("mosaic", *a))(q, k, v)
    (_, (ro, rl)), want = vg("reference", *_f32(q, k, v))
    assert_close(out, ro, dtype=jnp.bfloat16, scale=2.0)
    finite = np.isfinite(np.asarray(rl))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    assert_close(jnp.where(finite, lse, 0), jnp.where(finite, rl, 0), dtype=jnp.float32, scale=100)
    for name, g, w in zip("qkv", grads, want):
        scale = 4.0 * float(jnp.max(jnp.abs(w)))
        assert_close(g, w, dtype=jnp.bfloat16, scale=max(scale, 1.0), err_msg=name)


def test_forward_mode_against_reference():
    """jax.jvp through the Mosaic path: its custom JVP evaluates the blockwise XLA twin on the
    kernel's padded operands (segment ids and key lengths folded in as the kernel sees them)."""
    kw = dict(local_window_size=(40, 10), kvlen=True, seg=True)
    q, k, v = _inputs(2, 100, 100, 2, 1, 64, 64, jnp.bfloat16, seed=5)
    if kw.pop("kvlen", False):
        kw["key_value_seq_lengths"] = jnp.array([80, 100], jnp.int32)
    if kw.pop("seg", False):
        kw["segment_ids"] = _packed_ids(2, 100, [(30, 70), (50,)])
    tangents = _inputs(2, 100, 100, 2, 1, 64, 64, jnp.bfloat16, seed=6)

    def f(impl, q, k, v):
        out, lse = _attend(impl, q, k, v, kw)
        return out, jnp.where(jnp.isfinite(lse), lse, 0.0)

    (out, lse), (dout, dlse) = jax.jit(lambda p, t: jax.jvp(lambda *a: f("mosaic", *a), p, t))(
        (q, k, v), tangents
    )
    (ro, rl), (dro, drl) = jax.jvp(lambda *a: f("reference", *a), _f32(q, k, v), _f32(*tangents))
    assert dout.dtype == jnp.bfloat16 and dlse.dtype == jnp.float32
    assert_close(out, ro, dtype=jnp.bfloat16, scale=2.0)
    scale = 4.0 * float(jnp.max(jnp.abs(dro)))
    assert_close(dout, dro, dtype=jnp.bfloat16, scale=scale, err_msg="out tangent")
    assert_close(dlse, drl, dtype=jnp.bfloat16, scale=4.0 * float(jnp.max(jnp.abs(drl))))


def test_segment_ranges_cover_exactly_the_meeting_blocks():
    from jaxcore.kernels.attention._mosaic import _segment_ranges

    # 2 rows: packed ids (blocks of 4 keys, tiles of 4 queries) and non-monotone ids.
    qseg = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [5, 5, 9, 9, 0, 0, 0, 0, 7, 7, 7, 7]])
    kseg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [9, 9, 0, 0, 3, 3, 3, 3, 5, 5, 5, 5]])
    valid = jnp.ones(kseg.shape, bool).at[0, 8:].set(False)  # row 0: last block all padding
    rng = np.asarray(_segment_ranges(qseg, kseg, valid, 4, 4))
    # row 0: tile 0 (id 0) -> blocks 0..0; tile 1 (id 1) -> blocks 0..1; tile 2 (id 2) -> none
    np.testing.assert_array_equal(rng[0], [[0, 1], [0, 2], [0, 0]])
    # row 1: block id ranges [0, 9], [3, 3], [5, 5]: tile {5, 9} meets blocks 0 and 2 (range
    # 0..2, block 1 masked in between), tile {0} meets block 0, tile {7} meets block 0 only
    np.testing.assert_array_equal(rng[1], [[0, 3], [0, 1], [0, 1]])
    # tile validity (the dK/dV kernel's keys past a length): invalid rows do not widen a range,
    # a tile without valid rows walks nothing
    tvalid = jnp.ones(qseg.shape, bool).at[0, 4:6].set(False).at[1, 8:].set(False)
    rng = np.asarray(_segment_ranges(qseg, kseg, valid, 4, 4, tvalid))
    np.testing.assert_array_equal(rng[0], [[0, 1], [0, 2], [0, 0]])
    np.testing.assert_array_equal(rng[1], [[0, 3], [0, 1], [0, 0]])


def test_public_api_and_vmap():
    q, k, v = _inputs(2, 64, 64, 1, 1, 64, 64, jnp.bfloat16)
    got = dot_product_attention(q, k, v, is_causal=True, implementation="mosaic_interpret")
    want = dot_product_attention(*_f32(q, k, v), is_causal=True, implementation="reference")
    assert_close(got, want, dtype=jnp.bfloat16, scale=2.0)
    vm = jax.vmap(
        lambda q, k, v: dot_product_attention(
            q, k, v, is_causal=True, implementation="mosaic_interpret"
        )  # fmt: skip
    )(q, k, v)
    np.testing.assert_allclose(np.asarray(vm, np.float32), np.asarray(got, np.float32), atol=2e-2)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(bias=jnp.zeros((1, 1, 64, 64))), "bias"),
        (dict(mask=jnp.ones((1, 1, 64, 64), bool)), "mask"),
    ],
)
def test_unsupported_arguments_name_themselves(kw, name):
    q, k, v = _inputs(1, 64, 64, 2, 2, 64, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match=name):
        dot_product_attention(q, k, v, implementation="mosaic_interpret", **kw)


def test_bad_dtype_and_platform():
    q, k, v = _inputs(1, 64, 64, 2, 2, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="query: .*bfloat16 or float16, got float32"):
        dot_product_attention(q, k, v, implementation="mosaic_interpret")
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="block_k: expected 64 or 128"):
        attention_mosaic(normalize(qb, kb, vb), interpret=True, blocks=dict(block_k=32))
    with pytest.raises(ValueError, match="blocks: .*KiB of shared memory"):
        attention_mosaic(normalize(qb, kb, vb), interpret=True, blocks=dict(stages=8))
    if backend.platform() != "gpu":
        with pytest.raises(ValueError, match="implementation='mosaic'.*GPU only"):
            dot_product_attention(qb, kb, vb, implementation="mosaic")
        assert "mosaic" not in backend.families()["attention"].available(backend.platform())


LOWER = [
    ((4, 1024, 1024, 16, 16, 128, 128), jnp.bfloat16, dict(is_causal=True), {}),
    ((2, 512, 512, 8, 8, 128, 128), jnp.bfloat16, {}, dict(block_k=64, stages=3)),
    (
        (1, 300, 500, 8, 2, 64, 64),
        jnp.float16,
        dict(local_window_size=(100, 20)),
        dict(pingpong=False),
    ),  # fmt: skip
    (
        (1, 256, 256, 4, 1, 256, 256),
        jnp.bfloat16,
        dict(is_causal=True, logits_soft_cap=30.0),
        dict(block_k=64),
    ),  # fmt: skip
    ((1, 256, 256, 4, 4, 32, 96), jnp.bfloat16, {}, {}),
    ((2, 512, 640, 8, 8, 128, 128), jnp.bfloat16, dict(is_causal=True, kvlen=True), {}),
    ((2, 1024, 1024, 8, 2, 128, 128), jnp.bfloat16, dict(is_causal=True, seg=True), {}),
]


@pytest.mark.parametrize("case", range(len(LOWER)))
def test_compiled_kernel_lowers_for_cuda(case):
    (b, t, s, n, k, h, hv), dtype, kw, blocks = LOWER[case]
    sds = jax.ShapeDtypeStruct

    kw = dict(kw)
    lens = jnp.array([s, s // 3], jnp.int32)[:b] if kw.pop("kvlen", False) else None
    if kw.pop("seg", False):
        kw["segment_ids"] = _packed_ids(b, t, [(t // 3, t // 2)] * b)

    def f(q, k, v):
        inp = normalize(q, k, v, key_value_seq_lengths=lens, **kw)
        return attention_mosaic(inp, interpret=False, blocks=blocks)

    args = (sds((b, t, n, h), dtype), sds((b, s, k, h), dtype), sds((b, s, k, hv), dtype))
    txt = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in txt
    if case == 0:  # forward and backward (the default "auto": Mosaic GPU for head dim <= 128)
        loss = lambda *a: jnp.sum(f(*a)[0].astype(jnp.float32))  # noqa: E731
        traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args)
        txt = traced.lower(lowering_platforms=("cuda",)).as_text()
        calls = re.findall(r"custom_call @(\w+)", txt)
        want = 3 if max(h, hv) <= 128 else 1  # forward + dQ + dK/dV, or the Triton backward
        assert calls.count("mosaic_gpu_v2") == want, calls
        assert ("xla.gpu.triton" in txt) == (want == 1)


def test_interpreter_needs_cpu_devices(monkeypatch):
    from jaxcore.kernels.attention import _mosaic

    monkeypatch.setattr(_mosaic, "MIN_CPU_DEVICES", len(jax.devices("cpu")) + 1)
    q, k, v = _inputs(1, 64, 64, 2, 2, 64, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="needs >= .* CPU devices"):
        dot_product_attention(q, k, v, implementation="mosaic_interpret")


def test_gpu_default_rule():
    from types import SimpleNamespace

    from jaxcore.kernels.attention._api import gpu_default

    q, k, v = _inputs(1, 64, 64, 2, 2, 64, 64, jnp.bfloat16)
    h100 = SimpleNamespace(platform="gpu", compute_capability="9.0")
    a100 = SimpleNamespace(platform="gpu", compute_capability="8.0")
    inp = normalize(q, k, v, is_causal=True)
    assert gpu_default(inp, h100, prefer_mosaic=True) == "mosaic"
    assert gpu_default(inp, h100, prefer_mosaic=False) == "pallas"
    assert gpu_default(inp, a100, prefer_mosaic=True) == "pallas"
    packed = normalize(q, k, v, segment_ids=jnp.zeros((1, 64), jnp.int32))
    assert gpu_default(packed, h100, prefer_mosaic=True) == "mosaic"
    with_bias = normalize(q, k, v, jnp.zeros((1, 1, 64, 64), jnp.bfloat16))
    assert gpu_default(with_bias, h100, prefer_mosaic=True) == "pallas"
    f32 = normalize(*_f32(q, k, v))
    assert gpu_default(f32, h100, prefer_mosaic=True) == "pallas"


@pytest.mark.parametrize("backward", ["triton", "mosaic"])
def test_compiled_kernels_lower_inside_shard_map_with_check_vma(monkeypatch, backward):
    """Batch-sharded inside jax.shard_map (check_vma=True): forward and both backwards lower for
    'cuda', their gradients typed as the primals."""
    from jax.sharding import PartitionSpec as P
    from jaxcore.kernels.attention import _mosaic

    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    monkeypatch.setattr(_mosaic, "MOSAIC_BACKWARD", backward)
    mesh = jax.make_mesh((4,), ("b",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    sds = jax.ShapeDtypeStruct((4, 256, 2, 64), jnp.bfloat16)

    def local(q, k, v):
        return dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")

    sm = jax.shard_map(local, mesh=mesh, in_specs=(P("b"),) * 3, out_specs=P("b"))
    grad = jax.grad(lambda *a: sm(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    txt = jax.jit(grad).trace(sds, sds, sds).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(\w+)", txt)
    assert calls.count("mosaic_gpu_v2") == (3 if backward == "mosaic" else 1), calls
