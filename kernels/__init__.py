"""Pure functional kernels: ``jaxcore.kernels`` (source in ``kernels/``).

Sub-modules are imported on first use (``jaxcore.kernels.attention``, ``.lowp``, ``.scan``,
``.rnn``, ``.fixed_point``, ``.decoding``, ``.parallel``); :func:`load_all` imports every one,
which also registers their implementation families with :mod:`jaxcore.backend`.
"""

import importlib

SUBMODULES = ("lowp", "scan", "rnn", "attention", "fixed_point", "decoding", "parallel")


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_all() -> None:
    """Import every kernel sub-module (registers their implementation families)."""
    for name in SUBMODULES:
        importlib.import_module(f"{__name__}.{name}")
