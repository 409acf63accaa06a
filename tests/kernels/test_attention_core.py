"""dot_product_attention: every implementation against the dense reference (values, lse, grads)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.attention import dot_product_attention
from jaxcore.kernels.attention._common import normalize
from jaxcore.kernels.attention._pallas import attention_pallas
from jaxcore.kernels.attention._reference import attention_reference
from jaxcore.kernels.attention._xla import attention_xla, plan

from jaxcore import backend
from jaxcore.testing import assert_close

# (name, B, T, S, N, K, H, Hv, options); options "bias"/"mask"/"seg"/"qlen"/"kvlen" are built
# by _case, the rest go to dot_product_attention as they are.
CASES = [
    ("causal_ragged", 2, 37, 37, 2, 2, 32, 32, dict(is_causal=True)),
    ("t1_gqa2", 2, 1, 19, 4, 2, 64, 64, dict()),
    ("gqa8_window_hv", 1, 23, 41, 8, 1, 128, 32, dict(local_window_size=(5, 3))),
    ("segments_causal", 2, 40, 40, 4, 2, 32, 48, dict(is_causal=True, seg=True)),
    ("bias_mask_cap", 2, 30, 50, 4, 2, 32, 32, dict(bias=True, mask=True, logits_soft_cap=5.0)),
    (
        "combined",
        2,
        45,
        45,
        4,
        2,
        32,
        16,
        dict(
            is_causal=True,
            local_window_size=(9, 0),
            seg=True,
            qlen=True,
            kvlen=True,
            logits_soft_cap=2.0,
        ),
    ),
]


def _case(b, t, s, n, k, h, hv, opts, dtype, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *sh: jnp.asarray(rng.standard_normal(sh), dtype)
    q, kk, v = arr(b, t, n, h), arr(b, s, k, h), arr(b, s, k, hv)
    kw = {
        key: val for key, val in opts.items() if key not in ("bias", "mask", "seg", "qlen", "kvlen")
    }
    if opts.get("bias"):
        kw["bias"] = arr(1, n, t, s)
    if opts.get("mask"):
        kw["mask"] = jnp.asarray(rng.random((b, 1, t, s)) < 0.8)
    if opts.get("seg"):
        seg = np.sort(rng.integers(0, 3, (b, t)), axis=1)
        kw["segment_ids"] = jnp.asarray(seg, jnp.int32)
    if opts.get("qlen"):
        kw["query_seq_lengths"] = jnp.asarray([t, t - 7][:b], jnp.int32)
    if opts.get("kvlen"):
        kw["key_value_seq_lengths"] = jnp.asarray([s - 3, s][:b], jnp.int32)
    return q, kk, v, kw


def _attend(impl, q, k, v, kw):
    """Run one implementation: 'xla_small'/'pallas_small' force several blocks per axis."""
    if impl in ("xla_small", "pallas_small"):
        kw = dict(kw)
        bias, mask = kw.pop("bias", None), kw.pop("mask", None)
        inp = normalize(q, k, v, bias, mask, **kw)
        if impl == "xla_small":
            out, lse = attention_xla(inp, block_q=8, block_k=16)
        else:
            blocks = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32, split_loops=True)
            out, lse = attention_pallas(inp, interpret=True, blocks=blocks)
        if inp.q_seqlen is not None:
            ok = jnp.arange(inp.spec.t)[None, :] < inp.q_seqlen[:, None]
            out = jnp.where(ok[:, :, None, None], out, jnp.zeros((), out.dtype))
            lse = jnp.where(ok[:, :, None], lse, -jnp.inf)
        return out, lse
    return dot_product_attention(q, k, v, implementation=impl, return_lse=True, **kw)


def _close64(actual, expected, err_msg=""):
    """float64 comparison (jaxcore.testing.tol maps "float64" to the float6 tolerance)."""
    assert jnp.result_type(actual) == jnp.float64, err_msg
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=1e-9, atol=1e-9, err_msg=err_msg
    )


GRID = [(impl, c) for c in CASES for impl in ("xla_small", "pallas_small")] + [
    ("xla", CASES[0]),
    ("xla", CASES[-1]),
    ("pallas_interpret", CASES[-1]),
]


def _split_static(kw):
    """Static options (python values) go in the jit key; arrays stay traced."""
    static = {k: v for k, v in kw.items() if not hasattr(v, "shape")}
    arrays = {k: v for k, v in kw.items() if hasattr(v, "shape")}
    return static, arrays


@pytest.mark.parametrize("impl, case", GRID, ids=[f"{c[0]}-{i}" for i, c in GRID])
def test_matches_reference_float64(x64, impl, case):
    _, b, t, s, n, k, h, hv, opts = case
    q, kk, v, kw = _case(b, t, s, n, k, h, hv, opts, jnp.float64)
    bias = kw.pop("bias", None)
    static, arrays = _split_static(kw)
    keys = tuple(sorted(arrays))
    vals = tuple(arrays[x] for x in keys)

    def run(which):
        f = functools.partial(_attend_static, static=tuple(sorted(static.items())))
        return f(which, keys, q, kk, v, bias, vals)

    out, lse, grads = run(impl)
    ref, ref_lse, ref_grads = run("reference")
    assert out.shape == (b, t, n, hv)
    _close64(out, ref)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    _close64(jnp.where(jnp.isfinite(lse), lse, 0), jnp.where(jnp.isfinite(ref_lse), ref_lse, 0))
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        _close64(g, w, err_msg=name)


@functools.partial(jax.jit, static_argnames=("impl", "kwkeys", "static"))
def _attend_static(impl, kwkeys, q, k, v, bias, kwvals, static):
    kw = dict(zip(kwkeys, kwvals))
    kw.update(dict(static))
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)

    def f(q, k, v, bias):
        kw2 = dict(kw)
        if bias is not None:
            kw2["bias"] = bias
        out, lse = _attend(impl, q, k, v, kw2)
        w = jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))
        fin = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out * w) + 0.3 * jnp.sum(fin * jnp.sin(fin)), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(q, k, v, bias)
    return out, lse, grads


@pytest.mark.parametrize(
    "impl, dtype",
    [
        ("xla", jnp.float32),
        ("xla", jnp.bfloat16),
        ("xla", jnp.float16),
        ("pallas_interpret", jnp.float32),
        ("pallas_interpret", jnp.bfloat16),
    ],
)
def test_dtypes(impl, dtype):
    q, k, v, kw = _case(2, 33, 33, 4, 2, 64, 64, dict(is_causal=True, seg=True), dtype)
    f32 = lambda x: x.astype(jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl, q, k, v, seg):
        f = lambda q: dot_product_attention(
            q, k, v, implementation=impl, is_causal=True, segment_ids=seg
        )
        return f(q), jax.grad(lambda q: jnp.sum(f32(f(q)) * jnp.cos(f32(f(q)))))(q)

    out, g = run(impl, q, k, v, kw["segment_ids"])
    ref, gr = run("reference", f32(q), f32(k), f32(v), kw["segment_ids"])
    assert out.dtype == jnp.dtype(dtype) and g.dtype == jnp.dtype(dtype)
    assert_close(out, ref, dtype=dtype, scale=3.0 if dtype != jnp.float32 else 10.0)
    assert_close(g, gr, dtype=dtype, scale=5.0 if dtype != jnp.float32 else 30.0)


@pytest.mark.parametrize(
    "opts",
    [
        dict(is_causal=True),
        dict(local_window_size=(4, 2)),
        dict(is_causal=True, local_window_size=3),
        dict(bias=True, mask=True),
        dict(kvlen=True),
    ],
    ids=["causal", "window", "causal_window", "bias_mask", "kvlen"],
)
def test_matches_jax_nn(opts):
    q, k, v, kw = _case(2, 29, 29, 4, 2, 32, 32, opts, jnp.float32)
    want = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw))(q, k, v)
    for impl in ("xla", "reference"):
        got = jax.jit(
            lambda q, k, v, impl=impl: dot_product_attention(q, k, v, implementation=impl, **kw)
        )(q, k, v)
        assert_close(got, want, scale=10.0, err_msg=impl)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_interpret"])
def test_fully_masked_rows_give_zeros_and_zero_grads(impl):
    b, t, n, h = 2, 20, 2, 16
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))
    seg_q = jnp.zeros((b, t), jnp.int32).at[:, 5:9].set(7)  # segment 7 has no keys
    seg_k = jnp.zeros((b, t), jnp.int32)
    kw = dict(segment_ids=(seg_q, seg_k), key_value_seq_lengths=jnp.array([20, 0], jnp.int32))

    def f(q, k, v):
        o, lse = dot_product_attention(q, k, v, implementation=impl, return_lse=True, **kw)
        return o, lse

    o, lse = jax.jit(f)(q, k, v)
    assert np.all(np.isfinite(np.asarray(o)))
    np.testing.assert_array_equal(np.asarray(o[:, 5:9]), 0.0)
    np.testing.assert_array_equal(np.asarray(o[1]), 0.0)  # kv length 0: every row masked
    assert np.all(np.asarray(lse[:, 5:9]) == -np.inf)
    grads = jax.jit(
        jax.grad(lambda *a: jnp.sum(f(*a)[0] ** 2) + jnp.sum(f(*a)[0]), argnums=(0, 1, 2))
    )(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[0][:, 5:9]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][1]), 0.0)


def test_block_plan_skips_masked_blocks():
    inp = normalize(
        *_case(1, 64, 64, 1, 1, 16, 16, dict(is_causal=True), jnp.float32)[:3], is_causal=True
    )
    from jaxcore.kernels.attention._xla import Config

    cfg = Config(inp.spec, 16, 16, 1, None, None, False, False)
    full, partial = plan(cfg)
    assert len(full) == 6 and len(partial) == 4  # 4x4 blocks: 6 below the diagonal, 4 on it
    assert all(i > j for i, j in full) and all(i == j for i, j in partial)
    inp = normalize(*_case(1, 64, 64, 1, 1, 16, 16, {}, jnp.float32)[:3], local_window_size=(8, 8))
    cfg = Config(inp.spec, 16, 16, 1, None, None, False, False)
    full, partial = plan(cfg)
    assert len(full) == 0 and len(partial) == 10  # diagonal + both neighbours


def test_default_implementation_rule():
    assert backend.resolve_implementation("attention", None, platform_name="cpu") == "xla"
    assert backend.resolve_implementation("attention", None, platform_name="gpu") == "pallas"
    assert backend.resolve_implementation("attention", None, platform_name="tpu") == "xla"
    with pytest.raises(ValueError, match="implementation"):
        backend.resolve_implementation("attention", "cudnn")


def test_rank3_inputs_and_tol_keys():
    q, k, v, _ = _case(1, 9, 9, 2, 2, 16, 16, {}, jnp.float32)
    out = dot_product_attention(q[0], k[0], v[0], is_causal=True)
    ref = jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    assert out.shape == (9, 2, 16)
    assert_close(out, ref, scale=10.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(key=np.zeros((2, 8, 2, 32), np.float32)), r"key: expected shape \(2, \*, \*, 16\)"),
        (
            dict(
                key=np.zeros((2, 8, 3, 16), np.float32), value=np.zeros((2, 8, 3, 16), np.float32)
            ),
            "key: expected a number of heads",
        ),
        (dict(value=np.zeros((2, 9, 2, 16), np.float32)), r"value: expected shape \(2, 8, 2, \*\)"),
        (dict(query=np.zeros((2, 8, 4), np.float32)), "key: expected rank 3"),
        (dict(bias=np.zeros((2, 4, 8, 7), np.float32)), r"bias: expected shape broadcastable"),
        (dict(mask=np.ones((1, 1, 8, 8), np.float32)), "mask: expected dtype bool"),
        (dict(key=np.zeros((2, 8, 2, 16), np.float16)), "key/value: expected the query dtype"),
        (
            dict(key_value_seq_lengths=np.zeros((3,), np.int32)),
            r"key_value_seq_lengths: expected shape \(2\)",
        ),
        (dict(segment_ids=np.zeros((2, 7), np.int32)), r"segment_ids \(query\): expected shape"),
        (dict(local_window_size=(-1, 2)), "local_window_size"),
        (dict(logits_soft_cap=0.0), "logits_soft_cap"),
        (dict(implementation="flash"), "implementation"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(bad, match):
    args = dict(
        query=np.zeros((2, 8, 4, 16), np.float32),
        key=np.zeros((2, 8, 2, 16), np.float32),
        value=np.zeros((2, 8, 2, 16), np.float32),
    )
    args.update(bad)
    q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **args)


def test_reference_oracle_is_softmax():
    q, k, v, _ = _case(1, 5, 6, 1, 1, 4, 3, {}, jnp.float32)
    inp = normalize(q, k, v)
    out, lse = attention_reference(inp)
    logits = np.einsum("th,sh->ts", np.asarray(q[0, :, 0]), np.asarray(k[0, :, 0])) / 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(out[0, :, 0]), p @ np.asarray(v[0, :, 0]), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(lse[0, :, 0]), np.log(np.exp(logits).sum(-1)), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- forward mode
# Every fast path is a custom JVP whose tangent map is a linear_call (jaxcore.autodiff): forward
# mode runs the JVP of the blockwise XLA forward, reverse mode the hand backward kernels.

FWD_GRID = [
    ("xla_small", CASES[0]),
    ("xla_small", CASES[4]),
    ("xla_small", CASES[5]),
    ("pallas_small", CASES[4]),
    ("pallas_small", CASES[5]),
    ("xla", CASES[3]),
    ("pallas_interpret", CASES[2]),
]


def _finite(lse):
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


@pytest.mark.parametrize("impl, case", FWD_GRID, ids=[f"{c[0]}-{i}" for i, c in FWD_GRID])
def test_forward_mode_matches_reference_float64(x64, impl, case):
    """jax.jvp in every differentiable input (q, k, v, bias): out and lse tangents."""
    _, b, t, s, n, k, h, hv, opts = case
    q, kk, v, kw = _case(b, t, s, n, k, h, hv, opts, jnp.float64)
    bias = kw.pop("bias", None)
    rng = np.random.default_rng(1)
    tan = lambda x: None if x is None else jnp.asarray(rng.standard_normal(x.shape))  # noqa: E731
    primals, tangents = (q, kk, v, bias), tuple(tan(x) for x in (q, kk, v, bias))

    def run(which):
        def f(q, k, v, bias):
            out, lse = _attend(which, q, k, v, dict(kw, bias=bias) if bias is not None else kw)
            return out, _finite(lse)

        return jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)

    (out, lse), (dout, dlse) = run(impl)
    (ref, ref_lse), (dref, dref_lse) = run("reference")
    _close64(out, ref)
    _close64(lse, ref_lse)
    _close64(dout, dref, err_msg="out tangent")
    _close64(dlse, dref_lse, err_msg="lse tangent")


@pytest.mark.parametrize("impl", ["xla_small", "pallas_small"])
def test_hessian_vector_product_matches_reference_float64(x64, impl):
    """Forward over reverse: the JVP of the gradient (the backward kernels differentiated through
    their XLA twin)."""
    _, b, t, s, n, k, h, hv, opts = CASES[4]  # bias, mask, soft cap
    q, kk, v, kw = _case(b, t, s, n, k, h, hv, opts, jnp.float64)
    bias = kw.pop("bias")

    def hvp(which):
        def loss(q, k, v, bias):
            out, lse = _attend(which, q, k, v, dict(kw, bias=bias))
            return jnp.sum(jnp.sin(out)) + 0.3 * jnp.sum(_finite(lse) ** 2)

        g = jax.grad(loss, argnums=(0, 1, 2, 3))
        return jax.jit(lambda p: jax.jvp(g, p, p))((q, kk, v, bias))

    (g, hv_), (g_ref, hv_ref) = hvp(impl), hvp("reference")
    for name, a, w in zip(("dq", "dk", "dv", "dbias"), g, g_ref):
        _close64(a, w, err_msg=name)
    for name, a, w in zip(("Hq", "Hk", "Hv", "Hbias"), hv_, hv_ref):
        _close64(a, w, err_msg=name)


def test_jacfwd_equals_jacrev_and_vmap_of_jvp(x64):
    q, kk, v, kw = _case(2, 9, 9, 2, 1, 8, 8, dict(is_causal=True, seg=True), jnp.float64)

    def f(q):
        return dot_product_attention(q, kk, v, implementation="xla", **kw)

    jf, jr = jax.jacfwd(f)(q), jax.jacrev(f)(q)
    _close64(jf, jr)
    ts = jnp.stack([q, jnp.cos(q), jnp.sin(q)])
    got = jax.vmap(lambda t: jax.jvp(f, (q,), (t,))[1])(ts)
    want = jnp.einsum("btnhBTNH,sBTNH->sbtnh", jr, ts)
    _close64(got, want)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_forward_mode_fully_masked_rows_have_zero_tangents(impl):
    b, t, n, h = 2, 20, 2, 16
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))
    seg_q = jnp.zeros((b, t), jnp.int32).at[:, 5:9].set(7)  # segment 7 has no keys
    kw = dict(segment_ids=(seg_q, jnp.zeros((b, t), jnp.int32)))

    def f(q, k, v):
        o, lse = dot_product_attention(q, k, v, implementation=impl, return_lse=True, **kw)
        return o, _finite(lse)

    _, (do, dlse) = jax.jit(lambda p: jax.jvp(f, p, p))((q, k, v))
    assert np.all(np.isfinite(np.asarray(do))) and np.all(np.isfinite(np.asarray(dlse)))
    np.testing.assert_array_equal(np.asarray(do[:, 5:9]), 0.0)
    np.testing.assert_array_equal(np.asarray(dlse[:, 5:9]), 0.0)


def test_forward_mode_memory_is_linear_in_length():
    """jit(jvp) of the XLA path keeps O(T) temporaries: doubling T at most ~doubles them, while
    the reference's JVP (T x S logits and their tangents) grows ~4x."""

    def temp(impl, t):
        q = jnp.ones((1, t, 2, 32), jnp.float32)
        f = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, implementation=impl)  # noqa: E731
        g = jax.jit(lambda p: jax.jvp(f, p, p))
        return g.lower((q, q, q)).compile().memory_analysis().temp_size_in_bytes

    assert temp("xla", 2048) <= 2.5 * temp("xla", 1024)
    assert temp("reference", 2048) >= 3.5 * temp("reference", 1024)
    assert temp("xla", 2048) * 8 < temp("reference", 2048)
