"""Flax NNX models and generated tasks: ``jaxcore.models`` (source in ``models/``).

* :class:`Transformer` (GQA, RoPE, sliding window, KV-cache decoding), :class:`Mamba` (selective
  scan; ``variant="mamba2"`` for the SSD form), :class:`Hybrid` (interleaved attention and SSM
  blocks), :class:`LSTMLM` / :class:`GRULM`: all map int tokens (B, T) to float32 logits
  (B, T, V) and decode one token at a time with ``init_cache`` / ``decode_step``.
* :class:`QDense` / :class:`QEinsum`: fake-quantized layers (formats from
  :mod:`jaxcore.kernels.lowp`), real codes on export, learnable bit-widths (:class:`BitWidth`).
* remat policies :data:`REMAT_POLICIES` (``remat=`` of every model).
* :mod:`jaxcore.models.tasks`: generated tasks and the character-level corpus.
"""

from . import tasks as tasks
from .hybrid import Hybrid as Hybrid
from .mamba import Mamba as Mamba
from .quant import BitWidth as BitWidth
from .quant import QDense as QDense
from .quant import QEinsum as QEinsum
from .quant import QuantConfig as QuantConfig
from .quant import bit_widths as bit_widths
from .quant import export_quantized as export_quantized
from .quant import resolve_format as resolve_format
from .recurrent import GRULM as GRULM
from .recurrent import LSTMLM as LSTMLM
from .registry import MODEL_NAMES as MODEL_NAMES
from .registry import build_model as build_model
from .registry import pure as pure
from .remat import REMAT_POLICIES as REMAT_POLICIES
from .transformer import Transformer as Transformer

MODELS = MODEL_NAMES

__all__ = [
    "GRULM",
    "LSTMLM",
    "MODELS",
    "MODEL_NAMES",
    "REMAT_POLICIES",
    "BitWidth",
    "Hybrid",
    "Mamba",
    "QDense",
    "QEinsum",
    "QuantConfig",
    "Transformer",
    "bit_widths",
    "build_model",
    "export_quantized",
    "pure",
    "resolve_format",
    "tasks",
]
