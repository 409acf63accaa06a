"""LSTM and GRU language models (``jaxcore.models.LSTMLM`` / ``GRULM``) on ``jaxcore.kernels.rnn``.

Pre-norm residual stack: ``x + rnn(norm(x))`` per layer, then a norm and the output head. The
recurrent layers hold the kernel's parameter dict (``w_ih`` (D, G, H), ``w_hh`` (heads, H/heads,
G, H/heads), biases) as ``nnx.Param``\\ s and fake-quantize the weights and the layer input like
:class:`~jaxcore.models.QDense` (with learnable bit-widths when asked).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxcore.kernels import rnn as rnn_k

from .quant import QDense, QuantConfig, _QBase
from .remat import block_call, check_remat
from .stack import StateLM

CELLS = ("lstm", "gru")


class RNNLayer(_QBase):
    """One LSTM or GRU layer over (B, T, D) -> (B, T, D) (hidden size = D)."""

    def __init__(
        self,
        cell: str,
        d_model: int,
        *,
        num_heads: int,
        remat: str,
        quant: QuantConfig | None,
        rngs: nnx.Rngs,
    ):
        init = rnn_k.lstm_init if cell == "lstm" else rnn_k.gru_init
        p = init(rngs.params(), d_model, d_model, num_heads=num_heads)
        self.cell, self.remat = cell, remat
        self.w_ih = nnx.Param(p["w_ih"])
        self.w_hh = nnx.Param(p["w_hh"])
        self.b_ih = nnx.Param(p["b_ih"])
        self.b_hh = nnx.Param(p["b_hh"])
        self._init_quant(quant, d_model // num_heads)  # w_hh contracts H / heads

    def _params(self) -> dict[str, jax.Array]:
        return {
            "w_ih": self._q_weight(self.w_ih[...], (0,)),
            "w_hh": self._q_weight(self.w_hh[...], (1,)),
            "b_ih": self.b_ih[...],
            "b_hh": self.b_hh[...],
        }

    def __call__(self, x: jax.Array) -> jax.Array:
        run = rnn_k.lstm if self.cell == "lstm" else rnn_k.gru
        hs, _ = run(self._params(), self._q_act(x), remat=self.remat == "selective")
        return hs

    def init_state(self, batch: int, dtype: Any) -> Any:
        h = jnp.zeros((batch, self.w_ih.shape[-1]), dtype)
        return (h, h) if self.cell == "lstm" else h

    def step(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """One token ``x`` (B, D) -> (h (B, D), new state)."""
        x = self._q_act(x)
        if self.cell == "lstm":
            h, c = rnn_k.lstm_cell(self._params(), state, x)
            return h, (h, c)
        h = rnn_k.gru_cell(self._params(), state, x)
        return h, h

    def export(self) -> dict[str, Any]:
        """Real codes of both weights (see :meth:`QDense.export`)."""
        return {
            "w_ih": self._export(self.w_ih[...], (0,)),
            "w_hh": self._export(self.w_hh[...], (1,)),
        }


class RNNBlock(nnx.Module):
    def __init__(self, layer: RNNLayer, d_model: int, remat: str, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.layer = layer
        self.remat = remat

    def _forward(self, x: jax.Array) -> jax.Array:
        return x + self.layer(self.norm(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return block_call(self.remat, type(self)._forward, self, x)

    def init_state(self, batch_size: int, dtype: Any = jnp.float32) -> Any:
        """This block's decoding state."""
        return self.layer.init_state(batch_size, dtype)

    def step(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        h, state = self.layer.step(self.norm(x), state)
        return x + h, state


class RNNLM(StateLM):
    """A recurrent language model: int tokens (B, T) -> float32 logits (B, T, vocab_size).

    Args:
      cell: "lstm" or "gru".
      d_model, num_layers: width (= hidden size) and depth.
      num_heads: head-wise block-diagonal recurrence (FlashRNN style); 1 = dense.
      remat: "none" | "full" (each block) | "selective" (the recurrence step only).
      quant: a :class:`QuantConfig` for the recurrent weights and the head.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        cell: str = "lstm",
        d_model: int = 64,
        num_layers: int = 1,
        num_heads: int = 1,
        remat: str = "none",
        quant: QuantConfig | None = None,
        rngs: nnx.Rngs,
    ):
        check_remat(remat)
        if cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
        if vocab_size < 1 or d_model < 1 or num_layers < 1:
            raise ValueError(
                "vocab_size, d_model, num_layers: expected positive integers, got "
                f"{vocab_size}, {d_model}, {num_layers}"
            )
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List(
            [
                RNNBlock(
                    RNNLayer(
                        cell, d_model, num_heads=num_heads, remat=remat, quant=quant, rngs=rngs
                    ),
                    d_model,
                    remat,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.head = QDense(d_model, vocab_size, quant=quant, rngs=rngs)


class LSTMLM(RNNLM):
    """:class:`RNNLM` with ``cell="lstm"``."""

    def __init__(self, vocab_size: int, **kwargs: Any):
        super().__init__(vocab_size, cell="lstm", **kwargs)


class GRULM(RNNLM):
    """:class:`RNNLM` with ``cell="gru"``."""

    def __init__(self, vocab_size: int, **kwargs: Any):
        super().__init__(vocab_size, cell="gru", **kwargs)
