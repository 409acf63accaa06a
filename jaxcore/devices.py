"""Device and mesh helpers."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh


def describe() -> dict:
    """JAX version, default backend and the visible devices, as a plain dict."""
    devs = jax.devices()
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "devices": [f"{d.platform}:{d.id} ({getattr(d, 'device_kind', '?')})" for d in devs],
    }


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] = ("data",)) -> Mesh:
    """A mesh over all devices; ``shape=None`` puts every device on the first axis."""
    devs = jax.devices()
    names = tuple(axis_names)
    if shape is None:
        shape = (len(devs),) + (1,) * (len(names) - 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(names):
        raise ValueError(f"shape: expected {len(names)} sizes for axes {names}, got {shape}")
    if int(np.prod(shape)) != len(devs):
        raise ValueError(f"shape: expected a product of {len(devs)} devices, got {shape}")
    return Mesh(np.asarray(devs).reshape(shape), names)
