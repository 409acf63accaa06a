"""Pallas flash attention (interpret mode) with bias and boolean mask against the reference.

Values, lse and gradients w.r.t. query, key, value and bias; float64 where the x64 fixture
allows, float32/bfloat16 with dtype-keyed tolerances. Small blocks (16/32) so every case spans
several query and key blocks with ragged ends.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.attention import dot_product_attention
from jaxcore.kernels.attention._common import normalize
from jaxcore.kernels.attention._pallas import attention_pallas
from jaxcore.kernels.attention._reference import attention_reference

from jaxcore.testing import assert_close

SMALL = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32)


def _inputs(b, t, s, n, k, h, hv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *sh: jnp.asarray(rng.standard_normal(sh), dtype)  # noqa: E731
    return arr(b, t, n, h), arr(b, s, k, h), arr(b, s, k, hv), rng


@functools.partial(jax.jit, static_argnames=("impl", "blocks", "static"))
def _run(impl, q, k, v, bias, mask, arrays, *, blocks=None, static=()):
    """(out, lse, (dq, dk, dv, dbias)) of a fixed scalar loss; ``impl`` "pallas" or "reference"."""
    kw = dict(static)
    kw.update(arrays)

    def f(q, k, v, bias):
        inp = normalize(q, k, v, bias, mask, **kw)
        if impl == "reference":
            out, lse = attention_reference(inp)
        else:
            out, lse = attention_pallas(inp, interpret=True, blocks=dict(blocks or ()))
            if inp.q_seqlen is not None:  # as dot_product_attention does after the kernel
                ok = jnp.arange(inp.spec.t)[None, :] < inp.q_seqlen[:, None]
                out = jnp.where(ok[:, :, None, None], out, jnp.zeros((), out.dtype))
                lse = jnp.where(ok[:, :, None], lse, -jnp.inf)
        cdt = jnp.promote_types(out.dtype, jnp.float32)  # the same loss for bf16 and f32
        w = jnp.cos(jnp.arange(out.size, dtype=cdt).reshape(out.shape))
        fin = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(cdt) * w) + 0.3 * jnp.sum(fin * jnp.sin(fin)), (out, lse)

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    (_, (out, lse)), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(q, k, v, bias)
    return out, lse, grads


def _compare(q, k, v, bias, mask, arrays, static, blocks, close):
    static = tuple(sorted(static.items()))
    got = _run("pallas", q, k, v, bias, mask, arrays, blocks=blocks, static=static)
    want = _run("reference", q, k, v, bias, mask, arrays, static=static)
    out, lse, grads = got
    ref, ref_lse, ref_grads = want
    assert out.shape == ref.shape and out.dtype == ref.dtype
    close(out, ref, "out")
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    fin = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)  # noqa: E731
    close(fin(lse), fin(ref_lse), "lse")
    assert len(grads) == len(ref_grads)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float64))), name
        close(g, w, name)
    return got


def _close64(actual, expected, name):
    assert jnp.result_type(actual) == jnp.float64, name
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=1e-9, atol=1e-9, err_msg=name
    )


B, T, S, N, K, H, HV = 2, 37, 45, 4, 2, 32, 16

# (id, bias shape, mask shape or None, static options, array options)
CASES = [
    ("full_causal_cap", (B, N, T, S), None, dict(is_causal=True, logits_soft_cap=3.0), ()),
    ("shared_window", (1, 1, T, S), (B, 1, T, S), dict(local_window_size=(9, 4)), ()),
    ("batch_seg", (B, 1, T, S), (1, N, T, S), dict(is_causal=True), ("seg", "kvlen")),
    ("head_keyrow", (1, N, 1, S), (B, 1, 1, S), dict(), ("qlen",)),
    ("scalar", (1, 1, 1, 1), (B, N, T, S), dict(logits_soft_cap=2.0), ("kvlen",)),
]


def _arrays(names, rng):
    arrays = {}
    if "seg" in names:
        seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
        kseg = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1), jnp.int32)
        arrays["segment_ids"] = (seg, kseg)
    if "kvlen" in names:
        arrays["key_value_seq_lengths"] = jnp.asarray([S - 5, 3], jnp.int32)
    if "qlen" in names:
        arrays["query_seq_lengths"] = jnp.asarray([T, T - 9], jnp.int32)
    return arrays


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bias_mask_match_reference_float64(x64, case):
    _, bshape, mshape, static, names = case
    q, k, v, rng = _inputs(B, T, S, N, K, H, HV, jnp.float64)
    bias = jnp.asarray(rng.standard_normal(bshape), jnp.float64)
    mask = None if mshape is None else jnp.asarray(rng.random(mshape) < 0.75)
    arrays = _arrays(names, rng)
    out, _, (_, _, _, dbias) = _compare(
        q, k, v, bias, mask, arrays, static, tuple(SMALL.items()), _close64
    )
    assert dbias.shape == bshape


def test_fully_masked_rows_zero_and_finite_float64(x64):
    """Rows hidden by the mask, by a -inf bias, or by both: zeros, lse -inf, zero gradients."""
    q, k, v, rng = _inputs(B, T, S, N, K, H, HV, jnp.float64, seed=1)
    bias = jnp.asarray(rng.standard_normal((1, N, T, 1)), jnp.float64)  # per-row bias
    bias = bias.at[:, :, 20:23].set(-jnp.inf)  # rows 20..22: every logit -inf through the bias
    mask = jnp.asarray(rng.random((B, 1, T, S)) < 0.7)
    mask = mask.at[:, :, 3:7].set(False).at[1].set(False)  # rows 3..6, and all of batch 1
    static = dict(local_window_size=(20, 0))
    out, lse, (dq, dk, dv, dbias) = _compare(
        q, k, v, bias, mask, {}, static, tuple(SMALL.items()), _close64
    )
    for rows in (slice(3, 7), slice(20, 23)):
        np.testing.assert_array_equal(np.asarray(out[:, rows]), 0.0)
        assert np.all(np.asarray(lse[:, rows]) == -np.inf)
        np.testing.assert_array_equal(np.asarray(dq[:, rows]), 0.0)
        np.testing.assert_array_equal(np.asarray(dbias[:, :, rows]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(dk[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(dv[1]), 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16], ids=["bf16"])
def test_bias_mask_dtypes(dtype):
    """bfloat16 inputs and bias against the float32 reference (float32 inputs: the rank-3 API
    test below; float16 follows the same code path as bfloat16)."""
    q, k, v, rng = _inputs(B, 33, 33, N, K, 64, 64, dtype, seed=2)
    bias = jnp.asarray(rng.standard_normal((1, N, 33, 33)), dtype)
    mask = jnp.asarray(rng.random((B, 1, 33, 33)) < 0.8)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, 33)), axis=1), jnp.int32)
    static = tuple(sorted(dict(is_causal=True).items()))
    arrays = dict(segment_ids=seg)
    out, lse, grads = _run("pallas", q, k, v, bias, mask, arrays, static=static)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_lse, ref_grads = _run(
        "reference", f32(q), f32(k), f32(v), f32(bias), mask, arrays, static=static
    )
    assert out.dtype == jnp.dtype(dtype)
    assert all(g.dtype == jnp.dtype(dtype) for g in grads)
    scale = 10.0 if dtype == jnp.float32 else 3.0
    assert_close(out, ref, dtype=dtype, scale=scale, err_msg="out")
    fin = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)  # noqa: E731
    assert_close(fin(lse), fin(ref_lse), dtype=jnp.float32, scale=10.0, err_msg="lse")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, strict=True):
        gscale = 30.0 if dtype == jnp.float32 else 5.0
        assert_close(g, w, dtype=dtype, scale=gscale, err_msg=name)


def test_api_pallas_takes_bias_and_mask_rank3():
    """Explicit pallas through the public API: rank-3 inputs with an (N, T, S) bias."""
    t, s, n, h = 19, 26, 2, 16
    q, k, v, rng = _inputs(1, t, s, n, n, h, h, jnp.float32, seed=3)
    q, k, v = q[0], k[0], v[0]
    bias = jnp.asarray(rng.standard_normal((n, t, s)), jnp.float32)
    mask = jnp.asarray(rng.random((1, t, s)) < 0.8)

    def loss(impl, q, bias):
        out = dot_product_attention(q, k, v, bias, mask, implementation=impl)
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    (dq, db), out = grad("pallas_interpret", q, bias)
    (rdq, rdb), ref = grad("reference", q, bias)
    assert out.shape == (t, n, h) and db.shape == (n, t, s)
    assert_close(out, ref, scale=10.0)
    assert_close(dq, rdq, scale=30.0)
    assert_close(db, rdb, scale=30.0)
    want = jax.nn.dot_product_attention(q, k, v, bias, mask)
    assert_close(out, want, scale=10.0, err_msg="jax.nn")


def test_compiled_pallas_off_gpu_raises_clearly():
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    bias = jnp.zeros((1, 2, 8, 8), jnp.float32)
    if jax.default_backend() == "gpu":
        pytest.skip("compiled pallas is the GPU default")
    with pytest.raises(ValueError, match="implementation='pallas'"):
        dot_product_attention(q, q, q, bias, implementation="pallas")


def _pallas_outputs(jaxpr) -> list[list[tuple[int, ...]]]:
    """Output shapes of every pallas_call in a jaxpr (nested jaxprs included)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append([tuple(v.aval.shape) for v in eqn.outvars])
        for p in eqn.params.values():
            sub = getattr(p, "jaxpr", None)
            if sub is not None:
                found += _pallas_outputs(getattr(sub, "jaxpr", sub))
    return found


def test_bias_gradient_only_when_differentiated():
    """A bias that is not differentiated costs no dS output (symbolic-zeros custom VJP)."""
    q = jnp.zeros((1, 20, 2, 16), jnp.float32)
    bias = jnp.zeros((1, 2, 20, 20), jnp.float32)

    def loss(q, bias):
        return jnp.sum(dot_product_attention(q, q, q, bias, implementation="pallas_interpret"))

    for argnums, n_out in (((0,), 1), ((0, 1), 2)):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(q, bias).jaxpr
        calls = _pallas_outputs(jaxpr)
        assert len(calls) == 3  # forward, dK/dV, dQ (+ dS)
        assert len(calls[-1]) == n_out, calls


@pytest.mark.parametrize(
    "spec_kw", [dict(is_causal=True), dict(local_window_size=(40, 8)), dict(), dict(s=100)]
)
def test_visited_blocks_match_a_brute_force_count(spec_kw):
    from jaxcore.kernels.attention._common import MaskSpec
    from jaxcore.kernels.attention._pallas import _bounds, visited_blocks

    spec_kw = dict(spec_kw)
    s = spec_kw.pop("s", 192)
    window = spec_kw.get("local_window_size")
    spec = MaskSpec(t=160, s=s, scale=1.0, is_causal=spec_kw.get("is_causal", False), window=window)
    tp, sp, bq, bk = 192, 192, 32, 64
    left, right = _bounds(spec)
    qpos, kpos = np.arange(tp)[:, None], np.arange(sp)[None, :]
    vis = np.broadcast_to(kpos < s, (tp, sp))
    if right is not None:
        vis = vis & (kpos <= qpos + right)
    if left is not None:
        vis = vis & (kpos >= qpos - left)
    blocks = vis.reshape(tp // bq, bq, sp // bk, bk).any(axis=(1, 3))
    # the kernels walk a contiguous range per query block: count the span of visible blocks
    want = sum(
        int(np.flatnonzero(r).max() - np.flatnonzero(r).min() + 1) if r.any() else 0 for r in blocks
    )
    assert visited_blocks(spec, tp, sp, bq, bk) == want


def test_pallas_calls_carry_cost_estimates_for_hardware_trace():
    """jaxcore.hardware.trace costs the Triton kernels from their cost_estimate: dense FLOPs
    equal the reference's matmuls (+ softmax), causal ones are the visited-block share, the
    backward is the FlashAttention-2 recompute (7 matmul passes vs the reference's 4)."""
    from jaxcore.hardware import trace

    sds = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)

    def fwd(impl, **kw):
        return trace(
            lambda q, k, v: dot_product_attention(q, k, v, implementation=impl, **kw),
            sds,
            sds,
            sds,
        )

    def fwd_bwd(impl, **kw):
        def g(q, k, v):
            loss = lambda *a: dot_product_attention(*a, implementation=impl, **kw).sum()  # noqa: E731
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        return trace(g, sds, sds, sds)

    mm = 2 * 2 * 256 * 256 * 64 * 2  # Q K^T and P V over B * N = 2 heads
    dense = fwd("pallas_interpret")
    assert not dense.unknown and dense.by_kind().get("custom", 0) == 1
    assert mm <= dense.flops <= 1.1 * mm
    trans = sum(o.transcendentals * o.count for o in dense.ops)
    assert 2 * 256 * 256 <= trans <= 1.05 * 2 * 256 * 256
    # bytes: at least q, k, v, out once each
    assert dense.bytes >= 4 * 256 * 2 * 64 * 4
    causal = fwd("pallas_interpret", is_causal=True)
    assert 0.5 * dense.flops < causal.flops < 0.8 * dense.flops
    both = fwd_bwd("pallas_interpret")
    assert not both.unknown and both.by_kind().get("custom", 0) == 3
    assert 4.4 * mm <= both.flops <= 4.9 * mm  # 2 + 4 (dK/dV) + 3 (dQ) passes of 2 matmul-halves


def test_smem_fit_matches_triton_requests_and_shrinks_to_the_limit():
    """The forward's shared-memory model against what Triton asked for on an H200 (session 5:
    bf16 H=128 128x128 tiles, 3 stages, bias (1, N, T, T): exactly 294912 bytes; f32 H=64 with a
    bias (1, N, T, S) and a mask (B, 1, T, S): 361472, the model over-estimates it), and the
    fitted tiles: one stage fewer, then halved key blocks, until the estimate fits."""
    from jaxcore.kernels.attention._pallas import default_blocks, fit_smem, forward_smem

    limit = 227 * 1024
    bf16 = default_blocks(4096, 4096, 128, 128, False)
    assert (bf16["block_q"], bf16["block_k"], bf16["num_stages"]) == (128, 128, 3)
    bias = (True, True, 2)
    assert forward_smem(bf16, 128, 128, 2, bias, None) == 294912
    fit = fit_smem(bf16, limit, 128, 128, 2, bias, None)
    assert (fit["block_q"], fit["block_k"], fit["num_stages"]) == (128, 128, 2)
    assert forward_smem(fit, 128, 128, 2, bias, None) == 196608
    # no bias: the measured default (ran on an H200 in sessions 1 and 5) is left as it is
    assert fit_smem(bf16, limit, 128, 128, 2, None, None) == bf16
    f32 = default_blocks(200, 136, 64, 64, False)
    est = forward_smem(f32, 64, 64, 4, (True, True, 4), (True, True, 1))
    assert est == 393216 and est >= 361472
    fit = fit_smem(f32, limit, 64, 64, 4, (True, True, 4), (True, True, 1))
    assert (fit["block_q"], fit["block_k"], fit["num_stages"]) == (128, 64, 2)
    assert forward_smem(fit, 64, 64, 4, (True, True, 4), (True, True, 1)) == 139264
    # a broadcast bias (1, 1, 1, S) costs one row of keys per stage
    assert forward_smem(bf16, 128, 128, 2, (False, True, 2), None) == 229376 + 2 * 128 * 2
