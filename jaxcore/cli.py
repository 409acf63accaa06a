"""The ``jaxcore`` command line.

Subcommands: ``info`` (versions, devices, kernel implementations), ``codesign`` (the main job),
``train``, ``cost`` and ``bench``. Every failure that is the user's (a bad flag value, an unknown
name, an unwritable directory) prints one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def _cmd_info(args: argparse.Namespace) -> int:
    from jaxcore import backend, devices

    try:
        import jaxcore.kernels

        jaxcore.kernels.load_all()  # registers the kernel families
    except ImportError as e:  # a broken optional kernel must not hide the device report
        print(f"warning: jaxcore.kernels failed to import: {e}", file=sys.stderr)
    info = devices.describe()
    plat = backend.platform()
    info["kernels"] = {
        name: {"available": list(f.available(plat)), "default": f.default(plat)}
        for name, f in sorted(backend.families().items())
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"jaxcore {_version()}  jax {info['jax']}  backend {info['backend']}")
    print(
        f"processes {info['process_count']} (this is {info['process_index']}), "
        f"devices {info['device_count']} ({info['local_device_count']} local)"
    )
    for d in info["devices"]:
        print(f"  {d}")
    if info["kernels"]:
        print("kernel implementations on this platform (default first):")
        for name, k in info["kernels"].items():
            rest = [i for i in k["available"] if i != k["default"]]
            print(f"  {name:<22} {k['default']}  [{', '.join(rest)}]")
    return 0


def _version() -> str:
    import jaxcore

    return jaxcore.__version__


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return Path(os.environ.get("JAXCORE_BENCHMARKS", here))


def _cmd_bench(args: argparse.Namespace) -> int:
    bdir = _benchmarks_dir()
    if not bdir.is_dir():
        raise UsageError(f"no benchmarks directory at {bdir} (set JAXCORE_BENCHMARKS)")
    scripts = sorted(p.stem for p in bdir.glob("bench_*.py"))
    if args.name is None:
        print("benchmarks:", " ".join(s.removeprefix("bench_") for s in scripts))
        return 0
    stem = args.name if args.name.startswith("bench_") else f"bench_{args.name}"
    if stem not in scripts:
        raise UsageError(f"unknown benchmark {args.name!r}; expected one of {scripts}")
    return subprocess.call([sys.executable, str(bdir / f"{stem}.py"), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxcore",
        description="Compiled, differentiable JAX kernels and differentiable hardware cost models.",
    )
    p.add_argument("--version", action="version", version=f"jaxcore {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="JAX version, backend, devices and kernel implementations")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("bench", help="list or run a benchmark from benchmarks/")
    s.add_argument("name", nargs="?", help="benchmark name (omit to list them)")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    s.set_defaults(func=_cmd_bench)

    _register_codesign(sub)
    _register_train(sub)
    _register_cost(sub)
    return p


def _register_codesign(sub) -> None:
    from jaxcore.hardware.codesign import register_cli

    register_cli(sub)


def _register_train(sub) -> None:
    from jaxcore.train import register_cli

    register_cli(sub)


def _register_cost(sub) -> None:
    from jaxcore.hardware.cli import register_cli

    register_cli(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"jaxcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
