"""End-to-end load test: TurboQuant KV against what a user would run instead, at the same memory.

Each KV config gets a fresh SGLang server (dummy weights, ``--skip-tokenizer-init``,
127.0.0.1 only) and runs the selected workloads on it, one after the other.

Configs -> server flags (every server also gets the common flags below):

    bf16          (no backend flag)          SGLang's default attention backend,
    fp8           --kv-cache-dtype fp8_e4m3  fa3 on Hopper in SGLang 0.5.17
    bf16-triton   --attention-backend triton                            SGLang's Triton backend
    fp8-triton    --attention-backend triton --kv-cache-dtype fp8_e4m3  (REFERENCE.md's H100 setup)
    bf16-fa3      --attention-backend fa3                               FA3 named explicitly
    fp8-fa3       --attention-backend fa3 --kv-cache-dtype fp8_e4m3
    kXvY          --kv-quant turboquant --kv-quant-bits kXvY            k4v4, k3v3, k4v2, ...

``bf16`` and ``fp8`` are the baselines every ratio and target uses: SGLang with no
``--attention-backend``, so it picks its own default for the GPU at hand
(ServerArgs._get_default_attn_backend: fa3 on Hopper with CUDA >= 12.3, trtllm_mha on
B200, else flashinfer or triton). Every result row records the backend the server
really ran as ``backend``: ``attention_backend`` of the server's ``/server_info``
(SGLang's resolved ServerArgs), else the start-up log line "Attention backend not
specified. Use X backend by default.", else the flag; turboquant servers report
``turboquant``.

Common server flags, identical for every config: ``--mem-fraction-static``
(default 0.25), ``--cuda-graph-max-bs-decode`` (``--cuda-graph-max-bs``, default 128;
SGLang's ``--cuda-graph-max-bs`` is a deprecated alias of it), ``--stream-interval 1``
(SGLang's default, explicit: one streamed chunk per decode step) and
``--incremental-streaming-output`` (each chunk carries only its new token ids instead of
all of them, which keeps a 4000-token stream from sending O(n^2) JSON; ``--cumulative-stream``
turns it off). Prefill CUDA graphs stay on (SGLang's default): the load test adds no
``--disable-prefill-cuda-graph`` and refuses ``--extra-server-args`` that would turn
them off or change a config's backend or KV dtype.

Workloads (``--workloads``, default ``reference,long-gen,single-stream``):

* ``reference`` -- 96 requests of 6000 random input tokens and 400 output tokens at
  concurrency 64 (REFERENCE.md; H200, fa3: bf16 1227, fp8 1476 out tok/s);
* ``long-gen`` -- 128 requests of 1000 input and 4000 output tokens at concurrency 128,
  the reasoning-model case (H200, fa3: bf16 3786, fp8 5582 out tok/s);
* ``single-stream`` -- one request at a time at 4096 and at 32768 input tokens
  (``--ss-contexts``), 512 output tokens each, 3 requests per context
  (``--ss-requests``); each context is its own result row, workload
  ``single-stream-4k`` / ``single-stream-32k`` (H200, fa3: ITL p50 bf16 4.98 / 5.86 ms);
* ``shared-prefix`` -- 4 prefixes x 4000 tokens, 128 requests per prefix (prefix + 200
  unique tokens, 200 output tokens), interleaved across prefixes, concurrency 64. By
  default one request per prefix is sent first, untimed (1 output token), so the timed
  phase measures serving from a warm radix cache; ``--sp-cold`` skips that.

``--quick`` shrinks every workload for smoke tests.

Before each workload the client sends a few untimed requests of the workload's prompt
length with 8 output tokens (kernel JIT warm-up; single-stream: one request of the full
context) and then ``/flush_cache``, so every timed phase starts from an empty radix
cache. Requests are streaming ``/generate`` calls with ``input_ids`` (random ids in
[1000, 30000), fixed seed: identical prompts for every config), ``ignore_eos``, greedy.
TTFT = arrival of the first chunk carrying an output token; latency = the chunk with
``finish_reason``; output tokens = ``meta_info.completion_tokens``. ITL (inter-token
latency) = the gaps between successive arrivals of a request's output tokens: a network
read that brings n new tokens (one chunk carrying several tokens, or several chunks at
once) after a gap g counts as n gaps of g/n, so ITL is per token; ``multi_token_chunks``
counts such reads. ITL percentiles pool every token gap of the timed requests. Cache hit
rate = sum(``cached_tokens``) / sum(``prompt_tokens``). Throughput divides by the timed
phase's wall time (first send to last finish). Percentiles interpolate linearly (numpy's
default).

Results go to one JSON file (``--out``), rewritten after every (workload, config), so a
run cut short keeps what finished: top-level ``gpu``/``commit``, ``results`` (one object
per workload, variant and config, with at least workload, kv, backend, out_tok_s,
ttft_p50_s, itl_p50_ms, max_total_num_tokens, gpu, commit) and ``summary`` (ratios
against the same file's ``bf16`` and ``fp8`` rows, the target checks, and the printed
table as ``summary.text``). One GPU-host command may run at most 10 minutes, so run one
config per command and ``--append`` into one file (a new result replaces one with the
same workload, variant and config):

    python -m sglang_tq.bench load --configs bf16 --out lt.json --append --budget-s 570
    python -m sglang_tq.bench load --configs fp8  --out lt.json --append --budget-s 570
    python -m sglang_tq.bench load --configs k4v4 --out lt.json --append --budget-s 570

or let each command write its own file and ``--merge a.json b.json --out all.json``
afterwards. ``--summarize`` prints the table of a JSON file (targets: reference >= 1.5x
bf16 and >= 1.25x fp8 out tok/s; long-gen >= 2.0x bf16 and >= 1.4x fp8; single-stream
ITL p50 <= bf16's at 4k and at 32k; shared-prefix TTFT p50 < fp8's). ``--plan`` prints
the plan with each config's estimated seconds (H200 rates, start-up ~140 s) and exits.
``--budget-s`` skips whatever would not finish in time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import configs
from .cli import MODEL_CONFIGS, add_model_path, doc_parser
from .configs import TQ_RE as _TQ_RE
from .configs import expected_backend, kv_server_flags, kv_sort_key
from .results import get_provenance, load_json, write_json_atomic
from .server import SGLangServer, check_loopback, free_port, server_info
from .server import flush as flush_url
from .stream import ReqResult, stream_generate

TOOL = "sglang_tq.bench load"
DEFAULT_MODEL = str(MODEL_CONFIGS / "llama-3.1-8b")

BASELINES = ("bf16", "fp8")  # SGLang's default backend: the denominators of every ratio
DEFAULT_CONFIGS = ("bf16", "fp8", "k4v4", "k3v3", "bf16-triton", "fp8-triton")
WORKLOADS = ("reference", "long-gen", "single-stream", "shared-prefix")
DEFAULT_WORKLOADS = ("reference", "long-gen", "single-stream")
TOKEN_LO, TOKEN_HI = 1000, 30000
_SS_RE = re.compile(r"^single-stream-(\d+)(k?)$")
DEFAULT_MEM_FRACTION = 0.25
DEFAULT_CUDA_GRAPH_MAX_BS = 128
DEFAULT_BUDGET_HINT_S = 570  # one GPU-host command: 600 s

# Measured rates, for the README line under the reference table (REFERENCE.md).
BASELINE_H100 = {
    "bf16": {"out_tok_s": 920, "pool": 166_000},
    "fp8": {"out_tok_s": 1149, "pool": 332_000},
}
BASELINE_H200 = {  # Update 2026-12-02: one H200, fa3, mem 0.25, --cuda-graph-max-bs 128
    "reference": {"bf16": 1227, "fp8": 1476, "k4v4": 1558},
    "long-gen": {"bf16": 3786, "fp8": 5582, "k4v4": 5994},
    "single-stream-4k": {"bf16": 4.98, "fp8": 5.07, "k4v4": 6.07},  # ITL p50 ms
    "single-stream-32k": {"bf16": 5.86, "fp8": 5.84, "k4v4": 6.64},  # ITL p50 ms
}

# The targets: every kXvY config against the default-backend bf16 / fp8 rows.
THROUGHPUT_TARGETS = {
    "reference": (("bf16", 1.5), ("fp8", 1.25)),
    "long-gen": (("bf16", 2.0), ("fp8", 1.4)),
}
ITL_TARGET_WORKLOADS = ("single-stream-4k", "single-stream-32k")  # ITL p50 <= bf16's

# Device-time model for the plan and --budget-s (one H200, REFERENCE.md's update).
EST_STARTUP_S = 140.0  # server start-up with prefill CUDA graphs on
EST_WARMUP_S = 10.0  # per workload: JIT warm-up requests + flush
EST_PREFILL_TOK_S = 12_000.0  # uncached prompt tokens per second, one long prompt
EST_OUT_TOK_S = {  # out tok/s per workload and config family
    "reference": {"bf16": 1227.0, "fp8": 1476.0, "tq": 1558.0},
    "long-gen": {"bf16": 3786.0, "fp8": 5582.0, "tq": 6000.0},
}
EST_TRITON_FACTOR = 0.85  # SGLang's Triton backend against fa3 (d84bfea: 1048 vs 1227)
EST_ITL_S = {"bf16": 0.0059, "fp8": 0.0059, "tq": 0.0066}  # single stream, 32k
EST_SP_DECODE_TOK_S = 2_000.0  # shared-prefix: short contexts, everything fits


# ----------------------------------------------------------------------------- configs

# flags in --extra-server-args that would make a config label lie or turn prefill graphs off
_REFUSED_EXTRA = (
    "--attention-backend",
    "--prefill-attention-backend",
    "--decode-attention-backend",
    "--kv-cache-dtype",
    "--kv-quant",
    "--kv-quant-bits",
    "--disable-prefill-cuda-graph",
    "--disable-cuda-graph",
    "--disable-piecewise-cuda-graph",
    "--cuda-graph-backend-prefill",
    "--stream-interval",
)


def _flag_value(cmd: list[str], *names: str):
    """Value of the last occurrence of any of ``names`` in an argv (``--x v`` or ``--x=v``)."""
    val = None
    for i, a in enumerate(cmd):
        for n in names:
            if a == n and i + 1 < len(cmd):
                val = cmd[i + 1]
            elif a.startswith(n + "="):
                val = a[len(n) + 1 :]
    return val


def check_extra_server_args(extra: str) -> list[str]:
    """shlex-split ``--extra-server-args``; refuse flags that belong to the configs (backend,
    KV dtype), to the streaming setup, or that turn prefill CUDA graphs off."""
    return configs.check_extra_server_args(extra, _REFUSED_EXTRA)


# ----------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str  # result rows' "workload" (single-stream: one per context)
    params: dict
    prompts: list[list[int]]
    output_len: int
    concurrency: int
    warm_prompts: list[list[int]] = field(default_factory=list)  # untimed, sent first
    variant: str = "default"
    family: str = ""  # the --workloads name
    warmup_requests: int | None = None  # JIT warm-up override (None: --warmup-requests)
    warmup_len: int | None = None  # JIT warm-up prompt length (None: min(prompt, 8192))

    def __post_init__(self):
        self.family = self.family or self.name

    @property
    def label(self) -> str:
        return self.name if self.variant == "default" else f"{self.name} ({self.variant})"


_TOKENS = range(TOKEN_LO, TOKEN_HI)


def _rand_ids(rng: random.Random, n: int) -> list[int]:
    return rng.choices(_TOKENS, k=n)


REFERENCE_DEFAULTS = dict(num_requests=96, input_len=6000, output_len=400, concurrency=64)
REFERENCE_QUICK = dict(num_requests=16, input_len=1024, output_len=32, concurrency=8)
LONG_GEN_DEFAULTS = dict(num_requests=128, input_len=1000, output_len=4000, concurrency=128)
LONG_GEN_QUICK = dict(num_requests=16, input_len=256, output_len=128, concurrency=16)
SS_DEFAULTS = dict(num_requests=3, output_len=512)
SS_QUICK = dict(num_requests=2, output_len=32)
SS_CONTEXTS = (4096, 32768)
SS_QUICK_CONTEXTS = (1024, 4096)
SP_DEFAULTS = dict(
    num_prefixes=4,
    prefix_len=4000,
    requests_per_prefix=128,
    suffix_len=200,
    output_len=200,
    concurrency=64,
    warm=True,
)
SP_QUICK = dict(
    num_prefixes=2,
    prefix_len=1024,
    requests_per_prefix=8,
    suffix_len=64,
    output_len=32,
    concurrency=8,
    warm=True,
)


def _variant(params: dict, defaults: dict, quick: dict, is_quick: bool) -> str:
    base = quick if is_quick else defaults
    prefix = "quick" if is_quick else ""
    if params == base:
        return prefix or "default"
    if params == {**base, "warm": False}:
        return (prefix + "-" if prefix else "") + "cold"
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return ("quick-" if is_quick else "") + "custom-" + digest


def _random_workload(
    name: str,
    defaults: dict,
    quick_defaults: dict,
    *,
    num_requests: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    seed: int = 0,
    quick: bool = False,
) -> Workload:
    """``num_requests`` prompts of ``input_len`` random ids (seeded by ``name`` and ``seed``)."""
    params = dict(
        num_requests=num_requests,
        input_len=input_len,
        output_len=output_len,
        concurrency=concurrency,
    )
    rng = random.Random(f"{name}-{seed}")
    prompts = [_rand_ids(rng, input_len) for _ in range(num_requests)]
    return Workload(
        name,
        {**params, "seed": seed},
        prompts,
        output_len,
        concurrency,
        variant=_variant(params, defaults, quick_defaults, quick),
    )


def reference_workload(**params) -> Workload:
    """The reference workload; ``params``: num_requests, input_len, output_len, concurrency
    and optionally seed and quick (see _random_workload)."""
    return _random_workload("reference", REFERENCE_DEFAULTS, REFERENCE_QUICK, **params)


def long_gen_workload(**params) -> Workload:
    """The long-generation workload; ``params`` as for reference_workload."""
    return _random_workload("long-gen", LONG_GEN_DEFAULTS, LONG_GEN_QUICK, **params)


def single_stream_name(context: int) -> str:
    return (
        f"single-stream-{context // 1024}k" if context % 1024 == 0 else f"single-stream-{context}"
    )


def single_stream_workload(
    context: int, num_requests: int, output_len: int, seed: int = 0, quick: bool = False
) -> Workload:
    """One request at a time (concurrency 1) of ``context`` input tokens; one untimed
    warm-up request of the same length first."""
    params = dict(num_requests=num_requests, output_len=output_len)
    rng = random.Random(f"single-stream-{context}-{seed}")
    prompts = [_rand_ids(rng, context) for _ in range(num_requests)]
    return Workload(
        single_stream_name(context),
        {"context": context, **params, "seed": seed},
        prompts,
        output_len,
        1,
        variant=_variant(params, SS_DEFAULTS, SS_QUICK, quick),
        family="single-stream",
        warmup_requests=1,
        warmup_len=context,
    )


def shared_prefix_workload(
    num_prefixes: int,
    prefix_len: int,
    requests_per_prefix: int,
    suffix_len: int,
    output_len: int,
    concurrency: int,
    warm: bool = True,
    seed: int = 0,
    quick: bool = False,
) -> Workload:
    params = dict(
        num_prefixes=num_prefixes,
        prefix_len=prefix_len,
        requests_per_prefix=requests_per_prefix,
        suffix_len=suffix_len,
        output_len=output_len,
        concurrency=concurrency,
        warm=warm,
    )
    rng = random.Random(f"shared-prefix-{seed}")
    prefixes = [_rand_ids(rng, prefix_len) for _ in range(num_prefixes)]
    # interleaved: request i uses prefix i % num_prefixes
    prompts = [
        prefixes[i % num_prefixes] + _rand_ids(rng, suffix_len)
        for i in range(num_prefixes * requests_per_prefix)
    ]
    warm_prompts = [p + _rand_ids(rng, suffix_len) for p in prefixes] if warm else []
    return Workload(
        "shared-prefix",
        {**params, "seed": seed},
        prompts,
        output_len,
        concurrency,
        warm_prompts=warm_prompts,
        variant=_variant(params, SP_DEFAULTS, SP_QUICK, quick),
    )


def _overrides(args, defaults: dict, prefix: str, names: dict | None = None) -> dict:
    p = dict(defaults)
    for k in p:
        v = getattr(args, (names or {}).get(k, prefix + k), None)
        if v is not None:
            p[k] = v
    return p


def build_workloads(args) -> list[Workload]:
    out = []
    q = args.quick
    for name in args.workloads:
        if name == "reference":
            p = _overrides(args, REFERENCE_QUICK if q else REFERENCE_DEFAULTS, "")
            out.append(reference_workload(**p, seed=args.seed, quick=q))
        elif name == "long-gen":
            p = _overrides(args, LONG_GEN_QUICK if q else LONG_GEN_DEFAULTS, "lg_")
            out.append(long_gen_workload(**p, seed=args.seed, quick=q))
        elif name == "single-stream":
            p = _overrides(
                args,
                SS_QUICK if q else SS_DEFAULTS,
                "ss_",
                {"num_requests": "ss_requests", "output_len": "ss_output_len"},
            )
            contexts = getattr(args, "ss_contexts", None) or (
                SS_QUICK_CONTEXTS if q else SS_CONTEXTS
            )
            out += [single_stream_workload(c, **p, seed=args.seed, quick=q) for c in contexts]
        else:
            p = _overrides(args, SP_QUICK if q else SP_DEFAULTS, "sp_")
            if args.sp_cold:
                p["warm"] = False
            out.append(shared_prefix_workload(**p, seed=args.seed, quick=q))
    return out


def _est_family(kv: str) -> tuple[str, float]:
    """(rate family, speed factor) of a config for the time model."""
    if _TQ_RE.match(kv):
        return "tq", 1.0
    name, _, backend = kv.partition("-")
    return name, (EST_TRITON_FACTOR if backend == "triton" else 1.0)


def estimate_run_s(wl: Workload, kv: str) -> float:
    """Rough seconds for one workload's warm-up and timed phase (H200 rates, see EST_*)."""
    fam, speed = _est_family(kv)
    n = len(wl.prompts)
    out_tokens = n * wl.output_len
    if wl.family in EST_OUT_TOK_S:
        return EST_WARMUP_S + out_tokens / (EST_OUT_TOK_S[wl.family][fam] * speed)
    if wl.family == "single-stream":
        ctx = wl.params["context"]
        prefill = ctx / (EST_PREFILL_TOK_S * speed)
        warm = prefill + 8 * EST_ITL_S[fam] / speed
        return EST_WARMUP_S + warm + n * (prefill + wl.output_len * EST_ITL_S[fam] / speed)
    p = wl.params
    uncached = p["num_prefixes"] * p["prefix_len"] + n * p["suffix_len"]
    warm = p["num_prefixes"] * (p["prefix_len"] + p["suffix_len"]) / EST_PREFILL_TOK_S
    return EST_WARMUP_S + warm + uncached / EST_PREFILL_TOK_S + out_tokens / EST_SP_DECODE_TOK_S


def estimate_config_s(workloads: list[Workload], kv: str, starts: int = 1) -> float:
    return EST_STARTUP_S * starts + sum(estimate_run_s(w, kv) for w in workloads)


def workload_sort_key(name: str):
    """Result order: reference, long-gen, single-stream by context, shared-prefix, others."""
    m = _SS_RE.match(name or "")
    if m:
        ctx = int(m.group(1)) * (1024 if m.group(2) else 1)
        return (WORKLOADS.index("single-stream"), ctx, name)
    return (WORKLOADS.index(name) if name in WORKLOADS else len(WORKLOADS), 0, name or "")


# ----------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    return _sorted_percentile(v, q)


def _sorted_percentile(v: list[float], q: float) -> float | None:
    if not v:
        return None
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _r(x, nd=4):
    return None if x is None else round(x, nd)


def compute_stats(
    results: list[ReqResult | None],
    duration_s: float,
    num_requests: int,
    expected_output_len: int | None = None,
) -> dict:
    done = [r for r in results if r is not None]
    ok = [r for r in done if r.ok]
    failed = [r for r in done if not r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok if r.latency is not None]
    tpot = [
        (r.latency - r.ttft) / (r.completion_tokens - 1)
        for r in ok
        if r.latency is not None and r.ttft is not None and r.completion_tokens > 1
    ]
    itl = sorted(g for r in ok for g in r.itl)
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)

    def per_s(x, nd):  # None for an empty phase: NaN is no JSON
        return _r(x / duration_s, nd) if duration_s > 0 else None

    def ms(x):
        return None if x is None else round(x * 1e3, 3)

    stats = {
        "num_requests": num_requests,
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": _r(duration_s, 3),
        "out_tok_s": per_s(out_tokens, 2),
        "req_s": per_s(len(ok), 4),
        "in_tok_s": per_s(prompt_tokens, 1),
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
        # per output token, pooled over the timed requests (see the module docstring)
        "itl_mean_ms": ms(sum(itl) / len(itl) if itl else None),
        "itl_p50_ms": ms(_sorted_percentile(itl, 50)),
        "itl_p90_ms": ms(_sorted_percentile(itl, 90)),
        "itl_p99_ms": ms(_sorted_percentile(itl, 99)),
        "itl_tokens": len(itl),
        "stream_chunks": sum(r.arrivals for r in ok),
        "multi_token_chunks": sum(r.multi_token_chunks for r in ok),
        "max_tokens_per_chunk": max((r.max_chunk_tokens for r in ok), default=0),
    }
    if expected_output_len is not None:
        stats["short_outputs"] = sum(1 for r in ok if r.completion_tokens != expected_output_len)
    if failed:
        stats["errors"] = sorted({str(r.error)[:200] for r in failed})[:5]
    return stats


async def run_workload(
    base_url: str,
    wl: Workload,
    timeout_s: float,
    *,
    progress_s: float = 10.0,
    label: str = "",
    warmup_requests: int = 4,
    warmup_len: int | None = None,
    flush: Callable[[], object] | None = None,
    log: Callable[[str], None] = print,
    incremental: bool = False,
) -> dict:
    """Warm up, flush, (prefix warm-up), then the timed phase; returns compute_stats + extras.

    ``warmup_requests=0`` skips the JIT warm-up; otherwise the workload's own warm-up
    (single-stream: one request of the full context) replaces the count and length."""
    import aiohttp

    base_url = check_loopback(base_url)
    if warmup_requests > 0 and wl.warmup_requests is not None:
        warmup_requests = wl.warmup_requests
    if warmup_len is None:
        warmup_len = wl.warmup_len
    conn = aiohttp.TCPConnector(
        limit=max(wl.concurrency, warmup_requests, len(wl.warm_prompts)) + 4
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=max(timeout_s, 60))

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        def gen(ids, n):
            return stream_generate(session, base_url, ids, n, incremental=incremental)

        extra = await _warm_up(gen, wl, warmup_requests, warmup_len, flush)
        timed = _TimedPhase(gen, wl, progress_s, label, log)
        await timed.run(timeout_s)
    stats = compute_stats(timed.results, timed.duration_s, len(wl.prompts), wl.output_len)
    stats["timed_out"] = timed.timed_out
    if timed.timed_out:
        stats["timeout_s"] = timeout_s
    if timed.caught:
        stats["interrupted"] = timed.caught[0]
    stats.update(extra)
    return stats


async def _warm_up(
    gen, wl: Workload, requests: int, input_len: int | None, flush: Callable[[], object] | None
) -> dict:
    """The untimed part before a timed phase: JIT warm-up requests (first-launch costs), the
    flush, and the shared-prefix workload's prefix warm-up; what each did, for the row."""
    extra: dict = {}
    if requests > 0:
        rng = random.Random("jit-warmup")  # prompts of the workload's length, never reused
        if input_len is None:
            input_len = min(len(wl.prompts[0]), 8192) if wl.prompts else 256
        t = time.perf_counter()
        ws = await asyncio.gather(*(gen(_rand_ids(rng, input_len), 8) for _ in range(requests)))
        extra["jit_warmup"] = {
            "requests": requests,
            "input_len": input_len,
            "ok": sum(r.ok for r in ws),
            "s": round(time.perf_counter() - t, 2),
        }
        if not any(r.ok for r in ws):
            raise RuntimeError(f"warm-up requests failed: {ws[0].error}")
    if flush is not None:
        extra["flushed"] = await asyncio.get_running_loop().run_in_executor(None, flush)
    if wl.warm_prompts:  # shared-prefix: put every prefix in the radix cache, untimed
        t = time.perf_counter()
        ws = await asyncio.gather(*(gen(p, 1) for p in wl.warm_prompts))
        extra["prefix_warmup"] = {
            "requests": len(ws),
            "ok": sum(r.ok for r in ws),
            "s": round(time.perf_counter() - t, 2),
        }
    return extra


class _TimedPhase:
    """A workload's timed requests at its concurrency, with progress lines. SIGTERM / SIGINT
    end the phase like a timeout, so the partial numbers are kept (``caught`` names the
    signal; the caller re-raises KeyboardInterrupt afterwards)."""

    def __init__(self, gen, wl: Workload, progress_s: float, label: str, log):
        self.gen, self.wl, self.progress_s, self.label, self.log = gen, wl, progress_s, label, log
        self.results: list[ReqResult | None] = [None] * len(wl.prompts)
        self.finish_times: list[float] = []
        self.caught: list[str] = []
        self.timed_out = False
        self.duration_s = 0.0
        self.start = 0.0

    async def one(self, i: int, sem: asyncio.Semaphore) -> None:
        async with sem:
            r = await self.gen(self.wl.prompts[i], self.wl.output_len)
        self.results[i] = r
        self.finish_times.append(time.perf_counter())

    async def progress(self) -> None:
        n = len(self.results)
        while True:
            await asyncio.sleep(self.progress_s)
            done = [r for r in self.results if r is not None]
            el = time.perf_counter() - self.start
            toks = sum(r.completion_tokens for r in done if r.ok)
            self.log(
                f"  [{self.label}] {len(done)}/{n} done, {sum(not r.ok for r in done)} failed, "
                f"{el:.0f} s, {toks / el:.0f} out tok/s so far"
            )

    async def run(self, timeout_s: float) -> None:
        sem = asyncio.Semaphore(self.wl.concurrency)
        self.start = time.perf_counter()
        tasks = [asyncio.create_task(self.one(i, sem)) for i in range(len(self.results))]
        prog = asyncio.create_task(self.progress())
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(
                    sig, lambda sig=sig: (self.caught.append(sig.name), stop.set())
                )
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        all_done = asyncio.ensure_future(asyncio.wait(tasks))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                [all_done, stopper], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            pending = [t for t in tasks if not t.done()]
            for t in (prog, all_done, stopper, *tasks):
                t.cancel()
            await asyncio.gather(prog, all_done, stopper, *tasks, return_exceptions=True)
        self.timed_out = bool(pending) and not self.caught
        end = time.perf_counter() if pending or not self.finish_times else max(self.finish_times)
        self.duration_s = end - self.start


# ----------------------------------------------------------------------------- decode profile

# device time of a decode step by kernel class, from the kernels' names (first match wins)
KERNEL_CLASSES = (
    ("kv_write", re.compile(r"tq_store|store_cache|store_kv|set_kv|index_put|scatter")),
    ("norm", re.compile(r"norm")),  # before attention: flashinfer::norm::FusedAddRMSNormKernel
    ("attention", re.compile(r"tq_decode|flash_fwd|flash::|flashattn|fwd_combine|attn|attention")),
    ("gemm", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|matmul|splitk")),
    ("rope", re.compile(r"rope|rotary")),
    ("activation", re.compile(r"silu|gelu|act_and_mul")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, rx in KERNEL_CLASSES if rx.search(low)), "other")


def summarize_kernel_trace(events: list[dict], steps: int, top: int = 12) -> dict:
    """Per-step device time (µs) by kernel class and of the ``top`` kernels, from a
    Chrome trace's kernel events (``cat`` == "kernel", ``dur`` in µs) of ``steps``
    decode steps; ``span_us_per_step`` is first kernel start to last kernel end over
    the steps, so span minus busy is the GPU's idle time between kernels. Kernels started
    with programmatic dependent launch overlap their predecessor (busy can exceed span),
    and their duration includes the time they wait for it."""
    kern = [
        e
        for e in events
        if e.get("cat") == "kernel" and e.get("ph", "X") == "X" and "dur" in e and "ts" in e
    ]
    if not kern or steps < 1:
        return {"steps": steps, "kernels": 0}
    by_class: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kern:
        c = kernel_class(e.get("name", ""))
        by_class[c] = by_class.get(c, 0.0) + float(e["dur"])
        slot = by_name.setdefault(e.get("name", ""), [0.0, 0, c])
        slot[0] += float(e["dur"])
        slot[1] += 1
    busy = sum(by_class.values())
    span = max(float(e["ts"]) + float(e["dur"]) for e in kern) - min(float(e["ts"]) for e in kern)
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps,
        "kernels_per_step": round(len(kern) / steps, 2),
        "busy_us_per_step": round(busy / steps, 2),
        "span_us_per_step": round(span / steps, 2),
        "class_us_per_step": {
            c: round(t / steps, 2) for c, t in sorted(by_class.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {
                "name": n[:160],
                "class": c,
                "us_per_step": round(t / steps, 2),
                "launches_per_step": round(k / steps, 2),
                "us_per_launch": round(t / k, 3),
            }
            for n, (t, k, c) in names
        ],
    }


def read_trace_events(path: Path) -> list[dict]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    return doc.get("traceEvents", []) if isinstance(doc, dict) else doc


async def profile_decode_steps(
    base_url: str,
    prompt: list[int],
    steps: int,
    out_dir: Path,
    *,
    incremental: bool = False,
    lead_tokens: int = 16,
    timeout_s: float = 120.0,
) -> dict:
    """Profile ``steps`` decode steps of one streamed request (SGLang's /start_profile,
    GPU kernels only), started once ``lead_tokens`` tokens arrived so no prefill is in
    the window; returns :func:`summarize_kernel_trace` plus the trace's path."""
    import aiohttp

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.trace.json*"):
        old.unlink()
    res = ReqResult()
    req = {
        "output_dir": str(out_dir.resolve()),
        "num_steps": steps,
        "activities": ["GPU"],
        "profile_id": "decode",
    }
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        task = asyncio.create_task(
            stream_generate(
                session,
                base_url,
                prompt,
                lead_tokens + steps + 64,
                incremental=incremental,
                res=res,
            )
        )
        while res.completion_tokens < lead_tokens and not task.done():
            await asyncio.sleep(0.002)
        if task.done():
            raise RuntimeError(f"the profiled request ended early: {res.error}")
        async with session.post(base_url + "/start_profile", json=req) as resp:
            if resp.status != 200:
                raise RuntimeError(
                    f"/start_profile -> HTTP {resp.status}: {(await resp.text())[:300]}"
                )
        await task
    deadline = time.time() + timeout_s
    while time.time() < deadline:  # the scheduler exports the trace after the last step
        found = sorted(out_dir.glob("*.trace.json*"))
        if found:
            try:
                events = read_trace_events(found[0])
            except (OSError, ValueError, EOFError):
                await asyncio.sleep(1.0)  # still being written
                continue
            return {**summarize_kernel_trace(events, steps), "trace": str(found[0])}
        await asyncio.sleep(0.5)
    raise RuntimeError(f"no trace in {out_dir} {timeout_s:.0f} s after /start_profile")


# ----------------------------------------------------------------------------- server


def common_server_flags(args) -> list[str]:
    """Flags every measured server gets, whatever its config."""
    flags = [
        "--load-format",
        "dummy",
        "--skip-tokenizer-init",
        "--mem-fraction-static",
        str(args.mem_fraction_static),
        "--cuda-graph-max-bs-decode",
        str(args.cuda_graph_max_bs),
        "--stream-interval",
        "1",
    ]
    if not args.cumulative_stream:
        flags.append("--incremental-streaming-output")
    return flags


def server_flags(args, kv: str) -> list[str]:
    """A config's server arguments after --model-path/--host/--port."""
    return [
        *common_server_flags(args),
        *kv_server_flags(kv, args.model_path),
        *check_extra_server_args(args.extra_server_args),
    ]


def make_server(args, kv: str, port: int, log_path: Path) -> SGLangServer:
    return SGLangServer(
        args.model_path, server_flags(args, kv), log_path, module=args.server_module, port=port
    )


def server_command(args, kv: str, port: int) -> list[str]:
    return make_server(args, kv, port, Path(os.devnull)).cmd


def detect_backend(kv: str, info: dict, log_default: str | None = None) -> dict:
    """The attention backend a server ran: /server_info's resolved ``attention_backend``,
    else the start-up log's default-backend line, else what the flags name."""
    want = expected_backend(kv)
    if info.get("attention_backend"):
        backend, source = str(info["attention_backend"]), "server_info"
    elif log_default and want is None:
        backend, source = log_default, "server log"
    elif want is not None:
        backend, source = want, "flags"
    else:
        backend, source = "unknown", "none"
    out = {
        "backend": backend,
        "backend_source": source,
        "prefill_backend": info.get("prefill_attention_backend") or backend,
        "decode_backend": info.get("decode_attention_backend") or backend,
    }
    if want is not None and backend != want:
        out["backend_mismatch"] = f"flags name {want}, server ran {backend}"
    return out


def prefill_graph_state(info: dict, cmd: list[str] | None) -> bool | None:
    """Were prefill CUDA graphs on? From the server's resolved cuda_graph_config where
    it reports one, else from its flags; None if neither tells."""
    cfg = info.get("cuda_graph_config")
    if (
        isinstance(cfg, dict)
        and isinstance(cfg.get("prefill"), dict)
        and "backend" in cfg["prefill"]
    ):
        return str(cfg["prefill"]["backend"]).lower() not in ("disabled", "backend.disabled")
    if info.get("disable_prefill_cuda_graph") or info.get("disable_cuda_graph"):
        return False
    if cmd is not None:
        return not any(a in ("--disable-prefill-cuda-graph", "--disable-cuda-graph") for a in cmd)
    return None


def server_settings(args, kv: str, cmd: list[str] | None, info: dict) -> dict:
    """The settings a result row records (and the summary compares across configs)."""
    gmb = info.get("cuda_graph_max_bs_decode")
    if gmb is None and cmd is not None:
        gmb = _flag_value(cmd, "--cuda-graph-max-bs-decode", "--cuda-graph-max-bs")
    si = info.get("stream_interval")
    if si is None and cmd is not None:
        si = _flag_value(cmd, "--stream-interval")
    inc = info.get("incremental_streaming_output")
    if inc is None and cmd is not None:
        inc = "--incremental-streaming-output" in cmd
    return {
        "mem_fraction_static": info.get("mem_fraction_static") or args.mem_fraction_static,
        "cuda_graph_max_bs": None if gmb is None else int(gmb),
        "stream_interval": None if si is None else int(si),
        "incremental_stream": inc,
        "prefill_cuda_graph": prefill_graph_state(info, cmd),
    }


# ----------------------------------------------------------------------------- JSON


def upgrade_row(r: dict) -> dict:
    """Rows written before configs recorded ``backend`` (commit dde726b and earlier):
    their ``bf16`` / ``fp8`` ran ``--attention-backend triton``, so they become
    ``bf16-triton`` / ``fp8-triton`` and never stand in for the default-backend rows."""
    if "backend" in r or not isinstance(r.get("kv"), str):
        return r
    flags = r.get("kv_flags") or []
    named = (
        flags[flags.index("--attention-backend") + 1]
        if "--attention-backend" in flags[:-1]
        else None
    )
    kv = r["kv"]
    if kv in BASELINES and named:
        r["kv"] = f"{kv}-{named}"
    ran = (r.get("server_info") or {}).get("attention_backend")
    r["backend"] = ran or named or ("turboquant" if _TQ_RE.match(kv) else "unknown")
    r["backend_source"] = "server_info" if ran else "legacy kv_flags"
    return r


def load_doc(path: Path) -> dict:
    """A results file with its rows upgraded, or {} when it is missing or holds no results."""
    doc = load_json(path)
    if not isinstance(doc.get("results"), list):
        return {}
    doc["results"] = [upgrade_row(r) for r in doc["results"] if isinstance(r, dict)]
    return doc


def result_key(r: dict) -> tuple:
    return (r.get("workload"), r.get("variant", "default"), r.get("kv"))


def merge_result(doc: dict, res: dict) -> dict:
    res = upgrade_row(res)
    doc["results"] = [r for r in doc.get("results", []) if result_key(r) != result_key(res)]
    doc["results"].append(res)
    doc["results"].sort(
        key=lambda r: (
            workload_sort_key(r.get("workload")),
            r.get("variant", ""),
            kv_sort_key(r.get("kv", "")),
        )
    )
    return doc


def write_doc(path: Path, doc: dict):
    gpus = sorted({str(r.get("gpu", "unknown")) for r in doc.get("results", [])})
    doc["gpus"] = gpus
    doc["summary"] = summarize(doc.get("results", []))
    doc["summary"]["text"] = summary_text(doc).splitlines()
    write_json_atomic(path, doc)


# ----------------------------------------------------------------------------- summary


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def summarize(results: list[dict]) -> dict:
    """Ratios vs the default-backend ``bf16`` / ``fp8`` rows per (workload, variant) and
    the issue's target checks.

    Only complete runs (status "ok") enter ratios; a target whose inputs are missing or
    incomplete reads ``pass: null``. Targets use the default workloads only. Ratios:
    ``out_tok_s_vs_*`` and ``ttft_p50_speedup_vs_*`` > 1 is better; ``itl_p50_vs_*`` is
    this row's ITL p50 over the baseline's, < 1 is better."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["workload"], r.get("variant", "default")), {})[r["kv"]] = r
    out = {
        "baselines": {
            "bf16": "SGLang's default attention backend, bf16 KV",
            "fp8": "SGLang's default attention backend, --kv-cache-dtype fp8_e4m3",
        },
        "groups": [],
        "targets": [],
    }
    for (wl, variant), all_kv in sorted(
        groups.items(), key=lambda kv: (workload_sort_key(kv[0][0]), kv[0][1])
    ):
        by_kv = {kv: r for kv, r in all_kv.items() if r.get("status") == "ok"}
        base = {b: by_kv.get(b) for b in BASELINES}
        rows = {
            kv: _ratios(r, base)
            for kv, r in sorted(by_kv.items(), key=lambda kv_r: kv_sort_key(kv_r[0]))
        }
        mixed = len({r.get("gpu") for r in by_kv.values()}) > 1
        settings = {
            k: sorted({str(r.get(k)) for r in by_kv.values()})
            for k in (
                "mem_fraction_static",
                "cuda_graph_max_bs",
                "stream_interval",
                "prefill_cuda_graph",
            )
        }
        out["groups"].append(
            {
                "workload": wl,
                "variant": variant,
                "mixed_gpus": mixed,
                "baseline_backends": {b: br and br.get("backend") for b, br in base.items()},
                "settings_differ": [k for k, v in settings.items() if len(v) > 1],
                "ratios": rows,
            }
        )
        if variant == "default":
            kvs = sorted(all_kv, key=kv_sort_key)
            out["targets"] += _targets(wl, kvs, by_kv, rows, base, mixed)
    return out


def _ratios(r: dict, base: dict[str, dict | None]) -> dict:
    """One row's ratios against the baseline rows (None where a baseline is missing)."""
    row = {}
    for b, br in base.items():
        row[f"out_tok_s_vs_{b}"] = _ratio(r.get("out_tok_s"), br and br.get("out_tok_s"))
        # > 1 means faster (lower TTFT) than the baseline
        row[f"ttft_p50_speedup_vs_{b}"] = _ratio(br and br.get("ttft_p50_s"), r.get("ttft_p50_s"))
        row[f"itl_p50_vs_{b}"] = _ratio(r.get("itl_p50_ms"), br and br.get("itl_p50_ms"))
    row["pool_vs_bf16"] = _ratio(
        r.get("max_total_num_tokens"),
        base["bf16"] and base["bf16"].get("max_total_num_tokens"),
    )
    return row


def _targets(
    wl: str, kvs: list[str], by_kv: dict, rows: dict, base: dict, mixed: bool
) -> list[dict]:
    """The issue's target checks of one default workload, for every kXvY config in ``kvs``."""
    out = []

    def target(name, kv, value, threshold, ok):
        out.append(
            {
                "name": name,
                "workload": wl,
                "kv": kv,
                "value": value,
                "threshold": threshold,
                "pass": ok,
                "mixed_gpus": mixed,
            }
        )

    for kv in (kv for kv in kvs if _TQ_RE.match(kv)):
        row, mine = rows.get(kv, {}), by_kv.get(kv)
        if wl in THROUGHPUT_TARGETS:
            for b, thr in THROUGHPUT_TARGETS[wl]:
                v = row.get(f"out_tok_s_vs_{b}")
                target(f"{wl} {kv} out tok/s >= {thr}x {b}", kv, v, thr, _at_least(v, thr))
        elif wl in ITL_TARGET_WORKLOADS:
            v = mine and mine.get("itl_p50_ms")
            b = base["bf16"] and base["bf16"].get("itl_p50_ms")
            ok = None if v is None or b is None else v <= b
            target(f"{wl} {kv} ITL p50 <= bf16", kv, v, b, ok)
        elif wl == "shared-prefix":
            v = mine and mine.get("ttft_p50_s")
            b = base["fp8"] and base["fp8"].get("ttft_p50_s")
            ok = None if v is None or b is None else v < b
            target(f"shared-prefix {kv} TTFT p50 < fp8", kv, v, b, ok)
    return out


def _at_least(v, threshold) -> bool | None:
    return None if v is None else v >= threshold


def _fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


_TABLE_HEADER = (
    f"{'kv':<11} {'backend':<10} {'pool tok':>9} {'xbf16':>5} {'out tok/s':>9} {'xbf16':>6} {'xfp8':>6} "
    f"{'TTFT p50':>8} {'ITL p50':>7} {'p90':>6} {'ITL/bf16':>8} {'/fp8':>5} {'hit%':>5} {'done':>7} note"
)
_NO_GROUP = {"ratios": {}, "mixed_gpus": False, "settings_differ": [], "baseline_backends": {}}


def summary_text(doc: dict) -> str:
    results = doc.get("results", [])
    summ = summarize(results)
    lines = [
        f"GPU(s): {', '.join(sorted({str(r.get('gpu')) for r in results})) or '-'}   "
        f"commit(s): {', '.join(sorted({str(r.get('commit')) for r in results})) or '-'}",
        "bf16 / fp8 = SGLang's default attention backend (column 'backend'); x = ratio to that row "
        "(out tok/s: higher is better; ITL: this / baseline, lower is better)",
    ]
    ratio_by_group = {(g["workload"], g["variant"]): g for g in summ["groups"]}
    keys = sorted(
        {(r["workload"], r.get("variant", "default")) for r in results},
        key=lambda k: (workload_sort_key(k[0]), k[1]),
    )
    for wl, variant in keys:
        rows = sorted(
            (r for r in results if (r["workload"], r.get("variant", "default")) == (wl, variant)),
            key=lambda r: kv_sort_key(r["kv"]),
        )
        lines += _group_lines(wl, variant, rows, ratio_by_group.get((wl, variant), _NO_GROUP))
    if summ["targets"]:
        lines += ["", "targets (against this file's bf16 / fp8 rows):"]
        lines += [_target_line(t) for t in summ["targets"]]
    return "\n".join(lines)


def _group_lines(wl: str, variant: str, rows: list[dict], g: dict) -> list[str]:
    """One (workload, variant) table: heading with warnings, a line per config, notes."""
    warn = "   WARNING: results from different GPUs" if g["mixed_gpus"] else ""
    if g["settings_differ"]:
        warn += f"   WARNING: servers differ in {', '.join(g['settings_differ'])}"
    lines = ["", f"== {wl}" + ("" if variant == "default" else f" ({variant})") + warn]
    lines.append(_TABLE_HEADER)
    lines += [_row_line(r, g["ratios"].get(r["kv"], {})) for r in rows]
    bb = g.get("baseline_backends") or {}
    if bb.get("bf16") and bb.get("fp8") and bb["bf16"] != bb["fp8"]:
        lines.append(
            f"WARNING: the baselines ran different backends (bf16 {bb['bf16']}, fp8 {bb['fp8']})"
        )
    if variant == "default" and wl in BASELINE_H200:
        ref = BASELINE_H200[wl]
        what = "ITL p50 ms" if wl.startswith("single-stream") else "out tok/s"
        lines.append(
            f"(REFERENCE.md update, H200, fa3, {what}: "
            + ", ".join(f"{k} {v}" for k, v in ref.items())
            + ")"
        )
    return lines


def _row_line(r: dict, q: dict) -> str:
    """One config's line of a table; ``q``: its ratios."""
    if r.get("status") not in ("ok", "partial"):
        why = r.get("error") or (
            f"interrupted ({r['interrupted']})"
            if r.get("interrupted")
            else "timed out"
            if r.get("timed_out")
            else ""
        )
        return (
            f"{r['kv']:<11} {str(r.get('backend') or '?'):<10} {r.get('status')}: {str(why)[:100]}"
        )
    note = (
        "TIMED OUT (no ratios)"
        if r.get("timed_out")
        else f"INTERRUPTED ({r['interrupted']}, no ratios)"
        if r.get("interrupted")
        else f"{r['failed']} FAILED REQS"
        if r.get("failed")
        else ""
    )
    if r.get("retractions"):
        note += f" {r['retractions']} retractions"
    if r.get("backend_mismatch"):
        note += f" BACKEND MISMATCH ({r['backend_mismatch']})"
    if r.get("prefill_cuda_graph") is False:
        note += " PREFILL GRAPHS OFF"
    hit = r.get("cache_hit_rate")
    return (
        f"{r['kv']:<11} {str(r.get('backend') or '?'):<10} {_fmt(r.get('max_total_num_tokens')):>9} "
        f"{_fmt(q.get('pool_vs_bf16'), '{:.2f}'):>5} "
        f"{_fmt(r.get('out_tok_s')):>9} {_fmt(q.get('out_tok_s_vs_bf16'), '{:.2f}'):>6} "
        f"{_fmt(q.get('out_tok_s_vs_fp8'), '{:.2f}'):>6} "
        f"{_fmt(r.get('ttft_p50_s'), '{:.2f}'):>8} {_fmt(r.get('itl_p50_ms'), '{:.2f}'):>7} "
        f"{_fmt(r.get('itl_p90_ms'), '{:.2f}'):>6} {_fmt(q.get('itl_p50_vs_bf16'), '{:.2f}'):>8} "
        f"{_fmt(q.get('itl_p50_vs_fp8'), '{:.2f}'):>5} "
        f"{_fmt(None if hit is None else 100 * hit, '{:.1f}'):>5} "
        f"{r.get('completed')}/{r.get('num_requests'):<3} {note}".rstrip()
    )


def _target_line(t: dict) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
    if "ITL" in t["name"]:
        val = f"{_fmt(t['value'], '{:.2f}')} ms (bf16 {_fmt(t['threshold'], '{:.2f}')} ms)"
    elif "TTFT" in t["name"]:
        val = f"{_fmt(t['value'], '{:.3f}')} s (fp8 {_fmt(t['threshold'], '{:.3f}')} s)"
    else:
        val = f"{_fmt(t['value'], '{:.3f}')}x"
    return f"  [{mark}] {t['name']}: {val}" + ("  (mixed GPUs!)" if t["mixed_gpus"] else "")


# ----------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {text!r}"
        ) from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = doc_parser("python -m sglang_tq.bench load", __doc__)
    _add_server_args(ap)
    _add_run_args(ap)
    _add_workload_args(ap)
    args = ap.parse_args(argv)
    args.argv = argv
    _check_args(ap, args)
    return args


def _add_server_args(ap: argparse.ArgumentParser) -> None:
    add_model_path(
        ap,
        DEFAULT_MODEL,
        help="model folder (default: the dummy "
        "Llama-3.1-8B config in benchmarks/model_configs/llama-3.1-8b)",
    )
    ap.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="comma list of KV configs (default %(default)s): bf16 and fp8 run SGLang's default "
        "attention backend (no --attention-backend: fa3 on Hopper) and are the baselines of "
        "every ratio; bf16-triton / fp8-triton run SGLang's Triton backend, bf16-fa3 / fp8-fa3 "
        "name fa3 explicitly; kXvY (k4v4, k3v3, ...) run --kv-quant turboquant",
    )
    ap.add_argument(
        "--mem-fraction-static",
        type=float,
        default=DEFAULT_MEM_FRACTION,
        help="the same for every server (default %(default)s)",
    )
    ap.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=DEFAULT_CUDA_GRAPH_MAX_BS,
        help="decode CUDA-graph batch cap, the same for every server, passed as "
        "--cuda-graph-max-bs-decode (default %(default)s)",
    )
    ap.add_argument(
        "--cumulative-stream",
        action="store_true",
        help="let SGLang send all output ids in every streamed chunk (its default) instead of "
        "--incremental-streaming-output (only the new ids); both stream every token",
    )
    ap.add_argument(
        "--extra-server-args",
        default="",
        help="one string, shlex-split, added to every server; may not name a backend, KV dtype, "
        "streaming or prefill-CUDA-graph flag",
    )
    ap.add_argument(
        "--prefill-cuda-graph", action="store_true", help=argparse.SUPPRESS
    )  # always on now
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument(
        "--fresh-server-per-workload",
        action="store_true",
        help="restart the server for every workload (default: one server per KV config, "
        "/flush_cache between workloads)",
    )
    ap.add_argument(
        "--server-url",
        default=None,
        help="use an already running loopback server (one --configs label) instead of launching",
    )
    ap.add_argument("--server-module", default="sglang.launch_server", help=argparse.SUPPRESS)


def _add_run_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="loadtest.json")
    ap.add_argument(
        "--append",
        action="store_true",
        help="merge into an existing --out instead of starting over",
    )
    ap.add_argument("--log-dir", default=None, help="server logs (default: the folder of --out)")
    ap.add_argument(
        "--timeout-per-run",
        type=float,
        default=None,
        help="seconds for one timed phase (default: max(300, 2x its estimate); 120 with --quick)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="skip servers / workloads whose estimate would end later than this many seconds after "
        f"launch (0: no limit; ~{DEFAULT_BUDGET_HINT_S} for one 600 s GPU-host command); also "
        "caps each timed phase",
    )
    ap.add_argument("--progress-s", type=float, default=10)
    ap.add_argument(
        "--warmup-requests",
        type=int,
        default=4,
        help="untimed JIT warm-up requests per workload (single-stream: always one of the full "
        "context; 0: none)",
    )
    ap.add_argument("--summarize", action="store_true", help="only print the summary of --out")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        default=None,
        help="only merge these result files into --out (with --append: into its results), "
        "later files win per (workload, variant, kv), and print the summary",
    )
    ap.add_argument(
        "--plan",
        action="store_true",
        help="only print the plan with each config's estimated seconds, then exit",
    )


def _add_workload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma list from {','.join(WORKLOADS)} (default %(default)s); single-stream gives one "
        "result per --ss-contexts entry (single-stream-4k, single-stream-32k)",
    )
    ap.add_argument("--quick", action="store_true", help="small workloads for smoke tests")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group(
        "reference workload overrides (default 96 x 6000/400, concurrency 64)"
    )
    g.add_argument("--num-requests", type=int)
    g.add_argument("--input-len", type=int)
    g.add_argument("--output-len", type=int)
    g.add_argument("--concurrency", type=int)
    g = ap.add_argument_group(
        "long-gen workload overrides (default 128 x 1000/4000, concurrency 128)"
    )
    g.add_argument("--lg-num-requests", type=int)
    g.add_argument("--lg-input-len", type=int)
    g.add_argument("--lg-output-len", type=int)
    g.add_argument("--lg-concurrency", type=int)
    g = ap.add_argument_group(
        "single-stream workload overrides (default 4096,32768 x 3 requests, 512 output)"
    )
    g.add_argument(
        "--ss-contexts", type=_int_list, help="comma list of input lengths, one result each"
    )
    g.add_argument("--ss-requests", type=int, help="requests per context, one at a time")
    g.add_argument("--ss-output-len", type=int)
    g.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after each single-stream context, profile this many decode steps of one more "
        "request (SGLang's /start_profile, GPU kernels only) and record the device time "
        "per step by kernel class as decode_profile (default 0: off)",
    )
    g = ap.add_argument_group("shared-prefix workload overrides")
    g.add_argument("--sp-num-prefixes", type=int)
    g.add_argument("--sp-prefix-len", type=int)
    g.add_argument("--sp-requests-per-prefix", type=int)
    g.add_argument("--sp-suffix-len", type=int)
    g.add_argument("--sp-output-len", type=int)
    g.add_argument("--sp-concurrency", type=int)
    g.add_argument("--sp-cold", action="store_true", help="no untimed per-prefix warm-up request")


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Split the comma lists and refuse what cannot run (a usage error, exit code 2)."""
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for kv in args.configs:
        try:
            kv_server_flags(kv, args.model_path)
        except ValueError as exc:
            ap.error(str(exc))
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    try:
        check_extra_server_args(args.extra_server_args)
    except ValueError as exc:
        ap.error(str(exc))
    if args.server_url:
        try:
            check_loopback(args.server_url)
        except ValueError as exc:
            ap.error(str(exc))
        if len(args.configs) != 1:
            ap.error("--server-url needs exactly one --configs label (the running server's KV)")


def run_timeout_s(args, est: float) -> float:
    if args.timeout_per_run is not None:
        return args.timeout_per_run
    return 120.0 if args.quick else max(300.0, 2.0 * est)


def plan_text(args, workloads: list[Workload]) -> tuple[str, float]:
    n_starts = 0 if args.server_url else (len(workloads) if args.fresh_server_per_workload else 1)
    lines = [
        f"plan: {len(args.configs)} config(s) x {len(workloads)} workload(s), mem-fraction-static "
        f"{args.mem_fraction_static}, cuda-graph-max-bs {args.cuda_graph_max_bs}, prefill CUDA graphs on, "
        + (
            "reusing one server per config"
            if not args.fresh_server_per_workload
            else "fresh server each"
        )
    ]
    total = 0.0
    for kv in args.configs:
        parts = [f"start ~{EST_STARTUP_S * n_starts:.0f} s"] if n_starts else []
        for wl in workloads:
            parts.append(f"{wl.label} ~{estimate_run_s(wl, kv):.0f} s ({len(wl.prompts)} req)")
        t = estimate_config_s(workloads, kv, n_starts)
        total += t
        fits = (
            ""
            if t <= DEFAULT_BUDGET_HINT_S
            else f"  (> {DEFAULT_BUDGET_HINT_S} s: split --workloads)"
        )
        lines.append(f"  {kv:<11} ~{t:.0f} s = " + ", ".join(parts) + fits)
    lines.append(
        f"  estimated total ~{total:.0f} s ({total / 60:.1f} min; H200 rates from REFERENCE.md's "
        f"update, start-up ~{EST_STARTUP_S:.0f} s; one config per 600 s command with --append)"
    )
    return "\n".join(lines), total


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.merge:
        return merge_files(out, args.merge, append=args.append)
    if args.summarize:
        return print_summary(out)
    t_launch = time.time()
    workloads = build_workloads(args)
    text, _ = plan_text(args, workloads)
    print(text, flush=True)
    if args.plan:
        return 0
    return LoadTest(args, out, workloads, t_launch).run()


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def print_summary(out: Path) -> int:
    doc = load_doc(out)
    if not doc:
        print(f"no results in {out}")
        return 1
    print(summary_text(doc))
    return 0


class LoadTest:
    """One invocation: a server per KV config (or per workload, or an attached one), the
    workloads on it one after the other, every finished row written to ``out`` at once.
    ``rc``: 0 all ran, 1 a server or client failed, 2 something was skipped for the
    budget, 130 interrupted."""

    def __init__(self, args: argparse.Namespace, out: Path, workloads: list[Workload], t0: float):
        self.args, self.out, self.workloads, self.t_launch = args, out, workloads, t0
        self.log_dir = (
            Path(args.log_dir) if args.log_dir else (out.parent if str(out.parent) else Path("."))
        )
        self.server: SGLangServer | None = None
        self.doc: dict = {}
        self.prov: dict = {}
        self.rc = 0

    def remaining(self) -> float:
        if self.args.budget_s <= 0:
            return float("inf")
        return self.args.budget_s - (time.time() - self.t_launch)

    def run(self) -> int:
        self.open_doc()
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            for kv in self.args.configs:
                if self.args.fresh_server_per_workload:
                    groups = [[wl] for wl in self.workloads]
                else:
                    groups = [self.workloads]
                for group in groups:
                    self.run_group(kv, group)
        except KeyboardInterrupt as exc:
            print(f"interrupted ({exc or 'Ctrl-C'}); results so far are in {self.out}", flush=True)
            self.rc = 130
        finally:
            self.stop_server()
            signal.signal(signal.SIGTERM, old_handler)
        doc = load_doc(self.out) or self.doc
        print("\n" + summary_text(doc), flush=True)
        print(f"\nJSON: {self.out}   total {time.time() - self.t_launch:.0f} s")
        return self.rc

    def open_doc(self) -> None:
        """Start (or with --append, continue) the results file; provenance of this run."""
        args, out = self.args, self.out
        doc = load_doc(out) if args.append else {}
        if args.append and doc:
            print(f"appending to {out} ({len(doc['results'])} earlier result(s))")
        prov = self.prov = get_provenance()
        doc.update({k: prov.get(k) for k in ("gpu", "commit", "versions", "date")})
        doc.setdefault("tool", TOOL)
        doc.setdefault("results", [])
        doc.setdefault("invocations", []).append(
            {
                "argv": args.argv,
                "gpu": prov.get("gpu"),
                "commit": prov.get("commit"),
                "date": prov.get("date"),
            }
        )
        self.doc = doc
        write_doc(out, doc)
        print(f"gpu: {prov.get('gpu')}  commit: {prov.get('commit')}  -> {out}", flush=True)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def run_group(self, kv: str, group: list[Workload]) -> None:
        """One server (launched or attached) and the workloads of ``group`` on it."""
        est = estimate_config_s(group, kv, 0 if self.args.server_url else 1)
        if est > self.remaining():
            print(
                f"SKIP {kv} {[w.name for w in group]}: estimate {est:.0f} s > budget left "
                f"{self.remaining():.0f} s",
                flush=True,
            )
            self.rc = 2
            return
        base_res = {
            "kv": kv,
            "gpu": self.prov.get("gpu"),
            "commit": self.prov.get("commit"),
            "date": self.prov.get("date"),
            "kv_flags": kv_server_flags(kv, self.args.model_path),
        }
        try:
            if self.args.server_url:
                base_url = self.attach(base_res)
            else:
                base_url = self.launch(kv, group, base_res)
            if base_url is None:
                return
            for wl in group:
                self.run_one(kv, wl, base_url, base_res)
        finally:
            self.stop_server()

    def attach(self, base_res: dict) -> str:
        """--server-url: the running server's settings into ``base_res``."""
        base_url = check_loopback(self.args.server_url)
        base_res.update(server_url=base_url, startup_s=None)
        info = server_info(base_url)
        pool = {"max_total_num_tokens": info.get("max_total_num_tokens")}
        self.describe_server(base_res, None, info, pool, None)
        return base_url

    def launch(self, kv: str, group: list[Workload], base_res: dict) -> str | None:
        """Start the config's server; None (and a server_failed row per workload) when it
        does not come up."""
        args = self.args
        tag = kv + (
            "_" + group[0].name if args.fresh_server_per_workload or len(group) == 1 else ""
        )
        self.server = server = make_server(
            args, kv, free_port(), self.log_dir / f"loadtest_server_{tag}.log"
        )
        base_res["server_cmd"] = shlex.join(server.cmd[1:])
        base_res.update(server_settings(args, kv, server.cmd, {}))
        try:
            server.start(min(args.startup_timeout, max(self.remaining(), 30)))
        except RuntimeError as exc:
            print(f"ERROR {kv}: {exc}", flush=True)
            for wl in group:
                merge_result(
                    self.doc,
                    {
                        **base_res,
                        "backend": expected_backend(kv) or "unknown",
                        "backend_source": "flags",
                        "workload": wl.name,
                        "variant": wl.variant,
                        "status": "server_failed",
                        "error": str(exc)[-2000:],
                    },
                )
            write_doc(self.out, self.doc)
            self.rc = 1
            return None
        base_res["startup_s"] = server.startup_s
        self.describe_server(
            base_res,
            server.cmd,
            server.info(),
            server.pool_from_log(),
            server.default_backend_from_log(),
        )
        return server.base_url

    def describe_server(
        self, base_res: dict, cmd: list[str] | None, info: dict, pool: dict, log_default
    ) -> None:
        """What the server ran (settings, backend, pool) into ``base_res``, with warnings."""
        kv = base_res["kv"]
        base_res.update(server_settings(self.args, kv, cmd, info))
        base_res.update(detect_backend(kv, info, log_default))
        for key in ("max_total_num_tokens", "max_running_requests"):
            base_res[key] = pool.get(key) or info.get(key)
        base_res["server_info"] = info
        base_res["server_log"] = pool
        print(
            f"  {kv}: backend {base_res['backend']} ({base_res['backend_source']}), "
            f"max_total_num_tokens={base_res['max_total_num_tokens']} "
            f"max_running_requests={base_res['max_running_requests']}",
            flush=True,
        )
        if base_res.get("backend_mismatch"):
            print(f"  WARNING {kv}: {base_res['backend_mismatch']}", flush=True)
        if base_res.get("prefill_cuda_graph") is False:
            print(f"  WARNING {kv}: the server runs without prefill CUDA graphs", flush=True)

    def run_one(self, kv: str, wl: Workload, base_url: str, base_res: dict) -> None:
        """One workload on the running server: its row, written at once."""
        args = self.args
        est = estimate_run_s(wl, kv)
        if est > self.remaining():
            print(
                f"SKIP {kv} {wl.label}: estimate {est:.0f} s > budget left {self.remaining():.0f} s"
            )
            self.rc = 2
            return
        timeout = min(run_timeout_s(args, est), max(self.remaining() - 45, 10))
        label = f"{kv}/{wl.label}"
        print(
            f"run {label}: {len(wl.prompts)} requests, concurrency {wl.concurrency}, "
            f"output {wl.output_len}, timeout {timeout:.0f} s (estimate ~{est:.0f} s)",
            flush=True,
        )
        server = self.server
        flush = server.flush_cache if server else (lambda: _flush_url(base_url))
        incremental = bool(base_res.get("incremental_stream"))
        t = time.time()
        res = {
            **base_res,
            "workload": wl.name,
            "workload_family": wl.family,
            "variant": wl.variant,
            "quick": args.quick,
            "workload_params": wl.params,
        }
        if wl.family == "single-stream":
            res["context"] = wl.params["context"]
        try:
            stats = asyncio.run(
                run_workload(
                    base_url,
                    wl,
                    timeout,
                    progress_s=args.progress_s,
                    label=label,
                    warmup_requests=args.warmup_requests,
                    flush=flush,
                    incremental=incremental,
                )
            )
            incomplete = stats["timed_out"] or stats.get("interrupted")
            status = ("partial" if incomplete else "ok") if stats["completed"] else "no_completions"
            res.update(stats, status=status)
        except Exception as exc:
            res.update(status="client_failed", error=f"{type(exc).__name__}: {exc}")
            self.rc = 1
        finally:
            signal.signal(signal.SIGTERM, _on_sigterm)  # asyncio reset it
        if args.profile_steps > 0 and wl.family == "single-stream" and res["status"] == "ok":
            res["decode_profile"] = _profile_row(args, base_url, wl, kv, self.log_dir, incremental)
        res["wall_s"] = round(time.time() - t, 1)
        merge_result(self.doc, res)
        write_doc(self.out, self.doc)
        if res.get("interrupted"):
            raise _Terminated(res["interrupted"])
        _print_row(label, res)


def _print_row(label: str, res: dict) -> None:
    if res["status"] not in ("ok", "partial"):
        print(f"FAILED {label}: {res.get('error')}", flush=True)
        return
    print(
        f"done {label}: {res['out_tok_s']} out tok/s, TTFT p50 {res['ttft_p50_s']} s, "
        f"ITL p50 {res['itl_p50_ms']} ms, latency p50 {res['lat_p50_s']} s, "
        f"hit {res['cache_hit_rate']}, {res['completed']}/{res['num_requests']} "
        f"ok{' TIMED OUT' if res['timed_out'] else ''} ({res['wall_s']} s)",
        flush=True,
    )
    if res["failed"]:
        print(f"  {res['failed']} failed request(s): {res.get('errors')}", flush=True)


def _profile_row(
    args, base_url: str, wl: Workload, kv: str, log_dir: Path, incremental: bool
) -> dict:
    """decode_profile of a single-stream row; a failure is recorded, not raised."""
    try:
        prof = asyncio.run(
            profile_decode_steps(
                base_url,
                wl.prompts[0],
                args.profile_steps,
                log_dir / f"profile_{kv}_{wl.name}",
                incremental=incremental,
            )
        )
    except Exception as exc:
        print(f"  profile {kv}/{wl.name} failed: {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        signal.signal(signal.SIGTERM, _on_sigterm)
    cls = ", ".join(f"{c} {t}" for c, t in prof.get("class_us_per_step", {}).items())
    print(
        f"  profile {kv}/{wl.name}: {prof.get('busy_us_per_step')} us busy / {prof.get('span_us_per_step')} "
        f"us span per step, {prof.get('kernels_per_step')} kernels; {cls}",
        flush=True,
    )
    return prof


def merge_files(out: Path, files: list[str], append: bool = False) -> int:
    doc = load_doc(out) if append else {}
    doc.setdefault("tool", TOOL)
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


def _flush_url(base_url: str) -> bool:
    """Flush the radix cache of a server this run did not launch (--server-url)."""
    try:
        flush_url(base_url)
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
