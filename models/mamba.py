"""Mamba language models (``jaxcore.models.Mamba``): selective state-space blocks.

``variant="mamba"`` (Mamba-1): ``in_proj -> causal depthwise conv -> SiLU -> x_proj (dt, B, C)
-> selective_scan(..., z gate) -> out_proj``, with a per-channel diagonal ``A = -exp(A_log)``
(``jaxcore.kernels.scan.selective_scan``).

``variant="mamba2"`` (Mamba-2 / SSD): one projection gives ``z, x, B, C, dt``; after the conv,
``x`` is split into heads sharing a scalar decay per head and the sequence is mixed by the
chunked state-space-duality kernel ``jaxcore.kernels.scan.ssd``; a gated RMS norm precedes
``out_proj``.

Both decode one token at a time with a conv state and an SSM state
(``jaxcore.kernels.scan.selective_scan_step``; an SSD head is a selective scan whose channels
share ``dt`` and ``A`` within the head).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxcore.kernels import scan as scan_k

from .quant import QDense, QuantConfig
from .remat import block_call, check_remat, core
from .stack import StateLM

VARIANTS = ("mamba", "mamba2")


class CausalConv(nnx.Module):
    """Depthwise causal 1-D convolution over time: (B, T, C) -> (B, T, C)."""

    def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(width)
        self.weight = nnx.Param(
            jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound)
        )
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        T = x.shape[1]
        xp = jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0)))
        w = self.weight[...].astype(x.dtype)
        y = sum(xp[:, i : i + T] * w[i][None, None, :] for i in range(self.width))
        return y + self.bias[...].astype(x.dtype)[None, None, :]

    def step(self, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One step: ``x`` (B, C), ``state`` (B, width-1, C) = the previous inputs."""
        window = jnp.concatenate([state, x[:, None, :]], axis=1)  # (B, width, C)
        w = self.weight[...].astype(x.dtype)
        y = jnp.sum(window * w[None], axis=1) + self.bias[...].astype(x.dtype)[None, :]
        return y, window[:, 1:]


def _inv_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


def _dt_bias_init(key: jax.Array, n: int, dt_min: float = 1e-3, dt_max: float = 1e-1):
    u = jax.random.uniform(key, (n,), jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return _inv_softplus(jnp.maximum(dt, 1e-4))


class MambaMixer(nnx.Module):
    """The Mamba-1 selective SSM mixer: (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int,
        expand: int,
        d_conv: int,
        remat: str,
        quant: QuantConfig | None,
        implementation: str | None,
        rngs: nnx.Rngs,
    ):
        di = expand * d_model
        self.d_inner, self.d_state, self.d_conv = di, d_state, d_conv
        self.dt_rank = max(1, math.ceil(d_model / 16))
        self.remat, self.implementation = remat, implementation
        self.in_proj = QDense(d_model, 2 * di, quant=quant, rngs=rngs)
        self.conv = CausalConv(di, d_conv, rngs=rngs)
        self.x_proj = QDense(di, self.dt_rank + 2 * d_state, quant=quant, rngs=rngs)
        self.dt_proj = QDense(self.dt_rank, di, quant=quant, rngs=rngs)
        self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), di))
        self.A_log = nnx.Param(
            jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (di, d_state)))
        )
        self.D = nnx.Param(jnp.ones((di,), jnp.float32))
        self.out_proj = QDense(di, d_model, quant=quant, rngs=rngs)

    def _ssm_inputs(self, x: jax.Array):
        proj = self.x_proj(x)
        dt_low, B, C = jnp.split(proj, [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        return self.dt_proj(dt_low), B, C

    def __call__(self, h: jax.Array) -> jax.Array:
        x, z = jnp.split(self.in_proj(h), 2, axis=-1)
        x = jax.nn.silu(self.conv(x))
        delta, B, C = self._ssm_inputs(x)
        A = -jnp.exp(self.A_log[...])

        def mix(x, delta, B, C, z, A, D, dt_bias):
            return scan_k.selective_scan(
                x,
                delta,
                A,
                B,
                C,
                D,
                z=z,
                delta_bias=dt_bias,
                delta_softplus=True,
                implementation=self.implementation,
            )

        y = core(self.remat, mix)(x, delta, B, C, z, A, self.D[...], self.dt_bias[...])
        return self.out_proj(y)

    def init_state(self, batch: int, dtype: Any) -> dict:
        return {
            "conv": jnp.zeros((batch, self.d_conv - 1, self.d_inner), dtype),
            "ssm": jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32),
        }

    def step(self, h: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """``h`` (B, D) one token -> (B, D)."""
        x, z = jnp.split(self.in_proj(h), 2, axis=-1)
        x, conv = self.conv.step(x, state["conv"])
        x = jax.nn.silu(x)
        delta, B, C = self._ssm_inputs(x)
        A = -jnp.exp(self.A_log[...])
        y, ssm = scan_k.selective_scan_step(
            state["ssm"],
            x,
            delta,
            A,
            B,
            C,
            self.D[...],
            z_t=z,
            delta_bias=self.dt_bias[...],
            delta_softplus=True,
        )
        return self.out_proj(y), {"conv": conv, "ssm": ssm}


class Mamba2Mixer(nnx.Module):
    """The Mamba-2 (SSD) mixer: scalar decay per head, shared B/C, gated RMS norm."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int,
        expand: int,
        d_conv: int,
        head_dim: int,
        chunk_size: int,
        remat: str,
        quant: QuantConfig | None,
        rngs: nnx.Rngs,
    ):
        di = expand * d_model
        if di % head_dim:
            raise ValueError(
                f"head_dim: expected a divisor of expand * d_model = {di}, got {head_dim}"
            )
        self.d_inner, self.d_state, self.d_conv = di, d_state, d_conv
        self.head_dim, self.num_heads = head_dim, di // head_dim
        self.chunk_size, self.remat = chunk_size, remat
        H = self.num_heads
        self.in_proj = QDense(d_model, 2 * di + 2 * d_state + H, quant=quant, rngs=rngs)
        self.conv = CausalConv(di + 2 * d_state, d_conv, rngs=rngs)
        self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), H))
        self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, H, dtype=jnp.float32)))
        self.D = nnx.Param(jnp.ones((H,), jnp.float32))
        self.norm = nnx.RMSNorm(di, rngs=rngs)
        self.out_proj = QDense(di, d_model, quant=quant, rngs=rngs)

    def _split(self, proj: jax.Array):
        di, N = self.d_inner, self.d_state
        z, xbc, dt = jnp.split(proj, [di, 2 * di + 2 * N], axis=-1)
        return z, xbc, dt

    def _finish(self, y: jax.Array, z: jax.Array) -> jax.Array:
        return self.out_proj(self.norm(y * jax.nn.silu(z)))

    def __call__(self, h: jax.Array) -> jax.Array:
        Bsz, T, _ = h.shape
        z, xbc, dt = self._split(self.in_proj(h))
        xbc = jax.nn.silu(self.conv(xbc))
        x, B, C = jnp.split(xbc, [self.d_inner, self.d_inner + self.d_state], axis=-1)
        x = x.reshape(Bsz, T, self.num_heads, self.head_dim)
        dt = jax.nn.softplus(dt + self.dt_bias[...][None, None, :])
        A = -jnp.exp(self.A_log[...])

        def mix(x, dt, A, B, C, D):
            return scan_k.ssd(x, dt, A, B, C, chunk_size=self.chunk_size, D=D)

        y = core(self.remat, mix)(x, dt, A, B, C, self.D[...])
        return self._finish(y.reshape(Bsz, T, self.d_inner), z)

    def init_state(self, batch: int, dtype: Any) -> dict:
        return {
            "conv": jnp.zeros((batch, self.d_conv - 1, self.d_inner + 2 * self.d_state), dtype),
            "ssm": jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32),
        }

    def step(self, h: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        z, xbc, dt = self._split(self.in_proj(h))
        xbc, conv = self.conv.step(xbc, state["conv"])
        xbc = jax.nn.silu(xbc)
        x, B, C = jnp.split(xbc, [self.d_inner, self.d_inner + self.d_state], axis=-1)
        P = self.head_dim
        dt = jnp.repeat(jax.nn.softplus(dt + self.dt_bias[...][None, :]), P, axis=-1)  # (B, di)
        A = jnp.broadcast_to(
            jnp.repeat(-jnp.exp(self.A_log[...]), P)[:, None], (self.d_inner, self.d_state)
        )
        D = jnp.repeat(self.D[...], P)
        y, ssm = scan_k.selective_scan_step(state["ssm"], x, dt, A, B, C, D)
        return self._finish(y, z), {"conv": conv, "ssm": ssm}


class MambaBlock(nnx.Module):
    """``x + mixer(norm(x))``."""

    def __init__(self, d_model: int, mixer: nnx.Module, remat: str, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.mixer = mixer
        self.remat = remat

    def _forward(self, x: jax.Array) -> jax.Array:
        return x + self.mixer(self.norm(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return block_call(self.remat, type(self)._forward, self, x)

    def init_state(self, batch_size: int, dtype: Any = jnp.float32) -> Any:
        """This block's decoding state."""
        return self.mixer.init_state(batch_size, dtype)

    def step(self, x: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        y, state = self.mixer.step(self.norm(x), state)
        return x + y, state


def make_mixer(
    variant: str,
    d_model: int,
    *,
    d_state: int,
    expand: int,
    d_conv: int,
    head_dim: int,
    chunk_size: int,
    remat: str,
    quant: QuantConfig | None,
    implementation: str | None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A Mamba-1 or Mamba-2 mixer (shared with :class:`~jaxcore.models.Hybrid`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if d_conv < 1 or d_state < 1 or expand < 1:
        raise ValueError(
            "d_state, expand, d_conv: expected positive integers, got "
            f"{d_state}, {expand}, {d_conv}"
        )
    common = dict(
        d_state=d_state, expand=expand, d_conv=d_conv, remat=remat, quant=quant, rngs=rngs
    )
    if variant == "mamba":
        return MambaMixer(d_model, implementation=implementation, **common)
    return Mamba2Mixer(d_model, head_dim=head_dim, chunk_size=chunk_size, **common)


class Mamba(StateLM):
    """A Mamba language model: int tokens (B, T) -> float32 logits (B, T, vocab_size).

    Args:
      variant: "mamba" (selective scan) or "mamba2" (SSD).
      d_model, num_layers, d_state, expand (inner width = expand * d_model), d_conv: sizes.
      head_dim, chunk_size: Mamba-2 head size and SSD chunk length.
      remat: "none" | "full" | "selective" (the scan core only).
      quant: a :class:`QuantConfig` for every projection.
      scan_implementation: passed to ``selective_scan``.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        variant: str = "mamba",
        d_model: int = 64,
        num_layers: int = 2,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        head_dim: int = 16,
        chunk_size: int = 64,
        remat: str = "none",
        quant: QuantConfig | None = None,
        scan_implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        check_remat(remat)
        if vocab_size < 1 or d_model < 1 or num_layers < 1:
            raise ValueError(
                "vocab_size, d_model, num_layers: expected positive integers, got "
                f"{vocab_size}, {d_model}, {num_layers}"
            )
        self.variant, self.num_layers = variant, num_layers
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List(
            [
                MambaBlock(
                    d_model,
                    make_mixer(
                        variant,
                        d_model,
                        d_state=d_state,
                        expand=expand,
                        d_conv=d_conv,
                        head_dim=head_dim,
                        chunk_size=chunk_size,
                        remat=remat,
                        quant=quant,
                        implementation=scan_implementation,
                        rngs=rngs,
                    ),
                    remat,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.head = QDense(d_model, vocab_size, quant=quant, rngs=rngs)
