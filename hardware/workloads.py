"""Built-in workloads written in plain jnp (for the CLI, benchmarks and tests).

:func:`gpt2_decode_step` is a GPT-2-style decode step (one new token attending to a KV cache of
``context`` tokens): token + position embedding, ``n_layers`` x (layer norm, QKV projection,
cache update, multi-head attention, output projection, residual, layer norm, 4x GELU MLP,
residual), final layer norm, tied-embedding logits. It is a stand-in until the benchmark is
pointed at ``jaxcore.models.Transformer``'s decode step; any traced workload works the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["gpt2_decode_step", "GPT2_SIZES"]

# name -> (d_model, n_layers, n_heads)
GPT2_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large": (1280, 36, 20),
    "xl": (1600, 48, 25),
}


def _ln(x, g, b):
    m = jnp.mean(x, axis=-1, keepdims=True)
    v = jnp.mean(jnp.square(x - m), axis=-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + 1e-5) * g + b


def gpt2_decode_step(
    *,
    d_model: int = 768,
    n_layers: int = 12,
    n_heads: int | None = None,
    context: int = 1024,
    vocab: int = 50257,
    dtype: Any = jnp.float16,
) -> tuple[Any, tuple]:
    """``(fn, args)`` for one decode step; ``args`` are ``ShapeDtypeStruct`` s (nothing allocated).

    ``fn(params, cache_k, cache_v, token, pos) -> (logits, cache_k, cache_v)``; parameter names
    in the trace: ``arg0/layers/<i>/wqkv`` etc., so ``precision={"wqkv": 4}`` reaches them.
    """
    for name, v in (("d_model", d_model), ("n_layers", n_layers), ("context", context),
                    ("vocab", vocab)):  # fmt: skip
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    h = n_heads or max(1, d_model // 64)
    if d_model % h:
        raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {h}")
    dh = d_model // h
    S = jax.ShapeDtypeStruct
    layer = {
        "ln1_g": S((d_model,), dtype), "ln1_b": S((d_model,), dtype),
        "wqkv": S((d_model, 3 * d_model), dtype), "bqkv": S((3 * d_model,), dtype),
        "wo": S((d_model, d_model), dtype), "bo": S((d_model,), dtype),
        "ln2_g": S((d_model,), dtype), "ln2_b": S((d_model,), dtype),
        "w1": S((d_model, 4 * d_model), dtype), "b1": S((4 * d_model,), dtype),
        "w2": S((4 * d_model, d_model), dtype), "b2": S((d_model,), dtype),
    }  # fmt: skip
    params = {
        "wte": S((vocab, d_model), dtype),
        "wpe": S((context, d_model), dtype),
        "layers": [dict(layer) for _ in range(n_layers)],
        "lnf_g": S((d_model,), dtype),
        "lnf_b": S((d_model,), dtype),
    }
    cache = S((n_layers, h, context, dh), dtype)
    token = S((), jnp.int32)
    pos = S((), jnp.int32)

    def step(p, ck, cv, tok, t):
        x = p["wte"][tok] + p["wpe"][t]
        mask = jnp.arange(context) <= t
        for i, lp in enumerate(p["layers"]):
            y = _ln(x, lp["ln1_g"], lp["ln1_b"])
            qkv = y @ lp["wqkv"] + lp["bqkv"]
            q, k, v = jnp.split(qkv.reshape(3, h, dh), 3, axis=0)
            ck = jax.lax.dynamic_update_slice(ck, k.reshape(1, h, 1, dh), (i, 0, t, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.reshape(1, h, 1, dh), (i, 0, t, 0))
            s = jnp.einsum("hd,htd->ht", q[0], ck[i]) / jnp.sqrt(jnp.asarray(dh, dtype))
            s = jnp.where(mask[None, :], s, jnp.asarray(-1e4, dtype))
            a = jnp.einsum("ht,htd->hd", jax.nn.softmax(s, axis=-1), cv[i])
            x = x + a.reshape(d_model) @ lp["wo"] + lp["bo"]
            y = _ln(x, lp["ln2_g"], lp["ln2_b"])
            x = x + jax.nn.gelu(y @ lp["w1"] + lp["b1"]) @ lp["w2"] + lp["b2"]
        x = _ln(x, p["lnf_g"], p["lnf_b"])
        return x @ p["wte"].T, ck, cv

    return step, (params, cache, cache, token, pos)
