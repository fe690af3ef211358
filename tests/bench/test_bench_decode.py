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


def test_reference_sinks_match_the_kernel_reference():
    """The bench's float64 reference with sinks is the kernels' attention_ref with sinks."""
    from sglang_tq.kernels.tq_decode import attention_ref

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g) for s in ((8, 16), (11, 2, 16), (11, 2, 16)))
    sinks = torch.randn(8, generator=g)
    ours = bd.ref_attention(torch, q, k, v, 0.25, sinks)
    twin = attention_ref(q[None].double(), k.double(), v.double(), 0.25, sinks=sinks.double())[0]
    # attention_ref takes its softmax in float32: agreement to a few float32 ulps
    torch.testing.assert_close(ours, twin, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, bd.ref_attention(torch, q, k, v, 0.25))  # sinks matter


def test_window_and_sinks_leave_fa3_as_the_only_baseline(capsys):
    a = _args("--window", "127", "--sinks")
    assert a.impl_set == {"sglang-tq", "fa3", "copy"} & set(bd.ALL_IMPLS)
    assert "no flashinfer, sglang-triton rows" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--window"):
        _args("--window", "-2")


@pytest.mark.parametrize("window,sinks", [(-1, True), (4, False), (6, True), (40, False)])
def test_window_and_sinks_reach_the_kernel_and_its_check(window, sinks):
    """A tiny shape through the bench's own sglang-tq path on CPU (Triton interpreter): the
    window and sinks reach tq_decode and the float64 check, which passes; the same output is
    off against a check without them (so the check would catch a dropped argument)."""
    args = _args(
        "--shapes", "2x23x64", "--kv", "k4v4", "--num-q-heads", "4", "--num-kv-heads", "2",
        "--impls", "sglang-tq", "--window", str(window), *(["--sinks"] if sinks else []),
    )  # fmt: skip
    ctx = bl.Ctx()
    ctx.torch, ctx.device = torch, torch.device("cpu")
    sr = bd.ShapeRun(ctx, args, 2, 23, 64, [], [], True, {})
    assert sr.attended == (23 if window < 0 else min(23, window + 1))
    if sinks:  # a sink of weight e^2 per head: a visible share of every softmax row
        sr.sinks = torch.full_like(sr.sinks, 2.0)
    codec = bd.get_codec(ctx, sr.codecs, 64, 4, 4)
    bufs = bd.alloc_and_fill_tq(ctx, args, codec, sr.S, 2, 64)
    fn, _ = bd.build_tq(
        ctx, args, sr.q, bufs, sr.indptr, sr.slots, codec, sr.sm_scale, 2, sr.tq_extra
    )
    out = fn()
    row = sr.row("sglang-tq", "k4v4")
    bd.check_tq(sr, row, out, codec, bufs)
    assert row["check"]["ok"], row["check"]
    assert row["attended"] == sr.attended and row["sinks"] is sinks
    kd = codec.k_quant.dequantize(bufs[0][sr.idx0], bufs[1][sr.idx0])
    vd = codec.v_quant.dequantize(bufs[2][sr.idx0], bufs[3][sr.idx0])
    plain = bd.ref_attention(torch, sr.q[0], kd, vd, sr.sm_scale)
    off = bd.compare(torch, "plain", out[0], plain, bd.TOL["tq"])["rel_err"]
    if sinks or sr.attended < 23:
        assert off > 5 * max(row["check"]["rel_err"], 1e-3), (off, row["check"])
    else:  # a window longer than the sequence keeps every key
        assert off == pytest.approx(row["check"]["rel_err"], rel=1e-9)
