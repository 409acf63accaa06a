"""The obvious dense attention: the oracle every other implementation is tested against.

Materialises the (B, N, T, S) logits. Softmax runs in ``promote(dtype, float32)``; a fully masked
query row gives output 0 and log-sum-exp -inf (and zero gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import Inputs, compute_dtype, soft_cap, static_visible


def dense_visible(inp: Inputs) -> jax.Array | None:
    """The full boolean mask, broadcastable to (B, N, T, S); None when nothing is masked."""
    spec = inp.spec
    t, s = spec.t, spec.s
    qpos = jnp.arange(t)[:, None]
    kpos = jnp.arange(s)[None, :]
    vis = static_visible(spec, qpos, kpos)
    vis = None if vis is None else vis[None, None]

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if inp.mask is not None:
        vis = _and(vis, inp.mask)
    if inp.q_seqlen is not None:
        vis = _and(vis, (qpos[None] < inp.q_seqlen[:, None, None])[:, None])
    if inp.kv_seqlen is not None:
        vis = _and(vis, (kpos[None] < inp.kv_seqlen[:, None, None])[:, None])
    if inp.q_segment_ids is not None:
        same = inp.q_segment_ids[:, :, None] == inp.kv_segment_ids[:, None, :]
        vis = _and(vis, same[:, None])
    return vis


def attention_reference(inp: Inputs) -> tuple[jax.Array, jax.Array]:
    """Returns (output (B, T, N, Hv) in the query dtype, lse (B, T, N) float32 or float64)."""
    q, k, v = inp.query, inp.key, inp.value
    spec = inp.spec
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    cdt = compute_dtype(q.dtype)
    hi = jax.lax.Precision.HIGHEST
    qg = q.astype(cdt).reshape(b, t, kh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(cdt), precision=hi)
    logits = soft_cap(logits * jnp.asarray(spec.scale, cdt), spec.soft_cap)
    if inp.bias is not None:
        bias = jnp.broadcast_to(inp.bias.astype(cdt), (b, n, t, spec.s))
        logits = logits + bias.reshape(b, kh, g, t, spec.s)
    vis = dense_visible(inp)
    if vis is not None:
        vis = jnp.broadcast_to(vis, (b, n, t, spec.s)).reshape(b, kh, g, t, spec.s)
        logits = jnp.where(vis, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    ok = denom > 0
    safe = jnp.where(ok, denom, 1.0)
    out = jnp.einsum("bkgts,bskh->btkgh", p / safe, v.astype(cdt), precision=hi)
    lse = jnp.where(ok, m + jnp.log(safe), -jnp.inf)[..., 0]  # (b, k, g, t)
    out = out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, n)
    return out, lse
