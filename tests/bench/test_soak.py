"""``python -m sglang_tq.bench soak`` on CPU: short soaks against a fake SGLang server
(standard-library HTTP on 127.0.0.1, in a thread of the test process) and unit tests of the rules.

The fake implements what the soak touches: /health, /get_server_info (no /server_info, so
the older endpoint is the one read; like SGLang it carries no vocab size, so it comes from
the config.json in ``model_path``), /metrics (Prometheus text with SGLang 0.5.17's
retraction and radix-cache eviction counters), /v1/loads, /flush_cache and /generate,
non-streaming JSON and streaming SSE (cumulative ``output_ids``, ``data: [DONE]``), with
greedy outputs that are a function of ``input_ids`` and HTTP 400 for malformed bodies.
Faults are switched on per test: one malformed kind answered 200, outputs that change
after N requests (corruption), streamed requests failing with 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

import sglang_tq.bench.soak as soak
from sglang_tq.bench import cli
from tests.bench.conftest import QuietHandler, ThreadedServer

VOCAB = 1000
CORRUPT_FROM = 5  # first output position a corrupted fake changes


# ----------------------------------------------------------------------------- fake server
class FakeState:
    def __init__(
        self,
        model_path: Path,
        pool: int = 200,
        running: int = 8,
        token_s: float = 0.002,
        accept_kind: str | None = None,
        corrupt_after: int | None = None,
        fail_stream_after: int | None = None,
    ):
        self.model_path, self.pool, self.running, self.token_s = model_path, pool, running, token_s
        self.accept_kind, self.corrupt_after, self.fail_stream_after = (
            accept_kind,
            corrupt_after,
            fail_stream_after,
        )
        self.lock = threading.Lock()
        self.generated = self.streams = self.active = 0
        self.retracted = self.evicted = self.evictions = self.disconnects = self.flushes = 0
        self.seen: dict[tuple, list[int]] = {}

    def malformed(self, raw: bytes) -> tuple[str | None, dict | None]:
        """(error kind, body): SGLang's checks, as the soak's malformed kinds name them."""
        try:
            body = json.loads(raw)
        except ValueError:
            return "not_json", None
        ids = body.get("input_ids")
        n = body.get("sampling_params", {}).get("max_new_tokens", 16)
        if not isinstance(ids, list) or not ids:
            return "empty_input_ids", body
        if n < 0:
            return "negative_max_new_tokens", body
        if any(not 0 <= i < VOCAB for i in ids):
            return "id_out_of_vocab", body
        return None, body

    def generate(self, ids: list[int], n: int) -> dict:
        """Greedy output ids (a function of ids) and the meta_info of the last chunk."""
        with self.lock:
            self.generated += 1
            k = self.generated
            key = tuple(ids[:8])
            cached = min(soak.lcp_len(self.seen.get(key, []), ids), len(ids) - 1)
            self.seen[key] = list(ids)
            retractions = int(k % 7 == 0)
            self.retracted += retractions
            if k % 5 == 0:
                self.evicted += 32
                self.evictions += 1
        seed = sum((j + 1) * t for j, t in enumerate(ids)) % VOCAB
        toks = [(seed + 31 * j) % VOCAB for j in range(max(n, 0))]
        if self.corrupt_after is not None and k > self.corrupt_after:
            toks = [t if j < CORRUPT_FROM else (t + 1) % VOCAB for j, t in enumerate(toks)]
        meta = {
            "id": f"r{k}",
            "prompt_tokens": len(ids),
            "completion_tokens": len(toks),
            "cached_tokens": cached,
            "num_retractions": retractions,
            "finish_reason": {"type": "length", "length": len(toks)},
            # SGLang's replies are long (timings, per-token details): more than a few hundred bytes
            "e2e_latency": 0.1,
            "spec_verify_ct": [0] * 200,
        }
        return {"output_ids": toks, "meta_info": meta}

    def metrics(self) -> bytes:
        lab = 'model_name="fake",engine_type="unified",tp_rank="0"'
        with self.lock:
            text = (
                f"# HELP {soak.RETRACT_METRIC} Total number of retracted requests.\n"
                f"# TYPE {soak.RETRACT_METRIC} counter\n"
                f"{soak.RETRACT_METRIC}{{{lab}}} {float(self.retracted)}\n"
                f"# TYPE sglang:evicted_tokens counter\n"
                f'{soak.EVICT_TOKENS_METRIC}{{cache_type="RadixCache",{lab}}} {float(self.evicted)}\n'
                f"# TYPE sglang:eviction_duration_seconds histogram\n"
                f'sglang:eviction_duration_seconds_bucket{{cache_type="RadixCache",le="+Inf",{lab}}} '
                f"{float(self.evictions)}\n"
                f'{soak.EVICT_PASSES_METRIC}{{cache_type="RadixCache",{lab}}} {float(self.evictions)}\n'
                f"sglang:num_running_reqs{{{lab}}} {float(self.active)}\n"
            )
        return text.encode()


def make_handler(state: FakeState):
    class Handler(QuietHandler):
        def do_GET(self):
            if self.path == "/health":
                self._send(200, b"")
            elif self.path == "/get_server_info":
                self._send(
                    200,
                    json.dumps(
                        {
                            "max_total_num_tokens": state.pool,
                            "max_running_requests": None,
                            "max_req_input_len": 4000,
                            "model_path": str(state.model_path),
                            "kv_quant": "turboquant",
                            "enable_metrics": True,
                            "internal_states": [
                                {"effective_max_running_requests_per_dp": state.running}
                            ],
                        }
                    ).encode(),
                )
            elif self.path == "/metrics":
                self._send(200, state.metrics(), "text/plain")
            elif self.path == "/v1/loads?include=core":
                self._send(
                    200,
                    json.dumps(
                        {
                            "loads": [
                                {
                                    "dp_rank": 0,
                                    "num_running_reqs": state.active,
                                    "num_waiting_reqs": 0,
                                }
                            ]
                        }
                    ).encode(),
                )
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/flush_cache?timeout=30":
                with state.lock:
                    state.flushes += 1
                    state.seen.clear()
                self._send(200, b"Cache flushed.\n", "text/plain")
                return
            if self.path != "/generate":
                self._send(404, b"not found", "text/plain")
                return
            kind, body = state.malformed(raw)
            if kind is not None and kind != state.accept_kind:
                self._send(400, json.dumps({"error": {"message": f"bad request: {kind}"}}).encode())
                return
            ids = body["input_ids"] or [0]
            n = body["sampling_params"]["max_new_tokens"]
            if not body.get("stream"):
                self._send(200, json.dumps(state.generate(ids, n)).encode())
                return
            with state.lock:
                state.streams += 1
                failing = (
                    state.fail_stream_after is not None and state.streams > state.fail_stream_after
                )
            if failing:
                self._send(500, b'{"error": {"message": "internal error"}}')
                return
            self.stream(ids, n)

        def stream(self, ids: list[int], n: int):
            with state.lock:
                state.active += 1
            try:
                out = state.generate(ids, n)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for j in range(1, len(out["output_ids"]) + 1):
                    time.sleep(state.token_s)
                    last = j == len(out["output_ids"])
                    meta = {
                        **out["meta_info"],
                        "completion_tokens": j,
                        "finish_reason": out["meta_info"]["finish_reason"] if last else None,
                    }
                    chunk = {"output_ids": out["output_ids"][:j], "meta_info": meta}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                with state.lock:
                    state.disconnects += 1
            finally:
                with state.lock:
                    state.active -= 1

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the soak opens dozens of connections at once


def running_fake(state: FakeState) -> ThreadedServer:
    """with running_fake(state) as base_url: ..."""
    return ThreadedServer(_Server(("127.0.0.1", 0), make_handler(state)))


# ----------------------------------------------------------------------------- helpers
PROBES = 4
FAST_PROV = {"gpu": "cpu", "commit": "0000000", "versions": {}, "date": None}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return d


@pytest.fixture
def fast_provenance(monkeypatch):
    """Provenance from a child process costs ~2 s (torch import); one test keeps the real one."""
    monkeypatch.setattr(soak, "get_provenance", lambda: dict(FAST_PROV))


def soak_argv(url: str, out: Path, duration: float = 2.0, *extra: str) -> list[str]:
    return [
        "--url",
        url,
        "--out",
        str(out),
        "--duration-s",
        str(duration),
        "--concurrency",
        "16",
        "--seed",
        "3",
        "--prompt-len",
        "8,48",
        "--output-len",
        "4,24",
        "--num-prefixes",
        "4",
        "--prefix-len",
        "32",
        "--abort-share",
        "0.2",
        "--malformed-share",
        "0.15",
        "--probe-prompts",
        str(PROBES),
        "--probe-tokens",
        "12",
        "--sample-s",
        "0.1",
        "--progress-s",
        "1",
        "--drain-timeout-s",
        "10",
        "--server-pid",
        str(os.getpid()),
        *extra,
    ]


def run_soak(
    state: FakeState, tmp_path: Path, duration: float = 2.0, *extra: str
) -> tuple[int, dict]:
    out = tmp_path / "soak.json"
    with running_fake(state) as url:
        rc = soak.main(soak_argv(url, out, duration, *extra))
    return rc, json.loads(out.read_text())


# ----------------------------------------------------------------------------- end to end
def test_soak_passes_against_healthy_fake(tmp_path, model_dir, capsys):
    state = FakeState(model_dir)
    rc, doc = run_soak(state, tmp_path, 3.0)
    text = capsys.readouterr().out
    assert rc == 0 and doc["passed"] is True and doc["partial"] is False, text
    assert all(
        doc["checks"][k] is True
        for k in (
            "server_alive",
            "malformed_rejected",
            "no_failures",
            "host_memory_flat",
            "probes_identical",
        )
    )
    assert doc["checks"]["gpu_memory_flat"] is None  # no nvidia-smi here, with a note
    assert "nvidia-smi" in doc["memory"]["notes"]["gpu"]
    # provenance (the real one, from a child process), config, server info
    assert doc["tool"] == "sglang_tq.bench soak" and doc["commit"] and "versions" in doc
    assert doc["config"]["vocab_size_used"] == VOCAB and doc["config"][
        "vocab_size_source"
    ].endswith("config.json")
    assert doc["server_info"]["source"] == "/get_server_info"
    assert doc["server_info"]["effective_max_running_requests"] == 8
    assert doc["load"]["max_total_num_tokens"] == 200 and doc["load"]["overloaded"] is True
    # every kind of request was sent and counted
    c = doc["counts"]
    assert c["completed"] > 0 and c["failed"] == 0 and c["unfinished_at_drain"] == 0
    assert c["aborted"]["closed_mid_stream"] > 0 and state.disconnects > 0
    assert c["malformed"]["sent"] == c["malformed"]["rejected_4xx"] > 0
    assert set(c["malformed"]["by_kind"]) == set(soak.MALFORMED_KINDS)
    assert c["sent"] == sum(c["sent_by_kind"].values()) and c["short_outputs"] == 0
    # counters from /metrics, with their sources
    assert doc["retractions"]["source"] == soak.RETRACT_METRIC and doc["retractions"]["value"] > 0
    assert doc["retractions"]["meta_info_sum"] > 0
    assert doc["evictions"]["evicted_tokens"] > 0 and doc["evictions"]["eviction_passes"] > 0
    # the shared prefixes hit the (fake) radix cache; unrelated prompts do not
    assert doc["cache"]["prefix_requests"]["cached_share"] > 0.2
    assert doc["cache"]["other_requests"]["cached_share"] < 0.05
    assert doc["throughput"]["req_s"] > 0 and doc["drain"]["server_idle"]["idle"] is True
    # memory curve through every phase, host RSS of this process
    samples = doc["memory"]["samples"]
    assert {s["phase"] for s in samples} >= {"probe_start", "soak", "probe_end"}
    assert all(s["host_mib"] > 0 and s["gpu_mib"] is None for s in samples)
    assert doc["memory"]["growth"]["host"]["samples"] >= 8
    # probes: cold both times (flushed), identical
    assert state.flushes == 2
    cmp = doc["probes"]["comparison"]
    assert cmp["compared"] == cmp["identical"] == PROBES
    assert all(len(r["output_ids"]) == 12 for r in doc["probes"]["end"])
    assert "[soak" in text and "PASSED" in text and "probes      4/4 identical" in text


def test_malformed_answered_200_fails(tmp_path, model_dir, fast_provenance):
    rc, doc = run_soak(
        FakeState(model_dir, accept_kind="negative_max_new_tokens"),
        tmp_path,
        1.5,
        "--vocab-size",
        str(VOCAB),
    )
    assert rc == 1 and doc["passed"] is False
    assert doc["config"]["vocab_size_source"] == "--vocab-size"
    assert doc["checks"]["malformed_rejected"] is False
    assert doc["checks"]["no_failures"] is True and doc["checks"]["probes_identical"] is True
    wrong = doc["counts"]["malformed_not_rejected"]
    assert (
        wrong
        and {w["kind"] for w in wrong} == {"negative_max_new_tokens"}
        and wrong[0]["status"] == 200
    )
    by_kind = doc["counts"]["malformed"]["by_kind"]
    assert by_kind["negative_max_new_tokens"]["rejected_4xx"] == 0
    assert by_kind["not_json"]["rejected_4xx"] == by_kind["not_json"]["sent"] > 0


def test_corrupted_outputs_fail_the_probe_check(tmp_path, model_dir, fast_provenance, capsys):
    rc, doc = run_soak(FakeState(model_dir, corrupt_after=PROBES + 20), tmp_path, 1.5)
    assert rc == 1 and doc["checks"]["probes_identical"] is False
    assert doc["checks"]["no_failures"] is True and doc["checks"]["malformed_rejected"] is True
    rows = doc["probes"]["comparison"]["per_probe"]
    assert [r["identical"] for r in rows] == [False] * PROBES
    assert [r["first_diff"] for r in rows] == [CORRUPT_FROM] * PROBES
    assert f"probe 0 differs at {CORRUPT_FROM}" in capsys.readouterr().out


def test_server_errors_fail_the_no_failures_check(tmp_path, model_dir, fast_provenance):
    rc, doc = run_soak(FakeState(model_dir, fail_stream_after=30), tmp_path, 1.5)
    assert rc == 1 and doc["checks"]["no_failures"] is False
    assert doc["checks"]["probes_identical"] is True and doc["checks"]["server_alive"] is True
    c = doc["counts"]
    assert c["failed"] > 0 and c["errors"] and "HTTP 500" in c["errors"][0]


def test_sigterm_writes_partial_json(tmp_path, model_dir, fast_provenance):
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.time()
    try:
        rc, doc = run_soak(FakeState(model_dir), tmp_path, 60.0)
    finally:
        timer.cancel()
    assert time.time() - t0 < 15
    assert (
        rc == 1
        and doc["partial"] is True
        and doc["interrupted"] == "SIGTERM"
        and doc["passed"] is False
    )
    assert doc["counts"]["sent"] > 0 and doc["memory"]["samples"] and "end" not in doc["probes"]
    assert doc["checks"]["probes_identical"] is False
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_server_process_gone_ends_the_soak_early(tmp_path, model_dir, fast_provenance):
    proc = subprocess.Popen(["sleep", "0.8"])  # stands in for the server process (--server-pid)
    threading.Thread(target=proc.wait, daemon=True).start()  # reaped, so its /proc entry goes
    out = tmp_path / "soak.json"
    t0 = time.time()
    with running_fake(FakeState(model_dir)) as url:
        argv = soak_argv(url, out, 60.0)
        argv[argv.index("--server-pid") + 1] = str(proc.pid)
        rc = soak.main(argv)
    doc = json.loads(out.read_text())
    assert time.time() - t0 < 15 and rc == 1
    assert doc["checks"]["server_alive"] is False and doc["server"]["gone_after_s"] < 10
    assert doc["partial"] is False and doc["probes"]["end"]  # the run went on to its end phases


def test_usage_errors_exit_2(tmp_path, capsys):
    for argv in (
        [],
        ["--url", "http://127.0.0.1:1", "--model-path", "m"],
        ["--url", "http://10.0.0.1:80"],
        ["--url", "http://127.0.0.1:1", "--abort-share", "0.7", "--malformed-share", "0.5"],
        ["--url", "http://127.0.0.1:1", "--prompt-len", "9,3"],
        ["--url", "http://127.0.0.1:1", "--malformed-kinds", "not_json,bogus"],
    ):
        with pytest.raises(SystemExit) as exc:
            soak.parse_args(argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        soak.parse_args(["--help"])
    assert exc.value.code == 0 and "--max-mem-growth-mib" in capsys.readouterr().out


def test_request_longer_than_server_limit_is_a_usage_error(tmp_path, model_dir, fast_provenance):
    rc, doc = run_soak(FakeState(model_dir), tmp_path, 1.0, "--prompt-len", "8,4000")
    assert rc == 2 and doc["error"].startswith("usage:") and "max_req_input_len" in doc["error"]


# ----------------------------------------------------------------------------- rules
def test_memory_growth_rule():
    flat = [1000.0 + (i % 3) for i in range(40)]
    g = soak.memory_growth(flat, 512)
    assert g["flat"] is True and abs(g["growth_mib"]) < 3 and g["samples"] == 40
    warm = [100.0] * 10 + [5000.0] * 30  # warm-up jump in the first quarter: ignored
    assert soak.memory_growth(warm, 512)["flat"] is True
    leak = [1000.0 + 50 * i for i in range(40)]  # +50 MiB per sample
    g = soak.memory_growth(leak, 512)
    assert g["flat"] is False and g["growth_mib"] == pytest.approx(
        50 * 20
    )  # means of [10:20] and [30:40]
    assert soak.memory_growth([1.0, 2.0, 3.0], 512)["flat"] is None
    assert soak.memory_growth([0.0, 0.0, 0.0, 600.0], 512)["flat"] is False


def fake_smi(tmp_path: Path, monkeypatch, apps: str, used: str = "70000") -> None:
    """An nvidia-smi on PATH answering the two queries the sampler makes."""
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(
        '#!/bin/sh\ncase "$1" in --query-compute-apps*) printf \'%s\' "$APPS";; '
        '*) echo "$USED";; esac\n'
    )
    exe.chmod(0o755)
    monkeypatch.setenv("APPS", apps)
    monkeypatch.setenv("USED", used)
    monkeypatch.setenv("PATH", f"{exe.parent}:{os.environ['PATH']}")


@pytest.mark.parametrize("listed", [True, False])
def test_gpu_memory_is_the_servers_own_where_visible(tmp_path, monkeypatch, listed):
    """Another job on the GPU (pid 1, 60000 MiB) must not count when the server's pids are
    listed; when they are not, the device total is sampled and the scope says so."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    me = os.getpid()
    apps = f"1, 60000\n{me}, 1234\n{me}, 66\n" if listed else "1, 60000\n"
    fake_smi(tmp_path, monkeypatch, apps)
    sampler = soak.MemorySampler(me, 1.0)
    s = asyncio.run(sampler.sample())
    if listed:
        assert (
            s["gpu_mib"] == 1300
            and sampler.scope == "server processes"
            and "gpu_scope" not in sampler.notes
        )
    else:
        assert (
            s["gpu_mib"] == 70000
            and sampler.scope == "device"
            and "device-wide" in sampler.notes["gpu_scope"]
        )
    assert soak.apps_mib("pid, used\n12, 5\nbad line\n", {12}) == 5
    assert soak.apps_mib("12, 5\n", {13}) is None


def test_prometheus_parsing_and_deltas():
    text = (
        "# HELP sglang:evicted_tokens_total x\n# TYPE sglang:evicted_tokens_total counter\n"
        'sglang:evicted_tokens_total{cache_type="RadixCache",tp_rank="0"} 96.0\n'
        'sglang:evicted_tokens_total{cache_type="RadixCache",tp_rank="1"} 4.0\n'
        "sglang:num_running_reqs 3\nbroken line\n"
    )
    m = soak.parse_prometheus(text)
    assert m == {"sglang:evicted_tokens_total": 100.0, "sglang:num_running_reqs": 3.0}
    assert (
        soak.metric_delta({"sglang:evicted_tokens_total": 40.0}, m, "sglang:evicted_tokens_total")
        == 60.0
    )
    assert (
        soak.metric_delta({}, m, "sglang:evicted_tokens_total") == 100.0
    )  # not yet exported at the start
    assert soak.metric_delta(m, m, soak.RETRACT_METRIC) is None
    assert soak.metric_delta(m, None, "sglang:num_running_reqs") is None


def test_request_mix_is_seeded_and_shaped():
    args = soak.parse_args(
        [
            "--url",
            "http://127.0.0.1:1",
            "--prompt-len",
            "8,48",
            "--output-len",
            "4,24",
            "--num-prefixes",
            "4",
            "--prefix-len",
            "32",
        ]
    )
    first = soak.RequestMix(args, VOCAB, soak.random.Random(7)).draw()
    mix = soak.RequestMix(args, VOCAB, soak.random.Random(7))
    reqs = [mix.draw() for _ in range(4000)]
    assert reqs[0] == first  # seeded
    share = {k: sum(r.kind == k for r in reqs) / len(reqs) for k in ("generate", "abort")}
    assert share["abort"] == pytest.approx(0.1, abs=0.02) and share["generate"] == pytest.approx(
        0.85, abs=0.02
    )
    assert sum(r.kind in soak.MALFORMED_KINDS for r in reqs) / len(reqs) == pytest.approx(
        0.05, abs=0.015
    )
    well = [r for r in reqs if r.kind in ("generate", "abort")]
    assert sum(r.prefix for r in well) / len(well) == pytest.approx(0.5, abs=0.03)
    for r in well:
        suffix = len(r.input_ids) - (32 if r.prefix else 0)
        assert (
            8 <= suffix <= 48
            and 4 <= r.max_new_tokens <= 24
            and all(0 < i < VOCAB for i in r.input_ids)
        )
        if r.prefix:
            assert r.input_ids[:32] in mix.prefixes
        if r.kind == "abort":
            assert 1 <= r.close_after <= max(1, r.max_new_tokens // 2)
    bodies = {r.kind: r.body for r in reqs if r.kind in soak.MALFORMED_KINDS}
    with pytest.raises(ValueError):
        json.loads(bodies["not_json"])
    assert json.loads(bodies["negative_max_new_tokens"])["sampling_params"]["max_new_tokens"] < 0
    assert max(json.loads(bodies["id_out_of_vocab"])["input_ids"]) >= VOCAB
    assert json.loads(bodies["empty_input_ids"])["input_ids"] == []


def test_offered_load_and_probe_comparison():
    args = soak.parse_args(
        [
            "--url",
            "http://127.0.0.1:1",
            "--concurrency",
            "10",
            "--prompt-len",
            "10,30",
            "--output-len",
            "10,10",
            "--malformed-share",
            "0.0",
        ]
    )
    load = soak.offered_load(
        args, {"max_total_num_tokens": 100, "effective_max_running_requests": 4}
    )
    assert load["offered_inflight_tokens"] == 300 and load["token_ratio"] == 3.0
    assert load["request_ratio"] == 2.5 and load["overloaded"] is True
    assert soak.offered_load(args, {})["overloaded"] is None
    cmp = soak.compare_probes(
        [{"output_ids": [1, 2, 3]}, {"output_ids": [1, 2, 3]}, {"output_ids": [4]}],
        [{"output_ids": [1, 2, 3]}, {"output_ids": [1, 9, 3]}, {"error": "HTTP 500"}],
    )
    assert cmp["identical"] == 1 and [r["first_diff"] for r in cmp["per_probe"]] == [None, 1, None]
    assert cmp["per_probe"][2]["error"] == "HTTP 500"
    assert cli.gpu_tag("NVIDIA H200") == "h200" and cli.gpu_tag("cpu") == "cpu"
    assert soak.default_out is cli.default_out
    assert (
        cli.default_out("soak", {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abcdef0123-dirty"}).name
        == "soak_h100_abcdef0-dirty.json"
    )
