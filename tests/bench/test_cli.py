"""The bench package's shared argument vocabulary (sglang_tq.bench.cli) and its dispatcher."""

import argparse
import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

from sglang_tq.bench import SUBCOMMANDS, cli
from sglang_tq.bench.__main__ import main as bench_main


def test_shapes_forms_and_repeats():
    assert cli.parse_shapes("1x4096, 64X16384,1x4096") == [
        cli.Shape(1, 4096),
        cli.Shape(64, 16384),
    ]
    assert cli.parse_shapes("2x100x256", head_dim=True) == [cli.Shape(2, 100, 256)]
    assert cli.parse_shapes("64x200+4000s,3x7+5", prefix=True) == [
        cli.Shape(64, 200, None, 4000, True),
        cli.Shape(3, 7, None, 5, False),
    ]
    assert str(cli.Shape(64, 200, None, 4000, True)) == "64x200+4000s"
    assert cli.Shape(3, 7).tokens == 21


@pytest.mark.parametrize(
    "text,kw",
    [
        ("2x100x256", {}),  # head dim not allowed here
        ("1x2048+6000", {}),  # prefix not allowed here
        ("0x4096", {}),
        ("4096", {}),
        ("1x4096x4", {"head_dim": True}),  # head dim below 8
        (" , ", {}),
    ],
)
def test_shapes_refused_with_the_accepted_forms(text, kw):
    with pytest.raises(ValueError, match="--shapes"):
        cli.parse_shapes(text, **kw)


def test_kv_bits_and_argparse_errors(capsys):
    assert cli.parse_kv_bits("k4v4,K3V3,k4v4") == [("k4v4", 4, 4), ("k3v3", 3, 3)]
    ap = argparse.ArgumentParser()
    cli.add_kv_bits(ap)
    cli.add_shapes(ap, "1x4096")
    args = ap.parse_args([])
    assert args.kv == [("k4v4", 4, 4), ("k3v3", 3, 3)] and args.shapes == [cli.Shape(1, 4096)]
    with pytest.raises(SystemExit):
        ap.parse_args(["--kv", "k5v4"])
    assert "k4v4" in capsys.readouterr().err


def test_default_out_names_gpu_and_commit():
    out = cli.default_out("soak", {"gpu": "NVIDIA H200", "commit": "abcdef0123-dirty"})
    assert out == cli.RESULTS / "soak" / "soak_h200_abcdef0-dirty.json"
    assert cli.gpu_tag(None) == "unknown" and cli.gpu_tag("Tesla T4") == "t4"


def test_dispatcher_usage_and_unknown(capsys):
    assert bench_main([]) == 2
    assert "decode-mla" in capsys.readouterr().out
    assert bench_main(["nope"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_the_module_interface_and_help(name, capsys):
    module = importlib.import_module(SUBCOMMANDS[name][0])
    assert callable(module.parse_args) and callable(module.run)
    with pytest.raises(SystemExit) as exc:
        bench_main([name, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_no_subcommand_imports_another():
    """Shared code lives in modules that are not subcommands (server, results, cli, ...)."""
    modules = {mod for mod, _ in SUBCOMMANDS.values()}
    for mod in modules:
        path = Path(importlib.util.find_spec(mod).origin)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name(
                    "." * node.level + (node.module or ""), mod.rsplit(".", 1)[0]
                )
                names = {base} | {f"{base}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            assert not (names & (modules - {mod})), f"{mod} imports {names & modules}"


def test_one_results_schema_with_non_finite_values(tmp_path):
    """results.write_doc: provenance, tool and argv on top; NaN and inf written as null (a
    broken row must not stop the write, and strict JSON has no NaN)."""
    import json

    from sglang_tq.bench.results import write_doc

    prov = {"gpu": "NVIDIA H200", "commit": "abc", "versions": {"torch": "x"}, "date": "d"}
    path = write_doc(
        tmp_path / "r" / "x.json", "sglang_tq.bench t", ["--a", "1"], prov, rows=[1.5, float("nan")]
    )
    doc = json.loads(path.read_text())
    assert {k: doc[k] for k in prov} == prov
    assert (doc["tool"], doc["argv"], doc["rows"]) == (
        "sglang_tq.bench t",
        ["--a", "1"],
        [1.5, None],
    )


def test_doc_parser_records_the_arguments_it_parsed():
    ap = cli.doc_parser("python -m sglang_tq.bench x", "First line.\n\nMore.")
    ap.add_argument("--n", type=int, default=1)
    assert ap.parse_args(["--n", "3"]).argv == ["--n", "3"] and ap.parse_args([]).argv == []
