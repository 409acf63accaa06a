"""The package layout, backend selection, argument checks and the CLI."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jaxcore
from jaxcore import backend, checks, cli, devices

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for pkg, src in mapping.items():
        for init in (ROOT / src).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / src)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == listed, f"unlisted: {found - listed}, stale: {listed - found}"


def test_subpackages_import_under_one_namespace():
    import jaxcore.hardware
    import jaxcore.kernels
    import jaxcore.models

    for mod in (jaxcore.kernels, jaxcore.models, jaxcore.hardware):
        assert mod.__name__.startswith("jaxcore.")


def test_eight_host_devices_from_conftest():
    assert jax.device_count() == 8
    assert devices.describe()["device_count"] == 8


def test_make_mesh():
    mesh = devices.make_mesh((4, 2), ("data", "model"))
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="shape: expected a product of 8"):
        devices.make_mesh((3, 2), ("data", "model"))


def test_resolve_implementation():
    backend.register_family(
        "_test", ("reference", "xla", "pallas", "pallas_interpret"), {"gpu": "pallas", "*": "xla"}
    )
    assert backend.resolve_implementation("_test", None, platform_name="cpu") == "xla"
    assert backend.resolve_implementation("_test", None, platform_name="gpu") == "pallas"
    assert backend.resolve_implementation("_test", "reference") == "reference"
    with pytest.raises(ValueError, match="implementation='bogus' is not an implementation"):
        backend.resolve_implementation("_test", "bogus")
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        backend.resolve_implementation("_test", "pallas", platform_name="cpu")
    fam = backend.families()["_test"]
    assert "pallas" not in fam.available("cpu") and "pallas" in fam.available("gpu")
    with pytest.raises(KeyError):
        backend.resolve_implementation("_nope", None)


def test_checks_name_the_argument():
    x = jnp.zeros((2, 3))
    checks.check_rank(x, 2, "x")
    checks.check_shape(x, (2, None), "x")
    with pytest.raises(ValueError, match=re.escape("query: expected rank 4, got shape (2, 3)")):
        checks.check_rank(x, 4, "query")
    with pytest.raises(ValueError, match=re.escape("key: expected shape (2, 4), got (2, 3)")):
        checks.check_shape(x, (2, 4), "key")
    with pytest.raises(TypeError, match="x: expected dtype floating, got int32"):
        checks.check_dtype(jnp.zeros(2, jnp.int32), "x")
    checks.check_dtype(jnp.zeros(2, jnp.bfloat16), "x")
    with pytest.raises(ValueError, match="block: expected a positive number, got 0"):
        checks.check_positive(0, "block")
    with pytest.raises(ValueError, match="mode: expected one of"):
        checks.check_choice("x", ("a", "b"), "mode")


def test_cli_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device_count"] == 8 and info["jax"] == jax.__version__


def test_cli_help_and_module_entry():
    out = subprocess.run(
        [sys.executable, "-m", "jaxcore", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("info", "codesign", "train", "bench", "cost"):
        assert cmd in out
    assert (
        jaxcore.__version__
        in subprocess.run(
            [sys.executable, "-m", "jaxcore", "--version"], capture_output=True, text=True
        ).stdout
    )


def test_cli_bench_lists_and_rejects_unknown(capsys):
    assert cli.main(["bench"]) == 0
    assert "matmul" in capsys.readouterr().out
    assert cli.main(["bench", "no_such_bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_tolerances_by_dtype():
    from jaxcore.testing import assert_close, tol

    assert tol(jnp.bfloat16) == 1e-2 and tol(jnp.float32) == 1e-5 and tol("float8_e4m3fn") == 0.1
    assert tol("float64") == 1e-12 and tol("float6_e2m3fn") == 0.1 and tol("float4_e2m1fn") == 0.1
    assert_close(jnp.ones(3, jnp.bfloat16) * 1.004, jnp.ones(3))
    with pytest.raises(AssertionError):
        assert_close(jnp.ones(3) * 1.001, jnp.ones(3))
