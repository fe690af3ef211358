"""scripts/loadtest.py on CPU: the streaming client, statistics and JSON against a fake
SGLang server (aiohttp.web on 127.0.0.1) that emits SGLang 0.5.17-shaped SSE chunks
(``data: {"output_ids": [...cumulative], "meta_info": {...}}``, then ``data: [DONE]``)
and emulates the radix cache's ``cached_tokens`` (longest common prefix with earlier
prompts). The end-to-end test runs ``main()`` with the fake server as a subprocess in
place of ``sglang.launch_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "scripts"))
import loadtest as lt  # noqa: E402

ERROR_TOKEN, ABORT_TOKEN, HTTP500_TOKEN = 13, 14, 15


# ----------------------------------------------------------------------------- fake server

class FakeState:
    def __init__(self, ttft_s=0.01, itl_s=0.002, pool=1000, ready_after_s=0.0, split=True):
        self.ttft_s, self.itl_s, self.pool, self.split = ttft_s, itl_s, pool, split
        self.ready_at = time.time() + ready_after_s
        self.cache: list[list[int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.flushes = 0

    def cached_len(self, ids: list[int]) -> int:
        best = 0
        for seq in self.cache:
            n = 0
            for a, b in zip(seq, ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(ids) - 1)  # SGLang always computes at least one token


def make_fake_app(state: FakeState) -> web.Application:
    async def health(request):
        return web.Response(status=200 if time.time() >= state.ready_at else 503)

    async def server_info(request):
        return web.json_response({"max_total_num_tokens": state.pool, "max_running_requests": 64,
                                  "attention_backend": "fake", "version": "0.5.17", "other": 1})

    async def flush(request):
        if state.in_flight:
            return web.Response(status=400, text="busy")
        state.cache.clear()
        state.flushes += 1
        return web.Response(text="Cache flushed.\n")

    async def generate(request):
        body = await request.json()
        ids = body["input_ids"]
        n = body["sampling_params"]["max_new_tokens"]
        assert body["sampling_params"]["ignore_eos"] is True and body["stream"] is True
        if ids[0] == HTTP500_TOKEN:
            return web.Response(status=500, text="internal")
        state.requests += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            cached = state.cached_len(ids)
            state.cache.append(list(ids))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(obj):
                data = b"data: " + json.dumps(obj).encode() + b"\n\n"
                if state.split:  # fragment mid-line to exercise the SSE reassembly
                    cut = len(data) // 2
                    await resp.write(data[:cut])
                    await asyncio.sleep(0)
                    await resp.write(data[cut:])
                else:
                    await resp.write(data)

            await asyncio.sleep(state.ttft_s)
            if ids[0] == ERROR_TOKEN:
                await send({"error": {"message": "boom", "type": "invalid_request_error",
                                      "code": 400, "retryable": False}})
            else:
                out = []
                for k in range(1, n + 1):
                    out.append(1000 + k)
                    last = k == n or ids[0] == ABORT_TOKEN
                    fr = None
                    if last:
                        fr = ({"type": "abort", "message": "aborted", "status_code": 503, "err_type": None}
                              if ids[0] == ABORT_TOKEN else {"type": "length", "length": n})
                    meta = {"id": f"r{state.requests}", "finish_reason": fr, "prompt_tokens": len(ids),
                            "weight_version": "default", "num_retractions": 0, "reasoning_tokens": 0,
                            "completion_tokens": k, "cached_tokens": cached}
                    if last:
                        meta["e2e_latency"] = 0.0
                    await send({"output_ids": list(out), "meta_info": meta})
                    if last:
                        break
                    await asyncio.sleep(state.itl_s)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            state.in_flight -= 1

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/server_info", server_info)
    app.router.add_route("*", "/flush_cache", flush)
    app.router.add_post("/generate", generate)
    return app


class running_fake:
    """async with running_fake(state) as base_url: ..."""

    def __init__(self, state: FakeState):
        self.state = state

    async def __aenter__(self) -> str:
        self.runner = web.AppRunner(make_fake_app(self.state))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def fake_server_cli():
    """Entry of the fake ``sglang.launch_server`` module used by the end-to-end test."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--kv-quant", default="none")
    ap.add_argument("--kv-quant-bits", default="k4v4")
    ap.add_argument("--mem-fraction-static", type=float, required=True)
    args, _ = ap.parse_known_args()
    assert args.host == "127.0.0.1"
    if args.kv_quant == "turboquant":
        pool, itl = {"k4v4": 3880, "k3v3": 5100}[args.kv_quant_bits], 0.001
    elif args.kv_cache_dtype == "fp8_e4m3":
        pool, itl = 2000, 0.0015
    else:
        pool, itl = 1000, 0.002
    print(f"KV Cache is allocated. max_total_num_tokens={pool}, chunked_prefill_size=8192, "
          f"max_prefill_tokens=16384, max_running_requests=64, context_len=131072, "
          f"available_gpu_mem=12.34 GB", flush=True)
    state = FakeState(itl_s=itl, pool=pool, ready_after_s=0.1)
    web.run_app(make_fake_app(state), host=args.host, port=args.port, print=None,
                handle_signals=True)


# ----------------------------------------------------------------------------- pure logic

def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 5, 17):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert lt.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert lt.percentile([], 50) is None


def test_compute_stats_exact():
    R = lt.ReqResult
    results = [
        R(ok=True, ttft=0.1, latency=1.0, completion_tokens=10, prompt_tokens=100, cached_tokens=50),
        R(ok=True, ttft=0.3, latency=2.0, completion_tokens=10, prompt_tokens=100, cached_tokens=0),
        R(ok=True, ttft=0.2, latency=3.0, completion_tokens=5, prompt_tokens=200, cached_tokens=150),
        R(ok=False, error="boom", completion_tokens=7, prompt_tokens=100),
        None,  # never finished (timeout)
    ]
    s = lt.compute_stats(results, duration_s=5.0, num_requests=5, expected_output_len=10)
    assert s["completed"] == 3 and s["failed"] == 1 and s["num_requests"] == 5
    assert s["total_output_tokens"] == 25 and s["out_tok_s"] == 5.0
    assert s["req_s"] == pytest.approx(0.6)
    assert s["in_tok_s"] == 80.0
    assert s["cache_hit_rate"] == pytest.approx(200 / 400)
    assert s["ttft_p50_s"] == pytest.approx(0.2) and s["ttft_p90_s"] == pytest.approx(0.28)
    assert s["lat_p50_s"] == pytest.approx(2.0) and s["lat_p90_s"] == pytest.approx(2.8)
    assert s["tpot_p50_s"] == pytest.approx(1.7 / 9, abs=1e-5)  # 0.9/9, 1.7/9, 2.8/4 -> median 1.7/9
    assert s["short_outputs"] == 1
    assert s["errors"] == ["boom"]


def test_sse_event_parsing():
    res = lt.ReqResult()
    ev = b'data: {"output_ids": [5], "meta_info": {"completion_tokens": 1, "prompt_tokens": 9, ' \
         b'"cached_tokens": 4, "finish_reason": null}}'
    assert lt._handle_event(ev, res, t0=10.0, now=10.5) is False
    assert res.ttft == pytest.approx(0.5) and res.prompt_tokens == 9 and res.cached_tokens == 4
    ev = b'data: {"output_ids": [5, 6], "meta_info": {"completion_tokens": 2, "prompt_tokens": 9, ' \
         b'"cached_tokens": 4, "finish_reason": {"type": "length", "length": 2}}}'
    lt._handle_event(ev, res, t0=10.0, now=11.0)
    assert res.latency == pytest.approx(1.0) and res.ttft == pytest.approx(0.5)
    assert res.completion_tokens == 2 and res.finish_reason["type"] == "length"
    assert lt._handle_event(b"data: [DONE]", res, 10.0, 11.1) is True
    # no meta_info.completion_tokens: fall back to len(output_ids)
    r2 = lt.ReqResult()
    lt._handle_event(b'data: {"output_ids": [1, 2, 3]}', r2, 0.0, 0.2)
    assert r2.completion_tokens == 3 and r2.ttft == pytest.approx(0.2)


def test_kv_flags_and_loopback():
    assert lt.kv_server_flags("bf16") == ["--attention-backend", "triton"]
    assert lt.kv_server_flags("fp8") == ["--attention-backend", "triton", "--kv-cache-dtype", "fp8_e4m3"]
    assert lt.kv_server_flags("k3v3") == ["--kv-quant", "turboquant", "--kv-quant-bits", "k3v3"]
    assert lt.kv_server_flags("bf16-fa3") == ["--attention-backend", "fa3"]
    assert lt.kv_server_flags("fp8-fa3") == ["--attention-backend", "fa3", "--kv-cache-dtype", "fp8_e4m3"]
    with pytest.raises(ValueError, match="unknown KV config 'bf16-flashinfer'"):
        lt.kv_server_flags("bf16-flashinfer")
    with pytest.raises(ValueError):
        lt.kv_server_flags("int8")
    assert lt._check_loopback("http://127.0.0.1:1/") == "http://127.0.0.1:1"
    for bad in ("http://10.0.0.1:80", "http://example.com"):
        with pytest.raises(ValueError):
            lt._check_loopback(bad)


def test_workloads_deterministic_and_shaped():
    a = lt.reference_workload(**lt.REFERENCE_DEFAULTS)
    assert a.variant == "default"
    q1 = lt.reference_workload(**lt.REFERENCE_QUICK, quick=True)
    q2 = lt.reference_workload(**lt.REFERENCE_QUICK, quick=True)
    assert q1.prompts == q2.prompts and q1.variant == "quick"
    assert lt.reference_workload(**lt.REFERENCE_QUICK, seed=1).prompts != q1.prompts
    assert len(a.prompts) == 96 and all(len(p) == 6000 for p in a.prompts)
    assert a.output_len == 400 and a.concurrency == 64
    assert all(lt.TOKEN_LO <= t < lt.TOKEN_HI for p in a.prompts[:4] for t in p)
    sp = lt.shared_prefix_workload(**lt.SP_DEFAULTS)
    assert len(sp.prompts) == 512 and all(len(p) == 4200 for p in sp.prompts)
    assert len(sp.warm_prompts) == 4
    for i in range(8):  # interleaved over the 4 prefixes
        assert sp.prompts[i][:4000] == sp.warm_prompts[i % 4][:4000]
        assert sp.prompts[i][:4000] != sp.prompts[i + 1][:4000]
    cold = lt.shared_prefix_workload(**{**lt.SP_DEFAULTS, "warm": False})
    assert cold.variant == "cold" and cold.warm_prompts == []
    assert lt.reference_workload(**{**lt.REFERENCE_DEFAULTS, "num_requests": 8}).variant.startswith("custom-")


def test_summary_ratios_and_targets():
    def r(kv, tok, ttft, wl="reference", pool=None):
        return {"workload": wl, "variant": "default", "kv": kv, "status": "ok", "gpu": "G",
                "out_tok_s": tok, "req_s": 1.0, "ttft_p50_s": ttft, "lat_p50_s": 1.0,
                "max_total_num_tokens": pool, "completed": 1, "num_requests": 1}
    res = [r("bf16", 920, 2.0, pool=166000), r("fp8", 1149, 1.5, pool=332000), r("k4v4", 1500, 1.0, pool=645000),
           r("k3v3", 1300, 1.2),
           r("fp8", 2000, 0.5, "shared-prefix"), r("k4v4", 2100, 0.4, "shared-prefix"),
           r("k3v3", 2100, 0.6, "shared-prefix")]
    s = lt.summarize(res)
    ref = next(g for g in s["groups"] if g["workload"] == "reference")["ratios"]
    assert ref["k4v4"]["out_tok_s_vs_bf16"] == pytest.approx(1500 / 920, abs=1e-3)
    assert ref["k4v4"]["out_tok_s_vs_fp8"] == pytest.approx(1500 / 1149, abs=1e-3)
    assert ref["k4v4"]["pool_vs_bf16"] == pytest.approx(645000 / 166000, abs=1e-3)
    assert ref["fp8"]["ttft_p50_speedup_vs_bf16"] == pytest.approx(2.0 / 1.5, abs=1e-3)
    t = {x["name"]: x["pass"] for x in s["targets"]}
    assert t["reference k4v4 out tok/s >= 1.5x bf16"] is True
    assert t["reference k4v4 out tok/s >= 1.2x fp8"] is True
    assert t["reference k3v3 out tok/s >= 1.2x fp8"] is False
    assert t["shared-prefix k4v4 TTFT p50 < fp8"] is True
    assert t["shared-prefix k3v3 TTFT p50 < fp8"] is False
    text = lt.summary_text({"results": res})
    assert "PASS" in text and "FAIL" in text and "== shared-prefix" in text


# ----------------------------------------------------------------------------- client vs fake server

def test_stream_generate_timing_and_errors():
    async def go():
        state = FakeState(ttft_s=0.05, itl_s=0.01)
        async with running_fake(state) as url, aiohttp.ClientSession() as s:
            ok = await lt.stream_generate(s, url, [2000] * 30, 5)
            err = await lt.stream_generate(s, url, [ERROR_TOKEN, 1, 2], 5)
            abort = await lt.stream_generate(s, url, [ABORT_TOKEN, 1, 2], 5)
            h500 = await lt.stream_generate(s, url, [HTTP500_TOKEN, 1], 5)
            again = await lt.stream_generate(s, url, [2000] * 30 + [7], 5)
        return ok, err, abort, h500, again

    ok, err, abort, h500, again = asyncio.run(go())
    assert ok.ok and ok.error is None and ok.completion_tokens == 5 and ok.chunks == 5
    assert 0.05 <= ok.ttft < 0.2
    assert ok.latency >= ok.ttft + 4 * 0.01 and ok.latency < 0.5
    assert ok.prompt_tokens == 30 and ok.cached_tokens == 0
    assert ok.finish_reason == {"type": "length", "length": 5}
    assert not err.ok and err.error == "boom"
    assert not abort.ok and "abort" in abort.error
    assert not h500.ok and h500.error.startswith("HTTP 500")
    assert again.ok and again.cached_tokens == 30 and again.prompt_tokens == 31


def test_run_workload_shared_prefix_stats():
    wl = lt.shared_prefix_workload(num_prefixes=3, prefix_len=200, requests_per_prefix=6, suffix_len=20,
                                   output_len=8, concurrency=4)

    async def go():
        state = FakeState(ttft_s=0.01, itl_s=0.002)
        async with running_fake(state) as url:
            stats = await lt.run_workload(url, wl, timeout_s=30, progress_s=0.05, warmup_requests=2,
                                          flush=lambda: lt._flush_url(url), log=lambda s: None)
        return stats, state

    stats, state = asyncio.run(go())
    assert stats["completed"] == 18 and stats["failed"] == 0 and not stats["timed_out"]
    assert state.max_in_flight == 4  # the semaphore, not more
    assert state.flushes == 1 and stats["flushed"] is True
    assert stats["jit_warmup"]["ok"] == 2 and stats["prefix_warmup"] == {"requests": 3, "ok": 3,
                                                                           "s": stats["prefix_warmup"]["s"]}
    assert stats["total_output_tokens"] == 18 * 8 and stats["short_outputs"] == 0
    assert stats["total_prompt_tokens"] == 18 * 220
    # warm prefixes: every timed request hits exactly its 200-token prefix
    assert stats["total_cached_tokens"] == 18 * 200
    assert stats["cache_hit_rate"] == pytest.approx(200 / 220, abs=1e-4)
    assert stats["out_tok_s"] == pytest.approx(18 * 8 / stats["duration_s"], rel=5e-3)  # duration_s is rounded to ms
    assert stats["req_s"] == pytest.approx(18 / stats["duration_s"], rel=5e-3)  # duration_s is rounded to ms
    assert 0.01 <= stats["ttft_p50_s"] <= stats["ttft_p90_s"] <= stats["lat_p90_s"]


def test_run_workload_timeout_keeps_partial_results():
    wl = lt.reference_workload(num_requests=6, input_len=16, output_len=20, concurrency=2)

    async def go():
        async with running_fake(FakeState(ttft_s=0.01, itl_s=0.01)) as url:
            t = time.perf_counter()
            stats = await lt.run_workload(url, wl, timeout_s=0.5, warmup_requests=0, log=lambda s: None)
            return stats, time.perf_counter() - t

    stats, wall = asyncio.run(go())
    assert stats["timed_out"] and 0 < stats["completed"] < 6 and wall < 3
    assert stats["duration_s"] == pytest.approx(0.5, abs=0.3)


def test_run_workload_sigterm_keeps_partial_results():
    wl = lt.reference_workload(num_requests=12, input_len=16, output_len=50, concurrency=2)
    old = signal.getsignal(signal.SIGTERM)

    async def go():
        async with running_fake(FakeState(ttft_s=0.01, itl_s=0.002)) as url:
            asyncio.get_running_loop().call_later(0.5, os.kill, os.getpid(), signal.SIGTERM)
            return await lt.run_workload(url, wl, timeout_s=30, warmup_requests=0, log=lambda s: None)

    try:
        stats = asyncio.run(go())
    finally:
        signal.signal(signal.SIGTERM, old)
    assert stats["interrupted"] == "SIGTERM" and not stats["timed_out"]
    assert 0 < stats["completed"] < 12 and stats["duration_s"] < 2


# ----------------------------------------------------------------------------- end to end

REQUIRED = ("workload", "kv", "max_total_num_tokens", "out_tok_s", "req_s", "ttft_p50_s", "lat_p50_s",
            "ttft_p90_s", "lat_p90_s", "cache_hit_rate", "gpu", "commit", "status", "variant", "retractions",
            "tpot_p50_s", "startup_s", "workload_params", "server_cmd")


def test_main_end_to_end_with_fake_launcher(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_sglang.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from test_loadtest import fake_server_cli\nfake_server_cli()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(lt, "get_provenance", lambda: {"gpu": "FakeGPU", "commit": "abc123",
                                                       "versions": {}, "date": "2026-01-01T00:00:00+00:00"})
    out = tmp_path / "res" / "lt.json"
    common = ["--quick", "--out", str(out), "--server-module", "fake_sglang", "--progress-s", "0.2",
              "--warmup-requests", "1", "--extra-server-args", "--log-level warning"]
    assert lt.main(["--configs", "bf16,k4v4", *common]) == 0
    doc = json.loads(out.read_text())
    assert doc["gpu"] == "FakeGPU" and doc["commit"] == "abc123"
    assert [(r["workload"], r["kv"]) for r in doc["results"]] == [
        ("reference", "bf16"), ("reference", "k4v4"), ("shared-prefix", "bf16"), ("shared-prefix", "k4v4")]
    for r in doc["results"]:
        for k in REQUIRED:
            assert k in r, k
        assert r["status"] == "ok" and r["completed"] == r["num_requests"] and r["variant"] == "quick"
        assert "--disable-prefill-cuda-graph" in r["server_cmd"] and "--log-level warning" in r["server_cmd"]
        assert "--mem-fraction-static 0.45" in r["server_cmd"]
    by = {(r["workload"], r["kv"]): r for r in doc["results"]}
    assert by[("reference", "bf16")]["max_total_num_tokens"] == 1000
    assert by[("reference", "k4v4")]["max_total_num_tokens"] == 3880
    assert by[("reference", "k4v4")]["server_info"]["attention_backend"] == "fake"
    assert by[("reference", "k4v4")]["server_log"] == {
        "max_total_num_tokens": 3880, "chunked_prefill_size": 8192, "max_prefill_tokens": 16384,
        "max_running_requests": 64, "context_len": 131072, "available_gpu_mem_gb": 12.34}
    assert "--kv-quant turboquant --kv-quant-bits k4v4" in by[("reference", "k4v4")]["server_cmd"]
    p = lt.SP_QUICK
    assert by[("shared-prefix", "k4v4")]["cache_hit_rate"] == pytest.approx(
        p["prefix_len"] / (p["prefix_len"] + p["suffix_len"]), abs=1e-4)
    assert by[("reference", "bf16")]["cache_hit_rate"] < 0.01
    assert (out.parent / "loadtest_server_k4v4.log").exists()

    # one more (workload, config) appended by a second invocation, this time against an
    # already running server (--server-url), here a fake one on a thread of this process
    state = FakeState(itl_s=0.0015, pool=2000)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_fake_app(state))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert lt.main(["--configs", "fp8", "--workloads", "reference", "--append", "--server-url", url,
                        *common]) == 0
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 5 and len(doc["invocations"]) == 2
    assert {r["kv"] for r in doc["results"] if r["workload"] == "reference"} == {"bf16", "fp8", "k4v4"}
    fp8 = next(r for r in doc["results"] if r["kv"] == "fp8")
    assert fp8["max_total_num_tokens"] == 2000 and fp8["server_url"] == url and state.flushes == 1
    groups = {g["workload"]: g for g in doc["summary"]["groups"]}
    assert groups["reference"]["ratios"]["k4v4"]["out_tok_s_vs_fp8"] is not None
    text = capsys.readouterr().out
    assert "estimated total" in text and "== reference (quick)" in text and "xfp8" in text
    assert lt.main(["--summarize", "--out", str(out)]) == 0

    # --merge: per-command files combined afterwards; later files win per key
    other = tmp_path / "other.json"
    doc2 = json.loads(out.read_text())
    doc2["results"] = [{**fp8, "gpu": "OtherGPU", "out_tok_s": 1.0}]
    other.write_text(json.dumps(doc2))
    merged = tmp_path / "merged.json"
    assert lt.main(["--merge", str(out), str(other), "--out", str(merged)]) == 0
    m = json.loads(merged.read_text())
    assert len(m["results"]) == 5 and m["gpu"] == "mixed: FakeGPU, OtherGPU"
    assert next(r for r in m["results"] if r["kv"] == "fp8")["out_tok_s"] == 1.0
    assert next(g for g in m["summary"]["groups"] if g["workload"] == "reference")["mixed_gpus"] is True


def test_server_failure_is_recorded(tmp_path, monkeypatch):
    (tmp_path / "broken_sglang.py").write_text(
        "import sys\nprint('ValueError: --kv-quant turboquant refuses this', flush=True)\nsys.exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(lt, "get_provenance", lambda: {"gpu": "FakeGPU", "commit": "abc", "date": "d"})
    out = tmp_path / "lt.json"
    rc = lt.main(["--configs", "k3v3", "--workloads", "reference", "--quick", "--out", str(out),
                  "--server-module", "broken_sglang"])
    assert rc == 1
    (r,) = json.loads(out.read_text())["results"]
    assert r["status"] == "server_failed" and "refuses this" in r["error"]


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fake_server_cli()


def test_free_port_is_below_the_ephemeral_range():
    """Servers started side by side must not race for a bind(0) port (2026-11-28 collision)."""
    import socket

    ports = {lt.free_port() for _ in range(20)}
    assert all(20000 <= p < 32000 for p in ports)
    with socket.socket() as s:  # the port really is free
        s.bind(("127.0.0.1", ports.pop()))
