"""``python -m sglang_tq.bench decode-mla``: its arguments and errors, the inputs and split
rule, the sglang-tq step against its float64 twin (Triton interpreter without CUDA), the
FA3 call's arguments (against a fake with FA3's qv semantics), and the results file
through a fake timer; end to end with both implementations on a GPU (marked gpu)."""

import json

import pytest
import torch

from sglang_tq.bench import SUBCOMMANDS
from sglang_tq.bench import __main__ as bench_main
from sglang_tq.bench import decode_mla as dm
from sglang_tq.config import TQConfig
from sglang_tq.kernels.tq_decode import default_num_kv_splits, split_ceiling, tq_decode_ref

PROVENANCE = {"gpu": "test", "commit": "abc", "versions": {}, "date": "today"}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def no_provenance(monkeypatch):
    monkeypatch.setattr(dm.results, "get_provenance", lambda: dict(PROVENANCE))


def _timer(values):
    """A fake timer giving ``values`` in call order (the rows' table order)."""
    it = iter(values)

    def timer(step, args):
        ms = next(it)
        return {
            "ms": ms,
            "ms_runs": [ms],
            "spread_pct": 0.0,
            "cuda_graph": True,
            "timing_note": None,
        }

    return timer


def _fake_fa3(calls):
    """A loader of a flash_attn_with_kvcache stand-in: records its arguments and computes
    FA3's paged attention with qv, softmax((q·k + qv·v) · scale) · v."""

    def fa3(**kw):
        calls.append(kw)
        pages = kw["page_table"].long()
        outs = []
        for b in range(kw["q"].shape[0]):
            k = kw["k_cache"][pages[b], 0, 0].double()
            v = kw["v_cache"][pages[b], 0, 0].double()
            s = kw["q"][b].double() @ k.T + kw["qv"][b].double() @ v.T
            outs.append(torch.softmax(s * kw["softmax_scale"], dim=-1) @ v)
        return torch.stack(outs).to(kw["q"].dtype)

    return lambda: fa3


# ----------------------------------------------------------------------------- arguments


def test_subcommand_is_registered(capsys):
    assert SUBCOMMANDS["decode-mla"][0] == "sglang_tq.bench.decode_mla"
    assert bench_main.main(["--help"]) == 0
    assert "decode-mla" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench_main.main(["decode-mla", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("absorbed", "qv = q_nope", "fp8", "CUDA-graph replay", "tq_decode_ref"):
        assert phrase in text


def test_defaults():
    args = dm.parse_args([])
    assert [str(s) for s in args.shape_list] == ["1x4096", "1x32768", "16x8192", "64x8192"]
    assert args.bits == [4, 3, 2] and args.impls == ["sglang-tq", "fa3"]
    assert args.baseline_kv == ["bf16", "fp8_e4m3"]
    assert (args.num_heads, args.max_kv_splits, args.pool_tokens) == (16, 8, 0)
    assert dm.planned_rows(args) == [
        ("sglang-tq", "k4"),
        ("sglang-tq", "k3"),
        ("sglang-tq", "k2"),
        ("fa3", "bf16"),
        ("fa3", "fp8_e4m3"),
    ]


def test_kv_and_shape_forms():
    assert dm.parse_kv("k4, K4V4,k2") == [4, 2]
    assert dm.parse_shapes("1x4096, 16X8192,1x4096") == [dm.Shape(1, 4096), dm.Shape(16, 8192)]
    assert dm.Shape(16, 8192).tokens == 16 * 8192


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv", "k5"], "--kv takes the latent's bits as k4, k3 or k2"),
        (["--kv", "k4v3"], "--kv takes the latent's bits as k4, k3 or k2"),
        (["--shapes", "4096"], "--shapes takes BxL"),
        (["--shapes", "0x16"], "--shapes takes BxL"),
        (["--impl", "flashinfer"], "--impl takes sglang-tq, fa3, got 'flashinfer'"),
        (["--baseline-dtypes", "fp16"], "--baseline-dtypes takes bf16, fp8"),
        (["--num-heads", "0"], "--num-heads must be at least 1"),
        (["--pool-tokens", "-1"], "--pool-tokens must be 0 or positive"),
        (["--pool-tokens", "100", "--shapes", "1x64,1x4096"], "cannot hold shape 1x4096"),
    ],
)
def test_bad_arguments_are_one_sentence(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        dm.parse_args(argv)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and last.endswith(".")


def test_run_without_cuda_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(dm.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert dm.run(dm.parse_args(["--out", str(out)])) == 1
    assert capsys.readouterr().err.strip() == f"error: {dm.NO_CUDA}"
    assert not out.exists()


# ----------------------------------------------------------------------------- inputs, splits


def test_inputs_scatter_distinct_slots_like_the_pool():
    inp = dm.make_inputs(dm.Shape(3, 20), 16, 0, "cpu")
    assert inp.kv_rows.shape == (61, 1, 576) and inp.kv_rows.dtype == torch.bfloat16
    assert inp.q.shape == (3, 16, 576) and inp.q_nope.shape[-1] == 512 and inp.q_pe.shape[-1] == 64
    idx = inp.kv_indices
    assert idx.dtype == torch.int64 and idx.unique().numel() == 60 and 1 <= int(idx.min())
    assert int(idx.max()) <= 60, "slot 0 is SGLang's padding slot"
    assert torch.equal(inp.page_table, idx.view(3, 20).int())
    assert inp.kv_indptr.tolist() == [0, 20, 40, 60] and inp.seq_lens.tolist() == [20] * 3
    assert inp.sm_scale == pytest.approx(192**-0.5)
    big = dm.make_inputs(dm.Shape(3, 20), 16, 500, "cpu")
    assert big.num_slots == 501 and int(big.kv_indices.max()) <= 500


@pytest.mark.parametrize(
    "bsz, seq_len", [(1, 4096), (1, 32768), (16, 8192), (64, 8192), (128, 4096)]
)
@pytest.mark.parametrize("bits", [4, 2])
def test_split_plan_is_the_backends_rule(bsz, seq_len, bits):
    seq_lens = torch.full((bsz,), seq_len, dtype=torch.int32)
    plan = dm.split_plan(seq_lens, bits, 8, 132)
    assert plan.ceiling == split_ceiling(bsz, 8)
    want = default_num_kv_splits(
        seq_lens, 1, plan.ceiling, num_sms=132, head_dim=512, k_bits=bits, v_bits=bits
    )
    assert torch.equal(plan.counts, want)
    if bsz == 1 and seq_len == 32768:
        assert int(plan.counts[0]) > 8, "one long sequence needs more splits than SGLang's 8"
    if bsz >= 64:
        assert plan.ceiling == 8


# ----------------------------------------------------------------------------- sglang-tq


@pytest.mark.parametrize("bits, splits", [(4, None), (3, (3, 2)), (2, None)])
def test_tq_step_matches_reference(bits, splits):
    """The bench's step (pool codec and store, backend splits and workspace) against the
    float64 twin, every sequence; ``splits`` forces several splits per sequence."""
    inp = dm.make_inputs(dm.Shape(2, 45), 16, 0, "cpu", seed=bits)
    packed = dm.pack_latent(inp, bits)
    assert packed.codec.seed == TQConfig(512, bits, bits).layer_seed(0)
    assert packed.codes.shape == (91, 1, 512 * bits // 8) and packed.k_pe.shape == (91, 64)
    plan = dm.split_plan(inp.seq_lens, bits, 8, 132)
    if splits:
        plan = dm.SplitPlan(4, torch.tensor(splits, dtype=torch.int32))
    out = dm.tq_step(inp, packed, plan, 8, block_n=16)()
    args = (
        inp.q_nope,
        packed.codes,
        packed.norms,
        None,
        None,
        inp.kv_indptr,
        inp.kv_indices,
        packed.codec,
        inp.sm_scale,
    )
    pe = dict(q_pe=inp.q_pe, k_pe=packed.k_pe)
    ref = tq_decode_ref(*args, **pe)
    torch_err = _rel(tq_decode_ref(*args, dtype=torch.bfloat16, **pe), ref)
    assert out.shape == (2, 16, 512) and _rel(out, ref) <= 2 * torch_err
    check = dm.check_tq(inp, packed, out)
    assert check["ok"] and check["finite"] and check["rel_err"] <= dm.TQ_TOL


# ----------------------------------------------------------------------------- fa3


@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
def test_fa3_call_mirrors_sglang(kv):
    """FlashAttentionBackend.forward_decode's MLA call: q_rope vs the RoPE columns, qv =
    q_nope vs the latent as values, page size 1, the whole buffer cast to the query dtype."""
    inp = dm.make_inputs(dm.Shape(2, 24), 16, 100, "cpu")
    buffer = dm.fa3_buffer(inp, kv)
    assert buffer.dtype == dm.FA3_DTYPES[kv] and buffer.shape == (101, 1, 576)
    calls = []
    out = dm.fa3_step(inp, buffer, _fake_fa3(calls)())()
    kw = calls[0]
    assert kw["q"].data_ptr() == inp.q_pe.data_ptr() and kw["q"].shape == (2, 16, 64)
    assert kw["qv"].data_ptr() == inp.q.data_ptr() and kw["qv"].shape == (2, 16, 512)
    assert kw["k_cache"].shape == (101, 1, 1, 64) and kw["v_cache"].shape == (101, 1, 1, 512)
    assert kw["k_cache"].dtype == kw["v_cache"].dtype == torch.bfloat16
    assert torch.equal(kw["v_cache"][:, 0, 0], buffer[:, 0, :512].to(torch.bfloat16))
    assert torch.equal(kw["page_table"], inp.page_table) and kw["page_table"].dtype == torch.int32
    assert kw["cache_seqlens"].tolist() == [24, 24] and kw["cache_seqlens"].dtype == torch.int32
    assert kw["cu_seqlens_q"].tolist() == [0, 1, 2] and kw["cu_seqlens_k_new"].tolist() == [
        0,
        24,
        48,
    ]
    assert (kw["max_seqlen_q"], kw["causal"], kw["num_splits"], kw["ver"]) == (1, True, 0, 3)
    assert kw["k_descale"] is None and kw["v_descale"] is None and not kw["return_softmax_lse"]
    assert kw["softmax_scale"] == inp.sm_scale
    check = dm.check_fa3(inp, buffer, out)
    assert check["ok"] and check["matches_dense"] and check["rel_err"] < 1e-2


# ----------------------------------------------------------------------------- run


def test_timing_is_the_median_of_do_bench_medians(monkeypatch):
    """--no-cuda-graph times the step itself; ms is the median of the passes' medians."""
    triton_testing = pytest.importorskip("triton.testing")
    passes = iter([3.0, 1.0, 2.0])
    seen = []

    def do_bench(fn, warmup, rep, return_mode):
        seen.append((fn, warmup, rep, return_mode))
        return next(passes)

    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    step = object()
    args = dm.parse_args(["--no-cuda-graph", "--repeat", "3", "--warmup", "5", "--rep", "7"])
    got = dm.time_replay(step, args)
    assert got == {
        "ms": 2.0,
        "ms_runs": [3.0, 1.0, 2.0],
        "spread_pct": 200.0,
        "cuda_graph": False,
        "timing_note": None,
    }
    assert seen == [(step, 5.0, 7.0, "median")] * 3


def test_results_file_schema_and_ratios(tmp_path, no_provenance, capsys):
    out = tmp_path / "mla.json"
    args = dm.parse_args(["--shapes", "1x48", "--kv", "k4,k2", "--out", str(out)])
    rc = dm.run_benchmark(
        args, torch.device("cpu"), timer=_timer([0.02, 0.01, 0.04, 0.05]), fa3_loader=_fake_fa3([])
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["tool"] == dm.TOOL and doc["argv"] == args.argv
    assert all(doc[k] == PROVENANCE[k] for k in ("gpu", "commit", "versions", "date"))
    rows = {(r["impl"], r["kv"]): r for r in doc["results"]}
    assert list(rows) == dm.planned_rows(args)
    for r in rows.values():
        assert {
            "shape",
            "batch",
            "seq_len",
            "ms",
            "ms_runs",
            "cuda_graph",
            "check",
            "config",
            "ratio_vs_bf16",
            "ratio_vs_fp8",
            "gpu",
            "commit",
            "date",
        } <= set(r)
        assert (r["shape"], r["batch"], r["seq_len"]) == ("1x48", 1, 48) and r["check"]["ok"]
        cfg = r["config"]
        assert (cfg["num_heads"], cfg["latent"], cfg["rope"], cfg["shapes"]) == (
            16,
            512,
            64,
            ["1x48"],
        )
        assert "mla_num_kv_splits" in cfg["splits_policy"] and cfg["base_kv_splits"] == 8
        assert cfg["pool_slots"] == 49 and cfg["timing"]["cuda_graph"]
    k4 = rows[("sglang-tq", "k4")]
    assert k4["kv_quant_bits"] == "k4v4" and k4["max_kv_splits"] == split_ceiling(1, 8)
    assert k4["num_kv_splits"] == 1, "48 tokens are below one split's minimum of 64"
    assert k4["ratio_vs_bf16"] == pytest.approx(0.5) and k4["ratio_vs_fp8"] == pytest.approx(0.4)
    assert rows[("fa3", "bf16")]["ratio_vs_bf16"] == pytest.approx(1.0)
    assert "whole fp8 layer buffer" in rows[("fa3", "fp8_e4m3")]["note"]
    text = capsys.readouterr().out
    assert "[1/1] 1x48" in text and "0.50x" in text and "0.40x" in text


def test_missing_fa3_leaves_error_rows(tmp_path, no_provenance, capsys):
    def missing():
        raise ImportError("\nCan not import FA3 in sgl_kernel. Please check your installation.")

    out = tmp_path / "mla.json"
    args = dm.parse_args(["--shapes", "1x16", "--kv", "k2", "--out", str(out)])
    assert (
        dm.run_benchmark(args, torch.device("cpu"), timer=_timer([0.03]), fa3_loader=missing) == 3
    )
    rows = {(r["impl"], r["kv"]): r for r in json.loads(out.read_text())["results"]}
    tq = rows[("sglang-tq", "k2")]
    assert tq["ms"] == 0.03 and tq["check"]["ok"] and tq["ratio_vs_bf16"] is None
    for kv in ("bf16", "fp8_e4m3"):
        err = rows[("fa3", kv)]["error"]
        assert "FA3 is unavailable (ImportError: Can not import FA3 in sgl_kernel" in err
        assert "ms" not in rows[("fa3", kv)]
    assert "the fa3 rows carry this error, the rest runs" in capsys.readouterr().out


@pytest.mark.gpu
def test_run_end_to_end_on_gpu(tmp_path):
    """Both implementations at a tiny shape, graph-captured and timed on the GPU."""
    out = tmp_path / "mla.json"
    args = dm.parse_args(
        [
            "--shapes",
            "2x256",
            "--kv",
            "k4",
            "--warmup",
            "1",
            "--rep",
            "5",
            "--repeat",
            "1",
            "--out",
            str(out),
        ]
    )
    try:
        dm.load_fa3()
        has_fa3 = True
    except Exception:
        has_fa3 = False
    rc = dm.run(args)
    rows = {(r["impl"], r["kv"]): r for r in json.loads(out.read_text())["results"]}
    tq = rows[("sglang-tq", "k4")]
    assert tq["check"]["ok"] and tq["ms"] > 0 and tq["cuda_graph"], tq
    for kv in ("bf16", "fp8_e4m3"):
        row = rows[("fa3", kv)]
        if has_fa3:
            assert row["check"]["ok"] and row["check"]["matches_dense"] and row["ms"] > 0, row
            assert row["cuda_graph"] and tq["ratio_vs_bf16"] is not None
        else:
            assert "FA3 is unavailable" in row["error"]
    assert rc == (0 if has_fa3 else 3)


def test_a_shape_that_cannot_be_built_is_recorded(tmp_path, no_provenance, monkeypatch):
    """Out of memory while building one shape: its rows carry the error and their config."""

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(dm, "make_inputs", oom)
    out = tmp_path / "mla.json"
    args = dm.parse_args(["--shapes", "64x8192", "--kv", "k4", "--out", str(out)])
    assert (
        dm.run_benchmark(args, torch.device("cpu"), timer=_timer([]), fa3_loader=_fake_fa3([])) == 3
    )
    rows = json.loads(out.read_text())["results"]
    assert [(r["impl"], r["kv"]) for r in rows] == dm.planned_rows(args)
    for r in rows:
        assert r["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"
        assert r["config"]["pool_slots"] == 64 * 8192 + 1 and r["config"]["num_heads"] == 16
