"""Hybrid attention / state-space model (``jaxcore.models.Hybrid``), Jamba-style.

Layer ``i`` is an attention block (``"A"``: GQA + RoPE + SwiGLU, :mod:`.transformer`) or a Mamba
block (``"M"``: selective scan or SSD, :mod:`.mamba`) by ``pattern[i % len(pattern)]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .mamba import MambaBlock, make_mixer
from .quant import QDense, QuantConfig
from .remat import check_remat
from .transformer import TransformerBlock


class Hybrid(nnx.Module):
    """Interleaved attention and SSM blocks: int tokens (B, T) -> float32 logits (B, T, V).

    Args:
      pattern: a string over {"A", "M"} repeated over the layers (default "MA": Mamba, then
        attention).
      d_model, num_layers, num_heads, num_kv_heads, mlp_ratio, window: attention settings
        (as :class:`~jaxcore.models.Transformer`).
      variant, d_state, expand, d_conv, head_dim, chunk_size: SSM settings (as
        :class:`~jaxcore.models.Mamba`; ``head_dim`` is the Mamba-2 head size).
      remat, quant: as the other models.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        pattern: str = "MA",
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        mlp_ratio: int = 4,
        window: int | None = None,
        variant: str = "mamba",
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        head_dim: int = 16,
        chunk_size: int = 64,
        remat: str = "none",
        quant: QuantConfig | None = None,
        rngs: nnx.Rngs,
    ):
        check_remat(remat)
        if not pattern or set(pattern) - {"A", "M"}:
            raise ValueError(
                f"pattern: expected a non-empty string over 'A' and 'M', got {pattern!r}"
            )
        if vocab_size < 1 or d_model < 1 or num_layers < 1 or num_heads < 1:
            raise ValueError(
                "vocab_size, d_model, num_layers, num_heads: expected positive integers, got "
                f"{vocab_size}, {d_model}, {num_layers}, {num_heads}"
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}"
            )
        attn_head = d_model // num_heads
        if attn_head < 2 or attn_head % 2:
            raise ValueError(
                f"num_heads: d_model / num_heads must be even (RoPE), got {d_model}/{num_heads}"
            )
        self.kinds = tuple(pattern[i % len(pattern)] for i in range(num_layers))
        self.num_kv_heads, self.attn_head = num_kv_heads, attn_head
        attn_kw = dict(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=attn_head,
            window=window,
            rope_base=10000.0,
            implementation=None,
        )
        blocks = []
        for kind in self.kinds:
            if kind == "A":
                blocks.append(
                    TransformerBlock(
                        d_model, mlp_ratio * d_model, attn_kw, quant=quant, remat=remat, rngs=rngs
                    )
                )
            else:
                mixer = make_mixer(
                    variant,
                    d_model,
                    d_state=d_state,
                    expand=expand,
                    d_conv=d_conv,
                    head_dim=head_dim,
                    chunk_size=chunk_size,
                    remat=remat,
                    quant=quant,
                    implementation=None,
                    rngs=rngs,
                )
                blocks.append(MambaBlock(d_model, mixer, remat, rngs=rngs))
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List(blocks)
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.head = QDense(d_model, vocab_size, quant=quant, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
        """KV caches of ``max_len`` for attention layers, conv/SSM states for Mamba layers."""
        layers = []
        for kind, blk in zip(self.kinds, self.blocks):
            if kind == "A":
                shape = (batch_size, max_len, self.num_kv_heads, self.attn_head)
                layers.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
            else:
                layers.append(blk.mixer.init_state(batch_size, dtype))
        return {"pos": jnp.zeros((), jnp.int32), "layers": layers}

    def decode_step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Next-token logits (B, vocab_size) for ``tokens`` (B,) at ``cache["pos"]``."""
        pos = cache["pos"]
        x = self.embed(tokens[:, None])
        new = []
        for kind, blk, c in zip(self.kinds, self.blocks, cache["layers"]):
            if kind == "A":
                x, c = blk.decode(x, c, pos)
            else:
                y, c = blk.step(x[:, 0], c)
                x = y[:, None]
            new.append(c)
        logits = self.head(self.norm(x))[:, 0].astype(jnp.float32)
        return logits, {"pos": pos + 1, "layers": new}
