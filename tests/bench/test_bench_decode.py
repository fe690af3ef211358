"""``python -m sglang_tq.bench decode`` on CPU: the FA3 baseline's argument handling, its
"unavailable" path (no CUDA / no FA3 library: one line, rows marked, the rest runs)
and the ratio columns. The kernels themselves are timed on the GPU host only."""

from __future__ import annotations

import pytest
import torch

import sglang_tq.bench.decode as bd
from sglang_tq.bench import decode_baselines as bl


def _args(*argv):
    return bd.parse_args(list(argv))


def test_fa3_is_an_impl_and_in_the_help(capsys):
    assert "fa3" in bd.ALL_IMPLS
    a = _args()
    assert "fa3" in a.impl_set and not a.fa3_descale and not a.fa3_no_scheduler_metadata
    a = _args("--impls", "fa3,copy", "--fa3-descale")
    assert a.impl_set == {"fa3", "copy"} and a.fa3_descale
    with pytest.raises(SystemExit, match="unknown --impls"):
        _args("--impls", "fa4")
    with pytest.raises(SystemExit):
        bd.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "flash_attn_with_kvcache" in out and "--fa3-descale" in out and "fa3" in out


def test_probe_fa3_without_cuda_names_the_reason():
    ctx = bl.Ctx()
    ctx.torch, ctx.device = torch, torch.device("cpu")
    why = bl.probe_fa3(ctx)
    assert isinstance(why, str) and "CUDA device" in why and ctx.fa3 is None


def test_unavailable_fa3_rows_are_recorded_and_the_rest_runs(capsys):
    args = _args("--impls", "fa3,sglang-triton", "--shapes", "2x16x64", "--check", "none")
    ctx = bl.Ctx()
    ctx.import_errors = {}
    ctx.torch, ctx.device, ctx.sm_count = torch, torch.device("cpu"), 132
    bd.try_import(ctx, args)
    assert "FA3 rows not run: FA3 needs a CUDA device" in capsys.readouterr().out
    ctx.decode_attention_fwd = None  # no Triton launch on CPU: that row records its own error
    ctx.import_errors["sglang-triton"] = "no GPU in this test"
    results, checks = [], []
    bd.bench_shape(ctx, args, 2, 16, 64, results, checks, False, {})
    fa3 = [r for r in results if r["impl"] == "fa3"]
    assert [r["kv"] for r in fa3] == ["bf16", "fp8_e4m3"]
    for r in fa3:
        assert r["unavailable"].startswith("FA3 needs a CUDA device")
        assert r["error"].startswith("unavailable: ")
    assert {r["impl"] for r in results} == {"fa3", "sglang-triton"}
    bd.add_derived(results, None)
    bd.print_table(results)
    table = capsys.readouterr().out
    assert "xFA3-bf16" in table and "xFA3-fp8" in table
    assert (
        "fa3            bf16         2     16   64  not run (unavailable): FA3 needs a CUDA device"
        in table
    )


def test_fa3_ratio_columns():
    def row(impl, kv, ms):
        return {
            "impl": impl,
            "kv": kv,
            "B": 64,
            "L": 16384,
            "head_dim": 128,
            "ms": ms,
            "tbps": 1.0,
            "bytes": {"total": 1},
        }

    rows = [
        row("fa3", "bf16", 1.4),
        row("fa3", "fp8_e4m3", 1.0),
        row("sglang-tq", "k4v4", 0.7),
        {**row("fa3", "bf16", 0), "B": 1, "error": "unavailable: x", "unavailable": "x"},
    ]
    bd.add_derived(rows, None)
    assert rows[2]["speedup_vs_fa3_bf16"] == pytest.approx(2.0)
    assert rows[2]["speedup_vs_fa3_fp8"] == pytest.approx(1.0 / 0.7)
    assert rows[0]["speedup_vs_fa3_bf16"] == pytest.approx(1.0)
    assert "speedup_vs_flashinfer_bf16" not in rows[2]


def test_fa3_tables_mirror_sglang_decode_metadata():
    ctx = bl.Ctx()
    ctx.torch = torch
    slots = torch.randperm(3 * 5)
    pt, lens, cu = bl.fa3_tables(ctx, slots, 3, 5)
    assert (
        pt.dtype == torch.int32 and pt.shape == (3, 5) and pt.flatten().tolist() == slots.tolist()
    )
    assert lens.tolist() == [5, 5, 5] and lens.dtype == torch.int32
    assert cu.tolist() == [0, 1, 2, 3] and cu.dtype == torch.int32
    b = bd.count_bytes("fp8_e4m3", 3, 5, 32, 8, 128, 4, q_elt=1)
    assert b["q"] == 3 * 32 * 128 and b["out"] == 2 * b["q"] and b["indices"] == 15 * 4
