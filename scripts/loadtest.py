"""End-to-end load test: bf16, fp8 and TurboQuant KV at the same --mem-fraction-static.

Each KV config gets a fresh SGLang server (dummy weights, ``--skip-tokenizer-init``,
127.0.0.1 only) and runs the selected workloads on it:

* ``reference`` -- the REFERENCE.md end-to-end load: 96 requests of 6000 random input
  tokens and 400 output tokens at concurrency 64 (H100 baselines: bf16 920, fp8 1149
  output tok/s; pools of 166k and 332k tokens at ``--mem-fraction-static 0.45``);
* ``shared-prefix`` -- 4 prefixes x 4000 tokens, 128 requests per prefix (prefix + 200
  unique tokens, 200 output tokens), requests interleaved across prefixes, concurrency
  64. By default one request per prefix is sent first, untimed (1 output token), so
  the timed phase measures serving from a warm radix cache; ``--sp-cold`` skips that.

Config -> server flags (all with the same ``--mem-fraction-static``):

    bf16   --attention-backend triton
    fp8    --attention-backend triton --kv-cache-dtype fp8_e4m3
    kXvY   --kv-quant turboquant --kv-quant-bits kXvY     (k4v4, k3v3, k4v2, ...)

Before each workload the client sends a few untimed requests of the workload's prompt
length with 8 output tokens (kernel JIT warm-up) and then ``/flush_cache``, so every timed phase starts from an empty radix
cache. Requests are streaming ``/generate`` calls with ``input_ids`` (random ids in
[1000, 30000), fixed seed: identical prompts for every config), ``ignore_eos``,
greedy. TTFT = first streamed chunk carrying an output token; latency = the chunk
with ``finish_reason``; output tokens = final ``meta_info.completion_tokens``; cache
hit rate = sum(``meta_info.cached_tokens``) / sum(``meta_info.prompt_tokens``) over the
timed requests. Throughput divides by the timed phase's wall time (first send to last
finish). Percentiles interpolate linearly (numpy's default).

Results go to one JSON file (``--out``), rewritten after every (workload, kv), so a
run cut short keeps what finished: top-level ``gpu``/``commit`` (provenance) and
``results``, one object per (workload, kv). ``--append`` merges into an existing file
(a new result replaces one with the same workload, variant and kv), so the GPU session
can run one (workload, config) per command:

    python scripts/loadtest.py --configs k4v4 --workloads reference --out r.json --append

or each command writes its own file and ``--merge a.json b.json --out all.json``
combines them afterwards. ``--summarize`` only prints the table of a JSON file (ratios
vs bf16 and fp8, target checks). ``--plan`` prints the plan and time estimate only.
``--quick`` shrinks both workloads for smoke tests. ``--budget-s`` skips whatever would
not finish in time (one GPU-host command may run at most 10 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import free_port  # noqa: E402  (scripts/ is not a package)

try:  # orjson ships with SGLang; the stdlib parser is the fallback
    import orjson as _orjson

    def _loads(b: bytes):
        return _orjson.loads(b)
except ImportError:  # pragma: no cover
    def _loads(b: bytes):
        return json.loads(b)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = str(ROOT / "scripts/model_configs/llama-3.1-8b")
KV_ORDER = ("bf16", "fp8", "bf16-fa3", "fp8-fa3", "k4v4", "k3v3")
WORKLOADS = ("reference", "shared-prefix")
TOKEN_LO, TOKEN_HI = 1000, 30000
_TQ_RE = re.compile(r"^k[2-4]v[2-4]$")

# REFERENCE.md, H100, SGLang 0.5.17 Triton backend, dummy Llama-3.1-8B, mem 0.45.
BASELINE_H100 = {"bf16": {"out_tok_s": 920, "pool": 166_000}, "fp8": {"out_tok_s": 1149, "pool": 332_000}}

# Rough device-time model for the printed plan (H100; an H200 is faster).
EST_STARTUP_S = 150.0          # README: 145 s bf16, 109 s k4v4 (H200, prefill CG off)
EST_WARMUP_S = 15.0            # JIT warm-up requests + flush
EST_PREFILL_TOK_S = 12_000.0   # uncached prompt tokens per second
EST_DECODE_TOK_S = {"bf16": 920.0, "fp8": 1149.0}  # reference-shaped load, measured
EST_DECODE_TOK_S_DEFAULT = 1149.0                    # turboquant: assume fp8's rate
EST_SP_DECODE_TOK_S = 2_000.0  # short contexts, everything fits


# ----------------------------------------------------------------------------- configs

def kv_server_flags(kv: str) -> list[str]:
    """Server flags of one KV config label."""
    # bf16 / fp8: SGLang's Triton backend, REFERENCE.md's baseline setup; the -fa3 variants
    # run SGLang's FA3 backend (its Hopper default), the fastest stock prefill
    base = {"bf16": [], "fp8": ["--kv-cache-dtype", "fp8_e4m3"]}
    name, _, backend = kv.partition("-")
    if name in base and backend in ("", "fa3"):
        return ["--attention-backend", backend or "triton", *base[name]]
    if _TQ_RE.match(kv):
        return ["--kv-quant", "turboquant", "--kv-quant-bits", kv]
    raise ValueError(f"unknown KV config {kv!r}: use bf16, fp8, bf16-fa3, fp8-fa3 or kXvY "
                     f"(e.g. k4v4, k3v3)")


def kv_sort_key(kv: str):
    return (KV_ORDER.index(kv) if kv in KV_ORDER else len(KV_ORDER), kv)


# ----------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    params: dict
    prompts: list[list[int]]
    output_len: int
    concurrency: int
    warm_prompts: list[list[int]] = field(default_factory=list)  # untimed, sent first
    variant: str = "default"

    @property
    def label(self) -> str:
        return self.name if self.variant == "default" else f"{self.name} ({self.variant})"


_TOKENS = range(TOKEN_LO, TOKEN_HI)


def _rand_ids(rng: random.Random, n: int) -> list[int]:
    return rng.choices(_TOKENS, k=n)


REFERENCE_DEFAULTS = dict(num_requests=96, input_len=6000, output_len=400, concurrency=64)
REFERENCE_QUICK = dict(num_requests=16, input_len=1024, output_len=32, concurrency=8)
SP_DEFAULTS = dict(num_prefixes=4, prefix_len=4000, requests_per_prefix=128, suffix_len=200,
                   output_len=200, concurrency=64, warm=True)
SP_QUICK = dict(num_prefixes=2, prefix_len=1024, requests_per_prefix=8, suffix_len=64,
                output_len=32, concurrency=8, warm=True)


def _variant(params: dict, defaults: dict, quick: dict, is_quick: bool) -> str:
    base = quick if is_quick else defaults
    prefix = "quick" if is_quick else ""
    if params == base:
        return prefix or "default"
    if params == {**base, "warm": False}:
        return (prefix + "-" if prefix else "") + "cold"
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return ("quick-" if is_quick else "") + "custom-" + digest


def reference_workload(num_requests: int, input_len: int, output_len: int, concurrency: int,
                       seed: int = 0, quick: bool = False) -> Workload:
    params = dict(num_requests=num_requests, input_len=input_len, output_len=output_len,
                  concurrency=concurrency)
    rng = random.Random(f"reference-{seed}")
    prompts = [_rand_ids(rng, input_len) for _ in range(num_requests)]
    return Workload("reference", {**params, "seed": seed}, prompts, output_len, concurrency,
                    variant=_variant(params, REFERENCE_DEFAULTS, REFERENCE_QUICK, quick))


def shared_prefix_workload(num_prefixes: int, prefix_len: int, requests_per_prefix: int,
                           suffix_len: int, output_len: int, concurrency: int, warm: bool = True,
                           seed: int = 0, quick: bool = False) -> Workload:
    params = dict(num_prefixes=num_prefixes, prefix_len=prefix_len,
                  requests_per_prefix=requests_per_prefix, suffix_len=suffix_len,
                  output_len=output_len, concurrency=concurrency, warm=warm)
    rng = random.Random(f"shared-prefix-{seed}")
    prefixes = [_rand_ids(rng, prefix_len) for _ in range(num_prefixes)]
    # interleaved: request i uses prefix i % num_prefixes
    prompts = [prefixes[i % num_prefixes] + _rand_ids(rng, suffix_len)
               for i in range(num_prefixes * requests_per_prefix)]
    warm_prompts = [p + _rand_ids(rng, suffix_len) for p in prefixes] if warm else []
    return Workload("shared-prefix", {**params, "seed": seed}, prompts, output_len, concurrency,
                    warm_prompts=warm_prompts,
                    variant=_variant(params, SP_DEFAULTS, SP_QUICK, quick))


def build_workloads(args) -> list[Workload]:
    out = []
    for name in args.workloads:
        if name == "reference":
            p = dict(REFERENCE_QUICK if args.quick else REFERENCE_DEFAULTS)
            for k in p:
                if getattr(args, k, None) is not None:
                    p[k] = getattr(args, k)
            out.append(reference_workload(**p, seed=args.seed, quick=args.quick))
        else:
            p = dict(SP_QUICK if args.quick else SP_DEFAULTS)
            for k in p:
                v = getattr(args, "sp_" + k, None)
                if v is not None:
                    p[k] = v
            if args.sp_cold:
                p["warm"] = False
            out.append(shared_prefix_workload(**p, seed=args.seed, quick=args.quick))
    return out


def estimate_run_s(wl: Workload, kv: str) -> float:
    """Rough seconds for one timed phase plus warm-up (H100 rates, see EST_*)."""
    n = len(wl.prompts)
    out_tokens = n * wl.output_len
    if wl.name == "reference":
        rate = EST_DECODE_TOK_S.get(kv, EST_DECODE_TOK_S_DEFAULT)
        return EST_WARMUP_S + out_tokens / rate
    p = wl.params
    uncached = p["num_prefixes"] * p["prefix_len"] + n * p["suffix_len"]
    warm = p["num_prefixes"] * (p["prefix_len"] + p["suffix_len"]) / EST_PREFILL_TOK_S
    return EST_WARMUP_S + warm + uncached / EST_PREFILL_TOK_S + out_tokens / EST_SP_DECODE_TOK_S


# ----------------------------------------------------------------------------- client

@dataclass
class ReqResult:
    ok: bool = False
    input_len: int = 0
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    chunks: int = 0
    retractions: int = 0
    finish_reason: object = None
    error: str | None = None


def _check_loopback(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"only loopback servers are allowed, got {url!r}")
    return url.rstrip("/")


def _handle_event(event: bytes, res: ReqResult, t0: float, now: float) -> bool:
    """Apply one SSE event (``data: {...}``); return True at ``data: [DONE]``."""
    done = False
    for line in event.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # comments / other SSE fields
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            obj = _loads(data)
        except ValueError:
            res.error = res.error or f"bad chunk: {data[:120]!r}"
            continue
        res.chunks += 1
        if "error" in obj:
            err = obj["error"]
            res.error = res.error or (err.get("message") if isinstance(err, dict) else str(err))
            continue
        meta = obj.get("meta_info") or {}
        ntok = meta.get("completion_tokens")
        if ntok is None:
            ntok = len(obj.get("output_ids") or [])
        if res.ttft is None and ntok > 0:
            res.ttft = now - t0
        res.completion_tokens = max(res.completion_tokens, int(ntok))
        if "prompt_tokens" in meta:
            res.prompt_tokens = int(meta["prompt_tokens"])
        if "cached_tokens" in meta:
            res.cached_tokens = int(meta["cached_tokens"])
        if meta.get("num_retractions") is not None:
            res.retractions = int(meta["num_retractions"])
        fr = meta.get("finish_reason")
        if fr is not None and res.finish_reason is None:
            res.finish_reason = fr
            res.latency = now - t0
            if isinstance(fr, dict) and fr.get("type") == "abort":
                res.error = res.error or f"aborted: {fr.get('message')}"
    return done


async def stream_generate(session, base_url: str, input_ids: list[int], max_new_tokens: int,
                          ignore_eos: bool = True) -> ReqResult:
    """One streaming /generate request; never raises (errors land in ReqResult.error)."""
    payload = {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                            "ignore_eos": ignore_eos},
        "stream": True,
    }
    res = ReqResult(input_len=len(input_ids))
    t0 = time.perf_counter()
    try:
        async with session.post(base_url + "/generate", json=payload) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                res.error = f"HTTP {resp.status}: {body}"
                return res
            buf = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                buf += data.replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    _handle_event(event, res, t0, now)
            if buf.strip():
                _handle_event(buf, res, t0, time.perf_counter())
    except asyncio.CancelledError:
        res.error = res.error or "cancelled (timeout)"
        raise
    except Exception as exc:  # noqa: BLE001 - a failed request is data, not a crash
        res.error = res.error or f"{type(exc).__name__}: {exc}"
        return res
    if res.finish_reason is None and res.error is None:
        res.error = "stream ended without finish_reason"
    if res.latency is None and res.ttft is not None:
        res.latency = time.perf_counter() - t0
    if res.prompt_tokens == 0:
        res.prompt_tokens = len(input_ids)
    res.ok = res.error is None
    return res


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _r(x, nd=4):
    return None if x is None else round(x, nd)


def compute_stats(results: list[ReqResult | None], duration_s: float, num_requests: int,
                  expected_output_len: int | None = None) -> dict:
    done = [r for r in results if r is not None]
    ok = [r for r in done if r.ok]
    failed = [r for r in done if not r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok if r.latency is not None]
    tpot = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok
            if r.latency is not None and r.ttft is not None and r.completion_tokens > 1]
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    d = duration_s if duration_s > 0 else float("nan")
    stats = {
        "num_requests": num_requests,
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": _r(duration_s, 3),
        "out_tok_s": _r(out_tokens / d, 2),
        "req_s": _r(len(ok) / d, 4),
        "in_tok_s": _r(prompt_tokens / d, 1),
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": prompt_tokens,
        "total_cached_tokens": cached,
        "retractions": sum(r.retractions for r in ok),  # decode-time preemptions (pool full)
        "cache_hit_rate": _r(cached / prompt_tokens if prompt_tokens else None, 4),
        "ttft_mean_s": _r(sum(ttft) / len(ttft) if ttft else None),
        "ttft_p50_s": _r(percentile(ttft, 50)),
        "ttft_p90_s": _r(percentile(ttft, 90)),
        "ttft_p99_s": _r(percentile(ttft, 99)),
        "lat_mean_s": _r(sum(lat) / len(lat) if lat else None),
        "lat_p50_s": _r(percentile(lat, 50)),
        "lat_p90_s": _r(percentile(lat, 90)),
        "lat_p99_s": _r(percentile(lat, 99)),
        "tpot_p50_s": _r(percentile(tpot, 50), 5),
        "tpot_p90_s": _r(percentile(tpot, 90), 5),
    }
    if expected_output_len is not None:
        stats["short_outputs"] = sum(1 for r in ok if r.completion_tokens != expected_output_len)
    if failed:
        stats["errors"] = sorted({str(r.error)[:200] for r in failed})[:5]
    return stats


async def run_workload(base_url: str, wl: Workload, timeout_s: float, *,
                       progress_s: float = 10.0, label: str = "",
                       warmup_requests: int = 4, warmup_len: int | None = None,
                       flush: Callable[[], object] | None = None,
                       log: Callable[[str], None] = print) -> dict:
    """Warm up, flush, (prefix warm-up), then the timed phase; returns compute_stats + extras."""
    import aiohttp

    base_url = _check_loopback(base_url)
    conn = aiohttp.TCPConnector(limit=max(wl.concurrency, warmup_requests, len(wl.warm_prompts)) + 4)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=max(timeout_s, 60))
    extra: dict = {}
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        if warmup_requests > 0:  # JIT compile / first-launch costs, untimed, then flushed
            rng = random.Random("jit-warmup")  # prompts of the workload's length, never reused
            if warmup_len is None:
                warmup_len = min(len(wl.prompts[0]), 8192) if wl.prompts else 256
            t = time.perf_counter()
            ws = await asyncio.gather(*(stream_generate(session, base_url, _rand_ids(rng, warmup_len), 8)
                                        for _ in range(warmup_requests)))
            extra["jit_warmup"] = {"requests": warmup_requests, "ok": sum(r.ok for r in ws),
                                   "s": round(time.perf_counter() - t, 2)}
            if not any(r.ok for r in ws):
                raise RuntimeError(f"warm-up requests failed: {ws[0].error}")
        if flush is not None:
            extra["flushed"] = await asyncio.get_running_loop().run_in_executor(None, flush)
        if wl.warm_prompts:  # shared-prefix: put every prefix in the radix cache, untimed
            t = time.perf_counter()
            ws = await asyncio.gather(*(stream_generate(session, base_url, p, 1) for p in wl.warm_prompts))
            extra["prefix_warmup"] = {"requests": len(ws), "ok": sum(r.ok for r in ws),
                                      "s": round(time.perf_counter() - t, 2)}

        n = len(wl.prompts)
        results: list[ReqResult | None] = [None] * n
        finish_times: list[float] = []
        sem = asyncio.Semaphore(wl.concurrency)
        start = time.perf_counter()

        async def one(i: int):
            async with sem:
                r = await stream_generate(session, base_url, wl.prompts[i], wl.output_len)
            results[i] = r
            finish_times.append(time.perf_counter())

        async def progress():
            while True:
                await asyncio.sleep(progress_s)
                done = [r for r in results if r is not None]
                el = time.perf_counter() - start
                toks = sum(r.completion_tokens for r in done if r.ok)
                log(f"  [{label}] {len(done)}/{n} done, {sum(not r.ok for r in done)} failed, "
                    f"{el:.0f} s, {toks / el:.0f} out tok/s so far")

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        prog = asyncio.create_task(progress())
        # SIGTERM/SIGINT end the timed phase like a timeout, so the partial numbers are kept;
        # the caller re-raises KeyboardInterrupt afterwards.
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        caught: list[str] = []
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, lambda sig=sig: (caught.append(sig.name), stop.set()))
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        all_done = asyncio.ensure_future(asyncio.wait(tasks))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([all_done, stopper], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            pending = [t for t in tasks if not t.done()]
            for t in (prog, all_done, stopper, *tasks):
                t.cancel()
            await asyncio.gather(prog, all_done, stopper, *tasks, return_exceptions=True)
        timed_out = bool(pending) and not caught
        end = time.perf_counter() if pending or not finish_times else max(finish_times)
    stats = compute_stats(results, end - start, n, wl.output_len)
    stats["timed_out"] = timed_out
    if timed_out:
        stats["timeout_s"] = timeout_s
    if caught:
        stats["interrupted"] = caught[0]
    stats.update(extra)
    return stats


# ----------------------------------------------------------------------------- server

def _http(url: str, method: str = "GET", timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def _set_pdeathsig():  # the server dies with us even if we are SIGKILLed (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


SERVER_INFO_KEYS = ("max_total_num_tokens", "max_running_requests", "max_req_input_len",
                    "chunked_prefill_size", "max_prefill_tokens", "attention_backend",
                    "kv_cache_dtype", "kv_quant", "kv_quant_bits", "page_size",
                    "disable_radix_cache", "schedule_policy", "mem_fraction_static", "version")


class Server:
    """One SGLang server in its own process group; stop() kills the whole group."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, log: Callable[[str], None] = print):
        self.cmd, self.port, self.log_path, self.log = cmd, port, Path(log_path), log
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self, timeout_s: float) -> float:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"launch: {shlex.join(self.cmd)}\n  log: {self.log_path}")
        t0 = time.time()
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_set_pdeathsig if sys.platform == "linux" else None)
        last = 0.0
        while True:
            if _http(self.base_url + "/health", timeout=5)[0] == 200:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up; "
                                   f"log tail:\n{self.log_tail()}")
            el = time.time() - t0
            if el > timeout_s:
                raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; log tail:\n{self.log_tail()}")
            if el - last >= 15:
                self.log(f"  waiting for server ... {el:.0f} s")
                last = el
            time.sleep(0.2 if el < 10 else 1.0)
        self.startup_s = round(time.time() - t0, 1)
        self.log(f"  server up in {self.startup_s} s")
        return self.startup_s

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def pool_from_log(self) -> dict:
        text = self.log_text()
        out: dict = {}
        for key in ("max_total_num_tokens", "chunked_prefill_size", "max_prefill_tokens",
                    "max_running_requests", "context_len"):
            m = re.findall(rf"\b{key}=(\d+)", text)  # the scheduler's start-up line; last one wins
            out[key] = int(m[-1]) if m else None
        m = re.findall(r"available_gpu_mem=([\d.]+) GB", text)
        out["available_gpu_mem_gb"] = float(m[-1]) if m else None
        return out

    def info(self) -> dict:
        return _info_of(self.base_url)

    def flush_cache(self) -> bool:
        for _ in range(10):
            code, _ = _http(self.base_url + "/flush_cache", method="POST", timeout=60)
            if code == 200:
                return True
            time.sleep(1.0)
        self.log("  WARNING: /flush_cache did not succeed")
        return False

    def stop(self):
        """SIGTERM to the whole process group, SIGKILL after 30 s; wait until it is gone."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 15.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            deadline = time.time() + wait_s
            while time.time() < deadline:
                self.proc.poll()  # reap the leader
                if not _group_alive(pgid):
                    self.proc = None
                    return
                time.sleep(0.1)
        self.log(f"  WARNING: process group {pgid} still alive after SIGKILL")
        self.proc = None


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process left in the group? (Zombies hold no GPU memory, and in a
    container without an init that reaps, orphaned ones may linger.)"""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def server_command(args, kv: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", args.server_module, "--model-path", args.model_path,
           "--load-format", "dummy", "--skip-tokenizer-init", "--host", "127.0.0.1",
           "--port", str(port), "--mem-fraction-static", str(args.mem_fraction_static),
           *kv_server_flags(kv)]
    if not args.prefill_cuda_graph:
        cmd.append("--disable-prefill-cuda-graph")
    cmd += shlex.split(args.extra_server_args or "")
    return cmd


# ----------------------------------------------------------------------------- JSON

def get_provenance() -> dict:
    """sglang_tq.provenance in a child process: the CUDA context it may create must not
    stay alive in this process while servers size their pools from free GPU memory."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from sglang_tq.provenance import provenance; print(json.dumps(provenance()))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001
        return {"gpu": "unknown", "commit": os.environ.get("SGLANG_TQ_COMMIT", "unknown"),
                "provenance_error": repr(exc)[:300]}


def load_doc(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and isinstance(doc.get("results"), list) else {}


def result_key(r: dict) -> tuple:
    return (r.get("workload"), r.get("variant", "default"), r.get("kv"))


def merge_result(doc: dict, res: dict) -> dict:
    doc["results"] = [r for r in doc.get("results", []) if result_key(r) != result_key(res)]
    doc["results"].append(res)
    doc["results"].sort(key=lambda r: (WORKLOADS.index(r["workload"]) if r.get("workload") in WORKLOADS else 9,
                                       r.get("variant", ""), kv_sort_key(r.get("kv", ""))))
    return doc


def write_doc(path: Path, doc: dict):
    gpus = sorted({r.get("gpu", "unknown") for r in doc.get("results", [])})
    doc["gpus"] = gpus
    doc["summary"] = summarize(doc.get("results", []))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- summary

def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def summarize(results: list[dict]) -> dict:
    """Ratios vs bf16/fp8 per (workload, variant) and the project's target checks.

    Only complete runs (status "ok") enter ratios; a target whose inputs are missing or
    incomplete reads ``pass: null``. Targets use the default workloads only."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["workload"], r.get("variant", "default")), {})[r["kv"]] = r
    out = {"groups": [], "targets": []}
    for (wl, variant), all_kv in groups.items():
        by_kv = {kv: r for kv, r in all_kv.items() if r.get("status") == "ok"}
        bf16, fp8 = by_kv.get("bf16"), by_kv.get("fp8")
        rows = {}
        for kv, r in sorted(by_kv.items(), key=lambda kv_r: kv_sort_key(kv_r[0])):
            rows[kv] = {
                "out_tok_s_vs_bf16": _ratio(r["out_tok_s"], bf16 and bf16["out_tok_s"]),
                "out_tok_s_vs_fp8": _ratio(r["out_tok_s"], fp8 and fp8["out_tok_s"]),
                # > 1 means faster (lower TTFT) than the baseline
                "ttft_p50_speedup_vs_bf16": _ratio(bf16 and bf16["ttft_p50_s"], r["ttft_p50_s"]),
                "ttft_p50_speedup_vs_fp8": _ratio(fp8 and fp8["ttft_p50_s"], r["ttft_p50_s"]),
                "pool_vs_bf16": _ratio(r.get("max_total_num_tokens"), bf16 and bf16.get("max_total_num_tokens")),
            }
        mixed = len({r.get("gpu") for r in by_kv.values()}) > 1
        out["groups"].append({"workload": wl, "variant": variant, "mixed_gpus": mixed, "ratios": rows})
        if variant != "default":
            continue
        for kv in sorted(all_kv, key=kv_sort_key):
            if not _TQ_RE.match(kv):
                continue
            row = rows.get(kv, {})
            if wl == "reference":
                for base, thr in (("bf16", 1.5), ("fp8", 1.2)):
                    v = row.get(f"out_tok_s_vs_{base}")
                    out["targets"].append({"name": f"reference {kv} out tok/s >= {thr}x {base}", "kv": kv,
                                           "value": v, "threshold": thr,
                                           "pass": None if v is None else v >= thr, "mixed_gpus": mixed})
            elif wl == "shared-prefix":
                mine = by_kv[kv]["ttft_p50_s"] if kv in by_kv else None
                base = fp8 and fp8["ttft_p50_s"]
                out["targets"].append({"name": f"shared-prefix {kv} TTFT p50 < fp8", "kv": kv,
                                       "value": mine, "threshold": base,
                                       "pass": None if mine is None or base is None else mine < base,
                                       "mixed_gpus": mixed})
    return out


def _fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


def summary_text(doc: dict) -> str:
    results = doc.get("results", [])
    summ = summarize(results)
    lines = [f"GPU(s): {', '.join(sorted({str(r.get('gpu')) for r in results})) or '-'}   "
             f"commit(s): {', '.join(sorted({str(r.get('commit')) for r in results})) or '-'}"]
    ratio_by_group = {(g["workload"], g["variant"]): g for g in summ["groups"]}
    keys = sorted({(r["workload"], r.get("variant", "default")) for r in results},
                  key=lambda k: (WORKLOADS.index(k[0]) if k[0] in WORKLOADS else 9, k[1]))
    hdr = (f"{'kv':<6} {'pool tok':>9} {'xbf16':>6} {'out tok/s':>9} {'xbf16':>6} {'xfp8':>6} "
           f"{'req/s':>6} {'TTFT p50':>8} {'p90':>7} {'lat p50':>7} {'p90':>7} {'hit%':>5} {'done':>7} note")
    for wl, variant in keys:
        g = ratio_by_group.get((wl, variant), {"ratios": {}, "mixed_gpus": False})
        lines += ["", f"== {wl}" + ("" if variant == "default" else f" ({variant})")
                  + ("   WARNING: results from different GPUs" if g["mixed_gpus"] else ""), hdr]
        rows = sorted((r for r in results if (r["workload"], r.get("variant", "default")) == (wl, variant)),
                      key=lambda r: kv_sort_key(r["kv"]))
        for r in rows:
            if r.get("status") not in ("ok", "partial"):
                why = r.get("error") or (f"interrupted ({r['interrupted']})" if r.get("interrupted") else
                                         "timed out" if r.get("timed_out") else "")
                lines.append(f"{r['kv']:<6} {r.get('status')}: {str(why)[:100]}")
                continue
            q = g["ratios"].get(r["kv"], {})
            note = ("TIMED OUT (no ratios)" if r.get("timed_out") else
                    f"INTERRUPTED ({r['interrupted']}, no ratios)" if r.get("interrupted") else
                    f"{r['failed']} FAILED REQS" if r.get("failed") else "")
            if r.get("retractions"):
                note += f" {r['retractions']} retractions"
            hit = r.get("cache_hit_rate")
            lines.append(
                f"{r['kv']:<6} {_fmt(r.get('max_total_num_tokens')):>9} {_fmt(q.get('pool_vs_bf16'), '{:.2f}'):>6} "
                f"{_fmt(r['out_tok_s']):>9} {_fmt(q.get('out_tok_s_vs_bf16'), '{:.2f}'):>6} "
                f"{_fmt(q.get('out_tok_s_vs_fp8'), '{:.2f}'):>6} {_fmt(r['req_s'], '{:.2f}'):>6} "
                f"{_fmt(r['ttft_p50_s'], '{:.2f}'):>8} {_fmt(r.get('ttft_p90_s'), '{:.2f}'):>7} "
                f"{_fmt(r['lat_p50_s'], '{:.1f}'):>7} {_fmt(r.get('lat_p90_s'), '{:.1f}'):>7} "
                f"{_fmt(None if hit is None else 100 * hit, '{:.1f}'):>5} "
                f"{r.get('completed')}/{r.get('num_requests'):<3} {note}")
        if wl == "reference" and variant == "default":
            lines.append(f"(REFERENCE.md, H100: bf16 {BASELINE_H100['bf16']['out_tok_s']} tok/s, 166k pool; "
                         f"fp8 {BASELINE_H100['fp8']['out_tok_s']} tok/s, 332k pool)")
    if summ["targets"]:
        lines += ["", "targets:"]
        for t in summ["targets"]:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
            val = _fmt(t["value"], "{:.3f}")
            lines.append(f"  [{mark}] {t['name']}: {val}" + (f" (fp8 {_fmt(t['threshold'], '{:.3f}')} s)"
                                                               if "TTFT" in t["name"] else "")
                         + ("  (mixed GPUs!)" if t["mixed_gpus"] else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model-path", default=DEFAULT_MODEL)
    ap.add_argument("--configs", default=",".join(KV_ORDER), help="comma list: bf16,fp8,k4v4,k3v3 (any kXvY); bf16-fa3 / fp8-fa3 run SGLang's FA3 "
                         "backend instead of Triton")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list: reference,shared-prefix")
    ap.add_argument("--mem-fraction-static", type=float, default=0.45)
    ap.add_argument("--extra-server-args", default="", help="one string, shlex-split, added to every server")
    ap.add_argument("--prefill-cuda-graph", action="store_true",
                    help="keep SGLang's prefill CUDA graph (default: --disable-prefill-cuda-graph on every "
                         "server, which saves ~70 s of start-up each)")
    ap.add_argument("--out", default="loadtest.json")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out instead of starting over")
    ap.add_argument("--log-dir", default=None, help="server logs (default: the folder of --out)")
    ap.add_argument("--timeout-per-run", type=float, default=None,
                    help="seconds for one timed phase (default 300; 120 with --quick)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--budget-s", type=float, default=0,
                    help="stop starting new servers/workloads whose estimate would exceed this many seconds "
                         "since launch (0: no limit); also caps --timeout-per-run")
    ap.add_argument("--fresh-server-per-workload", action="store_true",
                    help="restart the server for every workload (default: one server per KV config, "
                         "/flush_cache between workloads)")
    ap.add_argument("--quick", action="store_true", help="small workloads for smoke tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress-s", type=float, default=10)
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--server-url", default=None,
                    help="use an already running loopback server (one --configs label) instead of launching")
    ap.add_argument("--summarize", action="store_true", help="only print the summary of --out")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="only merge these result files into --out (with --append: into its results), "
                         "later files win per (workload, variant, kv), and print the summary")
    ap.add_argument("--plan", action="store_true", help="only print the plan and time estimate")
    g = ap.add_argument_group("reference workload overrides")
    g.add_argument("--num-requests", type=int)
    g.add_argument("--input-len", type=int)
    g.add_argument("--output-len", type=int)
    g.add_argument("--concurrency", type=int)
    g = ap.add_argument_group("shared-prefix workload overrides")
    g.add_argument("--sp-num-prefixes", type=int)
    g.add_argument("--sp-prefix-len", type=int)
    g.add_argument("--sp-requests-per-prefix", type=int)
    g.add_argument("--sp-suffix-len", type=int)
    g.add_argument("--sp-output-len", type=int)
    g.add_argument("--sp-concurrency", type=int)
    g.add_argument("--sp-cold", action="store_true", help="no untimed per-prefix warm-up request")
    ap.add_argument("--server-module", default="sglang.launch_server", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for kv in args.configs:
        kv_server_flags(kv)  # validates
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.timeout_per_run is None:
        args.timeout_per_run = 120.0 if args.quick else 300.0
    if args.server_url:
        _check_loopback(args.server_url)
        if len(args.configs) != 1:
            ap.error("--server-url needs exactly one --configs label (the running server's KV)")
    return args


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.merge:
        return merge_files(out, args.merge, append=args.append)
    if args.summarize:
        doc = load_doc(out)
        if not doc:
            print(f"no results in {out}")
            return 1
        print(summary_text(doc))
        return 0

    t_launch = time.time()
    log_dir = Path(args.log_dir) if args.log_dir else (out.parent if str(out.parent) else Path("."))
    workloads = build_workloads(args)

    # plan and estimate
    plan_total = 0.0
    print(f"plan: {len(args.configs)} config(s) x {len(workloads)} workload(s), "
          f"mem-fraction-static {args.mem_fraction_static}"
          + (", reusing one server per config" if not args.fresh_server_per_workload else ", fresh server each"))
    for kv in args.configs:
        n_starts = 0 if args.server_url else (len(workloads) if args.fresh_server_per_workload else 1)
        parts = [f"start ~{EST_STARTUP_S * n_starts:.0f} s"] if n_starts else []
        plan_total += EST_STARTUP_S * n_starts
        for wl in workloads:
            e = estimate_run_s(wl, kv)
            plan_total += e
            parts.append(f"{wl.label} ~{e:.0f} s ({len(wl.prompts)} req)")
        print(f"  {kv:<5} " + ", ".join(parts))
    print(f"  estimated total ~{plan_total:.0f} s ({plan_total / 60:.1f} min; H100 rates, startup dominates; "
          f"timeout per timed phase {args.timeout_per_run:.0f} s)", flush=True)
    if args.plan:
        return 0

    doc = load_doc(out) if args.append else {}
    if args.append and doc:
        print(f"appending to {out} ({len(doc['results'])} earlier result(s))")
    prov = get_provenance()
    doc.update({k: prov.get(k) for k in ("gpu", "commit", "versions", "date")})
    doc.setdefault("tool", "scripts/loadtest.py")
    doc.setdefault("results", [])
    doc.setdefault("invocations", []).append({"argv": sys.argv[1:] if argv is None else list(argv),
                                              "gpu": prov.get("gpu"), "commit": prov.get("commit"),
                                              "date": prov.get("date")})
    write_doc(out, doc)
    print(f"gpu: {prov.get('gpu')}  commit: {prov.get('commit')}  -> {out}", flush=True)

    def remaining() -> float:
        return float("inf") if args.budget_s <= 0 else args.budget_s - (time.time() - t_launch)

    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    server: Server | None = None
    rc = 0
    try:
        for kv in args.configs:
            groups = [[wl] for wl in workloads] if args.fresh_server_per_workload else [workloads]
            for group in groups:
                est = (0 if args.server_url else EST_STARTUP_S) + sum(estimate_run_s(w, kv) for w in group)
                if est > remaining():
                    print(f"SKIP {kv} {[w.name for w in group]}: estimate {est:.0f} s > budget left "
                          f"{remaining():.0f} s", flush=True)
                    rc = 2
                    continue
                base_res = {"kv": kv, "gpu": prov.get("gpu"), "commit": prov.get("commit"),
                            "date": prov.get("date"), "mem_fraction_static": args.mem_fraction_static,
                            "kv_flags": kv_server_flags(kv)}
                if args.server_url:
                    server = None
                    base_url = _check_loopback(args.server_url)
                    base_res.update(server_url=base_url, startup_s=None)
                    info = _info_of(base_url)
                    pool = {"max_total_num_tokens": info.get("max_total_num_tokens")}
                else:
                    port = free_port()
                    tag = kv + ("_" + group[0].name if args.fresh_server_per_workload or len(group) == 1 else "")
                    server = Server(server_command(args, kv, port), port, log_dir / f"loadtest_server_{tag}.log")
                    base_res["server_cmd"] = shlex.join(server.cmd[1:])
                    try:
                        server.start(min(args.startup_timeout, max(remaining(), 30)))
                    except RuntimeError as exc:
                        print(f"ERROR {kv}: {exc}", flush=True)
                        for wl in group:
                            merge_result(doc, {**base_res, "workload": wl.name, "variant": wl.variant,
                                               "status": "server_failed", "error": str(exc)[-2000:]})
                        write_doc(out, doc)
                        server.stop()
                        server = None
                        rc = 1
                        continue
                    base_url = server.base_url
                    info = server.info()
                    pool = server.pool_from_log()
                    base_res["startup_s"] = server.startup_s
                base_res["max_total_num_tokens"] = pool.get("max_total_num_tokens") or info.get("max_total_num_tokens")
                base_res["max_running_requests"] = pool.get("max_running_requests") or info.get("max_running_requests")
                base_res["server_info"] = info
                base_res["server_log"] = pool
                print(f"  {kv}: max_total_num_tokens={base_res['max_total_num_tokens']} "
                      f"max_running_requests={base_res['max_running_requests']}", flush=True)
                try:
                    for wl in group:
                        est = estimate_run_s(wl, kv)
                        if est > remaining():
                            print(f"SKIP {kv} {wl.label}: estimate {est:.0f} s > budget left {remaining():.0f} s")
                            rc = 2
                            continue
                        timeout = min(args.timeout_per_run, max(remaining() - 45, 10))
                        label = f"{kv}/{wl.label}"
                        print(f"run {label}: {len(wl.prompts)} requests, concurrency {wl.concurrency}, "
                              f"output {wl.output_len}, timeout {timeout:.0f} s (estimate ~{est:.0f} s)", flush=True)
                        flush = server.flush_cache if server else (lambda: _flush_url(base_url))
                        t = time.time()
                        res = {**base_res, "workload": wl.name, "variant": wl.variant, "quick": args.quick,
                               "workload_params": wl.params}
                        try:
                            stats = asyncio.run(run_workload(base_url, wl, timeout, progress_s=args.progress_s,
                                                             label=label, warmup_requests=args.warmup_requests,
                                                             flush=flush))
                            incomplete = stats["timed_out"] or stats.get("interrupted")
                            res.update(stats, status=("partial" if incomplete else "ok")
                                       if stats["completed"] else "no_completions")
                        except Exception as exc:  # noqa: BLE001 - record, go on with the next one
                            res.update(status="client_failed", error=f"{type(exc).__name__}: {exc}")
                            rc = 1
                        finally:
                            signal.signal(signal.SIGTERM, _on_sigterm)  # asyncio reset it
                        res["wall_s"] = round(time.time() - t, 1)
                        merge_result(doc, res)
                        write_doc(out, doc)
                        if res.get("interrupted"):
                            raise _Terminated(res["interrupted"])
                        if res["status"] in ("ok", "partial"):
                            print(f"done {label}: {res['out_tok_s']} out tok/s, {res['req_s']} req/s, "
                                  f"TTFT p50 {res['ttft_p50_s']} s, latency p50 {res['lat_p50_s']} s, "
                                  f"hit {res['cache_hit_rate']}, {res['completed']}/{res['num_requests']} "
                                  f"ok{' TIMED OUT' if res['timed_out'] else ''} ({res['wall_s']} s)", flush=True)
                            if res["failed"]:
                                print(f"  {res['failed']} failed request(s): {res.get('errors')}", flush=True)
                        else:
                            print(f"FAILED {label}: {res.get('error')}", flush=True)
                finally:
                    if server is not None:
                        server.stop()
                        server = None
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); results so far are in {out}", flush=True)
        rc = 130
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, old_handler)
    doc = load_doc(out) or doc
    print("\n" + summary_text(doc), flush=True)
    print(f"\nJSON: {out}   total {time.time() - t_launch:.0f} s")
    return rc


def merge_files(out: Path, files: list[str], append: bool = False) -> int:
    doc = load_doc(out) if append else {}
    doc.setdefault("tool", "scripts/loadtest.py")
    doc.setdefault("results", [])
    doc.setdefault("invocations", [])
    for f in files:
        part = load_doc(Path(f))
        if not part:
            print(f"no results in {f}")
            return 1
        for r in part["results"]:
            merge_result(doc, r)
        doc["invocations"] += part.get("invocations", [])
        doc.update({k: part[k] for k in ("commit", "versions", "date") if k in part})
    gpus = sorted({str(r.get("gpu")) for r in doc["results"]})
    doc["gpu"] = gpus[0] if len(gpus) == 1 else "mixed: " + ", ".join(gpus)
    write_doc(out, doc)
    print(summary_text(doc))
    print(f"\nJSON: {out} ({len(doc['results'])} results from {len(files)} file(s))")
    return 0


def _info_of(base_url: str) -> dict:
    for path in ("/server_info", "/get_server_info"):
        code, body = _http(base_url + path, timeout=30)
        if code == 200:
            with contextlib.suppress(ValueError):
                data = json.loads(body)
                return {k: data[k] for k in SERVER_INFO_KEYS if k in data}
    return {}


def _flush_url(base_url: str) -> bool:
    return _http(base_url + "/flush_cache", method="POST", timeout=60)[0] == 200


if __name__ == "__main__":
    sys.exit(main())
