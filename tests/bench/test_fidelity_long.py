"""CPU tests of issue 14's long-generation pieces of ``python -m sglang_tq.bench fidelity`` and
``plot-fidelity``.

The trend statistic (least-squares slope of KL over position, bootstrap over prompts) on
synthetic data with a known slope, its edge cases and determinism; the --long preset; the
config labels against the shared table of sglang_tq.bench.configs; the end-of-turn
bookkeeping; and the PNG plot from a small synthetic fidelity JSON. No server, no model.
"""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

import sglang_tq.bench.fidelity as fid
import sglang_tq.bench.fidelity_metrics as fm
import sglang_tq.bench.generation as generation
import sglang_tq.bench.plot_fidelity as plot
import sglang_tq.bench.prompts as prompts
from sglang_tq.bench.configs import kv_server_flags
from tests.conftest import ROOT


def _synthetic(slope_per_1k, n_prompts=20, n_pos=1024, noise=0.004, seed=0, prompt_sd=0.003):
    rng = np.random.default_rng(seed)
    t = np.arange(n_pos)
    return [
        0.01 + rng.normal(0, prompt_sd) + slope_per_1k * t / 1000 + rng.normal(0, noise, n_pos)
        for _ in range(n_prompts)
    ]


# ----------------------------------------------------------------------------- trend
def test_trend_recovers_a_known_slope():
    tr = fm.trend(_synthetic(0.002))
    lo, hi = tr["ci95"]
    assert lo < 0.002 < hi
    assert lo > 0  # the interval excludes 0: an upward trend
    assert tr["slope_per_1k"] == pytest.approx(0.002, abs=3e-4)
    assert tr["intercept"] == pytest.approx(0.01, abs=2e-3)
    assert tr["prompts"] == 20 and tr["positions"] == 1024 and tr["quarter_len"] == 256
    assert tr["last_quarter"] > tr["first_quarter"]
    assert tr["ratio"] == pytest.approx(tr["last_quarter"] / tr["first_quarter"])
    assert "note" not in tr


def test_trend_flat_data_interval_contains_zero():
    tr = fm.trend(_synthetic(0.0, seed=1))
    lo, hi = tr["ci95"]
    assert lo < 0 < hi
    assert tr["ratio"] == pytest.approx(1.0, abs=0.1)


def test_trend_slope_is_the_pooled_least_squares_slope():
    rng = np.random.default_rng(2)
    data = [rng.normal(size=n) + 0.5 * np.arange(n) / 1000 for n in (50, 80, 64)]
    data[1][[3, 17]] = np.nan  # skipped, as in bin_positions
    x = np.concatenate([np.arange(a.size) / 1000 for a in data])
    y = np.concatenate(data)
    ok = ~np.isnan(y)
    want = np.polyfit(x[ok], y[ok], 1)
    tr = fm.trend(data, n_boot=200)
    assert tr["slope_per_1k"] == pytest.approx(want[0], rel=1e-9)
    assert tr["intercept"] == pytest.approx(want[1], rel=1e-9)
    assert tr["positions"] == 80


def test_trend_bootstrap_resamples_prompts_not_positions():
    """Prompts with their own slopes (tiny noise within a prompt): the pooled fit alone would
    be very sure of its slope; resampling prompts gives the honest, wide interval."""
    rng = np.random.default_rng(3)
    t = np.arange(512) / 1000
    data = [0.02 + s * t + rng.normal(0, 1e-5, t.size) for s in rng.normal(0, 0.01, 20)]
    tr = fm.trend(data)
    lo, hi = tr["ci95"]
    per_prompt_slopes = [np.polyfit(t, a, 1)[0] for a in data]
    se_prompts = np.std(per_prompt_slopes, ddof=1) / np.sqrt(len(data))
    assert lo < 0 < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se_prompts, rel=0.35)


def test_trend_bootstrap_is_deterministic():
    data = _synthetic(0.001, n_prompts=8, n_pos=256, seed=4)
    a, b = fm.trend(data), fm.trend(data)
    assert a == b
    assert fm.trend(data, seed=1)["ci95"] != a["ci95"]
    assert fm.trend(data, seed=1)["slope_per_1k"] == a["slope_per_1k"]


def test_trend_quarters_of_a_line():
    tr = fm.trend([np.arange(8.0)])
    assert tr["slope_per_1k"] == pytest.approx(1000.0)
    assert (tr["first_quarter"], tr["last_quarter"]) == (0.5, 6.5)
    assert tr["ratio"] == pytest.approx(13.0)
    assert tr["ci95"] is None and "one prompt" in tr["note"]


def test_trend_constant_data():
    tr = fm.trend([np.full(100, 0.25)] * 5)
    assert tr["slope_per_1k"] == 0.0 and tr["ci95"] == [0.0, 0.0]
    assert tr["ratio"] == 1.0 and tr["intercept"] == 0.25
    assert "constant" in tr["note"]
    zero = fm.trend([np.zeros(10), np.zeros(10)])
    assert zero["ratio"] is None and zero["slope_per_1k"] == 0.0


def test_trend_refuses_too_few_positions():
    with pytest.raises(ValueError, match="at least 2 positions"):
        fm.trend([[0.1], [0.3]])
    with pytest.raises(ValueError, match="at least 2 positions"):
        fm.trend([[0.1, np.nan], [np.nan]])
    with pytest.raises(ValueError, match="at least one prompt"):
        fm.trend([])


def test_trends_of_kl_and_disagreement():
    kl = _synthetic(0.002, n_prompts=6, n_pos=200, seed=5)
    top1 = [np.ones(200) for _ in kl]
    top1[0][150:] = 0.0
    tr = fm.trends(kl, top1, n_boot=300)
    assert set(tr) == {"kl", "disagreement"}
    assert tr["kl"]["slope_per_1k"] > 0 and tr["disagreement"]["slope_per_1k"] > 0
    assert tr["disagreement"]["first_quarter"] == 0.0 and tr["disagreement"]["ratio"] is None
    assert "error" in fm.trends([[0.1]], [[1.0]])["kl"]


def test_score_config_reports_the_trend():
    p_top = [[[-0.1, 4, None], [-2.5, 9, None]], [[-0.2, 6, None], [-1.8, 8, None]]]
    q_top = [[[-0.1, 4, None], [-2.5, 9, None]], [[-0.3, 8, None], [-1.5, 6, None]]]
    gen = {"tokens": [[4, 8], [4, 8]], "token_lps": [[-0.1, -0.3]] * 2, "top": [q_top, q_top]}
    sc = {"token_lps": [[-0.1, -1.8]] * 2, "top": [p_top, p_top]}
    m = fm.score_config(gen, sc, [[4, 6], [4, 6]], bin_size=1)
    assert m["trend"]["kl"]["slope_per_1k"] > 0
    assert m["trend"]["disagreement"]["slope_per_1k"] == pytest.approx(1000.0)


def test_print_trends(capsys):
    results = {
        "bf16-triton": {
            "summary": {"past_eos_frac": 0.25},
            "trend": fm.trends(_synthetic(0.0, 4, 64), [np.ones(64)] * 4),
        },
        "k4v4": {"summary": {}, "trend": fm.trends(_synthetic(0.002, 4, 64), [np.ones(64)] * 4)},
        "old": {"summary": {}},
    }
    fm.print_trends(results)
    out = capsys.readouterr().out
    assert "KL slope/1k" in out and "bf16-triton" in out and "k4v4" in out and "25%" in out
    assert "old" not in out


# ----------------------------------------------------------------------------- --long
def _preset(**kw):
    ns = argparse.Namespace(long=False, max_new_tokens=None, bin_size=None, **kw)
    return ns


def _error(msg):
    raise SystemExit(msg)


def test_long_preset():
    a = _preset()
    assert fid.apply_preset(a, _error) is prompts.PROMPTS
    assert (a.max_new_tokens, a.bin_size) == (256, 32)
    a = _preset()
    a.long = True
    assert fid.apply_preset(a, _error) is prompts.LONG_PROMPTS
    assert (a.max_new_tokens, a.bin_size) == (1024, 64)
    a = _preset()
    a.long, a.max_new_tokens, a.bin_size = True, 2048, 128
    fid.apply_preset(a, _error)
    assert (a.max_new_tokens, a.bin_size) == (2048, 128)
    a = _preset()
    a.long, a.max_new_tokens = True, 512
    with pytest.raises(SystemExit, match=">= 1024"):
        fid.apply_preset(a, _error)


def test_main_refuses_long_with_few_tokens_before_starting_anything(capsys):
    with pytest.raises(SystemExit):
        fid.main(["--model-path", "/nonexistent", "--long", "--max-new-tokens", "512"])
    assert "--max-new-tokens >= 1024" in capsys.readouterr().err


def test_long_prompts():
    assert len(prompts.LONG_PROMPTS) == 20 == len(set(prompts.LONG_PROMPTS))
    assert all(len(p) > 150 for p in prompts.LONG_PROMPTS)


def test_eos_bookkeeping(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert fid.eos_token_ids(str(tmp_path)) == [7, 9]
    assert fid.eos_token_ids(str(tmp_path / "missing")) == []
    firsts, frac = fm.eos_summary([[1, 2, 9, 3, 4], [1, 2, 3, 4, 5]], [7, 9])
    assert firsts == [2, None] and frac == pytest.approx(2 / 10)


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    "label",
    [
        "bf16",
        "fp8",
        "bf16-triton",
        "fp8-triton",
        "bf16-fa3",
        "k4v4",
        "k4v4-nc",
        "k3v3",
        "k3v3-nc",
        "k4v2",
    ],
)
def test_config_flags_are_the_shared_table(label):
    assert generation.config_flags(label) == kv_server_flags(label)


def test_packed_prefill_and_centered_names_on_top_of_the_table():
    assert generation.config_flags("k4v4-pp") == [
        *kv_server_flags("k4v4"),
        "--kv-quant-packed-prefill",
    ]
    assert generation.config_flags("k4v4-nc-pp") == [
        *kv_server_flags("k4v4-nc"),
        "--kv-quant-packed-prefill",
    ]
    for bad in ("fp8-pp", "bf16-pp", "k4v4-pp-pp", "k4v4-pp-nc", "k9v9", "int4"):
        with pytest.raises(ValueError, match="unknown config"):
            generation.config_flags(bad)
    custom = {}
    generation.add_centered_configs(
        ["k4v4-c", "k4v4-pp-c", "k4v4-nc"], custom, "/m/c.safetensors", _error
    )
    assert custom == {
        "k4v4-c": [
            "--kv-quant",
            "turboquant",
            "--kv-quant-bits",
            "k4v4",
            "--kv-quant-key-centers",
            "/m/c.safetensors",
        ],
        "k4v4-pp-c": [
            "--kv-quant",
            "turboquant",
            "--kv-quant-bits",
            "k4v4",
            "--kv-quant-packed-prefill",
            "--kv-quant-key-centers",
            "/m/c.safetensors",
        ],
    }
    assert generation.config_flags("k4v4-c", custom) == custom["k4v4-c"]
    for bad in ("k4v4-nc-c", "fp8-c"):
        with pytest.raises(SystemExit, match="-c adds key centers"):
            generation.add_centered_configs([bad], {}, "/m/c.safetensors", _error)


def test_main_refuses_an_unknown_label_before_starting_anything(capsys):
    with pytest.raises(SystemExit):
        fid.main(["--model-path", "/nonexistent", "--configs", "k4v4,int4"])
    assert "unknown config 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["fidelity", "plot-fidelity"])
def test_help(subcommand):
    r = subprocess.run(
        [sys.executable, "-m", "sglang_tq.bench", subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    if subcommand == "fidelity":
        assert "--long" in r.stdout and "--teacher" in r.stdout


# ----------------------------------------------------------------------------- plot
def _entry(kl_slope, n_prompts=4, n_pos=256, miss_every=0, with_trend=True, seed=0):
    kl = _synthetic(kl_slope, n_prompts, n_pos, seed=seed)
    per_prompt = [
        {
            "kl": [round(float(v), 6) for v in a],
            "top1_miss": list(range(0, n_pos, miss_every)) if miss_every else [],
        }
        for a in kl
    ]
    e = {"flags": [], "summary": {}, "per_prompt": per_prompt}
    if with_trend:
        e["trend"] = fm.trends(kl, [np.ones(n_pos)] * n_prompts, n_boot=200)
    return e


def _doc():
    return {
        "gpu": "NVIDIA H200",
        "commit": "abc1234",
        "model_path": "/tmp/models/tiny-bf16",
        "teacher": "bf16-triton",
        "configs": {
            "bf16-triton": _entry(0.0, with_trend=False),
            "k4v4": _entry(0.002, miss_every=7, seed=1),
            "broken": {"flags": [], "error": "server failed"},
        },
    }


def test_bucket_stats():
    s = plot.bucket_stats([np.array([1.0, 3.0, 5.0]), np.array([3.0, 5.0, np.nan])], 2)
    assert s["center"].tolist() == [0.5, 2.0]
    assert s["mean"].tolist() == [3.0, 5.0]
    assert s["sem"][0] == pytest.approx(np.std([2.0, 4.0], ddof=1) / np.sqrt(2))
    assert s["sem"][1] == 0.0


def test_load_series_reads_per_prompt_data(tmp_path):
    p = tmp_path / "f.json"
    p.write_text(json.dumps(_doc()))
    series, docs = plot.load_series([str(p)])
    assert [s["name"] for s in series] == ["bf16-triton", "k4v4"]
    k = series[1]
    assert k["top1"][0][0] == 0.0 and k["top1"][0][1] == 1.0
    assert k["trend"]["slope_per_1k"] > 0
    assert series[0]["trend"]["slope_per_1k"] == pytest.approx(
        fm.trend([np.asarray(x["kl"]) for x in _doc()["configs"]["bf16-triton"]["per_prompt"]])[
            "slope_per_1k"
        ]
    )
    assert "abc1234" in plot.title_of(docs, series) and "NVIDIA H200" in plot.title_of(docs, series)
    q = tmp_path / "g.json"
    q.write_text(
        json.dumps(
            {
                **_doc(),
                "configs": {
                    "k4v4": _entry(0.001, seed=9),
                    "bf16-triton": _doc()["configs"]["bf16-triton"],
                },
            }
        )
    )
    series, _ = plot.load_series([str(p), str(q)], ["k4v4", "bf16-triton"])
    assert [s["label"] for s in series] == ["k4v4 (f)", "k4v4 (g)", "bf16-triton"]


def test_plot_without_matplotlib_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[plots\]"'):
        plot.plot([], "t", str(tmp_path / "x.png"), 64)


def test_plot_writes_a_png(tmp_path):
    p = tmp_path / "fidelity_long.json"
    p.write_text(json.dumps(_doc()))
    out = tmp_path / "plots" / "fidelity_long.png"
    assert plot.main([str(p), "--out", str(out), "--bin-size", "32"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
