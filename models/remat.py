"""Rematerialisation policies shared by the models (``remat=`` of every model).

* ``"none"``: keep every activation for the backward pass.
* ``"full"``: checkpoint each block ("Training Deep Nets with Sublinear Memory Cost"): only the
  block inputs are stored, the block is recomputed in the backward pass.
* ``"selective"``: recompute only the sequence-mixing core (the attention softmax core, the
  selective scan, the recurrence) and keep the cheap-to-store, expensive-to-recompute
  projections ("Reducing Activation Recomputation in Large Transformer Models").

Remat never changes values or gradients, only what is stored (tests check this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

REMAT_POLICIES = ("none", "full", "selective")


def check_remat(remat: str) -> str:
    """Validate a remat policy name."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat: expected one of {REMAT_POLICIES}, got {remat!r}")
    return remat


def block_call(remat: str, method: Callable[..., Any], module: nnx.Module, *args: Any) -> Any:
    """``method(module, *args)``, checkpointed as a whole when ``remat == "full"``."""
    if remat == "full":
        return nnx.remat(method)(module, *args)
    return method(module, *args)


def core(remat: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a pure function of arrays), checkpointed when ``remat == "selective"``."""
    return jax.checkpoint(fn) if remat == "selective" else fn
