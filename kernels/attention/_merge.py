"""Exact, differentiable merge of attention computed over disjoint key sets."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def merge(outputs: Sequence[jax.Array], lses: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Combine partial attentions over disjoint key sets into the attention over their union.

    Args:
      outputs: sequence of (..., Hv) arrays (e.g. (B, T, N, Hv)), each normalised over its keys.
      lses: matching log-sum-exps (...) (e.g. (B, T, N)); -inf marks a part with no visible key.

    Returns:
      (output in outputs[0]'s dtype, lse float32 (float64 if any input is)):
      ``lse = logsumexp_i lse_i`` and ``o = sum_i exp(lse_i - lse) o_i``. Rows where every part
      is empty give o = 0 and lse = -inf, with zero gradients.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(
            f"outputs/lses: expected two non-empty sequences of equal length, got "
            f"{len(outputs)} outputs and {len(lses)} lses"
        )
    o0 = outputs[0]
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape != o0.shape:
            raise ValueError(f"outputs[{i}]: expected shape {o0.shape}, got {o.shape}")
        if l.shape != o0.shape[:-1]:
            raise ValueError(f"lses[{i}]: expected shape {o0.shape[:-1]}, got {l.shape}")
    cdt = jnp.result_type(jnp.float32, *[l.dtype for l in lses])
    lse = jnp.stack([l.astype(cdt) for l in lses])  # (P, ...)
    m = jax.lax.stop_gradient(jnp.max(lse, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m[None])  # exp(-inf) = 0
    tot = jnp.sum(w, axis=0)
    ok = tot > 0
    safe = jnp.where(ok, tot, 1.0)
    out = sum((w[i] / safe)[..., None] * o.astype(cdt) for i, o in enumerate(outputs))
    out = jnp.where(ok[..., None], out, 0.0)
    lse_out = jnp.where(ok, m + jnp.log(safe), -jnp.inf)
    return out.astype(o0.dtype), lse_out
