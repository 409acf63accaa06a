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


def _manual_axis_param() -> str | None:
    """The ``jax.ShapeDtypeStruct`` keyword that says which manual (shard_map) mesh axes an
    array varies over: ``manual_axis_type`` (jax 0.10), ``vma`` (older), or None."""
    import inspect

    params = inspect.signature(jax.ShapeDtypeStruct.__init__).parameters
    for name in ("manual_axis_type", "vma"):
        if name in params:
            return name
    return None


_MANUAL_AXIS_PARAM = _manual_axis_param()


def kernel_out_struct(shape, dtype, *like: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel output type (``pallas_call`` ``out_shape``) that varies over every manual mesh
    axis any of ``like`` varies over, so the kernel runs inside ``jax.shard_map`` with
    ``check_vma=True``. Outside shard_map (nothing varies) it is a plain ShapeDtypeStruct, and
    so it is wherever this JAX spells the varying-axes type differently (then JAX itself asks
    for ``check_vma=False`` inside shard_map): never an error of its own."""
    plain = jax.ShapeDtypeStruct(shape, dtype)
    name = _MANUAL_AXIS_PARAM
    if name is None or not like:
        return plain
    try:
        varying = frozenset().union(*(vma(x) for x in like))
        if not varying:
            return plain
        if name == "manual_axis_type":
            mat = next(m for x in like if (m := getattr(jax.typeof(x), "mat", None)) is not None)
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(mat)(varying=varying))
        return jax.ShapeDtypeStruct(shape, dtype, vma=varying)
    except Exception:  # another JAX's internals: leave the type to JAX
        return plain


def pallas_call(kernel, *, out_shape, **kwargs):
    """``jax.experimental.pallas.pallas_call`` whose output types take the inputs' varying mesh
    axes (:func:`kernel_out_struct`), so a compiled kernel runs inside ``jax.shard_map`` with
    ``check_vma=True``. (JAX's Pallas *interpreter* still needs ``check_vma=False`` there.)"""
    from jax.experimental import pallas as pl

    def run(*args):
        shapes = jax.tree.map(lambda sd: kernel_out_struct(sd.shape, sd.dtype, *args), out_shape)
        return pl.pallas_call(kernel, out_shape=shapes, **kwargs)(*args)

    return run


def vma(x: jax.Array) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside)."""
    return aval_vma(jax.typeof(x))


def aval_vma(aval: object) -> frozenset:
    """:func:`vma` of an abstract value (what a primitive's abstract evaluation receives)."""
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def vary_over(x: jax.Array, axes: frozenset) -> jax.Array:
    """``x`` marked varying over the manual mesh axes ``axes`` it does not vary over yet
    (``lax.pcast(..., to="varying")``: no data moves; its transpose sums). Outside shard_map
    (``axes`` empty): ``x``."""
    from jax import lax

    missing = frozenset(axes) - vma(x)
    return lax.pcast(x, tuple(sorted(missing, key=str)), to="varying") if missing else x


def vary_together(*xs: jax.Array) -> list[jax.Array]:
    """Inside ``jax.shard_map``: each of ``xs`` marked varying over every manual mesh axis any
    of them varies over (:func:`vary_over`), so that a loop carrying one of them and combining
    it with the others keeps one type. Outside: unchanged."""
    union = frozenset().union(*(vma(x) for x in xs))
    return [vary_over(x, union) for x in xs]


def vary_as(g: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent typed like its primal under ``shard_map`` (what a ``custom_vjp`` backward
    must return with ``check_vma=True``): summed over the mesh axes it varies over and the
    primal does not (the transpose of the implicit broadcast of a replicated input), marked
    varying over those the primal varies over and it does not."""
    from jax import lax

    extra = vma(g) - vma(primal)
    if extra:
        g = lax.psum(g, tuple(sorted(extra, key=str)))
    return vary_over(g, vma(primal))
