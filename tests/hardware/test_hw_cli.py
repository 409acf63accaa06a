"""``jaxcore cost`` subcommand (hardware/cli.py register_cli)."""

import argparse
import json

import pytest
from jaxcore.hardware.cli import register_cli


def _parse(argv):
    p = argparse.ArgumentParser(prog="jaxcore")
    sub = p.add_subparsers(dest="command")
    register_cli(sub)
    return p.parse_args(argv)


def test_cost_table_printed(capsys):
    args = _parse(["cost", "--workload", "mlp", "--model", "systolic", "--dim", "64", "--top", "3"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Systolic: latency" in out and "dot_general" in out and "more ops" in out


def test_cost_json_decode_on_pim(capsys):
    args = _parse(
        [
            "cost",
            "--workload",
            "decode",
            "--model",
            "pim",
            "--dim",
            "64",
            "--batch",
            "16",
            "--bits",
            "8",
            "--json",
        ]
    )
    assert args.func(args) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["model"] == "pim" and rec["latency_s"] > 0 and rec["unknown"] == []


def test_cost_bad_input_is_a_usage_error():
    from jaxcore.cli import UsageError

    args = _parse(["cost", "--bits", "-3"])
    with pytest.raises(UsageError, match="--bits"):
        args.func(args)
