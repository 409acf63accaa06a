"""Argument normalisation and checks shared by every attention implementation.

Layout is BTNH like :func:`jax.nn.dot_product_attention`: ``query`` (B, T, N, H), ``key``
(B, S, K, H), ``value`` (B, S, K, Hv) with ``N % K == 0`` (G = N // K query heads share one
key/value head). ``bias`` and ``mask`` are 4-D and broadcastable to (B, N, T, S).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcore import checks


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static (hashable) part of the attention mask and logit transform."""

    scale: float
    is_causal: bool = False
    window: tuple[int, int] | None = None  # (left, right): q - left <= k <= q + right
    soft_cap: float | None = None
    t: int = 0  # query length
    s: int = 0  # key length


@dataclasses.dataclass
class Inputs:
    """Normalised arrays (4-D) and static spec; ``squeeze`` says the caller passed rank 3."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    q_seqlen: jax.Array | None
    kv_seqlen: jax.Array | None
    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None
    spec: MaskSpec
    squeeze: bool


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def normalize(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: Any = None,
    logits_soft_cap: float | None = None,
) -> Inputs:
    """Check every argument at trace time (ValueError naming it) and return 4-D arrays."""
    q_shape = _shape(query)
    checks.check_rank(query, (3, 4), "query")
    squeeze = len(q_shape) == 3
    checks.check_rank(key, len(q_shape), "key")
    checks.check_rank(value, len(q_shape), "value")
    query, key, value = (jnp.asarray(a) for a in (query, key, value))
    if squeeze:
        query, key, value = query[None], key[None], value[None]
    for name, a in (("query", query), ("key", key), ("value", value)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {a.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"key/value: expected the query dtype {query.dtype}, got key {key.dtype} "
            f"and value {value.dtype}"
        )
    b, t, n, h = query.shape
    _, s, k, _ = key.shape
    checks.check_shape(key, (b, None, None, h), "key")
    checks.check_shape(value, (b, s, k, None), "value")
    if k == 0 or n % k != 0:
        raise ValueError(
            f"key: expected a number of heads dividing the query's {n} heads, got shape "
            f"{key.shape} ({k} heads)"
        )

    def _bn_ts(x: Any, name: str, kind: str) -> jax.Array | None:
        if x is None:
            return None
        x = jnp.asarray(x)
        if x.ndim == 3 and squeeze:
            x = x[None]
        if x.ndim != 4 or any(
            d not in (1, full) for d, full in zip(x.shape, (b, n, t, s), strict=True)
        ):
            raise ValueError(
                f"{name}: expected shape broadcastable to (B, N, T, S) = {(b, n, t, s)}, "
                f"got {tuple(x.shape)}"
            )
        if kind == "bool" and x.dtype != jnp.bool_:
            raise ValueError(f"{name}: expected dtype bool, got {x.dtype}")
        if kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
        return x

    bias = _bn_ts(bias, "bias", "float")
    mask = _bn_ts(mask, "mask", "bool")

    def _lengths(x: Any, name: str) -> jax.Array | None:
        if x is None:
            return None
        x = jnp.asarray(x)
        if x.ndim == 0 and squeeze:
            x = x[None]
        checks.check_shape(x, (b,), name)
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}: expected an integer dtype, got {x.dtype}")
        return x.astype(jnp.int32)

    q_seqlen = _lengths(query_seq_lengths, "query_seq_lengths")
    kv_seqlen = _lengths(key_value_seq_lengths, "key_value_seq_lengths")

    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, tuple | list):
            if len(segment_ids) != 2:
                raise ValueError(
                    "segment_ids: expected an array (B, T) or a pair (q (B, T), kv (B, S)), "
                    f"got a sequence of length {len(segment_ids)}"
                )
            q_seg, kv_seg = (jnp.asarray(x) for x in segment_ids)
        else:
            q_seg = kv_seg = jnp.asarray(segment_ids)
            if t != s:
                raise ValueError(
                    f"segment_ids: a single array needs T == S, got T={t}, S={s}; "
                    "pass (q_segment_ids, kv_segment_ids)"
                )
        if squeeze:
            q_seg = q_seg[None] if q_seg.ndim == 1 else q_seg
            kv_seg = kv_seg[None] if kv_seg.ndim == 1 else kv_seg
        checks.check_shape(q_seg, (b, t), "segment_ids (query)")
        checks.check_shape(kv_seg, (b, s), "segment_ids (key/value)")
        for nm, x in (("segment_ids (query)", q_seg), ("segment_ids (key/value)", kv_seg)):
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"{nm}: expected an integer dtype, got {x.dtype}")
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)

    window = None
    if local_window_size is not None:
        if isinstance(local_window_size, int | np.integer):
            window = (int(local_window_size), int(local_window_size))
        else:
            lw = tuple(local_window_size)
            if len(lw) != 2:
                raise ValueError(
                    f"local_window_size: expected an int or a pair (left, right), got {lw}"
                )
            window = (int(lw[0]), int(lw[1]))
        if window[0] < 0 or window[1] < 0:
            raise ValueError(f"local_window_size: expected non-negative sizes, got {window}")
    if scale is None:
        scale = float(1.0 / np.sqrt(h))
    if logits_soft_cap is not None:
        checks.check_positive(logits_soft_cap, "logits_soft_cap")
        logits_soft_cap = float(logits_soft_cap)
    spec = MaskSpec(
        scale=float(scale),
        is_causal=bool(is_causal),
        window=window,
        soft_cap=logits_soft_cap,
        t=t,
        s=s,
    )
    return Inputs(query, key, value, bias, mask, q_seqlen, kv_seqlen, q_seg, kv_seg, spec, squeeze)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """f32 for half types, else the input dtype (f32 or f64)."""
    return jnp.promote_types(dtype, jnp.float32)


def static_visible(spec: MaskSpec, qpos: Any, kpos: Any, xp: Any = jnp) -> Any:
    """The static part of the mask (causal, window) at positions (broadcasting); None = all."""
    vis = None

    def _and(a, b):
        return b if a is None else xp.logical_and(a, b)

    if spec.is_causal:
        vis = _and(vis, kpos <= qpos)
    if spec.window is not None:
        left, right = spec.window
        vis = _and(vis, xp.logical_and(kpos >= qpos - left, kpos <= qpos + right))
    return vis


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (identity when ``cap`` is None)."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)
