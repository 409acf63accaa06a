"""Mosaic GPU (Hopper) flash-attention backward: the kernels in JAX's Mosaic GPU interpreter, and
lowered for the 'cuda' platform.

``_mosaic.MOSAIC_BACKWARD = "mosaic"`` (monkeypatched) makes implementation="mosaic" differentiate
through ``_mosaic_bwd.py`` (dQ and dK/dV kernels). Gradients w.r.t. q, k, v are held to jax.grad of
the reference computed in float32 from the same bf16 inputs; the compiled path (wgmma, register
layouts, TMA) is lowered to Mosaic GPU modules on this CPU, which catches layout errors.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels.attention import _mosaic
from jaxcore.kernels.attention._common import normalize
from jaxcore.kernels.attention._mosaic import attention_mosaic
from jaxcore.kernels.attention._reference import attention_reference

from jaxcore.testing import assert_close, attention_inputs, attention_loss

# If one thread of JAX's Mosaic GPU interpreter raises, the others wait at their barriers forever:
# a broken kernel would hang the run instead of failing. The thread method kills the worker with
# every thread's stack on stderr (pytest-xdist reports the test and starts a new worker).
pytestmark = pytest.mark.timeout(600, method="thread")


@pytest.fixture
def mosaic_backward(monkeypatch):
    monkeypatch.setattr(_mosaic, "MOSAIC_BACKWARD", "mosaic")


_inputs = attention_inputs


def _f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


_loss = attention_loss


def _grads(kw, q, k, v):
    def f(impl, q, k, v):
        inp = normalize(q, k, v, **kw)
        if impl == "reference":
            return _loss(*attention_reference(inp))
        return _loss(*attention_mosaic(inp, interpret=True))

    got = jax.jit(jax.grad(lambda *a: f("mosaic", *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: f("reference", *a), argnums=(0, 1, 2))(*_f32(q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        scale = 4.0 * float(jnp.max(jnp.abs(w)))  # bf16 inputs: relative to the gradient's size
        assert_close(g, w, dtype=jnp.bfloat16, scale=max(scale, 1.0), err_msg=name)
    return got


CASES = [
    # (b, t, s, n, k, h, hv), options: ragged T/S (padding), GQA 2:1, causal + soft cap, window
    ((1, 100, 120, 2, 1, 64, 64), dict(is_causal=True, logits_soft_cap=5.0)),
    ((1, 120, 130, 1, 1, 32, 64), dict(local_window_size=(40, 8))),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradients_against_reference(mosaic_backward, case):
    shape, kw = CASES[case]
    _grads(kw, *_inputs(*shape, seed=case))


def test_key_value_lengths_and_fully_masked_rows(mosaic_backward):
    # key lengths 0 (every query row of sequence 0 sees nothing) and 77 (ragged): gradients of
    # fully masked rows and of keys past the length are exactly zero.
    q, k, v = _inputs(2, 64, 128, 1, 1, 64, 64, seed=7)
    lens = jnp.array([0, 77], jnp.int32)
    dq, dk, dv = _grads(dict(key_value_seq_lengths=lens), q, k, v)
    for g in (dq[0], dk[0], dv[0], dk[1, 77:], dv[1, 77:]):
        np.testing.assert_array_equal(np.asarray(g, np.float32), 0.0)
    assert float(jnp.max(jnp.abs(dk[1, :77].astype(jnp.float32)))) > 0.0


def _packed(b: int, t: int, cuts) -> jnp.ndarray:
    ids = np.zeros((b, t), np.int32)
    for i, cs in enumerate(cuts):
        for c in cs:
            ids[i, c:] += 1
    return jnp.asarray(ids)


def test_segment_ids_with_lengths_and_gqa(mosaic_backward):
    # packed sequences (one of a single token, one spanning several blocks) + causal, GQA 2:1
    # and key lengths; keys past a length and rows that see nothing get zero gradients
    q, k, v = _inputs(2, 136, 136, 2, 1, 64, 64, seed=11)
    seg = _packed(2, 136, [(40, 41, 100), (90,)])
    lens = jnp.array([120, 136], jnp.int32)
    kw = dict(is_causal=True, segment_ids=seg, key_value_seq_lengths=lens)
    dq, dk, dv = _grads(kw, q, k, v)
    for g in (dk[0, 120:], dv[0, 120:]):
        np.testing.assert_array_equal(np.asarray(g, np.float32), 0.0)


def test_segment_ids_window_non_monotone(mosaic_backward):
    # ids that are not sorted (a block range with masked blocks in between) and a window
    q, k, v = _inputs(1, 136, 136, 1, 1, 64, 64, seed=12)
    seg = jnp.asarray(np.repeat(np.array([0, 1, 0, 2], np.int32), 34)[None])
    _grads(dict(local_window_size=(70, 20), segment_ids=seg), q, k, v)


def _lowered_grad(shape, kw, dtype=jnp.bfloat16):
    b, t, s, n, k, h, hv = shape
    kw = dict(kw)
    lens = jnp.array([s, s // 3], jnp.int32)[:b] if kw.pop("kvlen", False) else None
    if kw.pop("seg", False):
        kw["segment_ids"] = _packed(b, t, [(t // 3, t // 2)] * b)

    def loss(q, k, v):
        inp = normalize(q, k, v, key_value_seq_lengths=lens, **kw)
        return jnp.sum(attention_mosaic(inp, interpret=False)[0].astype(jnp.float32))

    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, n, h), dtype), sds((b, s, k, h), dtype), sds((b, s, k, hv), dtype))
    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


LOWER = [
    ((4, 1024, 1024, 16, 16, 128, 128), dict(is_causal=True)),  # the benchmark family
    ((1, 512, 512, 8, 2, 64, 64), dict(is_causal=True)),
    ((1, 256, 256, 4, 1, 256, 256), dict(is_causal=True, logits_soft_cap=30.0)),
    ((2, 300, 500, 8, 8, 128, 128), dict(local_window_size=(100, 20), kvlen=True)),
    ((1, 256, 256, 4, 4, 32, 96), {}),
    ((2, 1024, 1024, 8, 2, 128, 128), dict(is_causal=True, seg=True, kvlen=True)),
]


@pytest.mark.parametrize("case", range(len(LOWER)))
def test_compiled_backward_lowers_for_cuda(mosaic_backward, case):
    txt = _lowered_grad(*LOWER[case])
    calls = re.findall(r"custom_call @(\w+)", txt)
    # the forward, the dQ and the dK/dV kernels are Mosaic GPU; no Triton kernel is left
    assert calls.count("mosaic_gpu_v2") == 3 and "xla.gpu.triton" not in txt, calls


def test_default_backward_when_compiled_is_mosaic_where_checked():
    """Lowered for cuda with the default MOSAIC_BACKWARD: forward and both backward kernels in
    Mosaic GPU at H=64 bf16 (checked on a GPU); at H=256 the forward in Mosaic GPU, the backward
    in Triton."""
    txt = _lowered_grad((1, 256, 256, 2, 2, 64, 64), dict(is_causal=True))
    calls = re.findall(r"custom_call @(\w+)", txt)
    assert calls.count("mosaic_gpu_v2") == 3 and "xla.gpu.triton" not in txt, calls
    txt = _lowered_grad((1, 256, 256, 2, 2, 256, 256), dict(is_causal=True))
    calls = re.findall(r"custom_call @(\w+)", txt)
    assert calls.count("mosaic_gpu_v2") == 1 and txt.count("xla.gpu.triton") >= 2, calls


def test_bad_switch_value_names_itself(monkeypatch):
    monkeypatch.setattr(_mosaic, "MOSAIC_BACKWARD", "cudnn")
    with pytest.raises(ValueError, match="MOSAIC_BACKWARD: expected one of .*got 'cudnn'"):
        _lowered_grad((1, 128, 128, 2, 2, 64, 64), {})


def test_blocks_are_checked():
    from jaxcore.kernels.attention import _mosaic_bwd

    q, k, v = _inputs(1, 128, 128, 1, 1, 256, 256)
    cfg = _mosaic.MosaicConfig(spec=normalize(q, k, v).spec, groups=1)
    lse = jnp.zeros((1, 1, 128), jnp.float32)
    with pytest.raises(ValueError, match="stages_dkdv: 2 stages need .* KiB"):
        _mosaic_bwd.backward(cfg, q, k, v, None, q, lse, q, lse, blocks=dict(stages_dkdv=2))
    with pytest.raises(ValueError, match="block_k: expected 64 or 128"):
        _mosaic_bwd.backward(cfg, q, k, v, None, q, lse, q, lse, blocks=dict(block_k=32))


def test_default_backward_choice(monkeypatch):
    """MOSAIC_BACKWARD="auto" (the default): the Mosaic GPU backward compiled for the head dims
    and dtype checked on an H200 (bf16, H = Hv = 64 or 128), the Triton one for anything else
    and in interpret mode; an explicit setting is taken as is."""
    assert _mosaic.MOSAIC_BACKWARD == "auto"
    kind = _mosaic.backward_kind
    bf16, f16 = jnp.bfloat16, jnp.float16
    assert [kind(64, 64, bf16), kind(128, 128, bf16)] == ["mosaic"] * 2
    unchecked = [(128, 64, bf16), (256, 128, bf16), (256, 256, bf16), (128, 128, f16)]
    assert [kind(*c) for c in unchecked] == ["triton"] * 4
    assert kind(128, 128, bf16, interpret=True) == "triton"
    monkeypatch.setattr(_mosaic, "MOSAIC_BACKWARD", "mosaic")
    assert kind(128, 128, bf16, interpret=True) == kind(256, 128, f16) == "mosaic"
    monkeypatch.setattr(_mosaic, "MOSAIC_BACKWARD", "triton")
    assert kind(64, 64, bf16) == "triton"
