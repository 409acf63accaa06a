"""fake_quant: forward == round exactly, STE gradients exactly identity / clipped identity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels import lowp

SAT_E4M3 = lowp.FloatFormat(4, 3, specials="fn", overflow="saturate")


def _x():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)) * np.exp2(rng.integers(-4, 10, (4, 64)))
    return jnp.asarray(x.astype(np.float32))


@pytest.mark.parametrize(
    "fmt", [lowp.float8_e4m3fn, SAT_E4M3, lowp.IntFormat(8), lowp.FixedFormat(2, 5)], ids=str
)
def test_forward_exact_and_ste_gradients(fmt):
    x = _x()
    fq = jax.jit(lambda v, ste: lowp.fake_quant(v, fmt, ste=ste), static_argnums=1)
    y = fq(x, "identity")
    want = lowp.round(x, fmt)
    assert (np.asarray(y).view(np.uint32) == np.asarray(want).view(np.uint32)).all() or (
        np.isnan(np.asarray(want)) == np.isnan(np.asarray(y))
    ).all()
    g = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    _, vjp = jax.vjp(lambda v: fq(v, "identity"), x)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))
    _, vjp = jax.vjp(lambda v: fq(v, "clipped"), x)
    lo, hi = (-fmt.max, fmt.max) if isinstance(fmt, lowp.FloatFormat) else (fmt.min, fmt.max)
    inside = (np.asarray(x) >= lo) & (np.asarray(x) <= hi)
    assert 0 < inside.sum() < inside.size
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.where(inside, np.asarray(g), 0))


def test_exact_where_stop_gradient_idiom_is_not():
    x = jnp.float32(1e30)
    assert float(lowp.fake_quant(x, SAT_E4M3)) == 448.0
    idiom = x + jax.lax.stop_gradient(lowp.round(x, SAT_E4M3) - x)
    assert float(idiom) != 448.0  # 1e30 + (448 - 1e30) == 0 in float32
    assert float(jax.grad(lambda v: lowp.fake_quant(v, SAT_E4M3))(x)) == 1.0


@pytest.mark.parametrize("bf", [lowp.MXFP4, lowp.MXFP8_E4M3, lowp.NVFP4], ids=str)
def test_block_fake_quant(bf):
    x = _x()
    g = jnp.ones_like(x) * 3.0

    @jax.jit
    def run(v, g):
        y, vjp_i = jax.vjp(lambda u: lowp.fake_quant(u, bf, ste="identity"), v)
        _, vjp_c = jax.vjp(lambda u: lowp.fake_quant(u, bf, ste="clipped"), v)
        q = lowp.block_quantize(v, bf)
        return y, lowp.block_round(v, bf), vjp_i(g)[0], vjp_c(g)[0], q.scales

    y, br, gi, gc, scales = run(x, g)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(br))
    np.testing.assert_array_equal(np.asarray(gi), np.asarray(g))
    gc = np.asarray(gc)
    assert set(np.unique(gc)) <= {0.0, 3.0}
    if bf.pow2:  # zero gradient exactly where |x| > 2**shared_exp * elem_max
        se = np.asarray(scales, np.float64) - 127
        lim = np.repeat(np.exp2(se), bf.block_size, axis=-1) * bf.elem_max
        inside = np.abs(np.asarray(x, np.float64)) <= lim
        assert 0 < inside.sum() < inside.size
        np.testing.assert_array_equal(gc, np.where(inside, 3.0, 0.0))


def test_stochastic_fake_quant_and_transforms():
    x = _x()
    key = jax.random.key(0)

    def sr(v):
        return lowp.fake_quant(v, lowp.bfloat16, "stochastic", key=key)

    @jax.jit
    def run(v):
        e5 = lambda r: lowp.fake_quant(r, lowp.float8_e5m2)  # noqa: E731
        return (
            sr(v),
            sr(v),
            jax.grad(lambda u: jnp.sum(sr(u) * 2.0))(v),
            jax.vmap(e5)(v),
            lowp.round(v, lowp.float8_e5m2),
            jax.grad(jax.checkpoint(lambda r: e5(r).sum()))(v),
        )

    a, b, gx, vm, r, gc = run(x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(gx), 2.0)
    np.testing.assert_array_equal(np.asarray(vm), np.asarray(r))
    np.testing.assert_array_equal(np.asarray(gc), 1.0)
    xb = x.astype(jnp.bfloat16)
    assert jax.jit(lambda v: lowp.fake_quant(v, lowp.float8_e4m3fn))(xb).dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", [SAT_E4M3, lowp.IntFormat(8), lowp.MXFP4], ids=str)
def test_forward_mode_and_second_order(fmt):
    """jax.jvp / jacfwd give the same straight-through map as the VJP; a Hessian-vector product
    through fake_quant (the STE is locally linear) is the loss's curvature passed through it."""
    x = _x()
    t = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape).astype(np.float32))
    for ste in ("identity", "clipped"):
        f = lambda v, ste=ste: lowp.fake_quant(v, fmt, ste=ste)  # noqa: E731
        y, dy = jax.jit(lambda v, u, f=f: jax.jvp(f, (v,), (u,)))(x, t)
        _, vjp = jax.vjp(f, x)
        mask = np.asarray(vjp(jnp.ones_like(x))[0])  # the STE's 0/1 mask
        np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x)))
        np.testing.assert_array_equal(np.asarray(dy), mask * np.asarray(t))
        if ste == "clipped":
            assert 0 < mask.sum() < mask.size
    row = x[0, :32]  # one MX block
    jf = jax.jacfwd(lambda v: lowp.fake_quant(v, fmt, ste="clipped"))(row)
    jr = jax.jacrev(lambda v: lowp.fake_quant(v, fmt, ste="clipped"))(row)
    np.testing.assert_array_equal(np.asarray(jf), np.asarray(jr))
    loss = lambda v: jnp.sum(jnp.sin(lowp.fake_quant(v, fmt)))  # noqa: E731
    hvp = jax.jvp(jax.grad(loss), (x,), (t,))[1]
    want = -jnp.sin(lowp.fake_quant(x, fmt)) * t  # d/dx cos(q(x)) with dq/dx = 1
    np.testing.assert_allclose(np.asarray(hvp), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_fake_quant_errors():
    x = _x()
    with pytest.raises(ValueError, match="ste"):
        lowp.fake_quant(x, lowp.bfloat16, ste="straight")
    with pytest.raises(TypeError, match="x"):
        lowp.fake_quant(jnp.ones(3, jnp.int32), lowp.bfloat16)
    with pytest.raises(ValueError, match="key"):
        lowp.fake_quant(x, lowp.bfloat16, "stochastic")


def test_docs_qat_example_runs():
    """The QAT example in docs/lowp.md, run with fewer steps so the page cannot rot."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "lowp.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    qat = [b for b in blocks if "fake_quant" in b and "optax" in b]
    assert qat, "docs/lowp.md lost its QAT example"
    ns: dict = {"STEPS": 10}
    exec(compile(qat[0], str(doc), "exec"), ns)
    assert ns["final_loss"] < ns["first_loss"]


def test_docs_formats_table_is_generated():
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "lowp.md").read_text()
    start = doc.index("<!-- formats-table:start -->\n") + len("<!-- formats-table:start -->\n")
    end = doc.index("\n<!-- formats-table:end -->")
    assert doc[start:end] == lowp.formats_table()
