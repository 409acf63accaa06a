"""Flash-decoding: a few new query tokens against a KV cache, split over the cache and merged."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcore import backend, checks

from ._common import compute_dtype, soft_cap

FAMILY = "attention_decode"
backend.register_family(
    FAMILY, ("reference", "xla"), "xla", doc="decode_attention: split-KV flash decoding"
)


def _check(query, key_cache, value_cache, cache_lengths):
    checks.check_rank(query, 4, "query")
    checks.check_rank(key_cache, 4, "key_cache")
    checks.check_rank(value_cache, 4, "value_cache")
    b, tq, n, h = query.shape
    _, s, kh, _ = key_cache.shape
    checks.check_shape(key_cache, (b, None, None, h), "key_cache")
    checks.check_shape(value_cache, (b, s, kh, None), "value_cache")
    if n % kh:
        raise ValueError(
            f"key_cache: expected a number of heads dividing the query's {n} heads, got shape "
            f"{key_cache.shape}"
        )
    checks.check_shape(cache_lengths, (b,), "cache_lengths")
    if not jnp.issubdtype(jnp.result_type(cache_lengths), jnp.integer):
        raise ValueError(
            f"cache_lengths: expected an integer dtype, got {jnp.result_type(cache_lengths)}"
        )
    for nm, x in (("key_cache", key_cache), ("value_cache", value_cache)):
        if x.dtype != query.dtype:
            raise ValueError(f"{nm}: expected the query dtype {query.dtype}, got {x.dtype}")


def _visible(qpos, kpos, lengths, window):
    vis = (kpos <= qpos) & (kpos < lengths)
    if window is not None:
        vis = vis & (kpos >= qpos - window)
    return vis


def decode_attention(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    cache_lengths: Any,
    *,
    num_splits: int | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of Tq new tokens against a KV cache (flash-decoding, GQA-aware).

    Args:
      query: (B, Tq, N, H): the newest Tq tokens; token t sits at position
        ``cache_lengths - Tq + t`` and sees cache positions up to its own (causal).
      key_cache: (B, S, K, H), N % K == 0; the new tokens' keys are already written.
      value_cache: (B, S, K, Hv).
      cache_lengths: int (B,): valid cache entries per sequence (including the new tokens).
      num_splits: split the cache into this many chunks, attend to each, merge (default:
        chunks of about 512 positions).
      local_window_size: optional left window: position p sees [p - w, p].
      return_lse: also return the float32 log-sum-exp (B, Tq, N).

    Returns:
      (B, Tq, N, Hv) in the query dtype; a row with no visible key gives zeros.
    """
    query, key_cache, value_cache = (jnp.asarray(x) for x in (query, key_cache, value_cache))
    cache_lengths = jnp.asarray(cache_lengths)
    _check(query, key_cache, value_cache, cache_lengths)
    impl = backend.resolve_implementation(FAMILY, implementation)
    b, tq, n, h = query.shape
    _, s, kh, hv = value_cache.shape
    g = n // kh
    scale = float(1.0 / np.sqrt(h)) if scale is None else float(scale)
    if num_splits is None:
        num_splits = max(1, -(-s // 512))
    checks.check_positive(num_splits, "num_splits")
    num_splits = min(int(num_splits), s)
    cdt = compute_dtype(query.dtype)
    lengths = cache_lengths.astype(jnp.int32)
    qpos = lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]  # (B, Tq)
    q = (query.astype(cdt) * jnp.asarray(scale, cdt)).reshape(b, tq, kh, g, h)
    hi = jax.lax.Precision.HIGHEST if impl == "reference" else None

    if impl == "reference":
        k, v = key_cache.astype(cdt), value_cache.astype(cdt)
        logits = soft_cap(jnp.einsum("btkgh,bskh->bkgts", q, k, precision=hi), logits_soft_cap)
        kpos = jnp.arange(s, dtype=jnp.int32)[None, None, None, None, :]
        vis = _visible(
            qpos[:, None, None, :, None],
            kpos,
            lengths[:, None, None, None, None],
            local_window_size,
        )
        logits = jnp.where(vis, logits, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(logits - m)
        l = jnp.sum(p, -1, keepdims=True)
        ok = l > 0
        o = jnp.einsum("bkgts,bskh->btkgh", p / jnp.where(ok, l, 1.0), v, precision=hi)
        lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)[..., 0]
        lse = jnp.transpose(lse, (0, 3, 1, 2))  # (B, Tq, K, G)
    else:
        c = -(-s // num_splits)
        sp = c * num_splits
        pad = ((0, 0), (0, sp - s), (0, 0), (0, 0))
        k = jnp.pad(key_cache.astype(cdt), pad).reshape(b, num_splits, c, kh, h)
        v = jnp.pad(value_cache.astype(cdt), pad).reshape(b, num_splits, c, kh, hv)
        logits = soft_cap(jnp.einsum("btkgh,bpckh->bpkgtc", q, k), logits_soft_cap)
        kpos = jnp.arange(sp, dtype=jnp.int32).reshape(num_splits, c)[None, :, None, None, None, :]
        vis = _visible(
            qpos[:, None, None, None, :, None],
            kpos,
            lengths[:, None, None, None, None, None],
            local_window_size,
        )
        logits = jnp.where(vis, logits, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(logits - m)
        l = jnp.sum(p, -1, keepdims=True)
        ok = l > 0
        o_part = jnp.einsum("bpkgtc,bpckh->pbtkgh", p / jnp.where(ok, l, 1.0), v)
        lse_part = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)[..., 0]
        lse_part = jnp.transpose(lse_part, (1, 0, 4, 2, 3))  # (P, B, Tq, K, G)
        from ._merge import merge

        o, lse = merge(list(o_part), list(lse_part))
    o = o.reshape(b, tq, n, hv).astype(query.dtype)
    lse = lse.reshape(b, tq, n)
    return (o, lse) if return_lse else o
