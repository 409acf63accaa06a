"""Models by name (:data:`MODELS`, :func:`build_model`) and :func:`pure` (a model as a function)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flax import nnx

from .quant import QuantConfig


def _models() -> dict[str, tuple[type[nnx.Module], dict[str, Any]]]:
    from . import hybrid, mamba, recurrent, transformer

    return {
        "transformer": (transformer.Transformer, {}),
        "mamba": (mamba.Mamba, {}),
        "mamba2": (mamba.Mamba, {"variant": "mamba2"}),
        "hybrid": (hybrid.Hybrid, {}),
        "lstm": (recurrent.LSTMLM, {}),
        "gru": (recurrent.GRULM, {}),
    }


MODEL_NAMES = ("transformer", "mamba", "mamba2", "hybrid", "lstm", "gru")


def build_model(
    name: str,
    vocab_size: int,
    *,
    seed: int = 0,
    weight_format: Any = None,
    act_format: Any = None,
    learn_bits: bool = False,
    init_bits: float = 8.0,
    **kwargs: Any,
) -> nnx.Module:
    """A model by name (see :data:`MODEL_NAMES`), initialised from ``seed``.

    Keywords the model does not take (e.g. ``num_heads`` for an LSTM) are ignored, so one set of
    CLI flags serves every model; formats become a :class:`QuantConfig`.
    """
    table = _models()
    if name not in table:
        raise ValueError(f"model: expected one of {MODEL_NAMES}, got {name!r}")
    quant = None
    if weight_format is not None or act_format is not None or learn_bits:
        quant = QuantConfig(
            weight_format=weight_format,
            act_format=act_format,
            learn_bits=learn_bits,
            init_bits=init_bits,
        )
    cls, fixed = table[name]
    from .recurrent import RNNLM

    sig_of = RNNLM if issubclass(cls, RNNLM) else cls  # LSTMLM/GRULM forward **kwargs
    accepted = set(inspect.signature(sig_of.__init__).parameters) - {"cell"}
    kw = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
    return cls(vocab_size, quant=quant, rngs=nnx.Rngs(seed), **kw, **fixed)


def pure(model: nnx.Module, method: str = "__call__") -> tuple[Callable[..., Any], nnx.State]:
    """``(fn, state)`` with ``fn(state, *args) == getattr(model, method)(*args)``, a pure
    function (for ``jax.jit``, ``jax.grad`` over the state, or workload tracing)."""
    graphdef, state = nnx.split(model)

    def fn(state: nnx.State, *args: Any) -> Any:
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return fn, state
