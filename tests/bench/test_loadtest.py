"""``python -m sglang_tq.bench load`` on CPU: the streaming client (sglang_tq.bench.stream),
statistics and JSON against a fake SGLang server (aiohttp.web on 127.0.0.1) that emits
SGLang 0.5.17-shaped SSE chunks (``data: {"output_ids": [...], "meta_info": {...}}``, then
``data: [DONE]``; output_ids cumulative, or only the new ones as with
``--incremental-streaming-output``; one or several tokens per chunk), emulates the radix
cache's ``cached_tokens`` (longest common prefix with earlier prompts) and reports its
attention backend in ``/server_info`` the way SGLang does (the default backend, resolved,
when no ``--attention-backend`` is given). The end-to-end test runs ``main()`` with the fake
server as a subprocess in place of ``sglang.launch_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

import sglang_tq.bench.load as lt  # noqa: E402
from sglang_tq.bench import server as bench_server  # noqa: E402
from sglang_tq.bench import stream  # noqa: E402
from tests.bench.conftest import write_fake_launcher  # noqa: E402

ERROR_TOKEN, ABORT_TOKEN, HTTP500_TOKEN = 13, 14, 15
# one fake decode step: (kernel name, µs); each kernel is followed by 1 µs of idle GPU
FAKE_STEP_KERNELS = (
    ("nvjet_tst_128x64_64x5_gemm", 10.0),
    ("_tq_store_kernel", 3.0),
    ("_tq_decode_stage1", 12.0),
    ("_tq_decode_stage2", 4.0),
    ("rmsnorm_kernel", 2.0),
    ("elementwise_misc", 1.0),
)


# ----------------------------------------------------------------------------- fake server


class FakeState:
    def __init__(
        self,
        ttft_s=0.01,
        itl_s=0.002,
        pool=1000,
        ready_after_s=0.0,
        split=True,
        tokens_per_chunk=1,
        incremental=False,
        backend="fa3",
        info_extra=None,
    ):
        self.ttft_s, self.itl_s, self.pool, self.split = ttft_s, itl_s, pool, split
        self.tokens_per_chunk, self.incremental, self.backend = (
            tokens_per_chunk,
            incremental,
            backend,
        )
        self.info_extra = info_extra or {}
        self.ready_at = time.time() + ready_after_s
        self.cache: list[list[int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.flushes = 0
        self.profiles: list[dict] = []

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
        return web.json_response(
            {
                "max_total_num_tokens": state.pool,
                "max_running_requests": 64,
                "attention_backend": state.backend,
                "version": "0.5.17",
                "other": 1,
                **state.info_extra,
            }
        )

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
                await send(
                    {
                        "error": {
                            "message": "boom",
                            "type": "invalid_request_error",
                            "code": 400,
                            "retryable": False,
                        }
                    }
                )
            else:
                out = []
                sent = 0
                for k in range(1, n + 1):
                    out.append(1000 + k)
                    last = k == n or ids[0] == ABORT_TOKEN
                    if not last and k % state.tokens_per_chunk:
                        continue  # several tokens per chunk (e.g. SGLang's --stream-interval > 1)
                    fr = None
                    if last:
                        fr = (
                            {
                                "type": "abort",
                                "message": "aborted",
                                "status_code": 503,
                                "err_type": None,
                            }
                            if ids[0] == ABORT_TOKEN
                            else {"type": "length", "length": n}
                        )
                    meta = {
                        "id": f"r{state.requests}",
                        "finish_reason": fr,
                        "prompt_tokens": len(ids),
                        "weight_version": "default",
                        "num_retractions": 0,
                        "reasoning_tokens": 0,
                        "completion_tokens": k,
                        "cached_tokens": cached,
                    }
                    if last:
                        meta["e2e_latency"] = 0.0
                    await send(
                        {
                            "output_ids": out[sent:] if state.incremental else list(out),
                            "meta_info": meta,
                        }
                    )
                    sent = len(out)
                    if last:
                        break
                    await asyncio.sleep(state.itl_s)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            state.in_flight -= 1

    async def start_profile(request):  # writes a trace of num_steps fake decode steps
        body = await request.json()
        state.profiles.append(body)
        assert body["activities"] == ["GPU"] and state.in_flight == 1  # inside the stream

        def write():
            events, t = [], 0.0
            for _ in range(body["num_steps"]):
                for name, dur in FAKE_STEP_KERNELS:
                    events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
                    t += dur + 1.0  # 1 us idle after each kernel
            events.append(
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 99}
            )
            path = Path(body["output_dir"]) / f"{body['profile_id']}-TP-0.trace.json.gz"
            with gzip.open(path, "wt") as f:
                json.dump({"traceEvents": events}, f)

        asyncio.get_running_loop().call_later(0.05, write)
        return web.Response(text="Start profiling.\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/start_profile", start_profile)
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
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--cuda-graph-max-bs-decode", type=int, default=None)
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--incremental-streaming-output", action="store_true")
    ap.add_argument("--disable-prefill-cuda-graph", action="store_true")
    args, _ = ap.parse_known_args()
    assert args.host == "127.0.0.1"
    if args.kv_quant == "turboquant":
        pool, itl = {"k4v4": 3880, "k3v3": 5100}[args.kv_quant_bits], 0.001
        backend = "turboquant"  # the plugin sets attention_backend itself
    elif args.kv_cache_dtype == "fp8_e4m3":
        pool, itl = 2000, 0.0015
    else:
        pool, itl = 1000, 0.002
    if args.kv_quant != "turboquant":
        backend = args.attention_backend or "fa3"  # what SGLang resolves on Hopper
        if args.attention_backend is None:
            print("Attention backend not specified. Use fa3 backend by default.", flush=True)
    print(
        f"KV Cache is allocated. max_total_num_tokens={pool}, chunked_prefill_size=8192, "
        f"max_prefill_tokens=16384, max_running_requests=64, context_len=131072, "
        f"available_gpu_mem=12.34 GB",
        flush=True,
    )
    info = {
        "cuda_graph_max_bs_decode": args.cuda_graph_max_bs_decode,
        "stream_interval": args.stream_interval,
        "incremental_streaming_output": args.incremental_streaming_output,
        "mem_fraction_static": args.mem_fraction_static,
        "cuda_graph_config": {
            "decode": {"backend": "full"},
            "prefill": {"backend": "disabled" if args.disable_prefill_cuda_graph else "breakable"},
        },
    }
    state = FakeState(
        itl_s=itl,
        pool=pool,
        ready_after_s=0.1,
        incremental=args.incremental_streaming_output,
        tokens_per_chunk=args.stream_interval,
        backend=backend,
        info_extra=info,
    )
    web.run_app(
        make_fake_app(state), host=args.host, port=args.port, print=None, handle_signals=True
    )


# ----------------------------------------------------------------------------- pure logic


def test_kernel_classes():
    names = {
        "_tq_store_kernel": "kv_write",
        "store_cache_kernel<...>": "kv_write",
        "void flash::flash_fwd_kernel<...>": "attention",
        "_tq_decode_stage2": "attention",
        "flash::FlashAttnFwdCombine<...>": "attention",
        "nvjet_tst_64x8_64x16_4x1_v_bz_TNT": "gemm",
        "void cutlass::device_kernel<...>": "gemm",
        "FusedAddRMSNormKernel": "norm",
        "apply_rope_pos_ids_cos_sin_cache": "rope",
        "void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>": "norm",
        "act_and_mul_kernel<silu>": "activation",
        "vectorized_elementwise_kernel": "other",
    }
    for name, cls in names.items():
        assert lt.kernel_class(name) == cls, name


def test_summarize_kernel_trace_per_step():
    events, t = [], 100.0
    for _ in range(4):
        for name, dur in FAKE_STEP_KERNELS:
            events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
            t += dur + 1.0
    events.append(
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 1e6}
    )  # not a kernel
    s = lt.summarize_kernel_trace(events, 4, top=3)
    assert s["kernels_per_step"] == 6 and s["busy_us_per_step"] == 32.0
    assert s["span_us_per_step"] == pytest.approx(
        (4 * 38 - 1) / 4
    )  # the last idle µs is not in the span
    assert s["class_us_per_step"] == {
        "attention": 16.0,
        "gemm": 10.0,
        "kv_write": 3.0,
        "norm": 2.0,
        "other": 1.0,
    }
    assert [k["name"] for k in s["top_kernels"]] == [
        "_tq_decode_stage1",
        "nvjet_tst_128x64_64x5_gemm",
        "_tq_decode_stage2",
    ]
    assert s["top_kernels"][0] == {
        "name": "_tq_decode_stage1",
        "class": "attention",
        "us_per_step": 12.0,
        "launches_per_step": 1.0,
        "us_per_launch": 12.0,
    }
    assert lt.summarize_kernel_trace([], 4) == {"steps": 4, "kernels": 0}


def test_profile_decode_steps_against_fake(tmp_path):
    state = FakeState(itl_s=0.002)

    async def go():
        async with running_fake(state) as url:
            return await lt.profile_decode_steps(
                url, [2000] * 50, 5, tmp_path / "prof", lead_tokens=4
            )

    prof = asyncio.run(go())
    assert state.profiles[0]["num_steps"] == 5 and state.requests == 1
    assert Path(state.profiles[0]["output_dir"]) == (tmp_path / "prof").resolve()
    assert prof["steps"] == 5 and prof["busy_us_per_step"] == 32.0 and prof["kernels_per_step"] == 6
    assert prof["class_us_per_step"]["kv_write"] == 3.0 and prof["trace"].endswith(".trace.json.gz")


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 5, 17):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert lt.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert lt.percentile([], 50) is None


def test_compute_stats_exact():
    R = stream.ReqResult
    results = [
        R(
            ok=True,
            ttft=0.1,
            latency=1.0,
            completion_tokens=10,
            prompt_tokens=100,
            cached_tokens=50,
        ),
        R(ok=True, ttft=0.3, latency=2.0, completion_tokens=10, prompt_tokens=100, cached_tokens=0),
        R(
            ok=True,
            ttft=0.2,
            latency=3.0,
            completion_tokens=5,
            prompt_tokens=200,
            cached_tokens=150,
        ),
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
    assert s["tpot_p50_s"] == pytest.approx(
        1.7 / 9, abs=1e-5
    )  # 0.9/9, 1.7/9, 2.8/4 -> median 1.7/9
    assert s["short_outputs"] == 1
    assert s["errors"] == ["boom"]


def test_sse_event_parsing():
    res = stream.ReqResult()
    ev = (
        b'data: {"output_ids": [5], "meta_info": {"completion_tokens": 1, "prompt_tokens": 9, '
        b'"cached_tokens": 4, "finish_reason": null}}'
    )
    assert stream.handle_event(ev, res, t0=10.0, now=10.5) is False
    assert res.ttft == pytest.approx(0.5) and res.prompt_tokens == 9 and res.cached_tokens == 4
    ev = (
        b'data: {"output_ids": [5, 6], "meta_info": {"completion_tokens": 2, "prompt_tokens": 9, '
        b'"cached_tokens": 4, "finish_reason": {"type": "length", "length": 2}}}'
    )
    stream.handle_event(ev, res, t0=10.0, now=11.0)
    assert res.latency == pytest.approx(1.0) and res.ttft == pytest.approx(0.5)
    assert res.completion_tokens == 2 and res.finish_reason["type"] == "length"
    assert stream.handle_event(b"data: [DONE]", res, 10.0, 11.1) is True
    # no meta_info.completion_tokens: fall back to len(output_ids)
    r2 = stream.ReqResult()
    stream.handle_event(b'data: {"output_ids": [1, 2, 3]}', r2, 0.0, 0.2)
    assert r2.completion_tokens == 3 and r2.ttft == pytest.approx(0.2)


def test_kv_flags_and_loopback():
    # the baselines run SGLang's default backend: no --attention-backend at all
    assert lt.kv_server_flags("bf16") == []
    assert lt.kv_server_flags("fp8") == ["--kv-cache-dtype", "fp8_e4m3"]
    assert lt.kv_server_flags("bf16-triton") == ["--attention-backend", "triton"]
    assert lt.kv_server_flags("fp8-triton") == [
        "--attention-backend",
        "triton",
        "--kv-cache-dtype",
        "fp8_e4m3",
    ]
    assert lt.kv_server_flags("k3v3") == ["--kv-quant", "turboquant", "--kv-quant-bits", "k3v3"]
    assert lt.kv_server_flags("bf16-fa3") == ["--attention-backend", "fa3"]
    assert lt.kv_server_flags("fp8-fa3") == [
        "--attention-backend",
        "fa3",
        "--kv-cache-dtype",
        "fp8_e4m3",
    ]
    assert [lt.expected_backend(k) for k in ("bf16", "fp8", "bf16-triton", "fp8-fa3", "k4v4")] == [
        None,
        None,
        "triton",
        "fa3",
        "turboquant",
    ]
    with pytest.raises(ValueError, match="unknown KV config 'bf16-flashinfer'"):
        lt.kv_server_flags("bf16-flashinfer")
    with pytest.raises(ValueError):
        lt.kv_server_flags("int8")
    assert lt.check_loopback("http://127.0.0.1:1/") == "http://127.0.0.1:1"
    for bad in ("http://10.0.0.1:80", "http://example.com"):
        with pytest.raises(ValueError):
            lt.check_loopback(bad)


def _flag(cmd, name):
    assert cmd.count(name) == 1, (name, cmd)
    return cmd[cmd.index(name) + 1]


def test_server_commands_share_every_setting():
    args = lt.parse_args(
        ["--configs", "bf16,fp8,bf16-triton,fp8-triton,bf16-fa3,fp8-fa3,k4v4,k3v3"]
    )
    assert args.mem_fraction_static == 0.25 and args.cuda_graph_max_bs == 128
    cmds = {kv: lt.server_command(args, kv, 20000) for kv in args.configs}
    common = None
    for kv, cmd in cmds.items():
        assert not any("prefill-cuda-graph" in a or a == "--disable-cuda-graph" for a in cmd), cmd
        assert _flag(cmd, "--mem-fraction-static") == "0.25"
        assert _flag(cmd, "--cuda-graph-max-bs-decode") == "128"
        assert _flag(cmd, "--stream-interval") == "1"
        assert "--incremental-streaming-output" in cmd
        assert (
            _flag(cmd, "--load-format") == "dummy"
            and _flag(cmd, "--model-path") == lt.DEFAULT_MODEL
        )
        rest = [a for a in cmd if a not in lt.kv_server_flags(kv)]
        common = common or rest
        assert rest == common  # everything but the config's own flags is identical
    for kv in ("bf16", "fp8", "k4v4", "k3v3"):
        assert "--attention-backend" not in cmds[kv]
    assert _flag(cmds["bf16-triton"], "--attention-backend") == "triton"
    assert _flag(cmds["fp8-fa3"], "--attention-backend") == "fa3"
    a2 = lt.parse_args(
        [
            "--mem-fraction-static",
            "0.3",
            "--cuda-graph-max-bs",
            "64",
            "--cumulative-stream",
            "--extra-server-args",
            "--log-level warning",
        ]
    )
    c2 = lt.server_command(a2, "bf16", 20001)
    assert (
        _flag(c2, "--mem-fraction-static") == "0.3"
        and _flag(c2, "--cuda-graph-max-bs-decode") == "64"
    )
    assert "--incremental-streaming-output" not in c2 and c2[-2:] == ["--log-level", "warning"]
    # extra args may not turn prefill graphs off or re-label a config
    for bad in (
        "--disable-prefill-cuda-graph",
        "--attention-backend triton",
        "--kv-cache-dtype=fp8_e4m3",
        "--disable-cuda-graph",
        "--stream-interval 4",
    ):
        with pytest.raises(ValueError, match="may not contain"):
            lt.check_extra_server_args(bad)
        with pytest.raises(SystemExit):
            lt.parse_args(["--extra-server-args", bad])
    assert lt._flag_value(["--a", "1", "--b=2", "--a=3"], "--a") == "3"
    # the old opt-in flag is still accepted (graphs are always on now)
    assert "--disable-prefill-cuda-graph" not in lt.server_command(
        lt.parse_args(["--prefill-cuda-graph"]), "k4v4", 1
    )


def test_detect_backend_and_settings():
    d = lt.detect_backend("bf16", {"attention_backend": "fa3"}, "flashinfer")
    assert d == {
        "backend": "fa3",
        "backend_source": "server_info",
        "prefill_backend": "fa3",
        "decode_backend": "fa3",
    }
    assert lt.detect_backend("fp8", {}, "fa3")["backend_source"] == "server log"
    assert lt.detect_backend("bf16-triton", {}, None) == {
        "backend": "triton",
        "backend_source": "flags",
        "prefill_backend": "triton",
        "decode_backend": "triton",
    }
    assert lt.detect_backend("bf16", {}, None)["backend"] == "unknown"
    mism = lt.detect_backend("bf16-fa3", {"attention_backend": "triton"})
    assert mism["backend"] == "triton" and "fa3" in mism["backend_mismatch"]
    split = lt.detect_backend(
        "k4v4", {"attention_backend": "turboquant", "prefill_attention_backend": "fa3"}
    )
    assert (
        split["backend"] == "turboquant"
        and split["prefill_backend"] == "fa3"
        and "backend_mismatch" not in split
    )
    assert bench_server._DEFAULT_BACKEND_RE.findall(
        "[2026] INFO overrides.py:2025: Attention backend not specified. Use fa3 backend by default."
    ) == ["fa3"]
    args = lt.parse_args([])
    cmd = lt.server_command(args, "bf16", 1)
    st = lt.server_settings(args, "bf16", cmd, {})
    assert st == {
        "mem_fraction_static": 0.25,
        "cuda_graph_max_bs": 128,
        "stream_interval": 1,
        "incremental_stream": True,
        "prefill_cuda_graph": True,
    }
    off = {"cuda_graph_config": {"prefill": {"backend": "disabled"}}}
    assert lt.server_settings(args, "bf16", cmd, off)["prefill_cuda_graph"] is False
    assert lt.prefill_graph_state({}, cmd + ["--disable-prefill-cuda-graph"]) is False
    assert lt.prefill_graph_state({}, None) is None


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
    assert lt.reference_workload(**{**lt.REFERENCE_DEFAULTS, "num_requests": 8}).variant.startswith(
        "custom-"
    )


def test_new_workloads_shapes():
    lg = lt.long_gen_workload(**lt.LONG_GEN_DEFAULTS)
    assert lg.name == "long-gen" and lg.variant == "default"
    assert len(lg.prompts) == 128 and all(len(p) == 1000 for p in lg.prompts)
    assert lg.output_len == 4000 and lg.concurrency == 128
    assert (
        lg.prompts
        != lt.reference_workload(
            num_requests=128, input_len=1000, output_len=4000, concurrency=128
        ).prompts
    )  # own seed stream
    args = lt.parse_args([])
    assert args.workloads == ["reference", "long-gen", "single-stream"]
    wls = lt.build_workloads(args)
    assert [w.name for w in wls] == [
        "reference",
        "long-gen",
        "single-stream-4k",
        "single-stream-32k",
    ]
    assert all(w.variant == "default" for w in wls)
    for w, ctx in zip(wls[2:], (4096, 32768)):
        assert w.family == "single-stream" and w.concurrency == 1 and w.output_len == 512
        assert len(w.prompts) == 3 and all(len(p) == ctx for p in w.prompts)
        assert w.params["context"] == ctx and w.warmup_requests == 1 and w.warmup_len == ctx
        assert (
            len({tuple(p[:50]) for p in w.prompts}) == 3
        )  # fresh prompts: no radix hits between them
    quick = lt.build_workloads(lt.parse_args(["--quick"]))
    assert [(w.name, w.variant) for w in quick] == [
        ("reference", "quick"),
        ("long-gen", "quick"),
        ("single-stream-1k", "quick"),
        ("single-stream-4k", "quick"),
    ]
    assert sum(len(w.prompts) * w.output_len for w in quick) < 5000
    custom = lt.build_workloads(
        lt.parse_args(
            [
                "--workloads",
                "single-stream,long-gen",
                "--ss-contexts",
                "8192",
                "--ss-requests",
                "5",
                "--lg-output-len",
                "100",
            ]
        )
    )
    assert [w.name for w in custom] == ["single-stream-8k", "long-gen"]
    assert len(custom[0].prompts) == 5 and custom[0].variant.startswith("custom-")
    assert custom[1].output_len == 100 and custom[1].variant.startswith("custom-")
    assert lt.single_stream_name(3000) == "single-stream-3000"
    with pytest.raises(SystemExit):
        lt.parse_args(["--workloads", "long"])
    names = ["shared-prefix", "single-stream-32k", "long-gen", "single-stream-4k", "reference"]
    assert sorted(names, key=lt.workload_sort_key) == [
        "reference",
        "long-gen",
        "single-stream-4k",
        "single-stream-32k",
        "shared-prefix",
    ]


def test_estimates_know_the_new_workloads():
    wls = {w.name: w for w in lt.build_workloads(lt.parse_args([]))}
    W = lt.EST_WARMUP_S
    assert lt.estimate_run_s(wls["long-gen"], "bf16") == pytest.approx(W + 128 * 4000 / 3786)
    assert lt.estimate_run_s(wls["long-gen"], "fp8") == pytest.approx(W + 128 * 4000 / 5582)
    assert lt.estimate_run_s(wls["long-gen"], "k4v4") == pytest.approx(W + 128 * 4000 / 6000)
    assert lt.estimate_run_s(wls["reference"], "bf16") == pytest.approx(W + 96 * 400 / 1227)
    assert lt.estimate_run_s(wls["long-gen"], "bf16-triton") > lt.estimate_run_s(
        wls["long-gen"], "bf16"
    )
    ss32, ss4 = (
        lt.estimate_run_s(wls["single-stream-32k"], "bf16"),
        lt.estimate_run_s(wls["single-stream-4k"], "bf16"),
    )
    assert ss4 < ss32 < 60 and ss32 > W + 3 * 512 * lt.EST_ITL_S["bf16"]
    # every config with all three workloads fits one 600 s GPU-host command at the default budget
    for kv in lt.DEFAULT_CONFIGS:
        t = lt.estimate_config_s(list(wls.values()), kv)
        assert lt.EST_STARTUP_S + 150 < t < lt.DEFAULT_BUDGET_HINT_S, (kv, t)
    text, total = lt.plan_text(lt.parse_args(["--configs", "bf16,k4v4"]), list(wls.values()))
    assert "bf16        ~377 s = start ~140 s" in text and "long-gen ~145 s" in text
    assert total == pytest.approx(
        lt.estimate_config_s(list(wls.values()), "bf16")
        + lt.estimate_config_s(list(wls.values()), "k4v4")
    )


def test_itl_from_chunks():
    # one token per chunk: the gaps themselves; the first chunk only sets TTFT
    r = stream.itl_from_arrivals([(0.5, 1), (0.51, 2), (0.53, 3), (0.54, 4)])
    assert r.itl == pytest.approx([0.01, 0.02, 0.01]) and r.multi_token_chunks == 0
    assert r.first_chunk_tokens == 1 and r.max_chunk_tokens == 1 and r.arrivals == 4
    # a chunk with 3 tokens after 30 ms is three 10 ms gaps, not one 30 ms gap
    r = stream.itl_from_arrivals([(1.0, 2), (1.01, 3), (1.04, 6), (1.04, 6), (1.05, 7)])
    assert r.itl == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.01])
    assert r.first_chunk_tokens == 2 and r.multi_token_chunks == 1 and r.max_chunk_tokens == 3
    assert len(r.itl) == 7 - 2  # every token but those of the first chunk has a gap
    assert stream.itl_from_arrivals([]).itl == [] and stream.itl_from_arrivals([(1.0, 5)]).itl == []
    # pooled percentiles in milliseconds
    a = stream.ReqResult(
        ok=True, ttft=0.1, latency=0.2, completion_tokens=4, itl=[0.001, 0.002, 0.003]
    )
    b = stream.ReqResult(
        ok=True,
        ttft=0.1,
        latency=0.2,
        completion_tokens=3,
        itl=[0.010, 0.004],
        multi_token_chunks=1,
        max_chunk_tokens=2,
        arrivals=2,
    )
    st = lt.compute_stats([a, b], 1.0, 2)
    assert st["itl_p50_ms"] == pytest.approx(3.0) and st["itl_tokens"] == 5
    assert st["itl_p90_ms"] == pytest.approx(lt.percentile([1, 2, 3, 4, 10], 90))
    assert st["itl_mean_ms"] == pytest.approx(4.0) and st["multi_token_chunks"] == 1
    assert st["max_tokens_per_chunk"] == 2
    assert lt.compute_stats([], 1.0, 0)["itl_p50_ms"] is None


def test_sse_reads_bring_tokens_per_arrival():
    """Several SSE events in one network read arrive together: their tokens share one gap."""
    res = stream.ReqResult(incremental=True)
    ev = b'data: {"output_ids": [7], "meta_info": {"finish_reason": null}}'
    stream.handle_event(ev, res, 0.0, 1.0)  # no completion_tokens: incremental ids add up
    res.note_arrival(1.0)
    stream.handle_event(ev, res, 0.0, 1.03)
    stream.handle_event(ev, res, 0.0, 1.03)
    res.note_arrival(1.03)
    assert res.completion_tokens == 3 and res.itl == pytest.approx([0.015, 0.015])
    assert res.multi_token_chunks == 1 and res.ttft == pytest.approx(1.0)


def _row(kv, tok, ttft, wl="reference", pool=None, itl=None, backend=None, status="ok"):
    return {
        "workload": wl,
        "variant": "default",
        "kv": kv,
        "status": status,
        "gpu": "G",
        "backend": backend
        or ("turboquant" if kv.startswith("k") else "triton" if "triton" in kv else "fa3"),
        "out_tok_s": tok,
        "req_s": 1.0,
        "ttft_p50_s": ttft,
        "lat_p50_s": 1.0,
        "itl_p50_ms": itl,
        "max_total_num_tokens": pool,
        "completed": 1,
        "num_requests": 1,
    }


def test_summary_ratios_and_targets():
    r = _row
    res = [
        r("bf16", 1227, 2.0, pool=161452),
        r("fp8", 1476, 1.5, pool=322905),
        r("k4v4", 1900, 1.0, pool=626000),
        r("k3v3", 1800, 1.2),
        r("bf16-triton", 1048, 2.5),
        r("fp8-triton", 1220, 2.2),
        r("bf16", 3786, 5, "long-gen"),
        r("fp8", 5582, 4, "long-gen"),
        r("k4v4", 7900, 4, "long-gen"),
        r("k3v3", 7000, 4, "long-gen"),
        r("bf16", 100, 0.3, "single-stream-4k", itl=4.98),
        r("fp8", 100, 0.3, "single-stream-4k", itl=5.07),
        r("k4v4", 100, 0.3, "single-stream-4k", itl=4.90),
        r("bf16", 100, 2.0, "single-stream-32k", itl=5.86),
        r("k4v4", 100, 2.0, "single-stream-32k", itl=6.64),
        r("fp8", 2000, 0.5, "shared-prefix"),
        r("k4v4", 2100, 0.4, "shared-prefix"),
        r("k3v3", 2100, 0.6, "shared-prefix"),
    ]
    s = lt.summarize(res)
    groups = {g["workload"]: g for g in s["groups"]}
    assert list(groups) == [
        "reference",
        "long-gen",
        "single-stream-4k",
        "single-stream-32k",
        "shared-prefix",
    ]
    ref = groups["reference"]["ratios"]
    assert ref["k4v4"]["out_tok_s_vs_bf16"] == pytest.approx(1900 / 1227, abs=1e-3)
    assert ref["k4v4"]["out_tok_s_vs_fp8"] == pytest.approx(1900 / 1476, abs=1e-3)
    assert ref["k4v4"]["pool_vs_bf16"] == pytest.approx(626000 / 161452, abs=1e-3)
    assert ref["fp8"]["ttft_p50_speedup_vs_bf16"] == pytest.approx(2.0 / 1.5, abs=1e-3)
    # the Triton rows are extra rows against the default-backend baselines, never baselines themselves
    assert ref["bf16-triton"]["out_tok_s_vs_bf16"] == pytest.approx(1048 / 1227, abs=1e-3)
    assert groups["reference"]["baseline_backends"] == {"bf16": "fa3", "fp8": "fa3"}
    assert groups["single-stream-4k"]["ratios"]["k4v4"]["itl_p50_vs_bf16"] == pytest.approx(
        4.90 / 4.98, abs=1e-3
    )
    assert groups["single-stream-32k"]["ratios"]["k4v4"]["itl_p50_vs_fp8"] is None  # no fp8 row
    t = {x["name"]: x["pass"] for x in s["targets"]}
    assert t == {
        "reference k4v4 out tok/s >= 1.5x bf16": True,  # 1.549
        "reference k4v4 out tok/s >= 1.25x fp8": True,  # 1.287
        "reference k3v3 out tok/s >= 1.5x bf16": False,  # 1.467
        "reference k3v3 out tok/s >= 1.25x fp8": False,  # 1.220
        "long-gen k4v4 out tok/s >= 2.0x bf16": True,  # 2.087
        "long-gen k4v4 out tok/s >= 1.4x fp8": True,  # 1.415
        "long-gen k3v3 out tok/s >= 2.0x bf16": False,  # 1.849
        "long-gen k3v3 out tok/s >= 1.4x fp8": False,  # 1.254
        "single-stream-4k k4v4 ITL p50 <= bf16": True,
        "single-stream-32k k4v4 ITL p50 <= bf16": False,
        "shared-prefix k4v4 TTFT p50 < fp8": True,
        "shared-prefix k3v3 TTFT p50 < fp8": False,
    }
    # a missing baseline or an incomplete run gives "n/a", not a pass
    s2 = lt.summarize(
        [
            r("fp8", 1476, 1.5),
            r("k4v4", 3000, 1.0),
            r("bf16", 1, 1, "long-gen", status="partial"),
            r("k4v4", 9000, 1, "long-gen"),
        ]
    )
    t2 = {x["name"]: x["pass"] for x in s2["targets"]}
    assert (
        t2["reference k4v4 out tok/s >= 1.5x bf16"] is None
        and t2["reference k4v4 out tok/s >= 1.25x fp8"]
    )
    assert t2["long-gen k4v4 out tok/s >= 2.0x bf16"] is None
    text = lt.summary_text({"results": res})
    assert "[PASS] long-gen k4v4 out tok/s >= 2.0x bf16: 2.087x" in text
    assert "[FAIL] single-stream-32k k4v4 ITL p50 <= bf16: 6.64 ms (bf16 5.86 ms)" in text
    assert "== single-stream-4k" in text and "== shared-prefix" in text and "ITL/bf16" in text
    line = next(x for x in text.splitlines() if x.startswith("bf16-triton"))
    assert line.split()[1] == "triton" and " 0.85 " in line  # backend column, x bf16
    # baselines on different backends are flagged
    warn = lt.summary_text({"results": [r("bf16", 1, 1, backend="triton"), r("fp8", 1, 1)]})
    assert "the baselines ran different backends (bf16 triton, fp8 fa3)" in warn


def test_legacy_rows_are_relabelled(tmp_path):
    """Before this change bf16/fp8 meant --attention-backend triton: such rows must not
    become the default-backend baselines when an old file is summarized or merged."""
    old = [
        {
            "workload": "reference",
            "variant": "default",
            "kv": "bf16",
            "status": "ok",
            "out_tok_s": 1000,
            "kv_flags": ["--attention-backend", "triton"],
            "server_info": {"attention_backend": "triton"},
        },
        {
            "workload": "reference",
            "variant": "default",
            "kv": "fp8-fa3",
            "status": "ok",
            "out_tok_s": 1400,
            "kv_flags": ["--attention-backend", "fa3", "--kv-cache-dtype", "fp8_e4m3"],
        },
        {
            "workload": "reference",
            "variant": "default",
            "kv": "k4v4",
            "status": "ok",
            "out_tok_s": 1500,
            "kv_flags": ["--kv-quant", "turboquant", "--kv-quant-bits", "k4v4"],
        },
    ]
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"results": old}))
    doc = lt.load_doc(f)
    assert [(r["kv"], r["backend"]) for r in doc["results"]] == [
        ("bf16-triton", "triton"),
        ("fp8-fa3", "fa3"),
        ("k4v4", "turboquant"),
    ]
    t = {x["name"]: x["pass"] for x in lt.summarize(doc["results"])["targets"]}
    assert t["reference k4v4 out tok/s >= 1.5x bf16"] is None
    new = _row("bf16", 1227, 1.0)
    assert lt.upgrade_row(dict(new)) == new


# ----------------------------------------------------------------------------- client vs fake server


def test_stream_generate_timing_and_errors():
    async def go():
        state = FakeState(ttft_s=0.05, itl_s=0.01)
        async with running_fake(state) as url, aiohttp.ClientSession() as s:
            ok = await stream.stream_generate(s, url, [2000] * 30, 5)
            err = await stream.stream_generate(s, url, [ERROR_TOKEN, 1, 2], 5)
            abort = await stream.stream_generate(s, url, [ABORT_TOKEN, 1, 2], 5)
            h500 = await stream.stream_generate(s, url, [HTTP500_TOKEN, 1], 5)
            again = await stream.stream_generate(s, url, [2000] * 30 + [7], 5)
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
    assert len(ok.itl) == 4 and all(0.009 <= g < 0.1 for g in ok.itl) and ok.multi_token_chunks == 0


@pytest.mark.parametrize("incremental", [False, True])
def test_stream_itl_is_per_token_with_multi_token_chunks(incremental):
    """Chunks of 3 tokens every 30 ms: ITL is ~10 ms per token, not 30 ms per chunk."""

    async def go():
        state = FakeState(
            ttft_s=0.02, itl_s=0.03, tokens_per_chunk=3, incremental=incremental, split=False
        )
        async with running_fake(state) as url, aiohttp.ClientSession() as s:
            return await stream.stream_generate(s, url, [2000] * 8, 10, incremental=incremental)

    r = asyncio.run(go())
    assert r.ok and r.completion_tokens == 10  # chunks of 3, 3, 3, then the final 1
    assert r.first_chunk_tokens == 3 and r.multi_token_chunks == 2 and r.max_chunk_tokens == 3
    assert len(r.itl) == 7
    st = lt.compute_stats([r], 1.0, 1)
    assert 9.0 <= st["itl_p50_ms"] < 16.0, st["itl_p50_ms"]
    assert max(r.itl) >= 0.025  # the last chunk carries one token after a full 30 ms gap
    assert sorted(r.itl)[:6] == pytest.approx(
        [sorted(r.itl)[0]] * 6, rel=0.5
    )  # 3-token chunks: 6 equal thirds


def _run_on_fake(wl, itl_s, progress_s, warmup_requests, ttft_s=0.01):
    """run_workload against a fresh fake server with a flush; (stats, server state)."""

    async def go():
        state = FakeState(ttft_s=ttft_s, itl_s=itl_s)
        async with running_fake(state) as url:
            stats = await lt.run_workload(
                url,
                wl,
                timeout_s=30,
                progress_s=progress_s,
                warmup_requests=warmup_requests,
                flush=lambda: lt._flush_url(url),
                log=lambda s: None,
            )
        return stats, state

    return asyncio.run(go())


def test_run_workload_single_stream_is_sequential():
    wl = lt.single_stream_workload(64, num_requests=3, output_len=6)

    stats, state = _run_on_fake(wl, itl_s=0.005, progress_s=5, warmup_requests=4)
    assert (
        state.max_in_flight == 1 and state.requests == 1 + 3
    )  # one warm-up of the full context, 3 timed
    assert stats["jit_warmup"]["requests"] == 1 and stats["jit_warmup"]["input_len"] == 64
    assert stats["completed"] == 3 and stats["itl_tokens"] == 3 * 5
    assert 4.5 <= stats["itl_p50_ms"] < 30


def test_run_workload_shared_prefix_stats():
    wl = lt.shared_prefix_workload(
        num_prefixes=3,
        prefix_len=200,
        requests_per_prefix=6,
        suffix_len=20,
        output_len=8,
        concurrency=4,
    )

    stats, state = _run_on_fake(wl, itl_s=0.002, progress_s=0.05, warmup_requests=2)
    assert stats["completed"] == 18 and stats["failed"] == 0 and not stats["timed_out"]
    assert state.max_in_flight == 4  # the semaphore, not more
    assert state.flushes == 1 and stats["flushed"] is True
    assert stats["jit_warmup"]["ok"] == 2 and stats["prefix_warmup"] == {
        "requests": 3,
        "ok": 3,
        "s": stats["prefix_warmup"]["s"],
    }
    assert stats["total_output_tokens"] == 18 * 8 and stats["short_outputs"] == 0
    assert stats["total_prompt_tokens"] == 18 * 220
    # warm prefixes: every timed request hits exactly its 200-token prefix
    assert stats["total_cached_tokens"] == 18 * 200
    assert stats["cache_hit_rate"] == pytest.approx(200 / 220, abs=1e-4)
    assert stats["out_tok_s"] == pytest.approx(
        18 * 8 / stats["duration_s"], rel=5e-3
    )  # duration_s is rounded to ms
    assert stats["req_s"] == pytest.approx(
        18 / stats["duration_s"], rel=5e-3
    )  # duration_s is rounded to ms
    assert 0.01 <= stats["ttft_p50_s"] <= stats["ttft_p90_s"] <= stats["lat_p90_s"]


def test_run_workload_timeout_keeps_partial_results():
    wl = lt.reference_workload(num_requests=6, input_len=16, output_len=20, concurrency=2)

    async def go():
        async with running_fake(FakeState(ttft_s=0.01, itl_s=0.01)) as url:
            t = time.perf_counter()
            stats = await lt.run_workload(
                url, wl, timeout_s=0.5, warmup_requests=0, log=lambda s: None
            )
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
            return await lt.run_workload(
                url, wl, timeout_s=30, warmup_requests=0, log=lambda s: None
            )

    try:
        stats = asyncio.run(go())
    finally:
        signal.signal(signal.SIGTERM, old)
    assert stats["interrupted"] == "SIGTERM" and not stats["timed_out"]
    assert 0 < stats["completed"] < 12 and stats["duration_s"] < 2


# ----------------------------------------------------------------------------- end to end

REQUIRED = (
    "workload",
    "kv",
    "backend",
    "out_tok_s",
    "ttft_p50_s",
    "itl_p50_ms",
    "max_total_num_tokens",
    "gpu",
    "commit",
    "req_s",
    "lat_p50_s",
    "ttft_p90_s",
    "itl_p90_ms",
    "lat_p90_s",
    "cache_hit_rate",
    "status",
    "variant",
    "retractions",
    "tpot_p50_s",
    "startup_s",
    "workload_params",
    "server_cmd",
    "backend_source",
    "mem_fraction_static",
    "cuda_graph_max_bs",
    "stream_interval",
    "prefill_cuda_graph",
    "multi_token_chunks",
)


def test_main_end_to_end_with_fake_launcher(tmp_path, monkeypatch, capsys):
    write_fake_launcher(tmp_path / "fake_sglang.py", "test_loadtest")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(
        lt,
        "get_provenance",
        lambda: {
            "gpu": "FakeGPU",
            "commit": "abc123",
            "versions": {},
            "date": "2026-01-01T00:00:00+00:00",
        },
    )
    out = tmp_path / "res" / "lt.json"
    common = [
        "--quick",
        "--out",
        str(out),
        "--server-module",
        "fake_sglang",
        "--progress-s",
        "0.2",
        "--warmup-requests",
        "1",
        "--extra-server-args",
        "--log-level warning",
    ]
    assert lt.main(["--configs", "bf16,k4v4", "--profile-steps", "3", *common]) == 0
    doc = json.loads(out.read_text())
    assert doc["gpu"] == "FakeGPU" and doc["commit"] == "abc123"
    assert [(r["workload"], r["kv"]) for r in doc["results"]] == [
        ("reference", "bf16"),
        ("reference", "k4v4"),
        ("long-gen", "bf16"),
        ("long-gen", "k4v4"),
        ("single-stream-1k", "bf16"),
        ("single-stream-1k", "k4v4"),
        ("single-stream-4k", "bf16"),
        ("single-stream-4k", "k4v4"),
    ]
    for r in doc["results"]:
        for k in REQUIRED:
            assert k in r, k
        assert (
            r["status"] == "ok" and r["completed"] == r["num_requests"] and r["variant"] == "quick"
        )
        cmd = r["server_cmd"]
        assert "prefill-cuda-graph" not in cmd and "--log-level warning" in cmd
        assert "--mem-fraction-static 0.25" in cmd and "--cuda-graph-max-bs-decode 128" in cmd
        assert "--stream-interval 1" in cmd and "--incremental-streaming-output" in cmd
        assert (r["mem_fraction_static"], r["cuda_graph_max_bs"], r["stream_interval"]) == (
            0.25,
            128,
            1,
        )
        assert r["prefill_cuda_graph"] is True and r["incremental_stream"] is True
        assert r["backend_source"] == "server_info"
        assert r["itl_p50_ms"] > 0 and r["stream_chunks"] > 0 and r["short_outputs"] == 0
    by = {(r["workload"], r["kv"]): r for r in doc["results"]}
    assert "--attention-backend" not in by[("reference", "bf16")]["server_cmd"]
    assert (
        by[("reference", "bf16")]["backend"] == "fa3"
    )  # SGLang's default, as the server reported it
    assert by[("reference", "k4v4")]["backend"] == "turboquant"
    assert by[("reference", "bf16")]["max_total_num_tokens"] == 1000
    assert by[("reference", "k4v4")]["max_total_num_tokens"] == 3880
    assert by[("reference", "k4v4")]["server_info"]["attention_backend"] == "turboquant"
    assert by[("reference", "k4v4")]["server_log"] == {
        "max_total_num_tokens": 3880,
        "chunked_prefill_size": 8192,
        "max_prefill_tokens": 16384,
        "max_running_requests": 64,
        "context_len": 131072,
        "available_gpu_mem_gb": 12.34,
    }
    assert "--kv-quant turboquant --kv-quant-bits k4v4" in by[("reference", "k4v4")]["server_cmd"]
    ss = by[("single-stream-4k", "k4v4")]
    assert ss["context"] == 4096 and ss["workload_family"] == "single-stream"
    assert ss["decode_profile"]["steps"] == 3 and ss["decode_profile"]["busy_us_per_step"] == 32.0
    assert "decode_profile" not in by[("reference", "k4v4")]
    assert ss["itl_tokens"] == lt.SS_QUICK["num_requests"] * (lt.SS_QUICK["output_len"] - 1)
    assert 0.9 <= ss["itl_p50_ms"] < 20  # the fake server's 1 ms per token for k4v4
    lg = by[("long-gen", "bf16")]
    assert lg["total_output_tokens"] == 16 * 128 and lg["workload_params"]["concurrency"] == 16
    assert by[("reference", "bf16")]["cache_hit_rate"] < 0.01
    assert (out.parent / "loadtest_server_k4v4.log").exists()
    assert doc["summary"]["text"][0].startswith("GPU(s): FakeGPU")
    assert any("== long-gen (quick)" in x for x in doc["summary"]["text"])

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
        assert (
            lt.main(
                [
                    "--configs",
                    "fp8",
                    "--workloads",
                    "reference",
                    "--append",
                    "--server-url",
                    url,
                    *common,
                ]
            )
            == 0
        )
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    # and a Triton-backend row of the shared-prefix workload, launched again
    assert (
        lt.main(["--configs", "bf16-triton", "--workloads", "shared-prefix", "--append", *common])
        == 0
    )
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 10 and len(doc["invocations"]) == 3
    assert {r["kv"] for r in doc["results"] if r["workload"] == "reference"} == {
        "bf16",
        "fp8",
        "k4v4",
    }
    fp8 = next(r for r in doc["results"] if r["kv"] == "fp8")
    assert fp8["max_total_num_tokens"] == 2000 and fp8["server_url"] == url and state.flushes == 1
    assert fp8["backend"] == "fa3" and fp8["backend_source"] == "server_info"
    tri = next(r for r in doc["results"] if r["kv"] == "bf16-triton")
    assert tri["workload"] == "shared-prefix" and tri["backend"] == "triton"
    assert "--attention-backend triton" in tri["server_cmd"]
    p = lt.SP_QUICK
    assert tri["cache_hit_rate"] == pytest.approx(
        p["prefix_len"] / (p["prefix_len"] + p["suffix_len"]), abs=1e-4
    )
    groups = {g["workload"]: g for g in doc["summary"]["groups"]}
    assert groups["reference"]["ratios"]["k4v4"]["out_tok_s_vs_fp8"] is not None
    assert (
        groups["single-stream-4k"]["ratios"]["k4v4"]["itl_p50_vs_bf16"] < 1
    )  # 1 ms vs 2 ms per token
    text = capsys.readouterr().out
    assert "estimated total" in text and "== reference (quick)" in text and "xfp8" in text
    assert "bf16        ~" in text and "backend fa3 (server_info)" in text
    assert lt.main(["--summarize", "--out", str(out)]) == 0
    assert "== single-stream-4k (quick)" in capsys.readouterr().out

    # --merge: per-command files combined afterwards; later files win per key
    other = tmp_path / "other.json"
    doc2 = json.loads(out.read_text())
    doc2["results"] = [{**fp8, "gpu": "OtherGPU", "out_tok_s": 1.0}]
    other.write_text(json.dumps(doc2))
    merged = tmp_path / "merged.json"
    assert lt.main(["--merge", str(out), str(other), "--out", str(merged)]) == 0
    m = json.loads(merged.read_text())
    assert len(m["results"]) == 10 and m["gpu"] == "mixed: FakeGPU, OtherGPU"
    assert next(r for r in m["results"] if r["kv"] == "fp8")["out_tok_s"] == 1.0
    assert (
        next(g for g in m["summary"]["groups"] if g["workload"] == "reference")["mixed_gpus"]
        is True
    )


def test_budget_skips_what_would_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        lt, "get_provenance", lambda: {"gpu": "FakeGPU", "commit": "abc", "date": "d"}
    )
    out = tmp_path / "lt.json"
    # a server start alone is estimated at EST_STARTUP_S: nothing is launched
    rc = lt.main(
        [
            "--configs",
            "bf16",
            "--out",
            str(out),
            "--server-module",
            "no_such_module",
            "--budget-s",
            "100",
        ]
    )
    assert rc == 2 and json.loads(out.read_text())["results"] == []
    assert "SKIP bf16" in capsys.readouterr().out
    assert lt.main(["--plan", "--configs", "fp8", "--out", str(out)]) == 0
    plan = capsys.readouterr().out
    assert (
        "fp8         ~328 s = start ~140 s, reference ~36 s (96 req), long-gen ~102 s (128 req)"
        in plan
    )


def test_server_failure_is_recorded(tmp_path, monkeypatch):
    (tmp_path / "broken_sglang.py").write_text(
        "import sys\nprint('ValueError: --kv-quant turboquant refuses this', flush=True)\nsys.exit(3)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(
        lt, "get_provenance", lambda: {"gpu": "FakeGPU", "commit": "abc", "date": "d"}
    )
    out = tmp_path / "lt.json"
    rc = lt.main(
        [
            "--configs",
            "k3v3",
            "--workloads",
            "reference",
            "--quick",
            "--out",
            str(out),
            "--server-module",
            "broken_sglang",
        ]
    )
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
