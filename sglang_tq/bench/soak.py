"""Bounded overload soak of one ``--kv-quant turboquant`` SGLang server: does it survive and stay correct?

    python -m sglang_tq.bench soak --model-path /tmp/models/smollm2-bf16 --duration-s 1200
    python -m sglang_tq.bench soak --url http://127.0.0.1:30000 --server-pid 4242 --duration-s 60

Why
---
A packed KV pool adds scratch buffers, codecs and kernels to SGLang's memory and
scheduler paths. The failure modes that matter in production show only under
sustained overload: retraction (the pool is full, running requests are pushed back),
radix-cache eviction, client aborts mid-stream, garbage input. The soak drives one
server through all of them for a fixed time and checks that it neither crashes, nor
leaks memory, nor serves different greedy outputs afterwards (issue 15, "Reliability").

Server
------
``--model-path`` launches ``python -m sglang.launch_server`` (sglang_tq.bench.server) with
``--common-server-args`` (default ``--kv-quant turboquant --skip-tokenizer-init
--enable-metrics``) plus ``--server-args``; its log goes next to the JSON. ``--url``
attaches to a running server (loopback only) instead; ``--server-pid`` then names its
process so that host memory can be sampled. Requests send token ids (``input_ids``).

Phases
------
1. quiet probe run: POST /flush_cache, then ``--probe-prompts`` seeded prompts, one at a
   time, greedy (temperature 0, ignore_eos), ``--probe-tokens`` new tokens each;
2. soak, ``--duration-s``: ``--concurrency`` requests always in flight (closed loop). Each
   request draws a prompt length (``--prompt-len``) and an output length
   (``--output-len``); a ``--prefix-share`` of the well-formed ones starts with one of
   ``--num-prefixes`` shared prefixes of ``--prefix-len`` tokens (radix-cache hits, and
   evictions when running requests need the room); a ``--abort-share`` of all requests
   is streamed and the connection closed after a random number of chunks; a
   ``--malformed-share`` is malformed, one of ``--malformed-kinds``: ``not_json`` (a
   truncated body), ``negative_max_new_tokens``, ``id_out_of_vocab`` (one input id >=
   the vocab size), ``empty_input_ids``. The rest are streamed to the end. (SGLang 0.5.17
   defines TokenizerManager._validate_input_ids_in_vocab but never calls it; with any
   ``--kv-quant`` mode the plugin's ``input-ids-range`` patch answers such ids with 400,
   while a stock server lets them reach the embedding lookup.)
3. drain: no new requests; the in-flight ones finish (``--drain-timeout-s``), then the
   server's /v1/loads is polled until nothing runs or waits;
4. the same probe run again (after another flush) on the quiet server.
Memory is sampled every ``--sample-s`` throughout: the GPU memory of the server's process
tree (nvidia-smi's compute apps, so that other jobs on the same GPU do not count; where
their pids are not visible, the device's used memory on the GPUs of $CUDA_VISIBLE_DEVICES
or all of them, summed; ``memory.gpu_scope`` says which) and the RSS of the server's
process tree (from /proc; only with a known server pid).

Load
----
The offered load must exceed 2x what the server can hold at once, or the scheduler never
retracts. The soak reads ``max_total_num_tokens`` (the KV pool) and the effective
``max_running_requests`` from /server_info and prints offered in-flight tokens =
concurrency x well-formed share x (mean prompt + mean output length), the shared
prefixes not counted (they are stored once), divided by the pool; below 2x it warns.
A large GPU has a large pool: raise --concurrency or shrink the pool, e.g.
``--server-args "--max-total-tokens 100000"``.

Checks (each a boolean, or null where it cannot be evaluated; ``passed`` needs no false one)
--------------------------------------------------------------------------------------------
* server_alive: /health answers 200 at the end and the server's process (launched here, or
  --server-pid) still exists; when it goes away during the soak, the soak ends early;
* malformed_rejected: every malformed request got an HTTP 4xx (a 2xx, a 5xx or a broken
  connection is a failure, recorded with the body);
* no_failures: every well-formed request finished without an error: an HTTP error, a
  broken stream, an abort finish reason, no answer within the drain time-out (an aborted
  request counts only until the client closes it);
* gpu_memory_flat / host_memory_flat: the soak's samples split in quarters (the first is
  warm-up); the mean of the last quarter may exceed the mean of the second by less than
  ``--max-mem-growth-mib`` (default 512 MiB GPU, 1024 MiB host). SGLang preallocates the KV
  pool and CUDA graphs at start-up, so the GPU curve should be flat; 512 MiB leaves room for
  PyTorch's caching allocator keeping blocks of a few new batch shapes. The host limit
  allows for Python heaps and metric files growing with request history. Null with a note
  when nvidia-smi is absent, no server pid is known, or there are fewer than 4 samples;
* probes_identical: every probe's greedy output ids are the same at the end as at the
  start (both runs cold, one request at a time); a difference names its first position.
An interrupted run (SIGTERM, Ctrl-C) writes its JSON with ``"partial": true`` and fails.

Report
------
JSON (``--out``, default ``soak_<gpu>_<commit>.json`` in benchmarks/results/soak/): provenance
(gpu, commit, versions), config, the /server_info subset used, request counts (sent,
completed, failed, aborted, malformed by kind), retractions (the delta of
``sglang:num_retracted_requests_total`` from GET /metrics, which counts every retracted
request, else the sum of ``meta_info.num_retractions`` of the completed requests; both
are kept), evictions (deltas of ``sglang:evicted_tokens_total`` and
``sglang:eviction_duration_seconds_count``, which RadixCache.evict feeds when the server
runs with --enable-metrics), the cached-token share of shared-prefix requests and of
the others, throughput, the memory curve, the probe comparison and the checks. A table
is printed at the end. Exit code: 0 all checks pass, 1 otherwise, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .cli import add_model_path, add_out, default_out, doc_parser
from .results import get_provenance, write_json_atomic
from .server import SGLangServer, check_loopback, flush, http
from .stream import ReqResult, generate_payload, stream_generate

TOOL = "sglang_tq.bench soak"
DEFAULT_SERVER_ARGS = "--kv-quant turboquant --skip-tokenizer-init --enable-metrics"
MALFORMED_KINDS = ("not_json", "negative_max_new_tokens", "id_out_of_vocab", "empty_input_ids")
# SGLang 0.5.17, sglang/srt/observability/metrics_collector.py
RETRACT_METRIC = "sglang:num_retracted_requests_total"  # SchedulerMetricsCollector
EVICT_TOKENS_METRIC = "sglang:evicted_tokens_total"  # RadixCacheMetricsCollector
EVICT_PASSES_METRIC = "sglang:eviction_duration_seconds_count"
SERVER_INFO_KEYS = (
    "max_total_num_tokens",
    "max_running_requests",
    "max_req_input_len",
    "context_length",
    "model_path",
    "kv_quant",
    "kv_quant_bits",
    "kv_cache_dtype",
    "attention_backend",
    "page_size",
    "disable_radix_cache",
    "enable_metrics",
    "skip_tokenizer_init",
    "schedule_policy",
    "mem_fraction_static",
    "version",
)
OVERLOAD_TARGET = 2.0
ERROR_EXAMPLES = 5


class UsageError(Exception):
    """A setting that does not fit the server (exit code 2)."""


class _Interrupted(KeyboardInterrupt):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


# ----------------------------------------------------------------------------- requests
def rand_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return rng.choices(range(1, vocab_size), k=n)


def lcp_len(a, b) -> int:
    """Length of the common prefix of two token sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def healthy(base_url: str) -> bool:
    return http(base_url + "/health", timeout=5)[0] == 200


def malformed_body(kind: str, rng: random.Random, vocab_size: int) -> bytes:
    """A /generate body of one malformed kind; SGLang must answer it with a 4xx."""
    ids = rand_ids(rng, rng.randint(4, 32), vocab_size)
    max_new = rng.randint(1, 32)
    if kind == "negative_max_new_tokens":
        max_new = -rng.randint(1, 100)
    elif kind == "id_out_of_vocab":
        ids[rng.randrange(len(ids))] = vocab_size + rng.randrange(vocab_size)
    elif kind == "empty_input_ids":
        ids = []
    body = json.dumps(generate_payload(ids, max_new, stream=False))
    if kind == "not_json":
        body = body[: len(body) // 2]
    return body.encode()


@dataclass
class Req:
    kind: str  # "generate", "abort" or one of MALFORMED_KINDS
    input_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    prefix: bool = False  # starts with a shared prefix
    close_after: int = 0  # abort: chunks to read before closing
    body: bytes = b""  # malformed


class RequestMix:
    """Seeded draws of the soak's requests; see the module docstring for the shares."""

    def __init__(self, args, vocab_size: int, rng: random.Random):
        self.args, self.vocab_size, self.rng = args, vocab_size, rng
        self.prefixes = [
            rand_ids(rng, args.prefix_len, vocab_size) for _ in range(args.num_prefixes)
        ]

    def draw(self) -> Req:
        a, rng = self.args, self.rng
        r = rng.random()
        if r < a.malformed_share:
            kind = rng.choice(a.malformed_kinds)
            return Req(kind, body=malformed_body(kind, rng, self.vocab_size))
        prefix = bool(self.prefixes) and rng.random() < a.prefix_share
        ids = (list(rng.choice(self.prefixes)) if prefix else []) + rand_ids(
            rng, rng.randint(*a.prompt_len), self.vocab_size
        )
        n_out = rng.randint(*a.output_len)
        if r < a.malformed_share + a.abort_share:
            return Req("abort", ids, n_out, prefix, close_after=rng.randint(1, max(1, n_out // 2)))
        return Req("generate", ids, n_out, prefix)


def probe_prompts(args, vocab_size: int) -> list[list[int]]:
    rng = random.Random(f"probes-{args.seed}")
    return [
        rand_ids(rng, rng.randint(*args.prompt_len), vocab_size) for _ in range(args.probe_prompts)
    ]


def longest_request(args) -> int:
    return (
        (args.prefix_len if args.num_prefixes and args.prefix_share > 0 else 0)
        + args.prompt_len[1]
        + args.output_len[1]
    )


def offered_load(args, info: dict) -> dict:
    """Offered in-flight tokens and requests against the server's capacity."""
    mean_tokens = (sum(args.prompt_len) + sum(args.output_len)) / 2
    tokens = args.concurrency * (1 - args.malformed_share) * mean_tokens
    pool, running = info.get("max_total_num_tokens"), info.get("effective_max_running_requests")
    token_ratio = tokens / pool if pool else None
    return {
        "concurrency": args.concurrency,
        "offered_inflight_tokens": round(tokens),
        "max_total_num_tokens": pool,
        "token_ratio": None if token_ratio is None else round(token_ratio, 2),
        "max_running_requests": running,
        "request_ratio": round(args.concurrency / running, 2) if running else None,
        "overloaded": None if token_ratio is None else token_ratio >= OVERLOAD_TARGET,
    }


async def post_raw(session, base_url: str, body: bytes, keep: int | None = 300) -> tuple[int, str]:
    """(HTTP status, body) of one non-streaming /generate with a raw body, the body cut to
    ``keep`` characters (None: whole); status 0 when the connection failed (the body then
    holds the exception)."""
    try:
        async with session.post(
            base_url + "/generate", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            return resp.status, (await resp.text())[:keep]
    except Exception as exc:
        return 0, f"{type(exc).__name__}: {exc}"[:300]


async def generate_once(session, base_url: str, input_ids: list[int], max_new_tokens: int) -> dict:
    """One greedy non-streaming /generate -> {"output_ids": [...]} or {"error": ...}."""
    status, text = await post_raw(
        session,
        base_url,
        json.dumps(generate_payload(input_ids, max_new_tokens, False)).encode(),
        None,
    )
    if status != 200:
        return {"error": f"HTTP {status}: {text[:300]}"}
    try:
        return {"output_ids": [int(t) for t in json.loads(text)["output_ids"]]}
    except (ValueError, KeyError, TypeError) as exc:
        return {"error": f"bad reply ({type(exc).__name__}): {text[:200]}"}


# ----------------------------------------------------------------------------- tallies
@dataclass
class Tally:
    """What the soak's requests did, counted as they finish."""

    sent: dict = field(default_factory=lambda: defaultdict(int))
    completed: int = 0
    failed: int = 0
    errors: list = field(default_factory=list)
    short_outputs: int = 0
    out_tokens: int = 0
    tokens: dict = field(
        default_factory=lambda: {"prefix": [0, 0], "other": [0, 0]}
    )  # prompt, cached
    retractions_meta: int = 0
    closed_mid_stream: int = 0
    finished_before_close: int = 0
    malformed: dict = field(
        default_factory=lambda: {k: {"sent": 0, "rejected_4xx": 0} for k in MALFORMED_KINDS}
    )
    malformed_wrong: list = field(default_factory=list)
    unfinished_at_drain: int = 0

    def fail(self, kind: str, error: str) -> None:
        self.failed += 1
        if len(self.errors) < ERROR_EXAMPLES:
            self.errors.append(f"{kind}: {error}"[:400])

    def finished(self, req: Req, res: ReqResult) -> None:
        if not res.ok:
            self.fail(req.kind, str(res.error))
            return
        self.completed += 1
        self.out_tokens += res.completion_tokens
        self.short_outputs += int(res.completion_tokens < req.max_new_tokens)
        self.retractions_meta += res.retractions
        t = self.tokens["prefix" if req.prefix else "other"]
        t[0] += res.prompt_tokens
        t[1] += res.cached_tokens

    def aborted(self, req: Req, res: ReqResult, closed: bool) -> None:
        if closed:
            self.closed_mid_stream += 1
            return
        self.finished_before_close += int(res.ok)
        self.finished(req, res)

    def rejected(self, kind: str, status: int, body: str) -> None:
        self.malformed[kind]["sent"] += 1
        if 400 <= status < 500:
            self.malformed[kind]["rejected_4xx"] += 1
        elif len(self.malformed_wrong) < ERROR_EXAMPLES:
            self.malformed_wrong.append({"kind": kind, "status": status, "body": body})

    def malformed_sent(self) -> int:
        return sum(m["sent"] for m in self.malformed.values())

    def malformed_ok(self) -> int:
        return sum(m["rejected_4xx"] for m in self.malformed.values())

    def counts(self) -> dict:
        return {
            "sent": sum(self.sent.values()),
            "sent_by_kind": dict(self.sent),
            "completed": self.completed,
            "failed": self.failed,
            "unfinished_at_drain": self.unfinished_at_drain,
            "short_outputs": self.short_outputs,
            "aborted": {
                "sent": self.sent.get("abort", 0),
                "closed_mid_stream": self.closed_mid_stream,
                "finished_before_close": self.finished_before_close,
            },
            "malformed": {
                "sent": self.malformed_sent(),
                "rejected_4xx": self.malformed_ok(),
                "by_kind": {k: v for k, v in self.malformed.items() if v["sent"]},
            },
            "errors": self.errors,
            "malformed_not_rejected": self.malformed_wrong,
        }

    def cache_hits(self) -> dict:
        out = {}
        for name, (prompt, cached) in self.tokens.items():
            out[name + "_requests"] = {
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "cached_share": round(cached / prompt, 4) if prompt else None,
            }
        return out


# ----------------------------------------------------------------------------- server side
def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over its label sets}."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(\S+)", line)
        if m:
            try:
                value = float(m.group(2))
            except ValueError:
                continue
            out[m.group(1)] += value
    return dict(out)


def metric_delta(start: dict | None, end: dict | None, name: str) -> float | None:
    """``name`` at the end minus at the start; None unless the end has it (SGLang exports
    a labelled counter only after its first increment, so absent at the start means 0)."""
    if end is None or name not in end:
        return None
    return end[name] - (start or {}).get(name, 0.0)


def read_server_info(base_url: str) -> dict:
    """The SERVER_INFO_KEYS of /server_info (/get_server_info on older SGLang), plus
    ``effective_max_running_requests``: the schedulers' resolved limit summed over DP ranks
    (``internal_states``), else ``max_running_requests``."""
    for path in ("/server_info", "/get_server_info"):
        code, body = http(base_url + path, timeout=30)
        try:
            data = json.loads(body) if code == 200 else None
        except ValueError:
            continue
        if isinstance(data, dict):
            info = {k: data[k] for k in SERVER_INFO_KEYS if k in data}
            per_dp = [
                s.get("effective_max_running_requests_per_dp")
                for s in data.get("internal_states") or []
                if isinstance(s, dict)
            ]
            per_dp = [x for x in per_dp if x]
            info["effective_max_running_requests"] = (
                sum(per_dp) if per_dp else data.get("max_running_requests")
            )
            info["source"] = path
            return info
    return {}


def vocab_from_config(model_path: str | None) -> int | None:
    """``vocab_size`` (or ``text_config.vocab_size``) of a local model folder's config.json."""
    if not model_path:
        return None
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def resolve_vocab_size(args, info: dict) -> tuple[int, str]:
    """(vocab size, where it came from); SGLang's /server_info carries none, so: --vocab-size,
    else config.json of --model-path or of the server's model_path."""
    if args.vocab_size:
        return args.vocab_size, "--vocab-size"
    for path in (args.model_path, info.get("model_path")):
        v = vocab_from_config(path)
        if v:
            return int(v), f"{path}/config.json"
    raise UsageError(
        "vocab size unknown: the server's model_path has no local config.json; pass --vocab-size"
    )


def server_gone(proc, pid: int | None) -> bool:
    """The launched server's process (a Popen) exited, or the --server-pid process is gone."""
    if proc is not None:
        return proc.poll() is not None
    return pid is not None and not Path(f"/proc/{pid}").exists()


# ----------------------------------------------------------------------------- memory
def gpu_query_cmd(what: str = "gpu") -> list[str] | None:
    """nvidia-smi's per-device used memory (``gpu``) or per-process used memory (``apps``)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = "--query-gpu=memory.used" if what == "gpu" else "--query-compute-apps=pid,used_memory"
    cmd = [exe, query, "--format=csv,noheader,nounits"]
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if cvd and all(p.strip().isdigit() for p in cvd.split(",")):
        cmd.append("--id=" + cvd)
    return cmd


def tree_pids(pid: int) -> set[int]:
    """``pid`` and all its live descendants (Linux /proc)."""
    children: dict[int, list[int]] = defaultdict(list)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            children[int(stat[stat.rindex(")") + 2 :].split()[1])].append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if Path(f"/proc/{p}").exists():
            found.add(p)
            todo += children.get(p, [])
    return found


def tree_rss_mib(pid: int) -> float | None:
    """RSS of ``pid`` and all its descendants in MiB (Linux /proc); None once it is gone."""
    total, found = 0, False
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            found = True
        except OSError:
            continue
    return round(total / 1024, 1) if found else None


def apps_mib(csv_text: str, pids: set[int]) -> float | None:
    """The GPU memory (MiB) of the processes in ``pids`` from nvidia-smi's compute-apps CSV
    (``pid, used_memory`` rows); None when none of them is listed (e.g. the GPU host's
    nvidia-smi sees another pid namespace)."""
    total, seen = 0.0, False
    for line in csv_text.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            try:
                total += float(parts[1])
            except ValueError:
                continue
            seen = True
    return total if seen else None


class MemorySampler:
    """Samples the server's GPU memory and its process tree's RSS every ``interval_s`` seconds.

    GPU memory is the server's own processes' (nvidia-smi compute apps, so that other jobs
    on the same GPU do not count) where their pids are visible, else the device's used
    memory; ``scope`` says which one the samples hold."""

    def __init__(self, pid: int | None, interval_s: float):
        self.pid, self.interval_s = pid, interval_s
        self.gpu_cmd, self.apps_cmd = gpu_query_cmd("gpu"), gpu_query_cmd("apps")
        self.samples: list[dict] = []
        self.phase = "start"
        self.t0 = time.monotonic()
        self.notes = {}
        self.scope: str | None = None
        if self.gpu_cmd is None:
            self.notes["gpu"] = "nvidia-smi not found: GPU memory not sampled"
        if pid is None:
            self.notes["host"] = (
                "server pid unknown (attached without --server-pid): host memory not sampled"
            )

    async def _smi(self, cmd: list[str]) -> str | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            return out.decode()
        except (OSError, asyncio.TimeoutError) as exc:
            self.notes["gpu"] = f"nvidia-smi failed: {type(exc).__name__}: {exc}"[:300]
            return None

    async def gpu_mib(self) -> float | None:
        if self.gpu_cmd is None:
            return None
        if self.pid is not None and self.scope != "device":
            out = await self._smi(self.apps_cmd)
            mib = None if out is None else apps_mib(out, tree_pids(self.pid))
            if mib is not None:
                self.scope = "server processes"
                return mib
            if self.scope == "server processes":  # seen before: the server holds no GPU memory now
                return None
        out = await self._smi(self.gpu_cmd)
        if out is None:
            return None
        try:
            mib = sum(float(x) for x in out.split())
        except ValueError as exc:
            self.notes["gpu"] = f"nvidia-smi output unreadable: {exc}"[:300]
            return None
        if self.scope is None:
            self.scope = "device"
            self.notes["gpu_scope"] = (
                "device-wide used memory: the server's pids are not among nvidia-smi's "
                "compute apps, so other processes on the GPU count too"
            )
        return mib

    async def sample(self) -> dict:
        s = {
            "t": round(time.monotonic() - self.t0, 2),
            "phase": self.phase,
            "gpu_mib": await self.gpu_mib(),
            "host_mib": None if self.pid is None else tree_rss_mib(self.pid),
        }
        self.samples.append(s)
        return s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sample()

    async def enter(self, phase: str) -> None:
        """Start a phase with a sample, so that even a short phase is on the curve."""
        self.phase = phase
        await self.sample()

    def series(self, key: str, phase: str = "soak") -> list[float]:
        return [s[key] for s in self.samples if s["phase"] == phase and s[key] is not None]


def memory_growth(values: list[float], limit_mib: float) -> dict:
    """The flatness rule: split the samples in quarters (the first is warm-up); growth = mean
    of the last quarter - mean of the second; flat when growth < limit_mib. Fewer than 4
    samples: flat is None."""
    n = len(values)
    if n < 4:
        return {"samples": n, "growth_mib": None, "limit_mib": limit_mib, "flat": None}
    q = n // 4
    second, last = values[q : 2 * q], values[n - q :]
    m2, m4 = sum(second) / len(second), sum(last) / len(last)
    return {
        "samples": n,
        "second_quarter_mean_mib": round(m2, 1),
        "last_quarter_mean_mib": round(m4, 1),
        "growth_mib": round(m4 - m2, 1),
        "limit_mib": limit_mib,
        "flat": (m4 - m2) < limit_mib,
    }


# ----------------------------------------------------------------------------- probes
def compare_probes(start: list[dict], end: list[dict]) -> dict:
    """Per probe: identical output ids, else the first differing position."""
    rows = []
    for i, (a, b) in enumerate(zip(start, end)):
        err = a.get("error") or b.get("error")
        ta, tb = a.get("output_ids"), b.get("output_ids")
        same = err is None and ta == tb
        rows.append(
            {
                "probe": i,
                "identical": same,
                "first_diff": None if same or err else lcp_len(ta, tb),
                "start_tokens": None if ta is None else len(ta),
                "end_tokens": None if tb is None else len(tb),
                **({"error": err} if err else {}),
            }
        )
    return {
        "compared": len(rows),
        "identical": sum(r["identical"] for r in rows),
        "per_probe": rows,
    }


# ----------------------------------------------------------------------------- the run
class Soak:
    """The phases against one server; everything they learn lands in ``self.doc``."""

    def __init__(self, args, base_url: str, pid: int | None, doc: dict, vocab_size: int, proc=None):
        self.args, self.base, self.doc, self.pid, self.proc = args, base_url, doc, pid, proc
        self.mix = RequestMix(args, vocab_size, random.Random(f"soak-{args.seed}"))
        self.probes = probe_prompts(args, vocab_size)
        self.tally = Tally()
        self.sampler = MemorySampler(pid, args.sample_s)
        self.stop = asyncio.Event()
        self.session = None
        self.metrics: dict = {}

    async def run(self) -> None:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=self.args.concurrency + 8)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=30, sock_read=self.args.request_timeout_s
        )
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as self.session:
            sampler = asyncio.create_task(self.sampler.run())
            try:
                await self.phases()
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                self.doc["memory"]["samples"] = self.sampler.samples

    async def phases(self) -> None:
        await self.sampler.enter("probe_start")
        self.doc["probes"]["start"] = await self.probe_run("start")
        self.metrics["start"] = await self.get_metrics()
        await self.sampler.enter("soak")
        await self.soak()
        if not self.stop.is_set():
            self.doc["drain"]["server_idle"] = await self.wait_idle()
        self.metrics["end"] = await self.get_metrics()
        if self.stop.is_set():
            return
        await self.sampler.enter("probe_end")
        self.doc["probes"]["end"] = await self.probe_run("end")
        await self.sampler.enter("end")

    async def probe_run(self, label: str) -> list[dict]:
        try:
            await asyncio.get_running_loop().run_in_executor(None, flush, self.base)
        except (RuntimeError, OSError) as exc:
            self.doc["probes"][f"flush_error_{label}"] = f"{type(exc).__name__}: {exc}"[:300]
        out = []
        for ids in self.probes:
            if self.stop.is_set():
                break
            out.append(await generate_once(self.session, self.base, ids, self.args.probe_tokens))
        bad = sum("error" in r for r in out)
        print(
            f"probes ({label}): {len(out)} x {self.args.probe_tokens} greedy tokens, {bad} failed",
            flush=True,
        )
        return out

    async def get_text(self, path: str) -> str | None:
        try:
            async with self.session.get(self.base + path) as resp:
                return await resp.text() if resp.status == 200 else None
        except Exception:
            return None

    async def get_metrics(self) -> dict | None:
        text = await self.get_text("/metrics")
        return None if text is None else parse_prometheus(text)

    async def get_loads(self) -> list[dict] | None:
        text = await self.get_text("/v1/loads?include=core")
        try:
            return json.loads(text)["loads"] if text else None
        except (ValueError, KeyError, TypeError):
            return None

    async def one(self, req: Req) -> None:
        self.tally.sent[req.kind] += 1
        if req.kind == "abort":
            res = await stream_generate(
                self.session,
                self.base,
                req.input_ids,
                req.max_new_tokens,
                close_after=req.close_after,
            )
            self.tally.aborted(req, res, res.closed)
        elif req.kind == "generate":
            self.tally.finished(
                req,
                await stream_generate(self.session, self.base, req.input_ids, req.max_new_tokens),
            )
        else:
            self.tally.rejected(req.kind, *await post_raw(self.session, self.base, req.body))

    async def worker(self, deadline: float) -> None:
        while (
            time.monotonic() < deadline
            and not self.stop.is_set()
            and not server_gone(self.proc, self.pid)
        ):
            await self.one(self.mix.draw())

    async def progress(self, t_start: float) -> None:
        while True:
            await asyncio.sleep(self.args.progress_s)
            print(await self.progress_line(time.monotonic() - t_start), flush=True)

    async def progress_line(self, elapsed: float) -> str:
        t = self.tally
        loads, metrics = await self.get_loads(), await self.get_metrics()
        last = self.sampler.samples[-1] if self.sampler.samples else {}
        parts = [
            f"  [{self.sampler.phase} {elapsed:.0f}/{self.args.duration_s:g} s] sent {sum(t.sent.values())}",
            f"done {t.completed}",
            f"failed {t.failed}",
            f"aborted {t.closed_mid_stream}",
            f"malformed {t.malformed_sent()} ({t.malformed_ok()} 4xx)",
            f"{t.out_tokens / max(elapsed, 1e-9):.0f} out tok/s",
        ]
        if loads:
            parts.append(
                f"running {sum(x.get('num_running_reqs', 0) for x in loads)} "
                f"waiting {sum(x.get('num_waiting_reqs', 0) for x in loads)}"
            )
        retracted = metric_delta(self.metrics.get("start"), metrics, RETRACT_METRIC)
        if retracted is not None:
            parts.append(f"retracted {retracted:.0f}")
        parts += [
            f"{k.split('_')[0]} {last[k]:.0f} MiB"
            for k in ("gpu_mib", "host_mib")
            if last.get(k) is not None
        ]
        return ", ".join(parts)

    async def soak(self) -> None:
        a = self.args
        print(f"soak: {a.duration_s:g} s, {a.concurrency} in flight", flush=True)
        t_start = time.monotonic()
        deadline = t_start + a.duration_s
        workers = [asyncio.create_task(self.worker(deadline)) for _ in range(a.concurrency)]
        all_done = asyncio.gather(*workers)
        prog = asyncio.create_task(self.progress(t_start))
        stopper = asyncio.create_task(self.stop.wait())
        await asyncio.wait(
            [stopper, all_done], timeout=a.duration_s, return_when=asyncio.FIRST_COMPLETED
        )
        if server_gone(self.proc, self.pid):
            self.doc["server"]["gone_after_s"] = round(time.monotonic() - t_start, 1)
            print(
                f"SERVER GONE after {self.doc['server']['gone_after_s']} s: soak ended early",
                flush=True,
            )
        await self.sampler.enter("drain")
        t_drain = time.monotonic()
        if not self.stop.is_set():
            await asyncio.wait(
                [all_done, stopper], timeout=a.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        pending = [w for w in workers if not w.done()]
        if not self.stop.is_set():
            self.tally.unfinished_at_drain = len(pending)
            for _ in pending:
                self.tally.fail(
                    "drain", f"no answer within --drain-timeout-s {a.drain_timeout_s:g}"
                )
        for task in (*workers, prog, stopper):
            task.cancel()
        await asyncio.gather(all_done, prog, stopper, return_exceptions=True)
        t_end = time.monotonic()
        self.doc["drain"].update(
            in_flight_finish_s=round(t_end - t_drain, 2), unfinished=len(pending)
        )
        wall = t_end - t_start
        self.doc["throughput"] = {
            "wall_s": round(wall, 2),
            "req_s": round(self.tally.completed / wall, 3),
            "out_tok_s": round(self.tally.out_tokens / wall, 1),
        }
        print(await self.progress_line(t_end - t_start), flush=True)

    async def wait_idle(self) -> dict:
        """Poll /v1/loads until no request runs or waits (SGLang publishes its idle state),
        at most --drain-timeout-s; without the endpoint, settle for a second."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.args.drain_timeout_s and not self.stop.is_set():
            loads = await self.get_loads()
            if loads is None:
                await asyncio.sleep(1.0)
                return {"idle": None, "note": "GET /v1/loads unavailable; waited 1 s"}
            if all(x.get("num_running_reqs", 0) + x.get("num_waiting_reqs", 0) == 0 for x in loads):
                return {"idle": True, "s": round(time.monotonic() - t0, 2)}
            await asyncio.sleep(0.2)
        return {"idle": False, "s": round(time.monotonic() - t0, 2)}

    def interrupt(self, name: str) -> None:
        self.doc["interrupted"] = name
        self.stop.set()


def run_soak(soak: Soak) -> None:
    """soak.run() in an event loop whose SIGTERM / SIGINT stop the run gracefully."""

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, soak.interrupt, sig.name)
        try:
            await soak.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    asyncio.run(main())


# ----------------------------------------------------------------------------- report
def counter_reports(doc: dict, tally: Tally, metrics: dict) -> None:
    start, end = metrics.get("start"), metrics.get("end")
    if end is None:
        why = "GET /metrics unavailable at the end (server without --enable-metrics, or the run stopped early)"
    else:
        why = "not in /metrics (exported after the first increment; none happened, or metrics are off)"
    retracted = metric_delta(start, end, RETRACT_METRIC)
    doc["retractions"] = {
        "value": tally.retractions_meta if retracted is None else int(retracted),
        "source": "meta_info.num_retractions (completed requests)"
        if retracted is None
        else RETRACT_METRIC,
        "metrics_delta": None if retracted is None else int(retracted),
        "meta_info_sum": tally.retractions_meta,
        **({"note": f"{RETRACT_METRIC} {why}"} if retracted is None else {}),
    }
    tokens, passes = (
        metric_delta(start, end, EVICT_TOKENS_METRIC),
        metric_delta(start, end, EVICT_PASSES_METRIC),
    )
    doc["evictions"] = {
        "evicted_tokens": None if tokens is None else int(tokens),
        "eviction_passes": None if passes is None else int(passes),
        "source": f"{EVICT_TOKENS_METRIC}, {EVICT_PASSES_METRIC} (GET /metrics deltas)",
        **({"note": f"{EVICT_TOKENS_METRIC} {why}"} if tokens is None else {}),
    }


def evaluate(
    doc: dict, tally: Tally | None, sampler: MemorySampler | None, alive: bool, args
) -> None:
    """Fill doc["checks"] and doc["passed"]."""
    gpu_limit, host_limit = args.max_mem_growth_mib
    mem = doc["memory"]
    if sampler is not None:
        mem["growth"] = {
            "gpu": memory_growth(sampler.series("gpu_mib"), gpu_limit),
            "host": memory_growth(sampler.series("host_mib"), host_limit),
        }
        mem["notes"] = sampler.notes
        mem["gpu_scope"] = sampler.scope
    growth = mem.get("growth", {})
    probes = doc["probes"]
    if probes.get("start") and probes.get("end"):
        probes["comparison"] = compare_probes(probes["start"], probes["end"])
    cmp = probes.get("comparison")
    checks = {
        "server_alive": alive,
        "malformed_rejected": (
            None
            if tally is None or not tally.malformed_sent()
            else tally.malformed_ok() == tally.malformed_sent()
        ),
        "no_failures": tally is not None and tally.failed == 0,
        "gpu_memory_flat": growth.get("gpu", {}).get("flat"),
        "host_memory_flat": growth.get("host", {}).get("flat"),
        "probes_identical": bool(cmp)
        and cmp["compared"] == len(probes["start"]) == args.probe_prompts
        and cmp["identical"] == cmp["compared"],
    }
    doc["checks"] = checks
    doc["passed"] = (
        not doc["partial"] and "error" not in doc and all(v is not False for v in checks.values())
    )


def _fmt(x, unit: str = "") -> str:
    return "-" if x is None else f"{x}{unit}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_lines(doc: dict) -> list[str]:
    c, load = doc.get("counts") or {}, doc.get("load") or {}
    ab, mal = c.get("aborted") or {}, c.get("malformed") or {}
    ret, ev, th = (
        doc.get("retractions") or {},
        doc.get("evictions") or {},
        doc.get("throughput") or {},
    )
    hits = doc.get("cache") or {}
    growth = (doc.get("memory") or {}).get("growth") or {}
    cmp = (doc.get("probes") or {}).get("comparison") or {}
    lines = [
        f"soak of {doc['server'].get('url')} for {doc['config']['duration_s']:g} s, concurrency "
        f"{doc['config']['concurrency']}: offered {_fmt(load.get('token_ratio'), 'x')} the KV pool, "
        f"{_fmt(load.get('request_ratio'), 'x')} max_running_requests"
        + ("  (PARTIAL: " + str(doc.get("interrupted")) + ")" if doc["partial"] else ""),
        f"  requests    sent {_fmt(c.get('sent'))}, completed {_fmt(c.get('completed'))}, failed "
        f"{_fmt(c.get('failed'))}, aborted mid-stream {_fmt(ab.get('closed_mid_stream'))}, malformed "
        f"{_fmt(mal.get('sent'))} ({_fmt(mal.get('rejected_4xx'))} got 4xx)",
        f"  retractions {_fmt(ret.get('value'))} ({ret.get('source', '-')}); evicted tokens "
        f"{_fmt(ev.get('evicted_tokens'))} in {_fmt(ev.get('eviction_passes'))} passes",
        f"  cache hits  shared-prefix requests {_pct((hits.get('prefix_requests') or {}).get('cached_share'))} "
        f"of prompt tokens, others {_pct((hits.get('other_requests') or {}).get('cached_share'))}",
        f"  throughput  {_fmt(th.get('req_s'))} req/s, {_fmt(th.get('out_tok_s'))} out tok/s",
        f"  memory      gpu {_fmt((growth.get('gpu') or {}).get('growth_mib'), ' MiB')} growth, host "
        f"{_fmt((growth.get('host') or {}).get('growth_mib'), ' MiB')} growth (last vs second quarter)",
        f"  probes      {_fmt(cmp.get('identical'))}/{_fmt(cmp.get('compared'))} identical"
        + "".join(
            f"; probe {r['probe']} differs at {r['first_diff']}"
            for r in cmp.get("per_probe", [])
            if not r["identical"] and r["first_diff"] is not None
        ),
    ]
    if doc.get("error"):
        lines.append(f"  error       {doc['error'][:300]}")
    lines.append(f"  {'check':<18} result")
    for name, ok in (doc.get("checks") or {}).items():
        lines.append(f"  {name:<18} {'n/a' if ok is None else 'PASS' if ok else 'FAIL'}")
    lines.append("PASSED" if doc.get("passed") else "FAILED")
    return lines


# ----------------------------------------------------------------------------- CLI
def _int_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _mib_pair(text: str) -> tuple[float, float]:
    try:
        gpu, host = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU,HOST in MiB, got {text!r}") from None
    return gpu, host


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MALFORMED_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"malformed kinds are {', '.join(MALFORMED_KINDS)}; got {text!r}"
        )
    return kinds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = doc_parser("python -m sglang_tq.bench soak", __doc__)
    _add_server_args(ap.add_argument_group("server (one of --model-path / --url)"))
    _add_load_args(ap.add_argument_group("load"))
    _add_check_args(ap.add_argument_group("probes, sampling, checks, output"))
    args = ap.parse_args(argv)
    args.argv = argv
    _check_args(ap, args)
    return args


def _add_server_args(g) -> None:
    add_model_path(g, help="launch python -m sglang.launch_server on this model folder")
    g.add_argument(
        "--common-server-args",
        default=DEFAULT_SERVER_ARGS,
        help=f"flags of the launched server (default: {DEFAULT_SERVER_ARGS!r})",
    )
    g.add_argument("--server-args", default="", help="extra flags appended to --common-server-args")
    g.add_argument(
        "--startup-timeout",
        type=float,
        default=600,
        help="seconds to wait for /health (default 600)",
    )
    g.add_argument(
        "--url",
        help="attach to a running server instead, e.g. http://127.0.0.1:30000 (loopback only)",
    )
    g.add_argument(
        "--server-pid",
        type=int,
        help="with --url: the server's pid, so that its process tree's RSS is sampled",
    )


def _add_load_args(g) -> None:
    g.add_argument(
        "--duration-s", type=float, default=1200, help="soak length in seconds (default 1200)"
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=256,
        help="requests kept in flight (default 256); must offer > 2x what the server holds at "
        "once (see Load below)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of prompts, prefixes, probes and the mix (default 0)",
    )
    g.add_argument(
        "--prompt-len",
        type=_int_range,
        default=(16, 2048),
        metavar="MIN,MAX",
        help="random prompt length in tokens, also of probes and shared-prefix suffixes "
        "(default 16,2048)",
    )
    g.add_argument(
        "--output-len",
        type=_int_range,
        default=(16, 1024),
        metavar="MIN,MAX",
        help="random max_new_tokens (default 16,1024)",
    )
    g.add_argument(
        "--num-prefixes", type=int, default=16, help="distinct shared prefixes (default 16)"
    )
    g.add_argument(
        "--prefix-len", type=int, default=1024, help="tokens per shared prefix (default 1024)"
    )
    g.add_argument(
        "--prefix-share",
        type=float,
        default=0.5,
        help="share of well-formed requests that start with a shared prefix (default 0.5)",
    )
    g.add_argument(
        "--abort-share",
        type=float,
        default=0.1,
        help="share of requests streamed and closed mid-stream (default 0.1)",
    )
    g.add_argument(
        "--malformed-share",
        type=float,
        default=0.05,
        help="share of malformed requests (default 0.05)",
    )
    g.add_argument(
        "--malformed-kinds",
        type=_kinds,
        default=list(MALFORMED_KINDS),
        help=f"comma list of malformed kinds to send (default {','.join(MALFORMED_KINDS)})",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        help="model vocab size, for valid and out-of-vocab ids (default: config.json of the model)",
    )
    g.add_argument(
        "--request-timeout-s",
        type=float,
        default=900,
        help="seconds a request may go without a byte before it fails (default 900)",
    )
    g.add_argument(
        "--drain-timeout-s",
        type=float,
        default=300,
        help="after the soak: seconds for in-flight requests to finish, and again for the "
        "server to go idle (default 300)",
    )


def _add_check_args(g) -> None:
    g.add_argument(
        "--probe-prompts",
        type=int,
        default=8,
        help="probe prompts, greedy, start vs end (default 8)",
    )
    g.add_argument("--probe-tokens", type=int, default=64, help="new tokens per probe (default 64)")
    g.add_argument(
        "--sample-s", type=float, default=5, help="memory sampling interval in seconds (default 5)"
    )
    g.add_argument(
        "--progress-s", type=float, default=30, help="seconds between progress lines (default 30)"
    )
    g.add_argument(
        "--max-mem-growth-mib",
        type=_mib_pair,
        default=(512.0, 1024.0),
        metavar="GPU,HOST",
        help="memory check: mean of the soak's last quarter of samples minus the mean of its "
        "second quarter must stay below this many MiB (default 512,1024)",
    )
    add_out(g, "soak")


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse settings that contradict each other or are out of range (exit code 2)."""
    if bool(args.model_path) == bool(args.url):
        ap.error("give exactly one of --model-path and --url")
    if args.server_pid is not None and not args.url:
        ap.error("--server-pid goes with --url (a launched server's pid is known)")
    if args.url:
        try:
            args.url = check_loopback(args.url)
        except ValueError as exc:
            ap.error(str(exc))
    for name in ("prefix_share", "abort_share", "malformed_share"):
        if not 0 <= getattr(args, name) <= 1:
            ap.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.abort_share + args.malformed_share > 1:
        ap.error("--abort-share + --malformed-share must not exceed 1")
    for name in (
        "duration_s",
        "concurrency",
        "probe_prompts",
        "probe_tokens",
        "sample_s",
        "progress_s",
        "request_timeout_s",
        "drain_timeout_s",
    ):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    if args.num_prefixes < 0 or args.prefix_len < 1:
        ap.error("--num-prefixes must be >= 0 and --prefix-len >= 1")


def new_doc(args, prov: dict) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in ("out", "argv")}
    return {
        "tool": TOOL,
        "argv": args.argv,
        **prov,
        "partial": False,
        "interrupted": None,
        "config": config,
        "server": {},
        "server_info": {},
        "load": {},
        "counts": {},
        "retractions": {},
        "evictions": {},
        "cache": {},
        "throughput": {},
        "drain": {},
        "memory": {"sample_s": args.sample_s, "samples": []},
        "probes": {"count": args.probe_prompts, "tokens": args.probe_tokens},
        "checks": {},
        "passed": False,
    }


def prepare(args, base: str, doc: dict) -> int:
    """Server info, vocab size, load ratio and request-length check; returns the vocab size."""
    info = read_server_info(base)
    doc["server_info"] = info
    vocab, source = resolve_vocab_size(args, info)
    doc["config"]["vocab_size_used"], doc["config"]["vocab_size_source"] = vocab, source
    limit = info.get("max_req_input_len")
    if limit and longest_request(args) > limit:
        raise UsageError(
            f"the longest request ({longest_request(args)} tokens: prefix + prompt + output) "
            f"exceeds the server's max_req_input_len {limit}; lower --prompt-len, "
            f"--output-len or --prefix-len"
        )
    if info.get("disable_radix_cache"):
        print(
            "WARNING: the server runs with --disable-radix-cache: no prefix hits, no evictions",
            flush=True,
        )
    load = offered_load(args, info)
    doc["load"] = load
    print(
        f"vocab {vocab} ({source}); KV pool {_fmt(load['max_total_num_tokens'])} tokens, max running "
        f"{_fmt(load['max_running_requests'])}; offered {load['offered_inflight_tokens']} in-flight tokens = "
        f"{_fmt(load['token_ratio'], 'x')} the pool, {_fmt(load['request_ratio'], 'x')} the running limit",
        flush=True,
    )
    if load["overloaded"] is False:
        print(
            f"WARNING: offered load is only {load['token_ratio']}x the KV pool (< {OVERLOAD_TARGET:g}x): the "
            f"scheduler may never retract; raise --concurrency / --prompt-len / --output-len or shrink the "
            f"pool (--server-args '--max-total-tokens N')",
            flush=True,
        )
    elif load["overloaded"] is None:
        print(
            "WARNING: max_total_num_tokens unknown: cannot tell whether the load exceeds 2x the pool",
            flush=True,
        )
    return vocab


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    print("provenance ...", flush=True)
    prov = get_provenance()
    out = args.out or default_out("soak", prov)
    doc = new_doc(args, prov)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    srv: SGLangServer | None = None
    soak: Soak | None = None
    rc_usage = False
    try:
        srv = new_server(args, out, doc) if args.model_path else None
        base, pid = connect(args, srv, doc)
        vocab = prepare(args, base, doc)
        soak = Soak(args, base, pid, doc, vocab, srv.proc if srv else None)
        run_soak(soak)
        signal.signal(signal.SIGTERM, _raise_interrupted)  # asyncio reset it
    except UsageError as exc:
        doc["error"] = f"usage: {exc}"
        rc_usage = True
    except KeyboardInterrupt as exc:
        doc["interrupted"] = str(exc) or "KeyboardInterrupt"
    except RuntimeError as exc:
        doc["error"] = str(exc)[:2000]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not lose the report
        doc["partial"] = doc["interrupted"] is not None
        finish(doc, args, srv, soak, t0)
        write_json_atomic(out, doc)
        if srv is not None:
            srv.stop()
        signal.signal(signal.SIGTERM, old_term)
    print("\n".join(summary_lines(doc)), flush=True)
    print(f"JSON: {out}  ({doc['wall_s']:.0f} s)", flush=True)
    if rc_usage:
        print(f"error: {doc['error']}", file=sys.stderr)
        return 2
    return 0 if doc["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def new_server(args, out: Path, doc: dict) -> SGLangServer:
    """The server --model-path asks for (not started yet); its log goes next to the JSON."""
    flags = shlex.split(args.common_server_args) + shlex.split(args.server_args)
    srv = SGLangServer(
        str(Path(args.model_path).resolve()), flags, out.with_name(out.stem + "_server.log")
    )
    doc["server"] = {
        "url": srv.base_url,
        "launched": True,
        "cmd": shlex.join(srv.cmd[1:]),
        "log": str(srv.log_path),
    }
    return srv


def connect(args, srv: SGLangServer | None, doc: dict) -> tuple[str, int | None]:
    """Start the launched server, or check that the --url one answers; (base URL, pid)."""
    if srv is not None:
        srv.start(args.startup_timeout)
        doc["server"].update(pid=srv.proc.pid, startup_s=srv.startup_s)
        return srv.base_url, srv.proc.pid
    doc["server"] = {"url": args.url, "launched": False, "pid": args.server_pid}
    if not healthy(args.url):
        raise RuntimeError(f"{args.url}/health does not answer 200")
    return args.url, args.server_pid


def finish(doc: dict, args, srv: SGLangServer | None, soak: Soak | None, t0: float) -> None:
    """Liveness, counts, counters and checks into ``doc``."""
    base = doc["server"].get("url")
    proc = srv.proc if srv is not None else None
    alive = bool(base) and healthy(base) and not server_gone(proc, doc["server"].get("pid"))
    if proc is not None and proc.poll() is not None:
        doc["server"]["exit_code"] = proc.returncode
        doc["server"]["log_tail"] = srv.log_tail(40)
    if soak is not None:
        doc["counts"] = soak.tally.counts()
        doc["cache"] = soak.tally.cache_hits()
        counter_reports(doc, soak.tally, soak.metrics)
    evaluate(doc, soak.tally if soak else None, soak.sampler if soak else None, alive, args)
    doc["wall_s"] = round(time.time() - t0, 1)


if __name__ == "__main__":
    sys.exit(main())
