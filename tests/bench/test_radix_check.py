"""``python -m sglang_tq.bench radix`` on CPU: its metrics on hand-made runs with known answers, the
prompt builder, and the request flow against a fake SGLang server (standard-library
HTTP on 127.0.0.1) that emulates the radix cache's ``cached_tokens`` (longest common
prefix with what earlier requests left in the tree, at most prompt_len - 1) and a
quantized cache: with ``--kv-quant`` and without ``--kv-quant-packed-prefill`` a request
that hit the cache gets perturbed logprobs and diverges (warm at token 10, a
shared-prefix hit at token 3). The end-to-end test runs ``main()`` with the fake server
as a subprocess in place of ``sglang.launch_server``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import sglang_tq.bench.radix as rc
from sglang_tq.bench import server
from tests.bench.conftest import QuietHandler, ThreadedServer, write_fake_launcher
from tests.conftest import ROOT

WARM_DIVERGE, SHARED_DIVERGE = 10, 3
TOK0_SHIFT, LP_SHIFT, DIV_GAP = 0.25, 0.05, 0.5


# ----------------------------------------------------------------------------- helpers
def run(tokens, lps, top=None):
    """A run as radix sees it; top defaults to [own token] per position."""
    if top is None:
        top = [[[lp, t, None]] for t, lp in zip(tokens, lps)]
    return {"tokens": list(tokens), "token_lps": list(lps), "top": top}


# ----------------------------------------------------------------------------- pure metrics
def test_lcp_and_logprob_lookup():
    assert rc.lcp_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert rc.lcp_len([1, 2], [1, 2, 3]) == 2
    assert rc.lcp_len([], [1]) == 0 and rc.lcp_len([7], [8]) == 0
    g = run([5, 6], [-0.1, -0.2], top=[[[-0.1, 5, None], [-2.0, 9, None]], [[-0.2, 6, None]]])
    assert rc.logprob_of(g, 0, 5) == -0.1  # own token
    assert rc.logprob_of(g, 0, 9) == -2.0  # from the top-K row
    assert rc.logprob_of(g, 1, 9) is None  # not listed
    assert rc.logprob_of(g, 5, 5) is None  # past the end


def test_same_context_dlogps_and_lockstep():
    a = run([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4])
    # identical tokens: every position, |delta| of each
    b = run([1, 2, 3, 4], [-0.1, -0.25, -0.3, -0.1])
    assert rc.same_context_dlogps(a, b) == pytest.approx([0.0, 0.05, 0.0, 0.3])
    # diverges at 2; a's token 3 is in b's top-K at position 2 -> positions 0..2 count
    c = run(
        [1, 2, 8, 9],
        [-0.1, -0.2, -0.05, -0.1],
        top=[
            [[-0.1, 1, None]],
            [[-0.2, 2, None]],
            [[-0.05, 8, None], [-1.3, 3, None]],
            [[-0.1, 9, None]],
        ],
    )
    assert rc.same_context_dlogps(a, c) == pytest.approx([0.0, 0.0, 1.0])
    # diverges at 0 and a's token is not in c's top-K: one position, missing
    d = run([7, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4])
    assert rc.same_context_dlogps(a, d) == [None]
    assert rc.lockstep_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75
    assert rc.lockstep_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 3, 4], [5, 6, 7, 8]]) == 6 / 8
    assert rc.lockstep_agreement([], []) is None


def test_compare_runs_known_answers():
    cold = [
        run([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4]),
        run([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4]),
        run([5, 6, 7, 8], [-0.5, -0.6, -0.7, -0.8]),
    ]
    other = [
        run([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4]),  # identical
        run(
            [1, 2, 9, 9],
            [-0.3, -0.2, -0.1, -0.1],  # diverges at 2
            top=[
                [[-0.3, 1, None]],
                [[-0.2, 2, None]],
                [[-0.1, 9, None], [-0.9, 3, None]],
                [[-0.1, 9, None]],
            ],
        ),
        run([6, 6, 7, 8], [-0.5, -0.6, -0.7, -0.8]),
    ]  # diverges at 0, missing
    m = rc.compare_runs(cold, other)
    assert m["prompts"] == 3 and m["identical"] == 1 and m["identical_frac"] == pytest.approx(1 / 3)
    fd = m["first_divergence"]
    assert fd["per_prompt"] == [None, 2, 0] and fd["diverged"] == 2
    assert fd["mean"] == 1.0 and fd["median"] == 1.0 and fd["min"] == 0 and fd["max"] == 2
    assert m["lockstep_agreement"] == pytest.approx((4 + 2 + 3) / 12)
    assert m["first_token_same"] == pytest.approx(2 / 3)
    assert m["first_token_dlogp_max"] == pytest.approx(0.2)
    assert m["first_token_dlogp_mean"] == pytest.approx(0.1)  # (0 + 0.2) / 2
    assert m["first_token_dlogp_missing"] == 1
    # same context: prompt 0 four zeros, prompt 1 [0.2, 0, 0.6], prompt 2 [None]
    assert m["same_context_positions"] == 7 and m["same_context_missing"] == 1
    assert m["same_context_dlogp_max"] == pytest.approx(0.6)
    assert m["same_context_dlogp_mean"] == pytest.approx(0.8 / 7)
    # all identical: no divergence statistics
    m2 = rc.compare_runs(cold[:1], other[:1])
    assert m2["identical_frac"] == 1.0 and m2["first_divergence"]["mean"] is None
    assert m2["first_token_dlogp_max"] == 0.0 and m2["lockstep_agreement"] == 1.0
    # a shorter run is not identical even if it is a prefix
    m3 = rc.compare_runs([run([1, 2], [-1, -1])], [run([1], [-1])])
    assert m3["identical"] == 0 and m3["lockstep_agreement"] == 0.5
    with pytest.raises(ValueError):
        rc.compare_runs(cold, other[:2])


def test_cached_and_config_summary():
    recs = [
        {
            "prompt_len": 101,
            "primer_common_prefix": 90,
            "cached": {"cold": 0, "warm": 100, "primer": 0, "shared": 90},
            "runs": {
                "cold": run([1, 2], [-1, -1]),
                "warm": run([1, 2], [-1, -1]),
                "shared": run([1, 3], [-1, -1]),
            },
        },
        {
            "prompt_len": 51,
            "primer_common_prefix": 60,
            "cached": {"cold": 4, "warm": 48, "primer": 0, "shared": 48},
            "runs": {
                "cold": run([5, 6], [-1, -1]),
                "warm": run([5, 6], [-1, -1]),
                "shared": run([5, 6], [-1, -1]),
            },
        },
    ]
    assert rc.expected_cached(recs[0]) == {"cold": 0, "warm": 100, "primer": 0, "shared": 90}
    assert rc.expected_cached(recs[1])["shared"] == 50  # capped at prompt_len - 1
    cs = rc.cached_summary(recs)
    assert cs["mean"] == {"cold": 2.0, "warm": 74.0, "primer": 0.0, "shared": 69.0}
    assert cs["expected_mean"] == {"cold": 0.0, "warm": 75.0, "primer": 0.0, "shared": 70.0}
    assert cs["hit_frac"]["warm"] == pytest.approx((1.0 + 48 / 50) / 2)
    assert cs["hit_frac"]["shared"] == pytest.approx((1.0 + 48 / 50) / 2)
    assert cs["cold_nonzero"] == 1
    s = rc.config_summary(
        recs + [{"prompt_len": 9, "cached": {}, "runs": {}}]
    )  # unfinished: ignored
    assert s["prompts"] == 2
    assert s["warm"]["identical"] == 2 and s["shared"]["identical"] == 1
    assert s["shared"]["first_divergence"]["per_prompt"] == [1, None]
    # one prompt only: no primer, no shared variant
    solo = rc.config_summary(
        [
            {
                "prompt_len": 5,
                "cached": {"cold": 0, "warm": 4},
                "runs": {"cold": run([1], [-1]), "warm": run([1], [-1])},
            }
        ]
    )
    assert "shared" not in solo and solo["cached_tokens"]["hit_frac"] == {"warm": 1.0}


def test_budget_arithmetic():
    assert rc.prompts_that_fit(100, None, 60, 2.0, 16) == 16
    assert rc.prompts_that_fit(100, 0, 60, 2.0, 16) == 16
    assert rc.prompts_that_fit(100, 200, 60, 2.0, 16, stop_s=20) == 10  # 20 s left -> 10
    assert rc.prompts_that_fit(100, 400, 60, 2.0, 16, stop_s=20) == 16  # capped
    assert rc.prompts_that_fit(150, 200, 60, 2.0, 16, stop_s=20) == 0  # no room at all
    assert rc.guess_prompt_s(128) == pytest.approx(3 * 128 * 0.006 + 0.5)


# ----------------------------------------------------------------------------- prompts
class WordTok:
    """Whitespace tokenizer; no chat template (so radix falls back to ChatML)."""

    chat_template = None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return SimpleNamespace(
            input_ids=[self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]
        )


def test_build_radix_prompts_shared_prefix():
    tok = WordTok()
    pr = rc.build_radix_prompts(tok, 25, prefix_tokens=300)
    ids = pr["input_ids"]
    assert len(ids) == 25 and len({tuple(p) for p in ids}) == 25  # distinct
    assert pr["system_tokens"] >= 300
    assert pr["common_prefix_len"] >= pr["system_tokens"]
    assert all(p[: pr["common_prefix_len"]] == ids[0][: pr["common_prefix_len"]] for p in ids)
    assert pr["questions"][0].startswith("Question 1: ") and pr["questions"][21].startswith(
        "Question 22: "
    )
    assert pr["questions"][20][len("Question 21: ") :] == pr["questions"][0][len("Question 1: ") :]
    assert (
        rc.build_radix_prompts(WordTok(), 25, prefix_tokens=300)["input_ids"] == ids
    )  # deterministic
    longer = rc.build_radix_prompts(WordTok(), 2, prefix_tokens=1200)
    assert longer["system_tokens"] >= 1200 and longer["common_prefix_len"] >= 1200


def test_render_chat_template_fallbacks():
    class Tmpl:
        chat_template = "x"

        def __init__(self, system_ok):
            self.system_ok = system_ok

        def apply_chat_template(self, msgs, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            if msgs[0]["role"] == "system" and not self.system_ok:
                raise ValueError("System role not supported")
            return "|".join(f"{m['role']}:{m['content']}" for m in msgs)

    assert rc.render_chat(Tmpl(True), "S", "Q") == "system:S|user:Q"
    assert rc.render_chat(Tmpl(False), "S", "Q") == "user:S\n\nQ"
    assert rc.render_chat(WordTok(), "S", "Q") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


# ----------------------------------------------------------------------------- fake server
class FakeState:
    def __init__(self, quant: bool = False, packed_prefill: bool = False, delay_s: float = 0.0):
        self.quant, self.packed_prefill, self.delay_s = quant, packed_prefill, delay_s
        self.tree: list[list[int]] = []
        self.flushes = 0
        self.busy_flushes = 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def cached_len(self, ids):
        best = max((rc.lcp_len(s, ids) for s in self.tree), default=0)
        return min(best, len(ids) - 1)

    def generate(self, body):
        ids = body["input_ids"]
        sp = body["sampling_params"]
        n = sp["max_new_tokens"]
        assert sp["temperature"] == 0.0 and sp["ignore_eos"] is True
        time.sleep(self.delay_s)
        with self.lock:
            cached = self.cached_len(ids)
            self.requests.append({"len": len(ids), "cached": cached, "n": n})
            seed = sum(ids) % 97
            toks = [100 + (seed * 7 + 13 * t) % 50 for t in range(n)]
            lps = [-0.5 - 0.01 * t for t in range(n)]
            cold_toks, cold_lps = list(toks), list(lps)
            div = None
            if self.quant and not self.packed_prefill and cached > 0:
                div = WARM_DIVERGE if cached == len(ids) - 1 else SHARED_DIVERGE
                lps = [lp + (TOK0_SHIFT if t == 0 else LP_SHIFT) for t, lp in enumerate(lps)]
                toks = [x + 1000 if t >= div else x for t, x in enumerate(toks)]
            self.tree.append(list(ids) + toks[:-1])
        out = {
            "output_ids": toks,
            "meta_info": {
                "id": f"r{len(self.requests)}",
                "prompt_tokens": len(ids),
                "completion_tokens": n,
                "cached_tokens": cached,
                "finish_reason": {"type": "length", "length": n},
            },
        }
        if body.get("return_logprob"):
            k = body["top_logprobs_num"]
            top = []
            for t in range(n):
                row = [[lps[t], toks[t], None]]
                if toks[t] != cold_toks[t]:  # the cold token, still listed after the divergence
                    row.append([cold_lps[t] - DIV_GAP, cold_toks[t], None])
                row += [[lps[t] - 3.0 - j, 90 - j, None] for j in range(k - len(row))]
                top.append(row)
            out["meta_info"]["output_token_logprobs"] = [[lp, x, None] for lp, x in zip(lps, toks)]
            out["meta_info"]["output_top_logprobs"] = top
        return out


def make_handler(state: FakeState):
    class Handler(QuietHandler):
        def do_GET(self):
            if self.path == "/health":
                self._send(200, b"")
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.startswith("/flush_cache"):
                assert self.path == "/flush_cache?timeout=30", self.path
                with state.lock:
                    if state.busy_flushes > 0:  # "not idle": SGLang answers HTTP 400
                        state.busy_flushes -= 1
                        self._send(400, b"Timed out waiting for idle state.", "text/plain")
                        return
                    state.tree.clear()
                    state.flushes += 1
                self._send(
                    200,
                    b"Cache flushed.\nPlease check backend logs for more details.\n",
                    "text/plain",
                )
            elif self.path == "/generate":
                self._send(200, json.dumps(state.generate(body)).encode())
            else:
                self._send(404, b"not found", "text/plain")

    return Handler


def running_fake(state: FakeState, port: int = 0) -> ThreadedServer:
    """with running_fake(state) as base_url: ..."""
    return ThreadedServer(ThreadingHTTPServer(("127.0.0.1", port), make_handler(state)))


def fake_server_cli():
    """Entry of the fake ``sglang.launch_server`` module used by the end-to-end test."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--kv-quant", default="none")
    ap.add_argument("--kv-quant-bits", default="k4v4")
    ap.add_argument("--kv-quant-packed-prefill", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--skip-tokenizer-init", action="store_true")
    args, _ = ap.parse_known_args()
    assert args.host == "127.0.0.1" and args.skip_tokenizer_init
    quant = args.kv_quant == "turboquant" or args.kv_cache_dtype != "auto"
    print(f"fake server: quant={quant} packed_prefill={args.kv_quant_packed_prefill}", flush=True)
    state = FakeState(
        quant=quant,
        packed_prefill=args.kv_quant_packed_prefill,
        delay_s=float(os.environ.get("FAKE_RADIX_DELAY_S", "0")),
    )
    ThreadingHTTPServer((args.host, args.port), make_handler(state)).serve_forever()


# ----------------------------------------------------------------------------- request flow
def _prompts():
    shared = list(range(1000, 1200))
    return [shared + [5, i, 6, 7 + i] for i in range(4)]


@pytest.mark.parametrize("quant,pp", [(False, False), (True, False), (True, True)])
def test_run_prompts_against_fake_server(quant, pp):
    state = FakeState(quant=quant, packed_prefill=pp)
    prompts = _prompts()
    lines = []
    with running_fake(state) as url:
        recs, partial = rc.run_prompts(url, prompts, 16, 5, log=lines.append, tag="[t]")
    assert not partial and len(recs) == 4 and len(lines) == 4
    assert state.flushes == 8 and len(state.requests) == 16
    for i, r in enumerate(recs):
        assert r["prompt_len"] == 204 and r["primer"] == (i + 1) % 4
        assert r["primer_common_prefix"] == 201
        assert r["cached"] == {"cold": 0, "warm": 203, "primer": 0, "shared": 201}
    s = rc.config_summary(recs)
    assert s["cached_tokens"]["hit_frac"] == {"warm": 1.0, "shared": 1.0}
    assert s["cached_tokens"]["cold_nonzero"] == 0
    w, sh = s["warm"], s["shared"]
    if quant and not pp:
        assert w["identical"] == 0 and w["first_divergence"]["median"] == WARM_DIVERGE
        assert sh["identical"] == 0 and sh["first_divergence"]["mean"] == SHARED_DIVERGE
        assert w["lockstep_agreement"] == pytest.approx(WARM_DIVERGE / 16)
        assert sh["lockstep_agreement"] == pytest.approx(SHARED_DIVERGE / 16)
        assert w["first_token_dlogp_max"] == pytest.approx(TOK0_SHIFT)
        assert w["same_context_dlogp_max"] == pytest.approx(DIV_GAP)
        assert w["same_context_positions"] == 4 * (WARM_DIVERGE + 1)
        assert w["same_context_dlogp_mean"] == pytest.approx(
            (TOK0_SHIFT + (WARM_DIVERGE - 1) * LP_SHIFT + DIV_GAP) / (WARM_DIVERGE + 1)
        )
        assert "warm diverges at 10, shared diverges at 3" in lines[0]
    else:
        for m in (w, sh):
            assert m["identical_frac"] == 1.0 and m["lockstep_agreement"] == 1.0
            assert m["first_token_dlogp_max"] == 0.0 and m["first_divergence"]["mean"] is None
        assert (
            "warm identical, shared identical; cached cold 0 warm 203 primer 0 shared 201"
            in lines[0]
        )
    j = rc.record_json(recs[0])
    assert set(j["tokens"]) == {"cold", "warm", "shared"} and "runs" not in j
    assert j["first_divergence"] == (
        {"warm": 10, "shared": 3} if quant and not pp else {"warm": None, "shared": None}
    )
    json.dumps(j)


def test_run_prompts_deadline_and_single_prompt():
    state = FakeState()
    with running_fake(state) as url:
        recs, partial = rc.run_prompts(url, _prompts(), 4, 3, deadline=0.0, log=lambda s: None)
        assert (
            partial and len(recs) == 1
        )  # the first prompt always runs, then the deadline stops it
        recs, partial = rc.run_prompts(url, _prompts()[:1], 4, 3, log=lambda s: None)
    assert not partial and set(recs[0]["runs"]) == {"cold", "warm"} and "primer" not in recs[0]


def test_flush_retries_and_failures(monkeypatch):
    state = FakeState()
    with running_fake(state) as url:
        state.busy_flushes = 2
        server.flush(url)  # two HTTP 400s, then flushed
        assert state.flushes == 1 and state.busy_flushes == 0
        state.busy_flushes = 3
        with pytest.raises(RuntimeError, match="HTTP 400"):
            server.flush(url)  # gives up after 3 attempts
        assert state.flushes == 1
    monkeypatch.setattr(server, "post_json", lambda url, payload, timeout: {"not": "text"})
    with pytest.raises(RuntimeError, match="answered"):
        server.flush("http://x")

    def http_500(url, payload, timeout):
        raise RuntimeError("HTTP 500")

    monkeypatch.setattr(server, "post_json", http_500)
    with pytest.raises(RuntimeError, match="HTTP 500"):
        server.flush("http://x")


# ----------------------------------------------------------------------------- end to end
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_model_dir(path: Path) -> Path:
    """A folder with a tiny word-level HF tokenizer (ChatML template) covering the prompts."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    pre = tokenizers.pre_tokenizers.Whitespace()
    text = (
        rc.handbook_text(lambda s: len(s.split()), 3000)
        + " "
        + " ".join(rc.question_text(i) for i in range(40))
        + " "
        + rc.render_chat(WordTok(), "a", "b")
    )
    words = {w for w, _ in pre.pre_tokenize_str(text)} | {str(i) for i in range(300)}
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    fast.chat_template = CHATML
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


def test_main_end_to_end_with_fake_launcher(tmp_path, monkeypatch, capsys):
    model = make_model_dir(tmp_path / "model")
    write_fake_launcher(tmp_path / "fake_radix_sglang.py", "test_radix_check")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))
    )
    monkeypatch.setattr(
        rc,
        "get_provenance",
        lambda: {
            "gpu": "FakeGPU",
            "commit": "abc123",
            "versions": {"sglang": "0.5.17"},
            "date": "2026-01-01T00:00:00+00:00",
        },
    )
    out = tmp_path / "res" / "radix.json"
    logs = tmp_path / "logs"
    rcode = rc.main(
        [
            "--model-path",
            str(model),
            "--configs",
            "bf16,k4v4,k4v4-pp",
            "--num-prompts",
            "3",
            "--prefix-tokens",
            "200",
            "--max-new-tokens",
            "16",
            "--server-module",
            "fake_radix_sglang",
            "--log-dir",
            str(logs),
            "--out",
            str(out),
            "--startup-timeout",
            "60",
        ]
    )
    text = capsys.readouterr().out
    assert rcode == 0, text
    doc = json.loads(out.read_text())
    assert (
        doc["gpu"] == "FakeGPU"
        and doc["commit"] == "abc123"
        and doc["versions"] == {"sglang": "0.5.17"}
    )
    assert doc["tool"] == "sglang_tq.bench radix" and doc["settings"]["max_new_tokens"] == 16
    p = doc["prompts"]
    assert len(p["lens"]) == 3 and p["system_tokens"] >= 200 and p["common_prefix_len"] >= 200
    assert list(doc["configs"]) == ["bf16", "k4v4", "k4v4-pp"]
    for name, c in doc["configs"].items():
        assert c["status"] == "ok" and c["partial"] is False, name
        assert (
            "--skip-tokenizer-init" in c["server"]["cmd"]
            and "fake_radix_sglang" in c["server"]["cmd"]
        )
        assert (logs / f"radix_server_{name}.log").exists()
        s = c["summary"]
        assert s["prompts"] == 3 and s["cached_tokens"]["cold_nonzero"] == 0
        assert s["cached_tokens"]["hit_frac"]["warm"] == 1.0
        assert s["cached_tokens"]["mean"]["warm"] == pytest.approx(sum(p["lens"]) / 3 - 1)
        assert len(c["per_prompt"]) == 3 and len(c["per_prompt"][0]["tokens"]["cold"]) == 16
    assert doc["configs"]["k4v4"]["flags"] == [
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "k4v4",
    ]
    assert doc["configs"]["k4v4-pp"]["flags"][-1] == "--kv-quant-packed-prefill"
    assert doc["configs"]["bf16"]["summary"]["warm"]["identical_frac"] == 1.0
    assert doc["configs"]["k4v4-pp"]["summary"]["shared"]["identical_frac"] == 1.0
    k = doc["configs"]["k4v4"]["summary"]
    assert (
        k["warm"]["identical_frac"] == 0.0
        and k["warm"]["first_divergence"]["median"] == WARM_DIVERGE
    )
    assert k["shared"]["first_divergence"]["median"] == SHARED_DIVERGE
    assert "bf16" in text and "k4v4-pp" in text and "identical" in text and "wrote" in text


def test_main_budget_skip_and_server_failure(tmp_path, monkeypatch, capsys):
    model = make_model_dir(tmp_path / "model")
    (tmp_path / "broken_sglang.py").write_text(
        "import sys\nprint('ValueError: --kv-quant turboquant refuses this', flush=True)\nsys.exit(3)\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))
    )
    monkeypatch.setattr(rc, "get_provenance", lambda: {"gpu": "FakeGPU", "commit": "abc"})
    out = tmp_path / "radix.json"
    common = [
        "--model-path",
        str(model),
        "--num-prompts",
        "2",
        "--prefix-tokens",
        "50",
        "--max-new-tokens",
        "8",
        "--server-module",
        "broken_sglang",
        "--out",
        str(out),
    ]
    assert rc.main([*common, "--configs", "k3v3"]) == 1
    c = json.loads(out.read_text())["configs"]["k3v3"]
    assert c["status"] == "failed" and "refuses this" in c["error"]
    # a budget that leaves no room for the start-up skips every config, without starting one
    assert (
        rc.main([*common, "--configs", "bf16,fp8", "--budget-s", "30", "--est-startup-s", "60"])
        == 0
    )
    doc = json.loads(out.read_text())
    assert [c["status"] for c in doc["configs"].values()] == ["skipped_budget", "skipped_budget"]
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rc.main([*common, "--configs", "int8"])


def test_sigterm_stops_server_and_keeps_json(tmp_path):
    model = make_model_dir(tmp_path / "model")
    write_fake_launcher(tmp_path / "fake_radix_sglang.py", "test_radix_check")
    runner = tmp_path / "run_radix.py"  # radix.main without the provenance child
    runner.write_text(
        "import sys\nimport sglang_tq.bench.radix as rc\n"
        "rc.get_provenance = lambda: {'gpu': 'FakeGPU', 'commit': 'abc'}\nsys.exit(rc.main())\n"
    )
    out = tmp_path / "radix.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(tmp_path), str(ROOT))),
        "FAKE_RADIX_DELAY_S": "0.05",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            str(runner),
            "--model-path",
            str(model),
            "--configs",
            "bf16,k4v4",
            "--num-prompts",
            "40",
            "--prefix-tokens",
            "50",
            "--max-new-tokens",
            "4",
            "--server-module",
            "fake_radix_sglang",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "prompt 2/40" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, text
    port = re.search(r"--port (\d+)", text).group(1)
    health = server.http(f"http://127.0.0.1:{port}/health", timeout=5)[0]
    assert health != 200, "server still running after SIGTERM"
    doc = json.loads(out.read_text())
    assert doc["configs"]["bf16"]["status"] == "interrupted" and "k4v4" not in doc["configs"]
    assert doc["gpu"] == "FakeGPU" and "total_s" in doc


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fake_server_cli()
