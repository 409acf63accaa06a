"""Decoder-only Transformer (``jaxcore.models.Transformer``).

Pre-norm blocks of grouped-query attention (``jaxcore.kernels.attention``, K/V heads never
repeated), rotary position embeddings, an optional sliding window, and a SwiGLU MLP; every
projection is a :class:`~jaxcore.models.QDense`. Decoding is functional: :meth:`init_cache`
returns a pytree (per layer K/V caches and the position) and :meth:`decode_step` maps
``(tokens_t, cache) -> (logits_t, cache)``, attending with
``jaxcore.kernels.attention.decode_attention``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxcore.kernels import attention as attn_k

from .quant import QDense, QuantConfig
from .remat import block_call, check_remat, core


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary embedding of ``x`` (B, T, N, H) at integer ``positions`` (B, T); H even."""
    h = x.shape[-1]
    inv = base ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)  # (H/2,)
    ang = positions.astype(jnp.float32)[:, :, None, None] * inv[None, None, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int, *, quant: QuantConfig | None, rngs: nnx.Rngs):
        self.gate = QDense(d_model, d_ff, quant=quant, rngs=rngs)
        self.up = QDense(d_model, d_ff, quant=quant, rngs=rngs)
        self.down = QDense(d_ff, d_model, quant=quant, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE and an optional left window."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        window: int | None,
        rope_base: float,
        remat: str,
        implementation: str | None,
        quant: QuantConfig | None,
        rngs: nnx.Rngs,
    ):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window, self.rope_base, self.remat = window, rope_base, remat
        self.implementation = implementation
        self.q = QDense(d_model, num_heads * head_dim, quant=quant, rngs=rngs)
        self.k = QDense(d_model, num_kv_heads * head_dim, quant=quant, rngs=rngs)
        self.v = QDense(d_model, num_kv_heads * head_dim, quant=quant, rngs=rngs)
        self.o = QDense(num_heads * head_dim, d_model, quant=quant, rngs=rngs)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        B, T, _ = x.shape
        q = self.q(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        return rope(q, positions, self.rope_base), rope(k, positions, self.rope_base), v

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
        q, k, v = self._qkv(x, pos)
        window = None if self.window is None else (self.window, 0)

        def attend(q, k, v):
            return attn_k.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                local_window_size=window,
                implementation=self.implementation,
            )

        y = core(self.remat, attend)(q, k, v)
        return self.o(y.reshape(B, T, self.num_heads * self.head_dim))

    def decode(self, x: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
        """One token ``x`` (B, 1, D) at position ``pos`` (int32 scalar) against ``cache``."""
        B = x.shape[0]
        q, k, v = self._qkv(x, jnp.full((B, 1), pos, jnp.int32))
        kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, pos, 0, 0))
        vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, pos, 0, 0))
        lengths = jnp.full((B,), pos + 1, jnp.int32)
        y = attn_k.decode_attention(q, kc, vc, lengths, local_window_size=self.window)
        return self.o(y.reshape(B, 1, self.num_heads * self.head_dim)), {"k": kc, "v": vc}


class TransformerBlock(nnx.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, d_ff: int, attn_kw: dict, *, quant, remat, rngs):
        self.remat = remat
        self.norm1 = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = Attention(d_model, **attn_kw, remat=remat, quant=quant, rngs=rngs)
        self.norm2 = nnx.RMSNorm(d_model, rngs=rngs)
        self.mlp = SwiGLU(d_model, d_ff, quant=quant, rngs=rngs)

    def _forward(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return block_call(self.remat, type(self)._forward, self, x)

    def decode(self, x: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
        h, cache = self.attn.decode(self.norm1(x), cache, pos)
        x = x + h
        return x + self.mlp(self.norm2(x)), cache


class Transformer(nnx.Module):
    """Decoder-only Transformer language model.

    ``model(tokens)``: int (B, T) -> float32 logits (B, T, vocab_size).

    Args:
      vocab_size, d_model, num_layers: sizes.
      num_heads / num_kv_heads: query and key/value heads (GQA when fewer K/V heads; default
        equal). ``head_dim`` defaults to ``d_model // num_heads``.
      mlp_ratio: SwiGLU hidden size is ``mlp_ratio * d_model``.
      window: optional sliding window: position t attends to ``[t - window, t]``.
      remat: "none" | "full" | "selective" (attention core only).
      quant: a :class:`QuantConfig` for every projection (the embedding stays float).
      attention_implementation: passed to the attention kernel.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        mlp_ratio: int = 4,
        window: int | None = None,
        rope_base: float = 10000.0,
        remat: str = "none",
        quant: QuantConfig | None = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        check_remat(remat)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or d_model < 1 or num_layers < 1 or vocab_size < 1:
            raise ValueError(
                "vocab_size, d_model, num_layers, num_heads: expected positive integers, got "
                f"{vocab_size}, {d_model}, {num_layers}, {num_heads}"
            )
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}"
            )
        if head_dim is None and d_model % num_heads:
            raise ValueError(f"num_heads: expected a divisor of d_model={d_model}, got {num_heads}")
        head_dim = head_dim or d_model // num_heads
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim: expected an even size >= 2 (for RoPE), got {head_dim}")
        if window is not None and window < 1:
            raise ValueError(f"window: expected None or a positive integer, got {window}")
        self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        attn_kw = dict(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            window=window,
            rope_base=rope_base,
            implementation=attention_implementation,
        )
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List(
            [
                TransformerBlock(
                    d_model, mlp_ratio * d_model, attn_kw, quant=quant, remat=remat, rngs=rngs
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.head = QDense(d_model, vocab_size, quant=quant, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
        """An empty decoding cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
        layers = [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(self.num_layers)
        ]
        return {"pos": jnp.zeros((), jnp.int32), "layers": layers}

    def decode_step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Next-token logits (B, vocab_size) for ``tokens`` (B,) at ``cache["pos"]``."""
        pos = cache["pos"]
        x = self.embed(tokens[:, None])
        new = []
        for blk, c in zip(self.blocks, cache["layers"]):
            x, c = blk.decode(x, c, pos)
            new.append(c)
        logits = self.head(self.norm(x))[:, 0].astype(jnp.float32)
        return logits, {"pos": pos + 1, "layers": new}
