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
turns it off). Prefill CUDA graphs stay on (SGLang's default): the script adds no
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

    python scripts/loadtest.py --configs bf16 --out lt.json --append --budget-s 570
    python scripts/loadtest.py --configs fp8  --out lt.json --append --budget-s 570
    python scripts/loadtest.py --configs k4v4 --out lt.json --append --budget-s 570

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
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglang_tq.bench.configs import KV_ORDER, expected_backend, kv_server_flags, kv_sort_key  # noqa: F401
from sglang_tq.bench.configs import TQ_RE as _TQ_RE
from sglang_tq.bench.server import SGLangServer, check_loopback, http, server_info

try:  # orjson ships with SGLang; the stdlib parser is the fallback
    import orjson as _orjson

    def _loads(b: bytes):
        return _orjson.loads(b)
except ImportError:  # pragma: no cover

    def _loads(b: bytes):
        return json.loads(b)


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = str(ROOT / "benchmarks/model_configs/llama-3.1-8b")
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
    """shlex-split ``--extra-server-args``; refuse flags that belong to the configs."""
    toks = shlex.split(extra or "")
    for t in toks:
        name = t.split("=", 1)[0]
        if name in _REFUSED_EXTRA:
            raise ValueError(
                f"--extra-server-args may not contain {name}: the configs own the backend, "
                f"KV dtype and streaming flags, and prefill CUDA graphs stay on in every "
                f"measured server"
            )
    return toks


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
    num_requests: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    seed: int,
    quick: bool,
) -> Workload:
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


def reference_workload(
    num_requests: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    seed: int = 0,
    quick: bool = False,
) -> Workload:
    return _random_workload(
        "reference",
        REFERENCE_DEFAULTS,
        REFERENCE_QUICK,
        num_requests,
        input_len,
        output_len,
        concurrency,
        seed,
        quick,
    )


def long_gen_workload(
    num_requests: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    seed: int = 0,
    quick: bool = False,
) -> Workload:
    return _random_workload(
        "long-gen",
        LONG_GEN_DEFAULTS,
        LONG_GEN_QUICK,
        num_requests,
        input_len,
        output_len,
        concurrency,
        seed,
        quick,
    )


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
    incremental: bool = False  # chunks carry only their new output_ids
    itl: list = field(default_factory=list)  # seconds between successive output tokens
    arrivals: int = 0  # network reads that brought new tokens
    multi_token_chunks: int = 0  # of those, reads that brought more than one token
    max_chunk_tokens: int = 0
    first_chunk_tokens: int = 0
    _seen: int = 0
    _last_t: float | None = None

    def note_arrival(self, now: float) -> None:
        """Tokens that arrived since the last call came in at ``now``; n new tokens after
        a gap g are n inter-token gaps of g/n (the first arrival has no gap: TTFT)."""
        n = self.completion_tokens - self._seen
        if n <= 0:
            return
        self.arrivals += 1
        self.max_chunk_tokens = max(self.max_chunk_tokens, n)
        if self._last_t is None:
            self.first_chunk_tokens = n
        else:
            if n > 1:
                self.multi_token_chunks += 1
            self.itl.extend([(now - self._last_t) / n] * n)
        self._seen, self._last_t = self.completion_tokens, now


def itl_from_arrivals(arrivals: list[tuple[float, int]]) -> ReqResult:
    """Per-token ITL of one stream from (arrival time, cumulative output tokens) pairs."""
    r = ReqResult()
    for t, ntok in arrivals:
        r.completion_tokens = max(r.completion_tokens, ntok)
        r.note_arrival(t)
    return r


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
        ntok = meta.get("completion_tokens")  # cumulative in both streaming modes
        if ntok is None:
            ids = obj.get("output_ids") or []
            ntok = res.completion_tokens + len(ids) if res.incremental else len(ids)
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


async def stream_generate(
    session,
    base_url: str,
    input_ids: list[int],
    max_new_tokens: int,
    ignore_eos: bool = True,
    incremental: bool = False,
    res: ReqResult | None = None,
) -> ReqResult:
    """One streaming /generate request; never raises (errors land in ReqResult.error).
    ``res`` lets the caller watch the stream's progress while it runs."""
    payload = {
        "input_ids": input_ids,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": ignore_eos,
        },
        "stream": True,
    }
    if res is None:
        res = ReqResult()
    res.input_len, res.incremental = len(input_ids), incremental
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
                res.note_arrival(now)  # everything parsed from this read arrived at `now`
            if buf.strip():
                now = time.perf_counter()
                _handle_event(buf, res, t0, now)
                res.note_arrival(now)
    except asyncio.CancelledError:
        res.error = res.error or "cancelled (timeout)"
        raise
    except Exception as exc:
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
    d = duration_s if duration_s > 0 else float("nan")

    def ms(x):
        return None if x is None else round(x * 1e3, 3)

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
    extra: dict = {}

    def gen(ids, n):
        return stream_generate(session, base_url, ids, n, incremental=incremental)

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        if warmup_requests > 0:  # JIT compile / first-launch costs, untimed, then flushed
            rng = random.Random("jit-warmup")  # prompts of the workload's length, never reused
            if warmup_len is None:
                warmup_len = min(len(wl.prompts[0]), 8192) if wl.prompts else 256
            t = time.perf_counter()
            ws = await asyncio.gather(
                *(gen(_rand_ids(rng, warmup_len), 8) for _ in range(warmup_requests))
            )
            extra["jit_warmup"] = {
                "requests": warmup_requests,
                "input_len": warmup_len,
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

        n = len(wl.prompts)
        results: list[ReqResult | None] = [None] * n
        finish_times: list[float] = []
        sem = asyncio.Semaphore(wl.concurrency)
        start = time.perf_counter()

        async def one(i: int):
            async with sem:
                r = await gen(wl.prompts[i], wl.output_len)
            results[i] = r
            finish_times.append(time.perf_counter())

        async def progress():
            while True:
                await asyncio.sleep(progress_s)
                done = [r for r in results if r is not None]
                el = time.perf_counter() - start
                toks = sum(r.completion_tokens for r in done if r.ok)
                log(
                    f"  [{label}] {len(done)}/{n} done, {sum(not r.ok for r in done)} failed, "
                    f"{el:.0f} s, {toks / el:.0f} out tok/s so far"
                )

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

# ServerArgs._attention_backend_default (sglang/srt/arg_groups/overrides.py) logs this
# when no --attention-backend is given
_DEFAULT_BACKEND_RE = re.compile(r"Attention backend not specified\. Use (\w+) backend by default")


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


def get_provenance() -> dict:
    """sglang_tq.provenance in a child process: the CUDA context it may create must not
    stay alive in this process while servers size their pools from free GPU memory."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from sglang_tq.provenance import provenance; print(json.dumps(provenance()))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(ROOT)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])
    except Exception as exc:
        return {
            "gpu": "unknown",
            "commit": os.environ.get("SGLANG_TQ_COMMIT", "unknown"),
            "provenance_error": repr(exc)[:300],
        }


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
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not (isinstance(doc, dict) and isinstance(doc.get("results"), list)):
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


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
        rows = {}
        for kv, r in sorted(by_kv.items(), key=lambda kv_r: kv_sort_key(kv_r[0])):
            row = {}
            for b, br in base.items():
                row[f"out_tok_s_vs_{b}"] = _ratio(r.get("out_tok_s"), br and br.get("out_tok_s"))
                # > 1 means faster (lower TTFT) than the baseline
                row[f"ttft_p50_speedup_vs_{b}"] = _ratio(
                    br and br.get("ttft_p50_s"), r.get("ttft_p50_s")
                )
                row[f"itl_p50_vs_{b}"] = _ratio(r.get("itl_p50_ms"), br and br.get("itl_p50_ms"))
            row["pool_vs_bf16"] = _ratio(
                r.get("max_total_num_tokens"),
                base["bf16"] and base["bf16"].get("max_total_num_tokens"),
            )
            rows[kv] = row
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
        if variant != "default":
            continue
        for kv in sorted(all_kv, key=kv_sort_key):
            if not _TQ_RE.match(kv):
                continue
            row = rows.get(kv, {})
            mine = by_kv.get(kv)

            def target(name, value, threshold, ok):
                out["targets"].append(
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

            if wl in THROUGHPUT_TARGETS:
                for b, thr in THROUGHPUT_TARGETS[wl]:
                    v = row.get(f"out_tok_s_vs_{b}")
                    target(
                        f"{wl} {kv} out tok/s >= {thr}x {b}",
                        v,
                        thr,
                        None if v is None else v >= thr,
                    )
            elif wl in ITL_TARGET_WORKLOADS:
                v = mine and mine.get("itl_p50_ms")
                b = base["bf16"] and base["bf16"].get("itl_p50_ms")
                target(
                    f"{wl} {kv} ITL p50 <= bf16", v, b, None if v is None or b is None else v <= b
                )
            elif wl == "shared-prefix":
                v = mine and mine.get("ttft_p50_s")
                b = base["fp8"] and base["fp8"].get("ttft_p50_s")
                target(
                    f"shared-prefix {kv} TTFT p50 < fp8",
                    v,
                    b,
                    None if v is None or b is None else v < b,
                )
    return out


def _fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


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
    hdr = (
        f"{'kv':<11} {'backend':<10} {'pool tok':>9} {'xbf16':>5} {'out tok/s':>9} {'xbf16':>6} {'xfp8':>6} "
        f"{'TTFT p50':>8} {'ITL p50':>7} {'p90':>6} {'ITL/bf16':>8} {'/fp8':>5} {'hit%':>5} {'done':>7} note"
    )
    for wl, variant in keys:
        g = ratio_by_group.get(
            (wl, variant),
            {"ratios": {}, "mixed_gpus": False, "settings_differ": [], "baseline_backends": {}},
        )
        warn = "   WARNING: results from different GPUs" if g["mixed_gpus"] else ""
        if g["settings_differ"]:
            warn += f"   WARNING: servers differ in {', '.join(g['settings_differ'])}"
        lines += ["", f"== {wl}" + ("" if variant == "default" else f" ({variant})") + warn, hdr]
        rows = sorted(
            (r for r in results if (r["workload"], r.get("variant", "default")) == (wl, variant)),
            key=lambda r: kv_sort_key(r["kv"]),
        )
        for r in rows:
            if r.get("status") not in ("ok", "partial"):
                why = r.get("error") or (
                    f"interrupted ({r['interrupted']})"
                    if r.get("interrupted")
                    else "timed out"
                    if r.get("timed_out")
                    else ""
                )
                lines.append(
                    f"{r['kv']:<11} {str(r.get('backend') or '?'):<10} {r.get('status')}: {str(why)[:100]}"
                )
                continue
            q = g["ratios"].get(r["kv"], {})
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
            lines.append(
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
    if summ["targets"]:
        lines += ["", "targets (against this file's bf16 / fp8 rows):"]
        for t in summ["targets"]:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
            if "ITL" in t["name"]:
                val = f"{_fmt(t['value'], '{:.2f}')} ms (bf16 {_fmt(t['threshold'], '{:.2f}')} ms)"
            elif "TTFT" in t["name"]:
                val = f"{_fmt(t['value'], '{:.3f}')} s (fp8 {_fmt(t['threshold'], '{:.3f}')} s)"
            else:
                val = f"{_fmt(t['value'], '{:.3f}')}x"
            lines.append(
                f"  [{mark}] {t['name']}: {val}" + ("  (mixed GPUs!)" if t["mixed_gpus"] else "")
            )
    return "\n".join(lines)


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument(
        "--model-path",
        default=DEFAULT_MODEL,
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
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma list from {','.join(WORKLOADS)} (default %(default)s); single-stream gives one "
        "result per --ss-contexts entry (single-stream-4k, single-stream-32k)",
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
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="skip servers / workloads whose estimate would end later than this many seconds after "
        f"launch (0: no limit; ~{DEFAULT_BUDGET_HINT_S} for one 600 s GPU-host command); also "
        "caps each timed phase",
    )
    ap.add_argument(
        "--fresh-server-per-workload",
        action="store_true",
        help="restart the server for every workload (default: one server per KV config, "
        "/flush_cache between workloads)",
    )
    ap.add_argument("--quick", action="store_true", help="small workloads for smoke tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress-s", type=float, default=10)
    ap.add_argument(
        "--warmup-requests",
        type=int,
        default=4,
        help="untimed JIT warm-up requests per workload (single-stream: always one of the full "
        "context; 0: none)",
    )
    ap.add_argument(
        "--server-url",
        default=None,
        help="use an already running loopback server (one --configs label) instead of launching",
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
    ap.add_argument("--server-module", default="sglang.launch_server", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
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
        check_loopback(args.server_url)
        if len(args.configs) != 1:
            ap.error("--server-url needs exactly one --configs label (the running server's KV)")
    return args


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
    text, _ = plan_text(args, workloads)
    print(text, flush=True)
    if args.plan:
        return 0

    doc = load_doc(out) if args.append else {}
    if args.append and doc:
        print(f"appending to {out} ({len(doc['results'])} earlier result(s))")
    prov = get_provenance()
    doc.update({k: prov.get(k) for k in ("gpu", "commit", "versions", "date")})
    doc.setdefault("tool", "scripts/loadtest.py")
    doc.setdefault("results", [])
    doc.setdefault("invocations", []).append(
        {
            "argv": sys.argv[1:] if argv is None else list(argv),
            "gpu": prov.get("gpu"),
            "commit": prov.get("commit"),
            "date": prov.get("date"),
        }
    )
    write_doc(out, doc)
    print(f"gpu: {prov.get('gpu')}  commit: {prov.get('commit')}  -> {out}", flush=True)

    def remaining() -> float:
        return float("inf") if args.budget_s <= 0 else args.budget_s - (time.time() - t_launch)

    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    server: SGLangServer | None = None
    rc = 0
    try:
        for kv in args.configs:
            groups = [[wl] for wl in workloads] if args.fresh_server_per_workload else [workloads]
            for group in groups:
                est = estimate_config_s(group, kv, 0 if args.server_url else 1)
                if est > remaining():
                    print(
                        f"SKIP {kv} {[w.name for w in group]}: estimate {est:.0f} s > budget left "
                        f"{remaining():.0f} s",
                        flush=True,
                    )
                    rc = 2
                    continue
                base_res = {
                    "kv": kv,
                    "gpu": prov.get("gpu"),
                    "commit": prov.get("commit"),
                    "date": prov.get("date"),
                    "kv_flags": kv_server_flags(kv, args.model_path),
                }
                cmd = None
                log_default = None
                if args.server_url:
                    server = None
                    base_url = check_loopback(args.server_url)
                    base_res.update(server_url=base_url, startup_s=None)
                    info = server_info(base_url)
                    pool = {"max_total_num_tokens": info.get("max_total_num_tokens")}
                else:
                    port = free_port()
                    tag = kv + (
                        "_" + group[0].name
                        if args.fresh_server_per_workload or len(group) == 1
                        else ""
                    )
                    server = make_server(args, kv, port, log_dir / f"loadtest_server_{tag}.log")
                    cmd = server.cmd
                    base_res["server_cmd"] = shlex.join(server.cmd[1:])
                    base_res.update(server_settings(args, kv, cmd, {}))
                    try:
                        server.start(min(args.startup_timeout, max(remaining(), 30)))
                    except RuntimeError as exc:
                        print(f"ERROR {kv}: {exc}", flush=True)
                        for wl in group:
                            merge_result(
                                doc,
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
                        write_doc(out, doc)
                        server.stop()
                        server = None
                        rc = 1
                        continue
                    base_url = server.base_url
                    info = server.info()
                    pool = server.pool_from_log()
                    log_default = server.default_backend_from_log()
                    base_res["startup_s"] = server.startup_s
                base_res.update(server_settings(args, kv, cmd, info))
                base_res.update(detect_backend(kv, info, log_default))
                base_res["max_total_num_tokens"] = pool.get("max_total_num_tokens") or info.get(
                    "max_total_num_tokens"
                )
                base_res["max_running_requests"] = pool.get("max_running_requests") or info.get(
                    "max_running_requests"
                )
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
                    print(
                        f"  WARNING {kv}: the server runs without prefill CUDA graphs", flush=True
                    )
                try:
                    for wl in group:
                        est = estimate_run_s(wl, kv)
                        if est > remaining():
                            print(
                                f"SKIP {kv} {wl.label}: estimate {est:.0f} s > budget left {remaining():.0f} s"
                            )
                            rc = 2
                            continue
                        timeout = min(run_timeout_s(args, est), max(remaining() - 45, 10))
                        label = f"{kv}/{wl.label}"
                        print(
                            f"run {label}: {len(wl.prompts)} requests, concurrency {wl.concurrency}, "
                            f"output {wl.output_len}, timeout {timeout:.0f} s (estimate ~{est:.0f} s)",
                            flush=True,
                        )
                        flush = server.flush_cache if server else (lambda: _flush_url(base_url))
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
                                    incremental=bool(base_res.get("incremental_stream")),
                                )
                            )
                            incomplete = stats["timed_out"] or stats.get("interrupted")
                            res.update(
                                stats,
                                status=("partial" if incomplete else "ok")
                                if stats["completed"]
                                else "no_completions",
                            )
                        except Exception as exc:
                            res.update(status="client_failed", error=f"{type(exc).__name__}: {exc}")
                            rc = 1
                        finally:
                            signal.signal(signal.SIGTERM, _on_sigterm)  # asyncio reset it
                        if (
                            args.profile_steps > 0
                            and wl.family == "single-stream"
                            and res["status"] == "ok"
                        ):
                            res["decode_profile"] = _profile_row(
                                args,
                                base_url,
                                wl,
                                kv,
                                log_dir,
                                bool(base_res.get("incremental_stream")),
                            )
                        res["wall_s"] = round(time.time() - t, 1)
                        merge_result(doc, res)
                        write_doc(out, doc)
                        if res.get("interrupted"):
                            raise _Terminated(res["interrupted"])
                        if res["status"] in ("ok", "partial"):
                            print(
                                f"done {label}: {res['out_tok_s']} out tok/s, TTFT p50 {res['ttft_p50_s']} s, "
                                f"ITL p50 {res['itl_p50_ms']} ms, latency p50 {res['lat_p50_s']} s, "
                                f"hit {res['cache_hit_rate']}, {res['completed']}/{res['num_requests']} "
                                f"ok{' TIMED OUT' if res['timed_out'] else ''} ({res['wall_s']} s)",
                                flush=True,
                            )
                            if res["failed"]:
                                print(
                                    f"  {res['failed']} failed request(s): {res.get('errors')}",
                                    flush=True,
                                )
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


def _flush_url(base_url: str) -> bool:
    return http(base_url + "/flush_cache", method="POST", timeout=60)[0] == 200


if __name__ == "__main__":
    sys.exit(main())
