"""The shared shape of the constant-state language models (Mamba, LSTM/GRU).

``embed -> blocks -> RMSNorm -> head``, with a decode step that threads one state per block.
Subclasses build ``embed``, ``blocks``, ``norm`` and ``head``; each block has ``__call__(x)``,
``step(x, state) -> (x, state)`` and ``init_state(batch_size, dtype)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class StateLM(nnx.Module):
    """Mixin: forward pass and constant-size decoding over ``self.blocks``."""

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (B, T, vocab_size) in float32 for ``tokens`` (B, T)."""
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).astype(jnp.float32)

    def init_cache(
        self, batch_size: int, max_len: int | None = None, dtype: Any = jnp.float32
    ) -> dict:
        """Decoding state (constant size: ``max_len`` is accepted for a uniform API)."""
        layers = [blk.init_state(batch_size, dtype) for blk in self.blocks]
        return {"pos": jnp.zeros((), jnp.int32), "layers": layers}

    def decode_step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Next-token logits (B, vocab_size) for ``tokens`` (B,)."""
        x = self.embed(tokens)
        new = []
        for blk, st in zip(self.blocks, cache["layers"]):
            x, st = blk.step(x, st)
            new.append(st)
        return self.head(self.norm(x)).astype(jnp.float32), {"pos": cache["pos"] + 1, "layers": new}
