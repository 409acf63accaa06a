"""Test configuration: 8 host CPU devices and strict numerics, set BEFORE JAX initialises."""

import os

# Must happen before jax creates its backends (importing jax is fine; creating a device is not).
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (``jax.enable_x64``)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def strict_promotion():
    """Run the test body under ``jax_numpy_dtype_promotion="strict"``."""
    with jax.numpy_dtype_promotion("strict"):
        yield
