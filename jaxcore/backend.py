"""Implementation selection shared by every kernel family.

Each kernel family registers its implementations once, at import time, with
:func:`register_family`. Public kernels take ``implementation=None | "reference" | "xla" |
"pallas" | "pallas_interpret" | ...`` and call :func:`resolve_implementation`, which validates
the name (at trace time, with a message naming the argument) and picks the family's default
for the current platform when ``None`` is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax

IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas", "pallas_interpret")

# Platforms on which a compiled Pallas kernel can run. Interpret mode runs everywhere.
PALLAS_PLATFORMS: frozenset[str] = frozenset({"gpu", "cuda", "rocm", "tpu"})
# Compiled Mosaic GPU kernels (NVIDIA Hopper and later) run only here.
MOSAIC_GPU_PLATFORMS: frozenset[str] = frozenset({"gpu", "cuda"})
# Implementation names that run only on some platforms (the rest run everywhere).
REQUIRES: dict[str, frozenset[str]] = {"pallas": PALLAS_PLATFORMS, "mosaic": MOSAIC_GPU_PLATFORMS}


@dataclasses.dataclass(frozen=True)
class Family:
    """A kernel family: its implementation names and the rule that picks the default."""

    name: str
    implementations: tuple[str, ...]
    default: Callable[[str], str]
    doc: str = ""

    def available(self, platform: str) -> tuple[str, ...]:
        """Implementations that run on ``platform`` ("cpu", "gpu", "tpu")."""
        return tuple(i for i in self.implementations if platform in REQUIRES.get(i, (platform,)))


_FAMILIES: dict[str, Family] = {}


def platform() -> str:
    """The default JAX backend's platform name ("cpu", "gpu" or "tpu")."""
    p = jax.default_backend()
    return "gpu" if p in ("cuda", "rocm") else p


def register_family(
    name: str,
    implementations: Sequence[str],
    default: Callable[[str], str] | Mapping[str, str] | str,
    doc: str = "",
) -> Family:
    """Register (or re-register) a kernel family; returns it.

    ``default`` is a function of the platform name, a mapping platform -> name (key "*" is the
    fallback), or a single name.
    """
    if isinstance(default, str):
        name_ = default
        rule: Callable[[str], str] = lambda _p: name_
    elif isinstance(default, Mapping):
        table = dict(default)
        rule = lambda p: table.get(p, table["*"])
    else:
        rule = default
    fam = Family(name, tuple(implementations), rule, doc)
    _FAMILIES[name] = fam
    return fam


def families() -> dict[str, Family]:
    """All registered families (import :mod:`jaxcore.kernels` first to register them)."""
    return dict(_FAMILIES)


def resolve_implementation(
    family: str,
    implementation: str | None,
    *,
    argname: str = "implementation",
    platform_name: str | None = None,
) -> str:
    """Validate ``implementation`` for ``family`` and resolve ``None`` to the platform default."""
    fam = _FAMILIES.get(family)
    if fam is None:
        raise KeyError(f"unknown kernel family {family!r}; registered: {sorted(_FAMILIES)}")
    plat = platform_name or platform()
    if implementation is None:
        return fam.default(plat)
    if implementation not in fam.implementations:
        raise ValueError(
            f"{argname}={implementation!r} is not an implementation of {family}; "
            f"expected None or one of {fam.implementations}"
        )
    if plat not in REQUIRES.get(implementation, (plat,)):
        needs = "a GPU or TPU" if implementation == "pallas" else "an NVIDIA GPU (GPU only)"
        raise ValueError(
            f"{argname}={implementation!r} needs {needs} but the default backend is {plat!r}; "
            f"use '{implementation}_interpret' to run the same kernel on CPU"
        )
    return implementation
