"""Causal linear attention with optional per-step decay: reference recurrence and chunked form."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcore import backend, checks

from ._common import compute_dtype

FAMILY = "linear_attention"
backend.register_family(
    FAMILY, ("reference", "xla"), "xla", doc="linear_attention: chunked (xla) or recurrence"
)


def _reference(q, k, v, logd, s0):
    """S_t = d_t S_{t-1} + k_t v_t^T; o_t = q_t S_t. Arrays time-major (T, B, N, ...)."""

    def step(state, x):
        qt, kt, vt, lt = x
        state = jnp.exp(lt)[..., None, None] * state + kt[..., :, None] * vt[..., None, :]
        return state, jnp.einsum("bnh,bnhv->bnv", qt, state)

    state, o = jax.lax.scan(step, s0, (q, k, v, logd))
    return o, state


def _chunked(q, k, v, logd, s0, c):
    """Chunked form. q, k (B, T, N, H), v (B, T, N, Hv), logd (B, T, N); T % c == 0."""
    b, t, n, h = q.shape
    hv = v.shape[-1]
    nc = t // c
    q, k, v = (x.reshape(b, nc, c, n, x.shape[-1]) for x in (q, k, v))
    a = jnp.cumsum(logd.reshape(b, nc, c, n), axis=2)  # (B, nc, c, N), <= 0
    a_last = a[:, :, -1]  # (B, nc, N)
    ti = jnp.arange(c)
    causal = ti[:, None] >= ti[None, :]  # (t, s)
    diff = a[:, :, :, None, :] - a[:, :, None, :, :]  # (B, nc, t, s, N)
    cm = causal[None, None, :, :, None]
    w = jnp.where(cm, jnp.exp(jnp.where(cm, diff, 0.0)), 0.0)  # exp(a_t - a_s), s <= t
    qk = jnp.einsum("bctnh,bcsnh->bctsn", q, k)
    o_intra = jnp.einsum("bctsn,bcsnv->bctnv", qk * w, v)
    # local state of each chunk: sum_s exp(a_last - a_s) k_s v_s^T
    kd = k * jnp.exp(a_last[:, :, None] - a)[..., None]
    u = jnp.einsum("bcsnh,bcsnv->bcnhv", kd, v)  # (B, nc, N, H, Hv)

    def step(state, x):
        u_c, al = x
        prev = state
        state = jnp.exp(al)[..., None, None] * state + u_c
        return state, prev

    final, prev = jax.lax.scan(step, s0, (jnp.moveaxis(u, 1, 0), jnp.moveaxis(a_last, 1, 0)))
    prev = jnp.moveaxis(prev, 0, 1)  # (B, nc, N, H, Hv): state before each chunk
    o_inter = jnp.einsum("bctnh,bcnhv->bctnv", q * jnp.exp(a)[..., None], prev)
    return (o_intra + o_inter).reshape(b, t, n, hv), final


def linear_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    decay: Any = None,
    chunk_size: int = 64,
    initial_state: Any = None,
    return_final_state: bool = False,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal linear attention ``o_t = q_t S_t``, ``S_t = d_t S_{t-1} + k_t^T v_t``.

    Args:
      query, key: (B, T, N, H); value: (B, T, N, Hv). No feature map is applied (apply one first).
      decay: optional per-step factor d_t in [0, 1], broadcastable to (B, T, N) (gated /
        RetNet-style; a constant per head is ``decay=gamma[None, None, :]``). Default 1.
      chunk_size: chunk length C of the chunked form
        ``O_c = (Q_c K_c^T * M) V_c + Q_c S_{c-1}`` (M holds the causal decay weights).
      initial_state: (B, N, H, Hv), default zeros.
      return_final_state: also return S_T (B, N, H, Hv) in the compute dtype.
      implementation: None (= "xla", the chunked form), "reference" (the recurrence), "xla".

    Returns:
      (B, T, N, Hv) in the query dtype (and the final state if asked).
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    checks.check_rank(query, 4, "query")
    b, t, n, h = query.shape
    checks.check_shape(key, (b, t, n, h), "key")
    checks.check_rank(value, 4, "value")
    checks.check_shape(value, (b, t, n, None), "value")
    hv = value.shape[-1]
    checks.check_positive(chunk_size, "chunk_size")
    impl = backend.resolve_implementation(FAMILY, implementation)
    cdt = compute_dtype(query.dtype)
    q, k, v = (x.astype(cdt) for x in (query, key, value))
    if decay is None:
        logd = jnp.zeros((b, t, n), cdt)
    else:
        decay = jnp.asarray(decay)
        try:
            decay = jnp.broadcast_to(decay.astype(cdt), (b, t, n))
        except ValueError:
            raise ValueError(
                f"decay: expected shape broadcastable to (B, T, N) = {(b, t, n)}, got {decay.shape}"
            ) from None
        tiny = jnp.finfo(cdt).tiny
        logd = jnp.log(jnp.clip(decay, tiny, 1.0))
    if initial_state is None:
        s0 = jnp.zeros((b, n, h, hv), cdt)
    else:
        s0 = jnp.asarray(initial_state)
        checks.check_shape(s0, (b, n, h, hv), "initial_state")
        s0 = s0.astype(cdt)
    if impl == "reference":
        tm = lambda x: jnp.moveaxis(x, 1, 0)
        o, final = _reference(tm(q), tm(k), tm(v), tm(logd), s0)
        o = jnp.moveaxis(o, 0, 1)
    else:
        c = int(min(chunk_size, t))
        tp = -(-t // c) * c
        if tp != t:
            pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
            q, k, v, logd = pad(q), pad(k), pad(v), pad(logd)  # zero k, v; decay 1
        o, final = _chunked(q, k, v, logd, s0, c)
        o = o[:, :t]
    o = o.astype(query.dtype)
    return (o, final) if return_final_state else o
