"""The SGLang patch series (sglang_tq/patches/, the package sglang_tq.patches) on a copy of the
installed SGLang files: it applies cleanly, is idempotent, reverts byte for byte,
refuses a file it does not recognise, and patch 0001 makes `sglang serve --help`
list the plugin's flags."""

import os
import shutil
import subprocess
import sys

import pytest

from sglang_tq import patches


@pytest.fixture
def root(tmp_path):
    """A folder holding copies of every file the series touches."""
    real = patches.default_root()
    for p in patches.series():
        os.makedirs(tmp_path / os.path.dirname(p.path), exist_ok=True)
        shutil.copyfile(os.path.join(real, p.path), tmp_path / p.path)
    return str(tmp_path)


def _read(root, rel):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


def test_series_lists_numbered_patches_that_exist():
    ps = patches.series()
    assert [p.name[:4] for p in ps] == [f"{i:04d}" for i in range(1, len(ps) + 1)]
    assert all(p.hunks for p in ps)


def test_installed_sglang_is_unpatched_original_and_matches_the_pin():
    # CI installs the pinned SGLang fresh: every patch must find its exact context.
    assert patches._installed_version() == patches.PINNED_SGLANG
    assert {st for _, st in patches.run("status", patches.default_root())} <= {
        "original",
        "applied",
    }


def test_apply_is_idempotent_and_revert_restores_the_bytes(root):
    before = {p.path: _read(root, p.path) for p in patches.series()}
    assert {st for _, st in patches.run("status", root)} == {"original"}
    assert {st for _, st in patches.run("apply", root)} == {"applied"}
    once = {p: _read(root, p) for p in before}
    assert once != before
    assert {st for _, st in patches.run("apply", root)} == {"applied"}
    assert {p: _read(root, p) for p in before} == once
    assert {st for _, st in patches.run("revert", root)} == {"original"}
    assert {p: _read(root, p) for p in before} == before


def test_unrecognised_file_is_refused_and_left_alone(root):
    target = patches.series()[0].path
    with open(os.path.join(root, target), "w", encoding="utf-8") as f:
        f.write("def serve(args, extra_argv):\n    pass\n")
    with pytest.raises(RuntimeError, match="matches neither"):
        patches.run("apply", root)
    assert _read(root, target) == "def serve(args, extra_argv):\n    pass\n"


def test_malformed_patch_is_refused():
    with pytest.raises(ValueError, match="unified diff"):
        patches.parse("not a diff\n", "bad.patch")


_HELP = """
import contextlib, importlib.util, io, sys
spec = importlib.util.spec_from_file_location("_serve_under_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
    mod.serve(None, ["--help"])
print(buf.getvalue())
"""


def _serve_help(path):
    # A fresh interpreter: in this one another test may already have loaded the plugin.
    return subprocess.run(
        [sys.executable, "-c", _HELP, path], capture_output=True, text=True, timeout=300, check=True
    ).stdout


def test_patched_serve_help_lists_kv_quant_flags(root):
    """`sglang serve --help` from the original file lacks the flags; patched, it lists them."""
    path = os.path.join(root, "sglang", "cli", "serve.py")
    assert "--kv-quant-bits" not in _serve_help(path)
    patches.run("apply", root)
    text = _serve_help(path)
    for flag in ("--kv-quant ", "--kv-quant-bits", "--kv-quant-seed", "--kv-quant-bf16-layers"):
        assert flag in text, flag
