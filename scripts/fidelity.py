#!/usr/bin/env python3
"""KV-cache fidelity on a real model: quantized KV against bf16, teacher-forced, at decode time.

    python scripts/fidelity.py --model-path /tmp/models/smollm2-bf16 \\
        --configs fp8,k4v4,k3v3 --check-hf --out fidelity_smollm2.json

On the GPU host (after the model pieces were staged, see scripts/fetch_models.py), in the
call that carries the SGLang bundle:

    export PYTHONUNBUFFERED=1 SGLANG_TQ_COMMIT=<commit>; source scripts/gpu_host_setup.sh \
      && M=$(bash scripts/unpack_model.sh smollm2) \
      && timeout -s TERM 540 python3 scripts/fidelity.py --model-path "$M" \
           --configs fp8,k4v4,k3v3 --check-hf --log-dir $OUT/logs --out $OUT/fidelity_smollm2.json

A run cut off by `timeout` stops its server (SIGTERM is handled) and the same command
in the next call resumes from the work files in /tmp/fidelity/<model>.

What it does
------------
1. Builds --num-prompts (20) chat prompts with the model's chat template (math word
   problems, code, explanations, writing), tokenized here, sent as input_ids.
2. For every config under test (--configs; bf16 is always the reference and is added),
   starts one SGLang server and generates greedily (temperature 0, --max-new-tokens 256,
   ignore_eos so every sequence is full length) with ``return_logprob`` and
   ``top_logprobs_num=K``: the config's own decode-time distribution at each step
   (``meta_info.output_top_logprobs``), i.e. what its KV cache produced while decoding.
3. Starts ONE bf16 server (``--attention-backend triton``), which first generates its own
   greedy output the same way (bf16 decode kernels), then flushes its cache and scores
   every config's prompt + generated tokens in a single prefill (``logprob_start_len =
   prompt_len - 1``, ``top_logprobs_num=K``, ``max_new_tokens=1``): the bf16 teacher's
   distribution at exactly the positions where the config decoded.
4. Per config and generated position t (teacher forced: both models see the same prefix,
   the config's own greedy text):
   * top1: is the generated token (the config's argmax) the bf16 argmax?
   * KL(bf16 || config), from the two top-K lists (see `kl_topk`);
   * |dlogp|: |config's logprob of its token - bf16's logprob of it|, exact;
   * bf16 NLL of the generated token, exact.
   Means over all prompts x positions, a curve binned by position (--bin-size), and the
   first position where the config's greedy text leaves bf16's own greedy text.
   The bf16 row is the noise floor: bf16 decode kernels scored by bf16 prefill kernels.
5. --check-hf: the bf16 server also returns prompt logprobs (``logprob_start_len=0``) for
   the first --hf-prompts sequences (prompt + bf16 output); after the servers stop, the
   Hugging Face model computes the same positions (``--hf-dtypes``, default bf16 and fp32)
   and we report the max / mean |logprob difference| of the actual tokens, top-1 agreement
   and KL(HF || SGLang). This is the "SGLang bf16 matches the HF reference" check; a wrong
   RoPE base or weight layout shows up as top-1 agreement far below 95%.

KL with top-K lists (the approximation)
---------------------------------------
SGLang returns the top-K (default 20) logprobs of each distribution, not the full
vocabulary. With P = bf16 (teacher) and Q = config under test, KL is computed over K+1
buckets: the K tokens of P's top-K, plus one "rest of the vocabulary" bucket.
  P: exact on its top-K; P(rest) = 1 - sum(top-K).
  Q: exact where the token is also in Q's top-K. A token of P's top-K that is missing
     from Q's top-K has Q(x) <= Q's K-th probability, and all missing tokens together
     share at most Q's unlisted mass; it gets min(Q's K-th prob, Q's unlisted mass / number
     missing). Q(rest) = 1 - sum over the K buckets (>= 1e-10).
Merging tokens into buckets can only lower KL, so without imputation this is a lower
bound of the true KL; imputed tokens get the largest Q they can have, which also errs
low. `kl_imputed_frac` reports how often imputation was needed. On a greedy path both
top-20 lists usually hold > 99% of the mass.

SGLang API used (0.5.17, checked in io_struct.GenerateReqInput, tokenizer_manager and
scheduler_components/logprob_result_processor): POST /generate with ``input_ids``,
``sampling_params``, ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``;
reply ``meta_info.output_token_logprobs`` = [[logprob, token_id, null], ...],
``meta_info.output_top_logprobs`` = [[[logprob, token_id, null] x K], ...] per generated
token; ``meta_info.input_token_logprobs`` has one entry per input token from
``logprob_start_len`` on, the first being [null, token_id, null]; entry j is
log P(input[start + j] | input[:start + j]); ``input_top_logprobs`` is aligned the same
way (entry 0 null). The code checks this alignment (token ids, and the token's logprob
against the top-K list) and stops with an error if it does not hold.

Servers run with --skip-tokenizer-init (token ids in and out) plus --common-server-args;
each config adds its flags (`config_flags`). Work files (raw generations, scores) go to
--work-dir and are reused on a rerun with identical settings (--fresh to redo), so a run
cut off by a time limit resumes where it stopped.

The metric functions at the top import nothing but numpy; SGLang, torch and transformers
are imported only inside the functions that start servers or run the HF model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- configs
COMMON_SERVER_ARGS = ("--skip-tokenizer-init --mem-fraction-static 0.5 "
                      "--cuda-graph-max-bs-decode 32 --disable-prefill-cuda-graph --random-seed 0")

NAMED_CONFIGS = {
    "bf16": ["--attention-backend", "triton"],
    "fp8": ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "triton"],
}


def parse_config_specs(specs: list[str], error) -> dict[str, list[str]]:
    """``--config NAME=FLAGS`` values → {name: flags}; ``error`` (argparse's) on a bad one."""
    custom = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not name or not flags:
            error(f"--config {spec!r}: expected NAME=FLAGS")
        custom[name.strip()] = shlex.split(flags)
    return custom


def add_centered_configs(names: list[str], custom: dict[str, list[str]], key_centers: str | None,
                         error) -> None:
    """Define each ``<config>-c`` name (keys quantized around the model's key centers) as
    ``<config>``'s flags plus ``--kv-quant-key-centers``; ``error`` (argparse's) if no
    centers file was given."""
    for name in names:
        if name.endswith("-c") and name not in custom:
            if not key_centers:
                error(f"config {name!r} (centered keys) needs --key-centers FILE, made by "
                      "scripts/key_centers.py for this model")
            custom[name] = config_flags(name[:-2], custom) + ["--kv-quant-key-centers", key_centers]


def config_flags(name: str, custom: dict[str, list[str]] | None = None) -> list[str]:
    """Server flags of a config name: bf16, fp8, kKvV (TurboQuant), kKvV-pp (+packed prefill)."""
    if custom and name in custom:
        return list(custom[name])
    if name in NAMED_CONFIGS:
        return list(NAMED_CONFIGS[name])
    base, _, suffix = name.partition("-")
    if len(base) == 4 and base[0] == "k" and base[2] == "v" and base[1].isdigit() and base[3].isdigit():
        flags = ["--kv-quant", "turboquant", "--kv-quant-bits", base]
        if suffix == "pp":
            flags.append("--kv-quant-packed-prefill")
        elif suffix:
            raise ValueError(f"unknown config suffix in {name!r} (known: -pp)")
        return flags
    raise ValueError(f"unknown config {name!r}: use bf16, fp8, kKvV (e.g. k4v4), kKvV-pp, "
                     "a -c suffix with --key-centers, or define it with --config NAME='flags'")


# ----------------------------------------------------------------------------- prompts
PROMPTS = [
    # math word problems
    "A bakery sells muffins for $3 each and cookies for $1.50 each. Maria buys 4 muffins and "
    "6 cookies. How much does she spend? Explain step by step.",
    "A train leaves at 2:15 pm and travels 180 km at an average speed of 60 km/h. At what time "
    "does it arrive? Show your reasoning.",
    "If 3 workers can build a wall in 12 days, how many days would 4 workers need at the same "
    "rate? Explain your answer.",
    "Tom has twice as many marbles as Sara. Together they have 36 marbles. How many marbles "
    "does each of them have? Solve it step by step.",
    "A rectangle has a perimeter of 40 cm and a length of 12 cm. What is its area? Show the steps.",
    # code
    "Write a Python function that checks whether a string is a palindrome, ignoring case and "
    "punctuation. Include a short docstring.",
    "Write a Python function that returns the n-th Fibonacci number iteratively, and explain "
    "its time complexity.",
    "Write a SQL query that returns the five customers with the highest total order amount, "
    "given tables customers(id, name) and orders(id, customer_id, amount).",
    "Write a JavaScript function that removes duplicate values from an array while keeping "
    "the original order.",
    "Explain what this Python code does and suggest an improvement:\n\nresult = []\n"
    "for i in range(len(items)):\n    if items[i] % 2 == 0:\n        result.append(items[i] * items[i])",
    "Write a bash command that counts the lines of all .py files in a directory tree, and "
    "explain each part of it.",
    # explanations
    "Explain how photosynthesis works to a ten-year-old.",
    "What is the difference between a virus and a bacterium? Give three key points.",
    "Explain why the sky is blue.",
    "Describe how a hash table works and when its lookups can become slow.",
    "What causes the seasons on Earth?",
    "Compare TCP and UDP and give an example use case for each.",
    # writing / summarising
    "Summarize the main causes of the French Revolution in a short paragraph.",
    "Give me five tips for writing clear technical documentation.",
    "Write a short story of about 150 words about a robot who learns to paint.",
]


# ----------------------------------------------------------------------------- pure metrics
def topk_arrays(rows, k: int | None = None, pad_id: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """SGLang top-logprob rows -> (ids [n, K] int64, logprobs [n, K] float64).

    rows: one entry per position, each a list of [logprob, token_id, text] (SGLang's
    JSON), or None. Missing entries are padded with id `pad_id` and logprob -inf.
    """
    n = len(rows)
    if k is None:
        k = max((len(r) for r in rows if r), default=0)
    ids = np.full((n, k), pad_id, dtype=np.int64)
    lps = np.full((n, k), -np.inf, dtype=np.float64)
    for i, row in enumerate(rows):
        if not row:
            continue
        for j, e in enumerate(row[:k]):
            if e is None or e[0] is None:
                continue
            lps[i, j] = float(e[0])
            ids[i, j] = int(e[1])
    return ids, lps


def top1_agreement(tokens, ref_ids: np.ndarray) -> np.ndarray:
    """Bool per position: is tokens[t] the reference's argmax (first column of its top-K)?"""
    tokens = np.asarray(tokens, dtype=np.int64)
    if ref_ids.shape[0] != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} tokens but {ref_ids.shape[0]} reference rows")
    return tokens == ref_ids[:, 0]


def kl_topk(p_ids: np.ndarray, p_lps: np.ndarray, q_ids: np.ndarray, q_lps: np.ndarray,
            floor: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) per position from top-K lists, over P's top-K tokens + one rest bucket.

    Returns (kl [n], imputed [n] = number of P's top-K tokens absent from Q's top-K).
    See the module docstring for the approximation. Rows may be padded with logprob -inf.
    """
    p_ids = np.asarray(p_ids, dtype=np.int64)
    q_ids = np.asarray(q_ids, dtype=np.int64)
    p = np.exp(np.asarray(p_lps, dtype=np.float64))           # [n, K]; padding -> 0
    q = np.exp(np.asarray(q_lps, dtype=np.float64))           # [n, Kq]
    p_valid = p > 0
    q_valid = q > 0
    match = (p_ids[:, :, None] == q_ids[:, None, :]) & p_valid[:, :, None] & q_valid[:, None, :]
    found = match.any(-1)                                      # [n, K]
    q_at_p = (match * q[:, None, :]).sum(-1)                   # exact where found
    q_rest_listed = np.clip(1.0 - q.sum(-1), 0.0, 1.0)         # Q mass beyond its top-K
    q_min = np.where(q_valid, q, np.inf).min(-1)               # Q's K-th probability
    q_min = np.where(np.isfinite(q_min), q_min, 1.0)
    missing = (p_valid & ~found).sum(-1)                       # [n]
    share = q_rest_listed / np.maximum(missing, 1)
    impute = np.maximum(np.minimum(q_min, share), floor)       # [n]
    q_b = np.where(found, q_at_p, impute[:, None])
    q_b = np.where(p_valid, np.maximum(q_b, floor), 0.0)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.maximum(1.0 - q_b.sum(-1), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_valid, p * (np.log(np.where(p_valid, p, 1.0)) - np.log(np.where(p_valid, q_b, 1.0))), 0.0)
        rest = np.where(p_rest > 0, p_rest * (np.log(np.where(p_rest > 0, p_rest, 1.0)) - np.log(q_rest)), 0.0)
    return terms.sum(-1) + rest, missing


def bin_positions(per_prompt: list, bin_size: int) -> list[dict]:
    """Mean over prompts of a per-position quantity, in position bins [start, end).

    per_prompt: one 1-D sequence per prompt (lengths may differ); NaN entries are skipped.
    """
    if bin_size <= 0:
        raise ValueError("bin_size must be positive")
    n = max((len(a) for a in per_prompt), default=0)
    out = []
    for start in range(0, n, bin_size):
        vals = [np.asarray(a, dtype=np.float64)[start:start + bin_size] for a in per_prompt]
        vals = np.concatenate(vals) if vals else np.zeros(0)
        vals = vals[~np.isnan(vals)]
        out.append({"start": start, "end": min(start + bin_size, n), "count": int(vals.size),
                    "mean": float(vals.mean()) if vals.size else None})
    return out


def first_divergence(a, b) -> int | None:
    """Index of the first differing token of two sequences; None if one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def summarize_divergence(firsts: list, length: int) -> dict:
    div = [f for f in firsts if f is not None]
    return {"identical": len(firsts) - len(div), "diverged": len(div),
            "median": float(np.median(div)) if div else None,
            "min": int(min(div)) if div else None, "max": int(max(div)) if div else None,
            "of_length": length}


def score_config(gen: dict, score: dict, ref_tokens: list | None, bin_size: int) -> dict:
    """Metrics of one config from its generation (own top-K) and the bf16 scoring.

    gen:   {"tokens": [[...]], "token_lps": [[...]], "top": [[rows]]} per prompt (config)
    score: {"token_lps": [[...]], "top": [[rows]]} per prompt (bf16 teacher, same positions)
    ref_tokens: bf16's own greedy tokens per prompt (for first divergence), or None.
    """
    kl_all, top1_all, dlp_all, nll_all, imp_all, firsts = [], [], [], [], [], []
    per_prompt = []
    for i, toks in enumerate(gen["tokens"]):
        q_ids, q_lps = topk_arrays(gen["top"][i], pad_id=-2)
        p_ids, p_lps = topk_arrays(score["top"][i], pad_id=-1)
        kl, imp = kl_topk(p_ids, p_lps, q_ids, q_lps)
        t1 = top1_agreement(toks, p_ids)
        own = np.asarray(gen["token_lps"][i], dtype=np.float64)
        ref = np.asarray(score["token_lps"][i], dtype=np.float64)
        dlp = np.abs(own - ref)
        kl_all.append(kl)
        top1_all.append(t1.astype(np.float64))
        dlp_all.append(dlp)
        nll_all.append(-ref)
        imp_all.append(imp > 0)
        fd = first_divergence(toks, ref_tokens[i]) if ref_tokens is not None else None
        firsts.append(fd)
        per_prompt.append({"first_divergence": fd, "top1": float(t1.mean()),
                           "kl_mean": float(kl.mean()),
                           "kl": [round(float(x), 6) for x in kl],
                           "top1_miss": [int(j) for j in np.flatnonzero(~t1)]})
    cat = np.concatenate
    kl_c = cat(kl_all)
    summary = {
        "positions": int(kl_c.size),
        "top1_agreement": float(cat(top1_all).mean()),
        "kl_mean": float(kl_c.mean()),
        "kl_median": float(np.median(kl_c)),
        "kl_p99": float(np.quantile(kl_c, 0.99)),
        "kl_max": float(kl_c.max()),
        "kl_imputed_frac": float(cat(imp_all).mean()),
        "abs_dlogp_mean": float(cat(dlp_all).mean()),
        "bf16_nll_mean": float(cat(nll_all).mean()),
    }
    if ref_tokens is not None:
        summary["first_divergence"] = summarize_divergence(firsts, max(len(t) for t in gen["tokens"]))
    curve = {"kl": bin_positions(kl_all, bin_size), "top1": bin_positions(top1_all, bin_size)}
    return {"summary": summary, "curve": curve, "per_prompt": per_prompt}


# ----------------------------------------------------------------------------- reply parsing
def parse_generation(item: dict, max_new_tokens: int) -> dict:
    """One /generate reply (return_logprob, top_logprobs_num) -> tokens, own logprobs, top-K."""
    meta = item["meta_info"]
    otl = meta["output_token_logprobs"]
    tokens = [int(e[1]) for e in otl]
    if "output_ids" in item and list(item["output_ids"]) != tokens:
        raise RuntimeError("output_ids and output_token_logprobs disagree")
    if len(tokens) != max_new_tokens:
        raise RuntimeError(f"generated {len(tokens)} tokens, expected {max_new_tokens} "
                           f"(finish_reason {meta.get('finish_reason')})")
    top = meta["output_top_logprobs"]
    if len(top) != len(tokens):
        raise RuntimeError(f"{len(top)} top-logprob rows for {len(tokens)} tokens")
    return {"tokens": tokens, "token_lps": [float(e[0]) for e in otl], "top": top}


def parse_scoring(item: dict, prompt_len: int, gen_tokens: list) -> dict:
    """A /generate reply with logprob_start_len = prompt_len - 1 on prompt + gen_tokens
    -> bf16 logprob of each generated token and bf16's top-K at that position."""
    meta = item["meta_info"]
    itl, itop = meta["input_token_logprobs"], meta["input_top_logprobs"]
    n = len(gen_tokens)
    # entry 0 is token prompt[-1] (no logprob), entry 1 + i is gen_tokens[i]
    if len(itl) != n + 1 or len(itop) != n + 1:
        raise RuntimeError(f"scoring returned {len(itl)} / {len(itop)} input logprob rows, "
                           f"expected {n + 1} (prompt_len {prompt_len}); logprob_start_len "
                           "semantics changed?")
    ids = [int(e[1]) for e in itl[1:]]
    if ids != [int(t) for t in gen_tokens]:
        bad = first_divergence(ids, gen_tokens)
        raise RuntimeError(f"scoring rows are not aligned with the generated tokens (first "
                           f"mismatch at {bad}): input_token_logprobs ids {ids[:8]}..., "
                           f"tokens {list(gen_tokens[:8])}...")
    lps = [float(e[0]) for e in itl[1:]]
    top = itop[1:]
    check_alignment(gen_tokens, lps, top)
    return {"token_lps": lps, "top": top}


def check_alignment(tokens, token_lps, top, tol: float = 2e-3) -> int:
    """Where a token is in the same position's top-K, its logprob must equal that entry.
    Returns the number of positions checked; raises on a mismatch (off-by-one rows)."""
    checked = 0
    for t, lp, row in zip(tokens, token_lps, top):
        for e in row or ():
            if int(e[1]) == int(t):
                checked += 1
                if abs(float(e[0]) - lp) > tol:
                    raise RuntimeError(f"token {t}: logprob {lp} but top-K says {e[0]}: rows "
                                       "misaligned")
                break
    if tokens and checked == 0:
        raise RuntimeError("no generated token appears in any top-K row: rows misaligned")
    return checked


def compare_logprobs(tokens, sg_lps, sg_top, ref_logprobs: np.ndarray) -> dict:
    """SGLang prompt logprobs against a full reference distribution (HF), same positions.

    tokens: the sequence; sg_lps[j], sg_top[j] for j >= 1 describe tokens[j] (entry 0 None);
    ref_logprobs: [len(tokens), V] reference log-softmax at each position (row j predicts
    tokens[j + 1]).
    """
    n = len(tokens)
    tok = np.asarray(tokens[1:], dtype=np.int64)
    ref = ref_logprobs[: n - 1]
    ref_tok = ref[np.arange(n - 1), tok]
    sg = np.asarray([float(x) for x in sg_lps[1:]], dtype=np.float64)
    diff = np.abs(sg - ref_tok)
    s_ids, s_lps = topk_arrays(sg_top[1:], pad_id=-2)
    k = s_ids.shape[1]
    r_ids = np.argsort(-ref, axis=1)[:, :k]
    r_lps = np.take_along_axis(ref, r_ids, axis=1)
    kl, _ = kl_topk(r_ids, r_lps, s_ids, s_lps)
    top1 = s_ids[:, 0] == r_ids[:, 0]
    # near-ties of the reference are not disagreements worth reporting
    margin = r_lps[:, 0] - r_lps[:, 1] if k > 1 else np.full(n - 1, np.inf)
    return {"positions": int(n - 1), "max_abs_dlogp": float(diff.max()),
            "mean_abs_dlogp": float(diff.mean()), "p99_abs_dlogp": float(np.quantile(diff, 0.99)),
            "top1_agreement": float(top1.mean()),
            "top1_disagree_margin_gt_0.1": int((~top1 & (margin > 0.1)).sum()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


# ----------------------------------------------------------------------------- server side
def _server_module():
    sys.path.insert(0, str(HERE))
    import _server  # noqa: PLC0415

    return _server


def build_prompts(model_path: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer  # noqa: PLC0415

    if n > len(PROMPTS):
        raise SystemExit(f"--num-prompts {n}: only {len(PROMPTS)} prompts are defined")
    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for text in PROMPTS[:n]:
        msgs = [{"role": "user", "content": text}]
        if getattr(tok, "chat_template", None):
            s = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:  # ChatML, what both GGUF models use
            s = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        out.append(list(tok(s, add_special_tokens=False).input_ids))
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cached(path: Path, key: str, fresh: bool):
    if fresh or not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if d.get("key") == key else None


def _save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def generate(srv, prompts, max_new_tokens: int, top_k: int, ignore_eos: bool) -> dict:
    srv_mod = _server_module()
    t0 = time.time()
    reply = srv_mod.post(srv.base + "/generate", {
        "input_ids": prompts,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                            "ignore_eos": ignore_eos},
        "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": top_k,
    }, timeout=1200)
    if isinstance(reply, dict):
        reply = [reply]
    items = [parse_generation(r, max_new_tokens) for r in reply]
    return {"tokens": [g["tokens"] for g in items], "token_lps": [g["token_lps"] for g in items],
            "top": [g["top"] for g in items], "seconds": round(time.time() - t0, 2)}


def score(srv, prompts, gen_tokens, top_k: int) -> dict:
    srv_mod = _server_module()
    t0 = time.time()
    seqs = [list(p) + list(g) for p, g in zip(prompts, gen_tokens)]
    reply = srv_mod.post(srv.base + "/generate", {
        "input_ids": seqs,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True, "logprob_start_len": [len(p) - 1 for p in prompts],
        "top_logprobs_num": top_k,
    }, timeout=1200)
    if isinstance(reply, dict):
        reply = [reply]
    items = [parse_scoring(r, len(p), g) for r, p, g in zip(reply, prompts, gen_tokens)]
    return {"token_lps": [s["token_lps"] for s in items], "top": [s["top"] for s in items],
            "seconds": round(time.time() - t0, 2)}


def prompt_logprobs(srv, seqs, top_k: int) -> list[dict]:
    srv_mod = _server_module()
    reply = srv_mod.post(srv.base + "/generate", {
        "input_ids": seqs, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": top_k,
    }, timeout=1200)
    if isinstance(reply, dict):
        reply = [reply]
    out = []
    for r, s in zip(reply, seqs):
        itl, itop = r["meta_info"]["input_token_logprobs"], r["meta_info"]["input_top_logprobs"]
        if len(itl) != len(s) or [int(e[1]) for e in itl] != list(s):
            raise RuntimeError("prompt logprobs not aligned with the input tokens")
        check_alignment(s[1:], [e[0] for e in itl[1:]], itop[1:])
        out.append({"token_lps": [e[0] for e in itl], "top": itop})
    return out


def hf_reference(model_path: str, seqs, dtypes: list[str], device: str | None) -> dict:
    """Full log-softmax of the HF model at every position, per dtype (float32 numpy)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for name in dtypes:
        dt = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
              "fp32": torch.float32, "float16": torch.float16}[name]
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dt).to(device).eval()
        res = []
        with torch.no_grad():
            for s in seqs:
                ids = torch.tensor([s], device=device)
                logits = model(ids).logits[0].float()
                res.append(torch.log_softmax(logits, -1).cpu().numpy())
        out[name] = {"device": device, "logprobs": res}
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- report
def print_table(results: dict) -> None:
    rows = [("config", "top-1", "KL mean", "KL p99", "|dlogp|", "imputed", "greedy text vs bf16")]
    errors = []
    for name, r in results.items():
        if "summary" not in r:
            rows.append((name, "ERROR", "", "", "", "", ""))
            lines = [x for x in r.get("error", "?").splitlines() if x.strip()] or ["?"]
            errors.append(f"  {name}: {lines[0][:200]}" + (f" ... {lines[-1][:200]}" if len(lines) > 1 else ""))
            continue
        s = r["summary"]
        fd = s.get("first_divergence") or {}
        if not fd:
            fdt = "-"
        elif not fd["diverged"]:
            fdt = f"identical in all {fd['identical']}"
        else:
            fdt = (f"{fd['identical']} identical; {fd['diverged']} diverge at "
                   f"{fd['min']}..{fd['max']} (median {fd['median']:.0f})")
        rows.append((name, f"{100 * s['top1_agreement']:.2f}%", f"{s['kl_mean']:.5f}",
                     f"{s['kl_p99']:.4f}", f"{s['abs_dlogp_mean']:.4f}",
                     f"{100 * s['kl_imputed_frac']:.1f}%", fdt))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if errors:
        print("errors:")
        print("\n".join(errors))


def print_curves(results: dict) -> None:
    names = [n for n, r in results.items() if "curve" in r]
    if not names:
        return
    bins = results[names[0]]["curve"]["kl"]
    print("\nmean KL by position (teacher forced):")
    print("  pos       " + "  ".join(f"{n:>9s}" for n in names))
    for b in range(len(bins)):
        vals = []
        for n in names:
            c = results[n]["curve"]["kl"]
            vals.append(f"{c[b]['mean']:9.5f}" if b < len(c) and c[b]["mean"] is not None else " " * 9)
        print(f"  {bins[b]['start']:4d}-{bins[b]['end']:<4d} " + "  ".join(vals))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model-path", required=True, help="bf16 HF folder (config, tokenizer, weights)")
    ap.add_argument("--configs", default="fp8,k4v4,k3v3",
                    help="comma list of configs under test: bf16, fp8, kKvV, kKvV-pp, or names "
                         "given with --config (bf16 is always run as the reference); '' for none")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                    help="define a config, e.g. --config 'k4v2bf=--kv-quant turboquant "
                         "--kv-quant-bits k4v2 --kv-quant-bf16-layers 0,1'")
    ap.add_argument("--key-centers", default=None, metavar="FILE",
                    help="key centers file (scripts/key_centers.py) for configs named <config>-c, "
                         "e.g. k4v4-c")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=20, help="top_logprobs_num (default 20)")
    ap.add_argument("--bin-size", type=int, default=32)
    ap.add_argument("--common-server-args", default=COMMON_SERVER_ARGS,
                    help=f"flags of every server (default: {COMMON_SERVER_ARGS!r})")
    ap.add_argument("--server-args", default="", help="extra flags appended for every server")
    ap.add_argument("--startup-timeout", type=float, default=420)
    ap.add_argument("--check-hf", action="store_true",
                    help="also compare SGLang bf16 prompt logprobs with the HF model")
    ap.add_argument("--hf-prompts", type=int, default=4)
    ap.add_argument("--hf-dtypes", default="bfloat16,float32")
    ap.add_argument("--hf-device", default=None, help="default: cuda if available")
    ap.add_argument("--work-dir", default=None,
                    help="raw generations/scores, server logs (default /tmp/fidelity/<model>)")
    ap.add_argument("--log-dir", default=None, help="server logs (default: the work dir)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached work files")
    ap.add_argument("--out", default="fidelity.json")
    args = ap.parse_args(argv)

    custom = parse_config_specs(args.config, ap.error)
    under_test = [c.strip() for c in args.configs.split(",") if c.strip() and c.strip() != "bf16"]
    add_centered_configs(under_test, custom, args.key_centers, ap.error)
    for c in ["bf16", *under_test]:
        config_flags(c, custom)  # fail early on unknown names

    # `timeout` sends SIGTERM: turn it into an exception so that the `with Server` blocks
    # stop their servers (they run in their own sessions and would outlive us otherwise)
    def _on_term(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _on_term)

    from sglang_tq.provenance import provenance  # noqa: PLC0415  (imports torch)

    srv_mod = _server_module()
    model_path = str(Path(args.model_path).resolve())
    work = Path(args.work_dir or f"/tmp/fidelity/{Path(model_path).name}")
    work.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or work)
    log_dir.mkdir(parents=True, exist_ok=True)
    common = shlex.split(args.common_server_args) + shlex.split(args.server_args)
    ignore_eos = True  # every sequence is exactly --max-new-tokens long

    t_start = time.time()
    prompts = build_prompts(model_path, args.num_prompts)
    print(f"{len(prompts)} prompts, {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
          f"{args.max_new_tokens} new tokens each, top-{args.top_k}", flush=True)
    gen_settings = {"prompts": prompts, "max_new_tokens": args.max_new_tokens,
                    "top_k": args.top_k, "ignore_eos": ignore_eos, "common": common,
                    "model": model_path}
    weights = sorted(Path(model_path).glob("*.safetensors"))
    gen_settings["weights"] = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]

    result = {**provenance(), "model_path": model_path,
              "settings": {k: v for k, v in gen_settings.items() if k != "prompts"},
              "prompts": PROMPTS[:args.num_prompts], "prompt_lens": [len(p) for p in prompts],
              "kl_approximation": "bucketed top-K: P's top-K tokens + rest bucket; Q imputed "
                                  "min(Q K-th prob, Q unlisted mass / #missing) where missing",
              "configs": {}, "timings": {}}
    try:
        conv = json.loads((Path(model_path) / "conversion.json").read_text())
        result["model_conversion"] = {k: conv.get(k) for k in ("source_gguf", "source_sha256",
                                                                 "rope_theta", "weights_sha256", "fixes")}
    except (OSError, json.JSONDecodeError):
        pass

    gens: dict[str, dict] = {}
    errors: dict[str, str] = {}
    server_info: dict[str, dict] = {}

    def gen_key(name: str) -> str:
        return _digest({**gen_settings, "flags": config_flags(name, custom)})

    # ---- 1. each config under test generates ----------------------------------
    for name in under_test:
        path = work / f"gen_{name}.json"
        key = gen_key(name)
        cached = _cached(path, key, args.fresh)
        if cached:
            print(f"[{name}] generation cached in {path}", flush=True)
            gens[name] = cached["gen"]
            server_info[name] = cached.get("server", {})
            continue
        flags = config_flags(name, custom)
        print(f"[{name}] starting server: {' '.join(flags)}", flush=True)
        srv = srv_mod.Server(model_path, [*common, *flags], str(log_dir / f"server_{name}.log"),
                             startup_timeout=args.startup_timeout)
        try:
            with srv:
                g = generate(srv, prompts, args.max_new_tokens, args.top_k, ignore_eos)
        except Exception as exc:  # noqa: BLE001 - one failing config must not stop the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] FAILED: {errors[name][:2000]}", flush=True)
            continue
        server_info[name] = {"flags": flags, "startup_s": srv.startup_s, "generate_s": g["seconds"],
                             "log": srv.log_path}
        print(f"[{name}] generated {len(g['tokens'])} x {args.max_new_tokens} tokens in "
              f"{g['seconds']} s (startup {srv.startup_s} s)", flush=True)
        gens[name] = g
        _save(path, {"key": key, "gen": g, "server": server_info[name]})

    # ---- 2. the bf16 server: own generation, scoring, HF prompt logprobs ---------
    scores: dict[str, dict] = {}
    hf_sg = None
    bf16_path = work / "gen_bf16.json"
    bf16_key = gen_key("bf16")
    cached = _cached(bf16_path, bf16_key, args.fresh)
    if cached:
        gens["bf16"] = cached["gen"]
        server_info["bf16"] = cached.get("server", {})
    score_keys = {n: _digest({"gen": gen_key(n), "bf16": bf16_key, "tokens": gens[n]["tokens"]})
                  for n in gens}
    todo = [n for n in [*under_test, "bf16"] if n in gens or n == "bf16"]
    for n in list(todo):
        if n in gens:
            c = _cached(work / f"score_{n}.json", score_keys[n], args.fresh)
            if c:
                scores[n] = c["score"]
    hf_path = work / "hf_sglang.json"
    need_hf_sg = args.check_hf
    if need_hf_sg and "bf16" in gens:
        hf_key = _digest({"bf16": bf16_key, "n": args.hf_prompts})
        c = _cached(hf_path, hf_key, args.fresh)
        if c:
            hf_sg = c["data"]
            need_hf_sg = False
    need_server = "bf16" not in gens or any(n not in scores for n in gens) or need_hf_sg
    if need_server:
        flags = config_flags("bf16", custom)
        print(f"[bf16] starting the reference server: {' '.join(flags)}", flush=True)
        srv = srv_mod.Server(model_path, [*common, *flags], str(log_dir / "server_bf16.log"),
                             startup_timeout=args.startup_timeout)
        try:
            with srv:
                if "bf16" not in gens:
                    g = generate(srv, prompts, args.max_new_tokens, args.top_k, ignore_eos)
                    gens["bf16"] = g
                    server_info["bf16"] = {"flags": flags, "startup_s": srv.startup_s,
                                           "generate_s": g["seconds"], "log": srv.log_path}
                    _save(bf16_path, {"key": bf16_key, "gen": g, "server": server_info["bf16"]})
                    print(f"[bf16] generated in {g['seconds']} s (startup {srv.startup_s} s)", flush=True)
                    score_keys["bf16"] = _digest({"gen": bf16_key, "bf16": bf16_key,
                                                  "tokens": g["tokens"]})
                try:  # not essential: logprob_start_len already stops prefix reuse of the scored part
                    srv_mod.post(srv.base + "/flush_cache", {}, timeout=60)
                except Exception as exc:  # noqa: BLE001
                    print(f"[bf16] note: /flush_cache failed ({exc}); continuing", flush=True)
                for n in [*[x for x in under_test if x in gens], "bf16"]:
                    if n in scores:
                        continue
                    s = score(srv, prompts, gens[n]["tokens"], args.top_k)
                    scores[n] = s
                    _save(work / f"score_{n}.json", {"key": score_keys[n], "score": s})
                    print(f"[bf16] scored {n} in {s['seconds']} s", flush=True)
                if need_hf_sg:
                    seqs = [list(p) + list(t) for p, t in
                            zip(prompts[:args.hf_prompts], gens["bf16"]["tokens"][:args.hf_prompts])]
                    hf_sg = {"seqs": seqs, "sglang": prompt_logprobs(srv, seqs, args.top_k)}
                    _save(hf_path, {"key": _digest({"bf16": bf16_key, "n": args.hf_prompts}),
                                    "data": hf_sg})
        except Exception as exc:  # noqa: BLE001
            errors["bf16"] = f"{type(exc).__name__}: {exc}"
            print(f"[bf16] FAILED: {errors['bf16'][:2000]}", flush=True)
    result["timings"]["servers_done_s"] = round(time.time() - t_start, 1)

    # ---- 3. metrics -------------------------------------------------------------
    ref_tokens = gens.get("bf16", {}).get("tokens")
    for n in ["bf16", *under_test]:
        entry = {"flags": config_flags(n, custom), "server": server_info.get(n, {})}
        if n in errors:
            entry["error"] = errors[n]
        if n in gens and n in scores:
            entry.update(score_config(gens[n], scores[n], ref_tokens, args.bin_size))
            entry["tokens"] = gens[n]["tokens"]
        elif "error" not in entry:
            entry["error"] = "not scored (bf16 reference server failed?)"
        result["configs"][n] = entry

    # ---- 4. HF reference ----------------------------------------------------------
    if args.check_hf:
        if hf_sg is None:
            result["hf_check"] = {"error": "no SGLang prompt logprobs (bf16 server failed?)"}
        else:
            t0 = time.time()
            try:
                ref = hf_reference(model_path, hf_sg["seqs"],
                                   [d.strip() for d in args.hf_dtypes.split(",") if d.strip()],
                                   args.hf_device)
                hf = {}
                for dt, r in ref.items():
                    per = [compare_logprobs(s, sg["token_lps"], sg["top"], lp)
                           for s, sg, lp in zip(hf_sg["seqs"], hf_sg["sglang"], r["logprobs"])]
                    pos = sum(p["positions"] for p in per)
                    hf[dt] = {"device": r["device"], "sequences": len(per), "positions": pos,
                              "max_abs_dlogp": max(p["max_abs_dlogp"] for p in per),
                              "mean_abs_dlogp": sum(p["mean_abs_dlogp"] * p["positions"] for p in per) / pos,
                              "top1_agreement": sum(p["top1_agreement"] * p["positions"] for p in per) / pos,
                              "top1_disagree_margin_gt_0.1": sum(p["top1_disagree_margin_gt_0.1"] for p in per),
                              "kl_mean": sum(p["kl_mean"] * p["positions"] for p in per) / pos,
                              "per_sequence": per}
                hf["seconds"] = round(time.time() - t0, 1)
                result["hf_check"] = hf
            except Exception as exc:  # noqa: BLE001
                result["hf_check"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["timings"]["total_s"] = round(time.time() - t_start, 1)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    # ---- 5. summary -----------------------------------------------------------------
    print(f"\n{Path(model_path).name}: {args.num_prompts} prompts x {args.max_new_tokens} greedy "
          f"tokens, teacher-forced against bf16 prefill, KL over top-{args.top_k} + rest")
    print_table(result["configs"])
    print_curves(result["configs"])
    if "hf_check" in result:
        h = result["hf_check"]
        print("\nSGLang bf16 vs HF transformers (prompt + bf16 output logprobs):")
        if "error" in h:
            print(f"  ERROR: {h['error']}")
        for dt, v in h.items():
            if isinstance(v, dict) and "top1_agreement" in v:
                print(f"  HF {dt:9s} ({v['device']}): {v['positions']} positions, top-1 "
                      f"{100 * v['top1_agreement']:.2f}% ({v['top1_disagree_margin_gt_0.1']} with "
                      f"margin > 0.1), |dlogp| max {v['max_abs_dlogp']:.4f} mean "
                      f"{v['mean_abs_dlogp']:.5f}, KL {v['kl_mean']:.2e}")
    print(f"\nwrote {args.out} ({time.time() - t_start:.0f} s)")
    ok = not errors and all("summary" in c for c in result["configs"].values())
    if args.check_hf:
        ok = ok and "error" not in result.get("hf_check", {"error": 1})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
