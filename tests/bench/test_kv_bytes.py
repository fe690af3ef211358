"""python -m sglang_tq.tools.kv_bytes: the KV bytes each family's pool stores per token and per
sequence (issue 16), from the dummy configs, against hand-counted values."""

import subprocess
import sys

import pytest

from sglang_tq.tools import kv_bytes
from tests.conftest import MODEL_CONFIGS as CONFIGS


def _formats(model, context=32768, kv=("bf16", "fp8", "k4v4", "k3v3"), tp=1):
    doc = kv_bytes.report(str(CONFIGS / model), list(kv), context, tp)
    return doc, doc["formats"]


def test_full_attention_counts_every_layer_and_head():
    doc, f = _formats("llama-3.1-8b")
    assert doc["family"] == "full attention" and doc["kv_layers"] == 32
    assert [f[k]["bytes_per_token"] for k in ("bf16", "fp8", "k4v4", "k3v3")] == [
        32 * 8 * 512,
        32 * 8 * 256,
        32 * 8 * 132,
        32 * 8 * 100,
    ]
    assert f["k4v4"]["tokens_vs_bf16"] == 3.88
    _, tp4 = _formats("llama-3.1-8b", tp=4)  # a rank holds 2 of the 8 KV heads
    assert tp4["k4v4"]["bytes_per_token"] == 32 * 2 * 132


def test_hybrid_swa_window_layers_hold_only_the_window():
    doc, f = _formats("gpt-oss-20b", context=4096)
    assert (doc["family"], doc["window_layers"], doc["window"]) == ("hybrid-swa", 12, 128)
    full = 12 * 8 * (64 + 64) * 2
    assert f["bf16"]["bytes_per_sequence"] == full * 4096 + full * 128
    assert f["k4v4"]["full_layers_bytes_per_token"] == 12 * 8 * (32 + 32 + 4)


def test_hybrid_linear_counts_only_full_attention_layers():
    doc, f = _formats("qwen3-next-small")
    assert (doc["family"], doc["kv_layers"]) == ("hybrid-linear", 12)
    assert f["bf16"]["bytes_per_token"] == 12 * 2 * 256 * 2 * 2


def test_mla_latent_and_rope():
    doc, f = _formats("deepseek-v2-lite")
    assert doc["family"] == "mla"
    assert (f["bf16"]["bytes_per_token"], f["fp8"]["bytes_per_token"]) == (27 * 1152, 27 * 576)
    assert f["k4v4"]["bytes_per_token"] == 27 * (256 + 2 + 128) == 10_422
    assert f["k4v4"]["tokens_vs_bf16"] == 2.98


def test_cli_prints_a_table_and_refuses_a_bad_format(tmp_path):
    out = tmp_path / "kv.json"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglang_tq.tools.kv_bytes",
            "--model-path",
            str(CONFIGS / "gemma-3-270m"),
            "--kv",
            "bf16,k4v4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "sliding-window (plain pool)" in ok.stdout and "3.94x" in ok.stdout and out.exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglang_tq.tools.kv_bytes",
            "--model-path",
            str(CONFIGS / "gemma-3-270m"),
            "--kv",
            "k5v4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--kv 'k5v4'" in bad.stderr


@pytest.mark.parametrize("flag", ["--context", "--tp-size"])
def test_cli_refuses_non_positive_sizes(flag, capsys):
    with pytest.raises(SystemExit):
        kv_bytes.main(["--model-path", str(CONFIGS / "llama-3.1-8b"), flag, "0"])
    assert "must be positive" in capsys.readouterr().err
