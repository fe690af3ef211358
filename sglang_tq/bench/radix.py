"""Radix cache warm vs cold: does serving a prompt from a radix-cache hit change its greedy output?

    python -m sglang_tq.bench radix --model-path /tmp/models/smollm2-bf16 \\
        --configs bf16,k4v4,k4v4-pp --budget-s 270 --out radix_smollm2.json

On the GPU host (model pieces staged as for ``fidelity``), in the call that
carries the SGLang bundle:

    export PYTHONUNBUFFERED=1 SGLANG_TQ_COMMIT=<commit>; source dev/gpu_host/gpu_host_setup.sh \\
      && M=$(bash dev/gpu_host/unpack_model.sh smollm2) \\
      && timeout -s TERM 330 python3 -m sglang_tq.bench radix --model-path "$M" \\
           --configs bf16,k4v4,k4v4-pp --budget-s 270 --log-dir $OUT/logs \\
           --out $OUT/radix_smollm2.json

Why
---
With ``--kv-quant turboquant`` the KV cache is stored packed (2-4 bits). A cold prefill
attends to the tokens of its own new chunk in bf16 (the exact values it just computed)
and only then writes them packed; a warm request (radix hit) instead reads its whole
prefix back from the packed cache, i.e. quantized. So the first generated token, and
through it the greedy text, can differ between cold and warm unless the server runs with
``--kv-quant-packed-prefill`` (prefill attends to the new chunk from the packed cache
too, so cold and warm see identical values). bf16 is the control: cold and warm should
agree ~100%, up to kernel nondeterminism between the two batch shapes (a prefill of the
whole prompt vs an extend of one token over a cached prefix: the same sums in a
different order). fp8 (``--kv-cache-dtype fp8_e4m3``) has the same asymmetry as kKvV
without -pp (the extend kernel attends to the new chunk's own bf16 K/V and to the prefix
from the fp8 cache) and can be run for comparison.

Expected run time on an H200 with SmolLM2-135M: ~50 s server start-up plus ~16 x 3 x 128
greedy tokens at batch 1 per config, about 4 minutes for the three default configs.

What it does
------------
For each config in --configs (bf16, fp8, kKvV, kKvV-pp as in ``fidelity``, or
names defined with --config) one fresh SGLang server is started (--common-server-args,
``--skip-tokenizer-init``: token ids in and out). Then, one prompt at a time (batch 1,
so the decode shapes are the same for every request; /flush_cache carries ``?timeout=30``
so that SGLang defers the flush until its scheduler is idle, and a 400 is retried):

  cold    POST /flush_cache, then the prompt             -> cached_tokens must be 0
  warm    the same request again                         -> cached_tokens ~ prompt_len - 1
  shared  POST /flush_cache, one OTHER prompt (the primer, 1 output token, only to fill
          the radix tree with the common prefix), then the prompt -> cached_tokens ~ the
          common prefix; the prompt's own question is new and is prefilled.

Every measured request is greedy (temperature 0), --max-new-tokens (128) with
``ignore_eos``, ``return_logprob`` with ``top_logprobs_num`` --top-k (5) and
``logprob_start_len -1`` (output logprobs only; the match may then cover prompt_len - 1
tokens). ``meta_info.cached_tokens`` of every request is recorded as the proof of the
hit (or of its absence for cold).

Prompts
-------
A long shared prefix and a distinct question per prompt, through the model's chat
template: the system message is a deterministic "handbook" (numbered sections made of
the PROMPTS of ``sglang_tq.bench.prompts``, each with a fixed note, repeated until the system text
has at least --prefix-tokens (1024) tokens); the user message is "Question i: <one of
the PROMPTS>" (cycled, numbered, so any --num-prompts gives distinct prompts).
The whole text is tokenized at once, and the common token prefix of all prompts is
measured and reported (``prompts.common_prefix_len``), so a tokenizer merge at the
boundary cannot fake a longer shared part. A template without a system role gets the
handbook at the start of the user message; a tokenizer without a template gets ChatML.

Metrics (per config; "warm" = cold vs warm, "shared" = cold vs shared-prefix hit)
-------------------------------------------------------------------------------------
* identical_frac: prompts whose greedy outputs are identical;
* first_divergence mean / median / min / max over the diverged prompts (None if none);
* lockstep_agreement: tokens equal at the same position, over all positions (after a
  divergence the contexts differ, so this mixes the effect and its consequences);
* first_token_dlogp max / mean: |logprob of the cold run's first token, cold vs the
  other run| (the other's own token or its top-K entry; ``missing`` counts neither);
* same_context_dlogp max / mean: the same over every position up to and including the
  first divergence (the contexts are identical there, so this is the pure effect of
  reading the prefix from the cache);
* cached_tokens mean per kind (cold, warm, primer, shared), the expected values
  (0, prompt_len - 1, 0, min(common prefix with the primer, prompt_len - 1)) and the
  hit fraction cached / expected.

Output: a table, and --out JSON with top-level provenance (gpu, commit, versions; taken
in a child process so that no CUDA context lives here while servers size their pools)
and one object per config (flags, server start-up, summary, per-prompt tokens and
cached_tokens). The JSON is rewritten after every config, so a run cut off keeps the
finished configs. --budget-s (seconds for the whole run) skips a config unless
--min-prompts (4) of its prompts would fit after its server start-up (both measured on
the configs already run; before that --est-startup-s and 6 ms per generated token), and
stops a running config's prompt loop early (``partial: true``) 20 s before the budget
ends, leaving time to stop the server.
SIGTERM (``timeout``) stops the server and writes what is done. --out defaults to a file
in benchmarks/results/radix_check/ named by gpu and commit; server logs go to --log-dir
(default: the folder of an --out given, else /tmp/radix_check).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sglang_tq.bench.cli import add_model_path, add_out, default_out, doc_parser
from sglang_tq.bench.fidelity_metrics import first_divergence, print_rows
from sglang_tq.bench.generation import (
    add_server_options,
    config_flags,
    exit_on_sigterm,
    parse_config_specs,
    parse_generation,
    post_generate,
    split_flags,
    started,
)
from sglang_tq.bench.prompts import PROMPTS
from sglang_tq.bench.results import get_provenance, json_safe, write_json_atomic
from sglang_tq.bench.server import SGLangServer, flush

TOOL = "sglang_tq.bench radix"
RESULTS_DIR = "radix_check"  # benchmarks/results/radix_check/, the folder of earlier results

DEFAULT_CONFIGS = "bf16,k4v4,k4v4-pp"
KINDS = ("cold", "warm", "primer", "shared")
SECTION_NOTE = (
    "A good answer states its assumptions, works through each step in order, "
    "and checks the result against the question before concluding."
)


# ----------------------------------------------------------------------------- pure metrics
def lcp_len(a, b) -> int:
    """Length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def logprob_of(gen: dict, pos: int, token: int) -> float | None:
    """Logprob that run `gen` gave `token` at position `pos`: its own token's logprob if it
    generated that token, else the token's entry in its top-K row; None if absent."""
    if pos < len(gen["tokens"]) and int(gen["tokens"][pos]) == int(token):
        return float(gen["token_lps"][pos])
    top = gen.get("top") or []
    for e in (top[pos] if pos < len(top) else None) or ():
        if e is not None and e[0] is not None and int(e[1]) == int(token):
            return float(e[0])
    return None


def same_context_dlogps(ref: dict, other: dict) -> list[float | None]:
    """|ref logprob - other's logprob of ref's token| at every position where both runs
    had the same context: up to and including the first divergence (all if identical).
    None where `other` has no logprob for ref's token (not in its top-K)."""
    fd = first_divergence(ref["tokens"], other["tokens"])
    end = min(len(ref["tokens"]), len(other["tokens"])) if fd is None else fd + 1
    out = []
    for t in range(end):
        b = logprob_of(other, t, ref["tokens"][t])
        out.append(None if b is None else abs(float(ref["token_lps"][t]) - b))
    return out


def lockstep_agreement(refs: list, others: list) -> float | None:
    """Fraction of positions (over all pairs) where the two sequences hold the same token;
    a position present in only one of them counts as a disagreement."""
    same = total = 0
    for a, b in zip(refs, others):
        total += max(len(a), len(b))
        same += sum(1 for x, y in zip(a, b) if x == y)
    return same / total if total else None


def _stats(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "median": float(statistics.median(xs)),
        "min": min(xs),
        "max": max(xs),
    }


def compare_runs(refs: list[dict], others: list[dict]) -> dict:
    """Cold runs `refs` against the same prompts' `others` (warm or shared-prefix hits).

    Each run: {"tokens": [...], "token_lps": [...], "top": [[[lp, id, _], ...], ...]}.
    """
    if len(refs) != len(others):
        raise ValueError(f"{len(refs)} reference runs but {len(others)} others")
    n = len(refs)
    firsts = [first_divergence(a["tokens"], b["tokens"]) for a, b in zip(refs, others)]
    identical = sum(
        1
        for a, b, f in zip(refs, others, firsts)
        if f is None and len(a["tokens"]) == len(b["tokens"])
    )
    tok0 = [
        same_context_dlogps(a, b)[0] if a["tokens"] and b["tokens"] else None
        for a, b in zip(refs, others)
    ]
    ctx = [x for a, b in zip(refs, others) for x in same_context_dlogps(a, b)]
    t0 = _stats(tok0)
    cs = _stats(ctx)
    fd = _stats(firsts)
    return {
        "prompts": n,
        "identical": identical,
        "identical_frac": identical / n if n else None,
        "first_divergence": {
            "diverged": fd["n"],
            "mean": fd["mean"],
            "median": fd["median"],
            "min": fd["min"],
            "max": fd["max"],
            "per_prompt": firsts,
        },
        "lockstep_agreement": lockstep_agreement(
            [a["tokens"] for a in refs], [b["tokens"] for b in others]
        ),
        "first_token_same": (
            sum(1 for a, b in zip(refs, others) if a["tokens"][:1] == b["tokens"][:1]) / n
        )
        if n
        else None,
        "first_token_dlogp_max": t0["max"],
        "first_token_dlogp_mean": t0["mean"],
        "first_token_dlogp_missing": sum(1 for x in tok0 if x is None),
        "same_context_dlogp_max": cs["max"],
        "same_context_dlogp_mean": cs["mean"],
        "same_context_positions": cs["n"],
        "same_context_missing": sum(1 for x in ctx if x is None),
    }


def expected_cached(rec: dict) -> dict:
    """What cached_tokens should be for each request kind of one prompt record."""
    exp = {"cold": 0, "warm": max(rec["prompt_len"] - 1, 0), "primer": 0}
    if rec.get("primer_common_prefix") is not None:
        exp["shared"] = min(rec["primer_common_prefix"], max(rec["prompt_len"] - 1, 0))
    return exp


def cached_summary(records: list[dict]) -> dict:
    """Mean cached_tokens per request kind, the expected means, and hit fractions
    (cached / expected; a paged radix cache rounds hits down to whole pages)."""
    out = {"mean": {}, "expected_mean": {}, "hit_frac": {}, "cold_nonzero": 0}
    for kind in KINDS:
        got, exp, frac = [], [], []
        for r in records:
            c = r.get("cached", {}).get(kind)
            e = expected_cached(r).get(kind)
            if c is None or e is None:
                continue
            got.append(c)
            exp.append(e)
            if kind in ("warm", "shared") and e > 0:
                frac.append(c / e)
        if got:
            out["mean"][kind] = statistics.fmean(got)
            out["expected_mean"][kind] = statistics.fmean(exp)
        if frac:
            out["hit_frac"][kind] = statistics.fmean(frac)
    out["cold_nonzero"] = sum(1 for r in records if r.get("cached", {}).get("cold", 0) != 0)
    return out


def config_summary(records: list[dict]) -> dict:
    """All metrics of one config from its per-prompt records
    ({"prompt_len", "primer_common_prefix", "cached": {...}, "runs": {"cold", "warm", "shared"}})."""
    done = [r for r in records if "cold" in r.get("runs", {})]
    out = {"prompts": len(done)}
    for kind in ("warm", "shared"):
        pairs = [(r["runs"]["cold"], r["runs"][kind]) for r in done if kind in r["runs"]]
        if pairs:
            out[kind] = compare_runs([a for a, _ in pairs], [b for _, b in pairs])
    out["cached_tokens"] = cached_summary(done)
    return out


def guess_prompt_s(max_new_tokens: int, s_per_token: float = 0.006) -> float:
    """Seconds per prompt before one was measured: 3 full requests + flushes and primer."""
    return 3 * max_new_tokens * s_per_token + 0.5


def prompts_that_fit(
    elapsed_s: float,
    budget_s: float | None,
    startup_s: float,
    per_prompt_s: float,
    num_prompts: int,
    stop_s: float = 20,
) -> int:
    """How many prompts one more config can run within the budget: what is left after
    the elapsed time, the server start-up and `stop_s` (stopping the server, writing the
    JSON), divided by the time per prompt. No budget (None or <= 0): all of them."""
    if not budget_s or budget_s <= 0:
        return num_prompts
    room = budget_s - stop_s - elapsed_s - startup_s
    if room <= 0 or per_prompt_s <= 0:
        return 0 if room <= 0 else num_prompts
    return max(0, min(num_prompts, int(room // per_prompt_s)))


# ----------------------------------------------------------------------------- prompts
def handbook_text(count_tokens, min_tokens: int) -> str:
    """Deterministic system text of at least `min_tokens` tokens (count_tokens(text) -> int)."""
    parts = [
        "You are a careful assistant. The handbook below describes the kinds of tasks "
        "you will be asked about; read it, then answer the user's question."
    ]
    k = 0
    while True:
        for _ in range(4):  # tokenize every few sections, not after each
            parts.append(f"Section {k + 1}. {PROMPTS[k % len(PROMPTS)]} {SECTION_NOTE}")
            k += 1
        text = "\n\n".join(parts)
        if count_tokens(text) >= min_tokens:
            return text


def question_text(i: int) -> str:
    return f"Question {i + 1}: {PROMPTS[i % len(PROMPTS)]}"


def render_chat(tok, system: str, user: str) -> str:
    if getattr(tok, "chat_template", None):
        try:
            return tok.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception:
            return tok.apply_chat_template(
                [{"role": "user", "content": system + "\n\n" + user}],
                add_generation_prompt=True,
                tokenize=False,
            )
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def build_radix_prompts(tok, n: int, prefix_tokens: int) -> dict:
    """n chat prompts (token ids) sharing a >= prefix_tokens system text; see the docstring."""

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    system = handbook_text(count, prefix_tokens)
    questions = [question_text(i) for i in range(n)]
    ids = [
        list(tok(render_chat(tok, system, q), add_special_tokens=False).input_ids)
        for q in questions
    ]
    common = min((lcp_len(ids[0], p) for p in ids[1:]), default=len(ids[0]) if ids else 0)
    return {
        "input_ids": ids,
        "questions": questions,
        "system_tokens": count(system),
        "common_prefix_len": common,
    }


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


# ----------------------------------------------------------------------------- server side
def request(base_url: str, ids: list[int], max_new_tokens: int, top_k: int) -> tuple[dict, int]:
    """One greedy /generate (ignore_eos, output logprobs + top-K) -> (run, cached_tokens)."""
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    (reply,) = post_generate(base_url, list(ids), sampling, top_k=top_k, timeout=600)
    run = parse_generation(reply, max_new_tokens)
    return run, int(reply["meta_info"].get("cached_tokens", -1))


def prime(base_url: str, ids: list[int]) -> int:
    """Fill the radix tree with `ids` (1 output token, no logprobs) -> its cached_tokens."""
    sampling = {"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    (reply,) = post_generate(base_url, list(ids), sampling, timeout=600)
    return int(reply["meta_info"].get("cached_tokens", -1))


def run_prompt(
    base_url: str, prompts: list[list[int]], i: int, max_new_tokens: int, top_k: int
) -> dict:
    """The cold / warm / shared-prefix requests of prompt ``i`` -> its record."""
    ids, n = prompts[i], len(prompts)
    rec: dict = {"prompt": i, "prompt_len": len(ids), "cached": {}, "runs": {}}
    flush(base_url)
    rec["runs"]["cold"], rec["cached"]["cold"] = request(base_url, ids, max_new_tokens, top_k)
    rec["runs"]["warm"], rec["cached"]["warm"] = request(base_url, ids, max_new_tokens, top_k)
    if n > 1:
        j = (i + 1) % n
        rec["primer"] = j
        rec["primer_common_prefix"] = lcp_len(prompts[j], ids)
        flush(base_url)
        rec["cached"]["primer"] = prime(base_url, prompts[j])
        rec["runs"]["shared"], rec["cached"]["shared"] = request(
            base_url, ids, max_new_tokens, top_k
        )
    return rec


def run_prompts(
    base_url: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    top_k: int,
    deadline: float | None = None,
    log=print,
    tag: str = "",
) -> tuple[list[dict], bool]:
    """The cold / warm / shared-prefix sequence for every prompt, one request at a time.

    Returns (records, partial); partial is True when the deadline stopped the loop early.
    """
    n = len(prompts)
    records: list[dict] = []
    durations: list[float] = []
    for i, ids in enumerate(prompts):
        if deadline is not None and durations and time.time() + max(durations) > deadline:
            log(f"{tag} budget: stopping after {i}/{n} prompts")
            return records, True
        t0 = time.time()
        rec = run_prompt(base_url, prompts, i, max_new_tokens, top_k)
        durations.append(time.time() - t0)
        records.append(rec)
        cold = rec["runs"]["cold"]["tokens"]
        msg = []
        for kind in ("warm", "shared"):
            if kind in rec["runs"]:
                fd = first_divergence(cold, rec["runs"][kind]["tokens"])
                msg.append(f"{kind} {'identical' if fd is None else f'diverges at {fd}'}")
        c = rec["cached"]
        log(
            f"{tag} prompt {i + 1}/{n} ({len(ids)} tokens): {', '.join(msg)}; cached "
            + " ".join(f"{k} {c[k]}" for k in KINDS if k in c)
            + f" ({durations[-1]:.1f} s)"
        )
    return records, False


def record_json(rec: dict) -> dict:
    """A per-prompt record for the JSON: tokens and first logprobs, no top-K lists."""
    out = {k: v for k, v in rec.items() if k != "runs"}
    out["tokens"] = {k: r["tokens"] for k, r in rec["runs"].items()}
    out["first_token_logprob"] = {
        k: r["token_lps"][0] if r["token_lps"] else None for k, r in rec["runs"].items()
    }
    cold = rec["runs"].get("cold")
    out["first_divergence"] = {
        k: first_divergence(cold["tokens"], r["tokens"])
        for k, r in rec["runs"].items()
        if k != "cold" and cold
    }
    return out


# ----------------------------------------------------------------------------- report
def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(configs: dict) -> None:
    rows = [
        (
            "config",
            "vs cold",
            "identical",
            "1st div mean/med",
            "lockstep",
            "tok0 |dlp| max",
            "ctx |dlp| max",
            "cached mean (expected)",
        )
    ]
    for name, c in configs.items():
        s = c.get("summary")
        if not s or not s.get("prompts"):
            rows.append((name, c.get("status", "?"), "", "", "", "", "", ""))
            continue
        cs = s["cached_tokens"]
        for kind in ("warm", "shared"):
            m = s.get(kind)
            if not m:
                continue
            fd = m["first_divergence"]
            cached = (
                f"cold {_f(cs['mean'].get('cold'), '.0f')}, {kind} "
                f"{_f(cs['mean'].get(kind), '.1f')} ({_f(cs['expected_mean'].get(kind), '.1f')})"
            )
            rows.append(
                (
                    name + (" (partial)" if c.get("partial") else ""),
                    kind,
                    f"{m['identical']}/{m['prompts']} ({100 * m['identical_frac']:.0f}%)",
                    f"{_f(fd['mean'], '.1f')}/{_f(fd['median'], '.0f')}",
                    f"{100 * m['lockstep_agreement']:.2f}%",
                    _f(m["first_token_dlogp_max"], ".4f"),
                    _f(m["same_context_dlogp_max"], ".4f"),
                    cached,
                )
            )
    print_rows(rows)
    for name, c in configs.items():
        if c.get("error"):
            print(f"  {name}: {c['error'].splitlines()[0][:300]}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- main
STOP_S = 20  # stopping a server and writing the JSON, kept free at the end of a budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.bench radix", __doc__)
    add_model_path(ap, required=True, help="bf16 HF folder (config, tokenizer, weights)")
    ap.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma list: bf16, fp8, kKvV, kKvV-pp, or --config names (default {DEFAULT_CONFIGS})",
    )
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument(
        "--prefix-tokens",
        type=int,
        default=1024,
        help="minimum length of the shared system text in tokens (default 1024)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=5, help="top_logprobs_num (default 5)")
    add_server_options(ap)
    _add_budget_args(ap)
    ap.add_argument(
        "--log-dir",
        default=None,
        help="server logs (default: the folder of an --out given, else /tmp/radix_check)",
    )
    add_out(ap, RESULTS_DIR, "radix")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.custom = parse_config_specs(args.config, ap.error)
    args.names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.names:
        ap.error("--configs is empty")
    try:
        args.flags_of = {n: config_flags(n, args.custom) for n in args.names}
    except ValueError as exc:
        ap.error(str(exc))
    if args.num_prompts < 1:
        ap.error("--num-prompts must be >= 1")
    return args


def _add_budget_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--server-module",
        default="sglang.launch_server",
        help="module run as the server (tests use a fake one)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="total seconds for the run: skip configs that would not fit and stop a "
        "config's prompts early (0: no budget)",
    )
    ap.add_argument(
        "--min-prompts",
        type=int,
        default=4,
        help="with --budget-s, skip a config unless this many prompts fit (default 4)",
    )
    ap.add_argument(
        "--est-startup-s",
        type=float,
        default=60,
        help="server start-up guess for the budget before one was measured (default 60)",
    )


def new_doc(args, prov: dict, model_path: str, pr: dict, common: list[str]) -> dict:
    """The result document before any config ran."""
    return {
        **{k: prov.get(k) for k in ("gpu", "commit", "versions", "date")},
        **({"provenance_error": prov["provenance_error"]} if "provenance_error" in prov else {}),
        "tool": TOOL,
        "argv": args.argv,
        "model_path": model_path,
        "settings": {
            "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens,
            "top_k": args.top_k,
            "prefix_tokens": args.prefix_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "common_server_args": common,
            "budget_s": args.budget_s,
        },
        "prompts": {
            "lens": [len(p) for p in pr["input_ids"]],
            "common_prefix_len": pr["common_prefix_len"],
            "system_tokens": pr["system_tokens"],
            "questions": pr["questions"],
        },
        "expectation": "bf16 (control): cold == warm == shared up to kernel nondeterminism; "
        "kKvV: warm/shared hits read the prefix quantized while a cold prefill "
        "attends to it in bf16, so they may differ; kKvV-pp: cold also reads "
        "the packed cache, so it should match like bf16",
        "configs": {},
    }


class RadixRun:
    """The configs of one run, one server each, within the --budget-s budget."""

    def __init__(
        self, args, model_path: str, prompts: list[list[int]], log_dir: Path, common, t_start: float
    ):
        self.args, self.model_path, self.prompts = args, model_path, prompts
        self.log_dir, self.common = log_dir, common
        self.t_start = t_start  # the budget counts from the start of the run
        self.budget = args.budget_s if args.budget_s > 0 else None
        self.startups: list[float] = []  # measured server start-up, per config run
        self.prompt_s: list[float] = []  # measured mean seconds per prompt, per config run

    def fits(self, name: str, entry: dict) -> bool:
        """Whether --min-prompts of the prompts fit in the budget after a server start-up;
        marks ``entry`` skipped when not."""
        a, n = self.args, len(self.prompts)
        elapsed = time.time() - self.t_start
        est_start = max(self.startups) if self.startups else a.est_startup_s
        est_prompt = max(self.prompt_s) if self.prompt_s else guess_prompt_s(a.max_new_tokens)
        fit = prompts_that_fit(elapsed, self.budget, est_start, est_prompt, n, STOP_S)
        min_prompts = min(a.min_prompts, n)
        if fit < min_prompts:
            entry["status"] = "skipped_budget"
            entry["error"] = (
                f"skipped: {elapsed:.0f} s elapsed + ~{est_start:.0f} s start-up "
                f"leave room for {fit} prompts (< {min_prompts}) at ~{est_prompt:.1f} s "
                f"each in the budget of {self.budget:.0f} s"
            )
            print(f"[{name}] {entry['error']}", flush=True)
            return False
        if fit < n:
            print(f"[{name}] budget: about {fit} of {n} prompts fit", flush=True)
        return True

    def measure(self, name: str, entry: dict) -> bool:
        """Start the config's server and run every prompt (until the budget's deadline);
        fills ``entry``. False when the server failed."""
        a = self.args
        print(f"[{name}] starting server: {' '.join(entry['flags'])}", flush=True)
        t_cfg = time.time()
        srv = SGLangServer(
            self.model_path,
            [*self.common, *entry["flags"]],
            self.log_dir / f"radix_server_{name}.log",
            module=a.server_module,
        )
        entry["server"] = {"cmd": " ".join(srv.cmd[1:]), "log": str(srv.log_path)}
        deadline = self.t_start + self.budget - STOP_S if self.budget else None
        try:
            with started(srv, a.startup_timeout):
                entry["server"]["startup_s"] = srv.startup_s
                records, partial = run_prompts(
                    srv.base_url,
                    self.prompts,
                    a.max_new_tokens,
                    a.top_k,
                    deadline,
                    tag=f"[{name}]",
                )
        except Exception as exc:
            entry["status"] = "failed"
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] FAILED: {entry['error'][:2000]}", flush=True)
            return False
        self.startups.append(srv.startup_s or a.est_startup_s)
        if records:
            self.prompt_s.append((time.time() - t_cfg - self.startups[-1]) / len(records))
        seconds = time.time() - t_cfg
        entry.update(
            {
                "status": "ok",
                "partial": partial,
                "seconds": round(seconds, 1),
                "summary": config_summary(records),
                "per_prompt": [record_json(r) for r in records],
            }
        )
        s = entry["summary"]
        print(
            f"[{name}] done in {seconds:.0f} s: warm identical "
            f"{_f(s.get('warm', {}).get('identical_frac'), '.0%')}, shared identical "
            f"{_f(s.get('shared', {}).get('identical_frac'), '.0%')}",
            flush=True,
        )
        return True


def write_doc(path: Path, doc: dict) -> None:
    """Rewrite the result atomically, JSON-safe: a NaN or infinite logprob from a broken
    server is written down as null instead of failing the write."""
    write_json_atomic(path, json_safe(doc))


def run(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    t_start = time.time()
    model_path = str(Path(args.model_path).resolve())
    print("provenance ...", flush=True)
    prov = get_provenance()
    out = Path(args.out) if args.out else default_out(RESULTS_DIR, prov, "radix")
    log_dir = Path(args.log_dir or (out.parent if args.out else "/tmp/radix_check"))
    log_dir.mkdir(parents=True, exist_ok=True)
    common = split_flags(args.common_server_args, args.server_args)
    pr = build_radix_prompts(load_tokenizer(model_path), args.num_prompts, args.prefix_tokens)
    rr = RadixRun(args, model_path, pr["input_ids"], log_dir, common, t_start)
    lens = [len(p) for p in rr.prompts]
    print(
        f"{len(lens)} prompts of {min(lens)}-{max(lens)} tokens, common prefix "
        f"{pr['common_prefix_len']} tokens (system text {pr['system_tokens']}); "
        f"{args.max_new_tokens} new tokens, top-{args.top_k}; configs {', '.join(args.names)}"
        + (f"; budget {args.budget_s:.0f} s" if args.budget_s > 0 else ""),
        flush=True,
    )
    doc = new_doc(args, prov, model_path, pr, common)
    errors = 0
    try:
        for name in args.names:
            entry: dict = {"flags": args.flags_of[name], "status": "pending"}
            doc["configs"][name] = entry
            if rr.fits(name, entry):
                errors += not rr.measure(name, entry)
                write_doc(out, doc)
    finally:
        for entry in doc["configs"].values():
            if entry["status"] == "pending":
                entry["status"] = "interrupted"
        doc["total_s"] = round(time.time() - rr.t_start, 1)
        write_doc(out, doc)
    print(
        f"\n{Path(model_path).name}: {len(lens)} prompts ({min(lens)}-{max(lens)} tokens, "
        f"common prefix {pr['common_prefix_len']}) x {args.max_new_tokens} greedy tokens; "
        "cold vs warm (same prompt again) and vs shared (prefix primed by another prompt)"
    )
    print_table(doc["configs"])
    print(f"\nwrote {out} ({time.time() - rr.t_start:.0f} s)", flush=True)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
