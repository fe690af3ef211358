#!/usr/bin/env python3
"""KV-cache fidelity on a real model: quantized KV against bf16, teacher-forced, at decode time.

    python scripts/fidelity.py --model-path /tmp/models/smollm2-bf16 \\
        --configs fp8,k4v4,k3v3 --check-hf --out fidelity_smollm2.json

On the GPU host (after the model pieces were staged, see dev/gpu_host/fetch_models.py), in the
call that carries the SGLang bundle:

    export PYTHONUNBUFFERED=1 SGLANG_TQ_COMMIT=<commit>; source dev/gpu_host/gpu_host_setup.sh \\
      && M=$(bash dev/gpu_host/unpack_model.sh smollm2) \\
      && timeout -s TERM 540 python3 scripts/fidelity.py --model-path "$M" \\
           --configs fp8,k4v4,k3v3 --check-hf --log-dir $OUT/logs --out $OUT/fidelity_smollm2.json

A run cut off by `timeout` stops its server (SIGTERM is handled) and the same command
in the next call resumes from the work files in /tmp/fidelity/<model> (while the host
keeps its /tmp, i.e. calls back to back).

Long generation (issue 14: does the error accumulate?), then the plot here:

    python scripts/fidelity.py --model-path "$M" --long --configs fp8,k4v4,k4v4-nc,k3v3 \\
        --out $OUT/fidelity_long.json
    python scripts/plot_fidelity.py fidelity_long.json --out fidelity_long.png

What it does
------------
1. Builds --num-prompts (20) chat prompts with the model's chat template (math word
   problems, code, explanations, writing; with --long the LONG_PROMPTS), tokenized here,
   sent as input_ids.
2. For every config under test (--configs; the teacher is always run and is added),
   starts one SGLang server and generates greedily (temperature 0, --max-new-tokens 256,
   ignore_eos so every sequence is full length) with ``return_logprob`` and
   ``top_logprobs_num=K``: the config's own decode-time distribution at each step
   (``meta_info.output_top_logprobs``), i.e. what its KV cache produced while decoding.
3. Starts ONE bf16 server, the teacher (--teacher, default bf16-triton: bf16 KV on
   ``--attention-backend triton``), which first generates its own
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
   Means over all prompts x positions, a curve binned by position (--bin-size), the
   trend over position (`trend`, below), and the first position where the config's
   greedy text leaves the teacher's own greedy text.
   The teacher's row (named after it, e.g. bf16-triton) is the noise floor: bf16 decode
   kernels scored by bf16 prefill kernels of the same backend.
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

Configs and attention backends
------------------------------
Config names are the labels of ``sglang_tq.bench.configs`` (the table the load test and
the accuracy harness use), so that a label means the same server everywhere:
  bf16, fp8       SGLang's default attention backend (fa3 on Hopper: on the GPU host its
                  library must be staged first, dev/gpu_host/stage_fa3.sh), bf16 / fp8_e4m3 KV;
  bf16-triton, fp8-triton, bf16-fa3, fp8-fa3   the backend named;
  kXvY            TurboQuant (the turboquant backend) with the default key centers (auto:
                  from the k_proj bias where the model has one), e.g. k4v4, k3v3;
  kXvY-nc         the same with --kv-quant-key-centers none (uncentered keys).
On top of the table, fidelity's own names: ``-pp`` after a TurboQuant label adds
--kv-quant-packed-prefill (k4v4-pp, k4v4-nc-pp); ``-c`` after one adds
--kv-quant-key-centers FILE from --key-centers (k4v4-c, k4v4-pp-c); --config NAME=FLAGS
defines any other name. Roles: each config under test generates on its own flags'
backend; the teacher (bf16-triton unless --teacher says bf16 or bf16-fa3) scores them
all. Before the shared table, fidelity's bf16 and fp8 meant Triton: the results of
commits up to a0d9ac7 name as bf16 / fp8 what is now bf16-triton / fp8-triton.

Long generation (--long) and the trend
--------------------------------------
--long sets --max-new-tokens 1024 (a larger value may be given, a smaller one is refused),
--bin-size 64 and the LONG_PROMPTS: 20 requests for long answers (programs with tests and
explanations, ten problems at once, long articles), so that most positions lie inside the
assistant's turn. The 20 PROMPTS cannot sustain 1024 tokens: Qwen2.5-Coder-0.5B-Instruct
(HF, bf16, greedy) ends 16 of them within 95-620 tokens, so about 60% of 1024 positions
would follow the end of the turn; it ends 11 of the LONG_PROMPTS at 643-1006 tokens and
runs the other 9 past 1100, about 7% of the positions after the end. ignore_eos still
holds every sequence at full length: a model that ends its turn early keeps generating
after its end-of-turn token, which is acceptable for a teacher-forced comparison (both
models see the same prefix) but is text it would not produce in use; `first_eos` per
prompt and ``past_eos_frac`` record how much of it there is.
`trend` fits one least-squares line to KL(position) over all prompts x positions
(position in units of 1000 generated tokens) and gives its slope with a 95% interval from
a bootstrap over prompts (2000 resamples, seed 0; prompts are the independent units), the
mean of the first and of the last quarter of the positions and their ratio; the same for
top-1 disagreement (1 - top1). The slope also moves with the text: a run of easy tokens
late in the answers lowers KL whatever the cache does, so read a config's slope against
the teacher row's. scripts/plot_fidelity.py draws the per-bin curves as a PNG.

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
COMMON_SERVER_ARGS = (
    "--skip-tokenizer-init --mem-fraction-static 0.5 "
    "--cuda-graph-max-bs-decode 32 --disable-prefill-cuda-graph --random-seed 0"
)

# The bf16 server that scores every config (the teacher) and whose own greedy generation
# is the noise-floor row; a label of sglang_tq.bench.configs that keeps bf16 KV.
DEFAULT_TEACHER = "bf16-triton"
TEACHER_LABELS = ("bf16-triton", "bf16", "bf16-fa3")
LONG_MIN_TOKENS = 1024


def parse_config_specs(specs: list[str], error) -> dict[str, list[str]]:
    """``--config NAME=FLAGS`` values → {name: flags}; ``error`` (argparse's) on a bad one."""
    custom = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not name or not flags:
            error(f"--config {spec!r}: expected NAME=FLAGS")
        custom[name.strip()] = shlex.split(flags)
    return custom


def add_centered_configs(
    names: list[str], custom: dict[str, list[str]], key_centers: str | None, error
) -> None:
    """Define each ``<config>-c`` name (keys quantized around the model's key centers) as
    ``<config>``'s flags plus ``--kv-quant-key-centers FILE``; ``error`` (argparse's) if no
    centers file was given or ``<config>`` is not a TurboQuant config with default centers."""
    for name in names:
        if name.endswith("-c") and name not in custom:
            if not key_centers:
                error(
                    f"config {name!r} (centered keys) needs --key-centers FILE, made by "
                    "python -m sglang_tq.tools.key_centers for this model"
                )
            base = config_flags(name[:-2], custom)
            if "--kv-quant" not in base or "--kv-quant-key-centers" in base:
                error(
                    f"config {name!r}: -c adds key centers to a TurboQuant config with default "
                    "centers (e.g. k4v4-c, k4v4-pp-c); drop the -c or the -nc"
                )
            custom[name] = [*base, "--kv-quant-key-centers", key_centers]


def config_flags(name: str, custom: dict[str, list[str]] | None = None) -> list[str]:
    """Server flags of a config name.

    In this order: a name of ``custom`` (--config NAME=FLAGS, and the -c names that
    `add_centered_configs` defines); a label of the shared table
    ``sglang_tq.bench.configs.kv_server_flags`` (bf16, fp8 on SGLang's default attention
    backend; bf16-triton, fp8-triton, bf16-fa3, fp8-fa3; kXvY with default key centers,
    kXvY-nc uncentered); a TurboQuant name of either kind plus ``-pp``
    (``--kv-quant-packed-prefill``), e.g. k4v4-pp, k4v4-nc-pp.
    """
    if custom and name in custom:
        return list(custom[name])
    from sglang_tq.bench.configs import kv_server_flags

    try:
        return kv_server_flags(name)
    except ValueError:
        pass
    base, sep, suffix = name.rpartition("-")
    if sep and suffix == "pp":
        try:
            flags = config_flags(base, custom)
        except ValueError:
            flags = []
        if "--kv-quant" in flags and "--kv-quant-packed-prefill" not in flags:
            return [*flags, "--kv-quant-packed-prefill"]
    raise ValueError(
        f"unknown config {name!r}: use a label of sglang_tq.bench.configs (bf16, fp8, "
        "bf16-triton, fp8-triton, bf16-fa3, fp8-fa3, kXvY such as k4v4, kXvY-nc), a "
        "TurboQuant label plus -pp or -c (with --key-centers), or define it with "
        "--config NAME='flags'"
    )


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

# --long: requests whose full answers run past 1024 tokens, so that most generated
# positions are inside the assistant's turn rather than after its end-of-turn token
LONG_PROMPTS = [
    # code, with tests and explanations
    "Write a complete, well-commented Python module for a command-line to-do list manager "
    "backed by SQLite: argument parsing, add/list/complete/delete commands, input validation "
    "and error handling. Then write a full pytest test suite for it, and finally walk through "
    "every function explaining the design decisions.",
    "Implement a red-black tree in C++ with insert, delete, search and in-order iteration, "
    "with comments on every rotation and recoloring case, and a main() that tests it "
    "thoroughly. After the code, explain each of the insertion and deletion cases in detail.",
    "Write a comprehensive guide to sorting algorithms: for bubble sort, insertion sort, "
    "selection sort, merge sort, quicksort, heapsort, counting sort and radix sort, explain "
    "how it works, give a Python implementation, analyse its time and space complexity, and "
    "trace it by hand on the list [5, 2, 9, 1, 7, 3].",
    "Build a REST API for a small blog (users, posts, comments) with FastAPI and SQLAlchemy. "
    "Give the full code for the models, schemas, routes and authentication, then explain "
    "each part step by step and show example requests and responses for every endpoint.",
    "Implement an LRU cache in Python, Java, Go and C++. For each language give complete, "
    "commented code and unit tests, then compare the four implementations in detail.",
    "Write a complete implementation of Conway's Game of Life in Python with a text-based "
    "display, a pattern loader and unit tests. Then discuss at length how to make it faster, "
    "with code for each optimisation.",
    "Design a relational database for a public library: give the CREATE TABLE statements with "
    "keys, constraints and indexes, INSERT statements with sample data for every table, and "
    "fifteen example SQL queries of increasing difficulty, each followed by an explanation.",
    "Explain how a compiler works, stage by stage (lexing, parsing, semantic analysis, "
    "intermediate representation, optimisation, code generation), with a worked example of "
    "each stage on the statement x = (a + b) * c - 4. Then write a Python tokenizer and a "
    "recursive-descent parser for arithmetic expressions, with tests.",
    "Implement a small neural network from scratch in NumPy: derive the forward pass and "
    "backpropagation equations step by step, write the full training code for the XOR "
    "problem, and explain every line and every hyperparameter.",
    "Write the complete README documentation for a hypothetical open-source Python library "
    "that parses and validates CSV files: installation, quick start, ten usage examples with "
    "code, an API reference for every class and function, an FAQ and a contribution guide.",
    "Write a multithreaded web crawler in Python with a worker pool, rate limiting, robots.txt "
    "handling and retries, with full code and tests, then explain the concurrency design and "
    "every possible race condition in detail.",
    "Write a bash script that backs up a set of directories with rotation, compression, "
    "logging and e-mail alerts, with a comment on every line. Then explain each part of the "
    "script at length and describe how to test it.",
    # mathematics, many problems at once
    "Solve the following ten problems one by one, showing every step of your reasoning in "
    "full for each: (1) the sum of the first 100 odd numbers; (2) the number of ways to seat "
    "6 people at a round table; (3) the area of a triangle with sides 13, 14 and 15; (4) the "
    "roots of x^2 - 7x + 10; (5) compound interest on $1000 at 5% for 10 years; (6) the "
    "probability of two sixes in three dice rolls; (7) the 20th Fibonacci number; (8) the "
    "least common multiple of 12, 18 and 30; (9) the volume of a sphere of radius 7; (10) the "
    "derivative of x^3 * sin(x).",
    "Write a detailed, self-contained introduction to linear algebra for programmers: vectors, "
    "matrices, matrix multiplication, determinants, inverses, eigenvalues and eigenvectors, "
    "each with a worked numerical example computed by hand and the same computation in NumPy.",
    # explanations
    "Explain in a long, thorough article how the internet works, from typing a URL into a "
    "browser to the page being displayed: DNS, TCP, TLS, HTTP, routing, caching and "
    "rendering, with concrete examples at every step.",
    "Write a detailed guide to the history of computing, from the abacus and Babbage's "
    "engines through vacuum tubes, transistors, integrated circuits and personal computers to "
    "today's GPUs, with a section on each era and the people involved.",
    "Explain how operating systems manage memory, in depth: virtual memory, paging, page "
    "tables, TLBs, page faults, swapping, memory-mapped files and allocators, with a worked "
    "example for each and C code where it helps.",
    # writing
    "Write a long short story, at least 1500 words, in several chapters, about a robot who "
    "learns to paint and opens an art school, with dialogue and detailed descriptions.",
    "Write a detailed week-long lesson plan for an introductory programming course in Python: "
    "for each day the goals, a lecture outline, code examples, exercises with full solutions "
    "and a short quiz with answers.",
    "Write a comprehensive code review of a typical beginner's Python script that reads a "
    "file of numbers, computes statistics and prints a report: first write the script with "
    "its usual mistakes, then review it line by line, and finally give the fully improved "
    "version with tests.",
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


def kl_topk(
    p_ids: np.ndarray, p_lps: np.ndarray, q_ids: np.ndarray, q_lps: np.ndarray, floor: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) per position from top-K lists, over P's top-K tokens + one rest bucket.

    Returns (kl [n], imputed [n] = number of P's top-K tokens absent from Q's top-K).
    See the module docstring for the approximation. Rows may be padded with logprob -inf.
    """
    p_ids = np.asarray(p_ids, dtype=np.int64)
    q_ids = np.asarray(q_ids, dtype=np.int64)
    p = np.exp(np.asarray(p_lps, dtype=np.float64))  # [n, K]; padding -> 0
    q = np.exp(np.asarray(q_lps, dtype=np.float64))  # [n, Kq]
    p_valid = p > 0
    q_valid = q > 0
    match = (p_ids[:, :, None] == q_ids[:, None, :]) & p_valid[:, :, None] & q_valid[:, None, :]
    found = match.any(-1)  # [n, K]
    q_at_p = (match * q[:, None, :]).sum(-1)  # exact where found
    q_rest_listed = np.clip(1.0 - q.sum(-1), 0.0, 1.0)  # Q mass beyond its top-K
    q_min = np.where(q_valid, q, np.inf).min(-1)  # Q's K-th probability
    q_min = np.where(np.isfinite(q_min), q_min, 1.0)
    missing = (p_valid & ~found).sum(-1)  # [n]
    share = q_rest_listed / np.maximum(missing, 1)
    impute = np.maximum(np.minimum(q_min, share), floor)  # [n]
    q_b = np.where(found, q_at_p, impute[:, None])
    q_b = np.where(p_valid, np.maximum(q_b, floor), 0.0)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.maximum(1.0 - q_b.sum(-1), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(
            p_valid,
            p * (np.log(np.where(p_valid, p, 1.0)) - np.log(np.where(p_valid, q_b, 1.0))),
            0.0,
        )
        rest = np.where(
            p_rest > 0, p_rest * (np.log(np.where(p_rest > 0, p_rest, 1.0)) - np.log(q_rest)), 0.0
        )
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
        vals = [np.asarray(a, dtype=np.float64)[start : start + bin_size] for a in per_prompt]
        vals = np.concatenate(vals) if vals else np.zeros(0)
        vals = vals[~np.isnan(vals)]
        out.append(
            {
                "start": start,
                "end": min(start + bin_size, n),
                "count": int(vals.size),
                "mean": float(vals.mean()) if vals.size else None,
            }
        )
    return out


def _ols(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, denominator) of least-squares lines from summed [n, Sx, Sy, Sxx, Sxy] rows."""
    n, sx, sy, sxx, sxy = np.moveaxis(np.asarray(stats, dtype=np.float64), -1, 0)
    den = n * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        return (n * sxy - sx * sy) / den, den


def trend(per_prompt: list, n_boot: int = 2000, seed: int = 0, per: float = 1000.0) -> dict:
    """Linear trend of a per-position quantity over the generated positions.

    per_prompt: one 1-D sequence per prompt, entry t at generated position t (lengths may
    differ; NaN entries are skipped). One ordinary least-squares line y = a + b * t / per
    is fitted to all prompts x positions together; ``slope_per_1k`` is b (the change of y
    per ``per`` = 1000 generated tokens). Its 95% interval is the 2.5 / 97.5 percentile
    of the slope refitted on ``n_boot`` bootstrap resamples of whole prompts (drawn with
    replacement, ``np.random.default_rng(seed)``): the prompts are the independent units,
    positions within a prompt are not. With one prompt there is nothing to resample and
    ``ci95`` is None (with a note); constant data give slope 0 and [0, 0].
    Also: the mean of y over the first and over the last quarter of the positions, and
    last / first (None when the first-quarter mean is 0).
    Raises ValueError for no prompts or fewer than 2 positions with data.
    """
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in per_prompt]
    if not arrays:
        raise ValueError("trend needs at least one prompt")
    n_pos = max(a.size for a in arrays)
    has = np.zeros(n_pos, dtype=bool)
    stats = np.zeros((len(arrays), 5))
    for i, a in enumerate(arrays):
        ok = ~np.isnan(a)
        has[: a.size] |= ok
        x, y = np.flatnonzero(ok) / per, a[ok]
        stats[i] = (x.size, x.sum(), y.sum(), (x * x).sum(), (x * y).sum())
    if has.sum() < 2:
        raise ValueError(
            f"trend needs at least 2 positions with data, got {int(has.sum())}: "
            "generate more tokens per prompt"
        )
    n_pos = int(np.flatnonzero(has)[-1]) + 1
    vals = np.concatenate([a[~np.isnan(a)] for a in arrays])
    q = max(1, n_pos // 4)
    first = np.concatenate([a[:q] for a in arrays])
    last = np.concatenate([a[n_pos - q : n_pos] for a in arrays])
    first_m = float(np.nanmean(first)) if np.any(~np.isnan(first)) else None
    last_m = float(np.nanmean(last)) if np.any(~np.isnan(last)) else None
    out = {
        "mean": float(vals.mean()),
        "prompts": len(arrays),
        "positions": n_pos,
        "first_quarter": first_m,
        "last_quarter": last_m,
        "ratio": last_m / first_m if first_m and last_m is not None else None,
        "quarter_len": q,
        "n_boot": n_boot,
        "seed": seed,
    }
    notes = []
    if len(arrays) == 1:
        notes.append("one prompt: no bootstrap over prompts, no interval")
    if np.ptp(vals) == 0:
        slope, intercept = 0.0, float(vals[0])
        ci = [0.0, 0.0] if len(arrays) > 1 else None
        notes.append("constant data")
    else:
        tot = stats.sum(0)
        slope = float(_ols(tot)[0])
        intercept = float((tot[2] - slope * tot[1]) / tot[0])
        ci = None
        if len(arrays) > 1:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, len(arrays), size=(n_boot, len(arrays)))
            counts = np.zeros((n_boot, len(arrays)))
            np.add.at(counts, (np.repeat(np.arange(n_boot), len(arrays)), idx.ravel()), 1.0)
            boot = counts @ stats
            b, den = _ols(boot)
            good = den > 1e-12 * boot[:, 0] * boot[:, 3]  # >= 2 distinct positions
            if not good.all():
                notes.append(f"{n_boot - int(good.sum())} resamples with one position skipped")
            if good.any():
                ci = [float(v) for v in np.percentile(b[good], [2.5, 97.5])]
    out.update({"slope_per_1k": slope, "intercept": intercept, "ci95": ci})
    if notes:
        out["note"] = "; ".join(notes)
    return out


def trends(kl_per_prompt: list, top1_per_prompt: list, **kw) -> dict:
    """`trend` of KL and of top-1 disagreement (1 - top1); {"error": ...} where one fails."""
    out = {}
    disagreement = [1.0 - np.asarray(t, dtype=np.float64) for t in top1_per_prompt]
    for key, data in (("kl", kl_per_prompt), ("disagreement", disagreement)):
        try:
            out[key] = trend(data, **kw)
        except ValueError as exc:
            out[key] = {"error": str(exc)}
    return out


def first_eos(tokens, eos_ids) -> int | None:
    """Index of the first end-of-sequence token in a generated sequence, None if there is none."""
    eos = set(int(e) for e in eos_ids)
    return next((i for i, t in enumerate(tokens) if int(t) in eos), None)


def eos_summary(tokens_per_prompt: list, eos_ids) -> tuple[list, float]:
    """(first end-of-sequence index per prompt, share of all positions after it).

    With ignore_eos the servers keep generating after the model ends its turn; the
    positions after that token are text the model would not have produced in use."""
    firsts = [first_eos(t, eos_ids) for t in tokens_per_prompt]
    past = sum(len(t) - f - 1 for t, f in zip(tokens_per_prompt, firsts) if f is not None)
    return firsts, past / max(1, sum(len(t) for t in tokens_per_prompt))


def first_divergence(a, b) -> int | None:
    """Index of the first differing token of two sequences; None if one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def summarize_divergence(firsts: list, length: int) -> dict:
    div = [f for f in firsts if f is not None]
    return {
        "identical": len(firsts) - len(div),
        "diverged": len(div),
        "median": float(np.median(div)) if div else None,
        "min": int(min(div)) if div else None,
        "max": int(max(div)) if div else None,
        "of_length": length,
    }


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
        per_prompt.append(
            {
                "first_divergence": fd,
                "top1": float(t1.mean()),
                "kl_mean": float(kl.mean()),
                "kl": [round(float(x), 6) for x in kl],
                "top1_miss": [int(j) for j in np.flatnonzero(~t1)],
            }
        )
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
        summary["first_divergence"] = summarize_divergence(
            firsts, max(len(t) for t in gen["tokens"])
        )
    curve = {"kl": bin_positions(kl_all, bin_size), "top1": bin_positions(top1_all, bin_size)}
    return {
        "summary": summary,
        "curve": curve,
        "trend": trends(kl_all, top1_all),
        "per_prompt": per_prompt,
    }


# ----------------------------------------------------------------------------- reply parsing
def parse_generation(item: dict, max_new_tokens: int) -> dict:
    """One /generate reply (return_logprob, top_logprobs_num) -> tokens, own logprobs, top-K."""
    meta = item["meta_info"]
    otl = meta["output_token_logprobs"]
    tokens = [int(e[1]) for e in otl]
    if "output_ids" in item and list(item["output_ids"]) != tokens:
        raise RuntimeError("output_ids and output_token_logprobs disagree")
    if len(tokens) != max_new_tokens:
        raise RuntimeError(
            f"generated {len(tokens)} tokens, expected {max_new_tokens} "
            f"(finish_reason {meta.get('finish_reason')})"
        )
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
        raise RuntimeError(
            f"scoring returned {len(itl)} / {len(itop)} input logprob rows, "
            f"expected {n + 1} (prompt_len {prompt_len}); logprob_start_len "
            "semantics changed?"
        )
    ids = [int(e[1]) for e in itl[1:]]
    if ids != [int(t) for t in gen_tokens]:
        bad = first_divergence(ids, gen_tokens)
        raise RuntimeError(
            f"scoring rows are not aligned with the generated tokens (first "
            f"mismatch at {bad}): input_token_logprobs ids {ids[:8]}..., "
            f"tokens {list(gen_tokens[:8])}..."
        )
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
                    raise RuntimeError(
                        f"token {t}: logprob {lp} but top-K says {e[0]}: rows misaligned"
                    )
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
    return {
        "positions": int(n - 1),
        "max_abs_dlogp": float(diff.max()),
        "mean_abs_dlogp": float(diff.mean()),
        "p99_abs_dlogp": float(np.quantile(diff, 0.99)),
        "top1_agreement": float(top1.mean()),
        "top1_disagree_margin_gt_0.1": int((~top1 & (margin > 0.1)).sum()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


# ----------------------------------------------------------------------------- server side
def _server_module():
    sys.path.insert(0, str(HERE))
    import _server

    return _server


def build_prompts(model_path: str, n: int, texts: list[str] | None = None) -> list[list[int]]:
    """The first ``n`` of ``texts`` (default PROMPTS) as chat-template token ids."""
    from transformers import AutoTokenizer

    texts = PROMPTS if texts is None else texts
    if n > len(texts):
        raise SystemExit(f"--num-prompts {n}: only {len(texts)} prompts are defined; ask for fewer")
    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for text in texts[:n]:
        msgs = [{"role": "user", "content": text}]
        if getattr(tok, "chat_template", None):
            s = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:  # ChatML, what both GGUF models use
            s = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        out.append(list(tok(s, add_special_tokens=False).input_ids))
    return out


def eos_token_ids(model_path: str) -> list[int]:
    """End-of-sequence ids of a HF model folder (generation_config.json and config.json)."""
    ids: set[int] = set()
    for fname in ("generation_config.json", "config.json"):
        try:
            v = json.loads((Path(model_path) / fname).read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            continue
        ids.update(int(x) for x in (v if isinstance(v, list) else [v]) if x is not None)
    return sorted(ids)


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
    reply = srv_mod.post(
        srv.base + "/generate",
        {
            "input_ids": prompts,
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "temperature": 0.0,
                "ignore_eos": ignore_eos,
            },
            "return_logprob": True,
            "logprob_start_len": -1,
            "top_logprobs_num": top_k,
        },
        timeout=1200,
    )
    if isinstance(reply, dict):
        reply = [reply]
    items = [parse_generation(r, max_new_tokens) for r in reply]
    return {
        "tokens": [g["tokens"] for g in items],
        "token_lps": [g["token_lps"] for g in items],
        "top": [g["top"] for g in items],
        "seconds": round(time.time() - t0, 2),
    }


def score(srv, prompts, gen_tokens, top_k: int) -> dict:
    srv_mod = _server_module()
    t0 = time.time()
    seqs = [list(p) + list(g) for p, g in zip(prompts, gen_tokens)]
    reply = srv_mod.post(
        srv.base + "/generate",
        {
            "input_ids": seqs,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": [len(p) - 1 for p in prompts],
            "top_logprobs_num": top_k,
        },
        timeout=1200,
    )
    if isinstance(reply, dict):
        reply = [reply]
    items = [parse_scoring(r, len(p), g) for r, p, g in zip(reply, prompts, gen_tokens)]
    return {
        "token_lps": [s["token_lps"] for s in items],
        "top": [s["top"] for s in items],
        "seconds": round(time.time() - t0, 2),
    }


def prompt_logprobs(srv, seqs, top_k: int) -> list[dict]:
    srv_mod = _server_module()
    reply = srv_mod.post(
        srv.base + "/generate",
        {
            "input_ids": seqs,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": top_k,
        },
        timeout=1200,
    )
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
    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for name in dtypes:
        dt = {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
        }[name]
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
            errors.append(
                f"  {name}: {lines[0][:200]}"
                + (f" ... {lines[-1][:200]}" if len(lines) > 1 else "")
            )
            continue
        s = r["summary"]
        fd = s.get("first_divergence") or {}
        if not fd:
            fdt = "-"
        elif not fd["diverged"]:
            fdt = f"identical in all {fd['identical']}"
        else:
            fdt = (
                f"{fd['identical']} identical; {fd['diverged']} diverge at "
                f"{fd['min']}..{fd['max']} (median {fd['median']:.0f})"
            )
        rows.append(
            (
                name,
                f"{100 * s['top1_agreement']:.2f}%",
                f"{s['kl_mean']:.5f}",
                f"{s['kl_p99']:.4f}",
                f"{s['abs_dlogp_mean']:.4f}",
                f"{100 * s['kl_imputed_frac']:.1f}%",
                fdt,
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if errors:
        print("errors:")
        print("\n".join(errors))


def print_curves(results: dict) -> None:
    """Mean KL and top-1 agreement per position bin, then the trend table (`print_trends`)."""
    names = [n for n, r in results.items() if "curve" in r]
    if not names:
        return
    bins = max((results[n]["curve"]["kl"] for n in names), key=len)
    for key, title, fmt in (("kl", "mean KL", "{:9.5f}"), ("top1", "top-1 agreement", "{:9.2%}")):
        print(f"\n{title} by position (teacher forced):")
        print("  pos         " + "  ".join(f"{n:>9s}" for n in names))
        for b in range(len(bins)):
            vals = []
            for n in names:
                c = results[n]["curve"][key]
                vals.append(
                    fmt.format(c[b]["mean"]) if b < len(c) and c[b]["mean"] is not None else " " * 9
                )
            print(f"  {bins[b]['start']:5d}-{bins[b]['end']:<5d} " + "  ".join(vals))
    print_trends(results)


def _fmt_trend(t: dict | None) -> tuple[str, str, str, str]:
    if not t:
        return ("-", "", "", "")
    if "error" in t:
        return (f"({t['error'][:60]})", "", "", "")
    ci = t.get("ci95")
    slope = f"{t['slope_per_1k']:+.2e}" + (f" [{ci[0]:+.2e}, {ci[1]:+.2e}]" if ci else " [no CI]")
    ratio = f"{t['ratio']:.2f}" if t.get("ratio") is not None else "-"

    def num(v):
        return f"{v:.5f}" if v is not None else "-"

    return (slope, num(t.get("first_quarter")), num(t.get("last_quarter")), ratio)


def print_trends(results: dict) -> None:
    """Per config: OLS slope per 1000 generated tokens with its bootstrap 95% CI, the first-
    and last-quarter means and their ratio, for KL and for top-1 disagreement."""
    names = [n for n, r in results.items() if r.get("trend")]
    if not names:
        return
    rows = [
        (
            "config",
            "KL slope/1k tok [95% CI]",
            "KL q1",
            "KL q4",
            "q4/q1",
            "disagree slope/1k [95% CI]",
            "dis q1",
            "dis q4",
            "q4/q1",
            "past EOS",
        )
    ]
    for n in names:
        t = results[n]["trend"]
        eos = results[n].get("summary", {}).get("past_eos_frac")
        rows.append(
            (
                n,
                *_fmt_trend(t.get("kl")),
                *_fmt_trend(t.get("disagreement")),
                f"{eos:.0%}" if eos is not None else "-",
            )
        )
    any_t = next(iter(results[names[0]]["trend"].values()))
    print(
        f"\ntrend over generated positions (least squares over prompts x positions; 95% CI: "
        f"{any_t.get('n_boot', '?')} bootstrap resamples of prompts; q1 / q4: first / last "
        f"quarter of the positions):"
    )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    notes = {
        f"{n} {k}: {v['note']}"
        for n in names
        for k, v in results[n]["trend"].items()
        if isinstance(v, dict) and v.get("note")
    }
    for line in sorted(notes):
        print(f"  note: {line}")


# ----------------------------------------------------------------------------- main
def apply_preset(args, error) -> list[str]:
    """Fill in --max-new-tokens and --bin-size (256 / 32, or 1024 / 64 with --long) and
    return the prompt texts; ``error`` (argparse's) for --long with fewer than 1024 tokens."""
    if args.long and args.max_new_tokens is not None and args.max_new_tokens < LONG_MIN_TOKENS:
        error(
            f"--long measures at least {LONG_MIN_TOKENS} generated tokens: give "
            f"--max-new-tokens >= {LONG_MIN_TOKENS} or drop --long"
        )
    if args.max_new_tokens is None:
        args.max_new_tokens = LONG_MIN_TOKENS if args.long else 256
    if args.bin_size is None:
        args.bin_size = 64 if args.long else 32
    if args.max_new_tokens < 1 or args.bin_size < 1:
        error("--max-new-tokens and --bin-size must be positive")
    return LONG_PROMPTS if args.long else PROMPTS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    ap.add_argument(
        "--model-path", required=True, help="bf16 HF folder (config, tokenizer, weights)"
    )
    ap.add_argument(
        "--configs",
        default="fp8,k4v4,k3v3",
        help="comma list of configs under test: labels of sglang_tq.bench.configs "
        "(bf16, fp8, bf16-triton, fp8-triton, kXvY, kXvY-nc), a TurboQuant "
        "label plus -pp and/or -c, or names given with --config; the teacher "
        "(--teacher) always runs and is left out here; '' for none",
    )
    ap.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        choices=TEACHER_LABELS,
        help=f"the bf16 server that scores every config (default {DEFAULT_TEACHER}: "
        "bf16 KV on SGLang's Triton backend)",
    )
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="define a config, e.g. --config 'k4v2bf=--kv-quant turboquant "
        "--kv-quant-bits k4v2 --kv-quant-bf16-layers 0,1'",
    )
    ap.add_argument(
        "--key-centers",
        default=None,
        metavar="FILE",
        help="key centers file (python -m sglang_tq.tools.key_centers) for configs named <config>-c, "
        "e.g. k4v4-c",
    )
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default 256; {LONG_MIN_TOKENS} with --long, which refuses fewer",
    )
    ap.add_argument("--top-k", type=int, default=20, help="top_logprobs_num (default 20)")
    ap.add_argument("--bin-size", type=int, default=None, help="default 32; 64 with --long")
    ap.add_argument(
        "--long",
        action="store_true",
        help=f"long-generation preset: LONG_PROMPTS, >= {LONG_MIN_TOKENS} new tokens "
        f"(default {LONG_MIN_TOKENS}), bins of 64 positions",
    )
    ap.add_argument(
        "--common-server-args",
        default=COMMON_SERVER_ARGS,
        help=f"flags of every server (default: {COMMON_SERVER_ARGS!r})",
    )
    ap.add_argument("--server-args", default="", help="extra flags appended for every server")
    ap.add_argument("--startup-timeout", type=float, default=420)
    ap.add_argument(
        "--check-hf",
        action="store_true",
        help="also compare SGLang bf16 prompt logprobs with the HF model",
    )
    ap.add_argument("--hf-prompts", type=int, default=4)
    ap.add_argument("--hf-dtypes", default="bfloat16,float32")
    ap.add_argument("--hf-device", default=None, help="default: cuda if available")
    ap.add_argument(
        "--work-dir",
        default=None,
        help="raw generations/scores, server logs (default /tmp/fidelity/<model>)",
    )
    ap.add_argument("--log-dir", default=None, help="server logs (default: the work dir)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached work files")
    ap.add_argument("--out", default="fidelity.json")
    args = ap.parse_args(argv)
    texts = apply_preset(args, ap.error)

    ref = args.teacher
    custom = parse_config_specs(args.config, ap.error)
    under_test = []
    for c in (c.strip() for c in args.configs.split(",")):
        if c and c != ref and c not in under_test:
            under_test.append(c)
    add_centered_configs(under_test, custom, args.key_centers, ap.error)
    for c in [ref, *under_test]:
        try:
            if c not in custom and c.endswith("-b"):  # boundary layers: count the model's
                from sglang_tq.bench.configs import kv_server_flags

                custom[c] = kv_server_flags(c, args.model_path)
            config_flags(c, custom)  # fail early on unknown names
        except ValueError as exc:
            ap.error(str(exc))

    # `timeout` sends SIGTERM: turn it into an exception so that the `with Server` blocks
    # stop their servers (they run in their own sessions and would outlive us otherwise)
    def _on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _on_term)

    from sglang_tq.provenance import provenance

    srv_mod = _server_module()
    model_path = str(Path(args.model_path).resolve())
    work = Path(args.work_dir or f"/tmp/fidelity/{Path(model_path).name}")
    work.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or work)
    log_dir.mkdir(parents=True, exist_ok=True)
    common = shlex.split(args.common_server_args) + shlex.split(args.server_args)
    ignore_eos = True  # every sequence is exactly --max-new-tokens long

    t_start = time.time()
    prompts = build_prompts(model_path, args.num_prompts, texts)
    print(
        f"{len(prompts)} prompts, {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
        f"{args.max_new_tokens} new tokens each, top-{args.top_k}",
        flush=True,
    )
    gen_settings = {
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "top_k": args.top_k,
        "ignore_eos": ignore_eos,
        "common": common,
        "model": model_path,
    }
    weights = sorted(Path(model_path).glob("*.safetensors"))
    gen_settings["weights"] = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]

    result = {
        **provenance(),
        "model_path": model_path,
        "teacher": ref,
        "settings": {
            **{k: v for k, v in gen_settings.items() if k != "prompts"},
            "bin_size": args.bin_size,
            "long": args.long,
            "prompt_set": "LONG_PROMPTS" if args.long else "PROMPTS",
        },
        "prompts": texts[: args.num_prompts],
        "prompt_lens": [len(p) for p in prompts],
        "kl_approximation": "bucketed top-K: P's top-K tokens + rest bucket; Q imputed "
        "min(Q K-th prob, Q unlisted mass / #missing) where missing",
        "configs": {},
        "timings": {},
    }
    try:
        conv = json.loads((Path(model_path) / "conversion.json").read_text())
        result["model_conversion"] = {
            k: conv.get(k)
            for k in ("source_gguf", "source_sha256", "rope_theta", "weights_sha256", "fixes")
        }
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
        srv = srv_mod.Server(
            model_path,
            [*common, *flags],
            str(log_dir / f"server_{name}.log"),
            startup_timeout=args.startup_timeout,
        )
        try:
            with srv:
                g = generate(srv, prompts, args.max_new_tokens, args.top_k, ignore_eos)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] FAILED: {errors[name][:2000]}", flush=True)
            continue
        server_info[name] = {
            "flags": flags,
            "startup_s": srv.startup_s,
            "generate_s": g["seconds"],
            "log": srv.log_path,
        }
        print(
            f"[{name}] generated {len(g['tokens'])} x {args.max_new_tokens} tokens in "
            f"{g['seconds']} s (startup {srv.startup_s} s)",
            flush=True,
        )
        gens[name] = g
        _save(path, {"key": key, "gen": g, "server": server_info[name]})

    # ---- 2. the teacher (bf16): own generation, scoring, HF prompt logprobs -------
    scores: dict[str, dict] = {}
    hf_sg = None
    bf16_path = work / f"gen_{ref}.json"
    bf16_key = gen_key(ref)
    cached = _cached(bf16_path, bf16_key, args.fresh)
    if cached:
        gens[ref] = cached["gen"]
        server_info[ref] = cached.get("server", {})
    score_keys = {
        n: _digest({"gen": gen_key(n), "bf16": bf16_key, "tokens": gens[n]["tokens"]}) for n in gens
    }
    todo = [n for n in [*under_test, ref] if n in gens or n == ref]
    for n in list(todo):
        if n in gens:
            c = _cached(work / f"score_{n}.json", score_keys[n], args.fresh)
            if c:
                scores[n] = c["score"]
    hf_path = work / "hf_sglang.json"
    need_hf_sg = args.check_hf
    if need_hf_sg and ref in gens:
        hf_key = _digest({"bf16": bf16_key, "n": args.hf_prompts})
        c = _cached(hf_path, hf_key, args.fresh)
        if c:
            hf_sg = c["data"]
            need_hf_sg = False
    need_server = ref not in gens or any(n not in scores for n in gens) or need_hf_sg
    if need_server:
        flags = config_flags(ref, custom)
        print(f"[{ref}] starting the teacher server: {' '.join(flags)}", flush=True)
        srv = srv_mod.Server(
            model_path,
            [*common, *flags],
            str(log_dir / f"server_{ref}.log"),
            startup_timeout=args.startup_timeout,
        )
        try:
            with srv:
                if ref not in gens:
                    g = generate(srv, prompts, args.max_new_tokens, args.top_k, ignore_eos)
                    gens[ref] = g
                    server_info[ref] = {
                        "flags": flags,
                        "startup_s": srv.startup_s,
                        "generate_s": g["seconds"],
                        "log": srv.log_path,
                    }
                    _save(bf16_path, {"key": bf16_key, "gen": g, "server": server_info[ref]})
                    print(
                        f"[{ref}] generated in {g['seconds']} s (startup {srv.startup_s} s)",
                        flush=True,
                    )
                    score_keys[ref] = _digest(
                        {"gen": bf16_key, "bf16": bf16_key, "tokens": g["tokens"]}
                    )
                try:  # not essential: logprob_start_len already stops prefix reuse of the scored part
                    srv_mod.post(srv.base + "/flush_cache", {}, timeout=60)
                except Exception as exc:
                    print(f"[{ref}] note: /flush_cache failed ({exc}); continuing", flush=True)
                for n in [*[x for x in under_test if x in gens], ref]:
                    if n in scores:
                        continue
                    s = score(srv, prompts, gens[n]["tokens"], args.top_k)
                    scores[n] = s
                    _save(work / f"score_{n}.json", {"key": score_keys[n], "score": s})
                    print(f"[{ref}] scored {n} in {s['seconds']} s", flush=True)
                if need_hf_sg:
                    seqs = [
                        list(p) + list(t)
                        for p, t in zip(
                            prompts[: args.hf_prompts], gens[ref]["tokens"][: args.hf_prompts]
                        )
                    ]
                    hf_sg = {"seqs": seqs, "sglang": prompt_logprobs(srv, seqs, args.top_k)}
                    _save(
                        hf_path,
                        {"key": _digest({"bf16": bf16_key, "n": args.hf_prompts}), "data": hf_sg},
                    )
        except Exception as exc:
            errors[ref] = f"{type(exc).__name__}: {exc}"
            print(f"[{ref}] FAILED: {errors[ref][:2000]}", flush=True)
    result["timings"]["servers_done_s"] = round(time.time() - t_start, 1)

    # ---- 3. metrics -------------------------------------------------------------
    ref_tokens = gens.get(ref, {}).get("tokens")
    eos_ids = eos_token_ids(model_path)
    result["eos_token_ids"] = eos_ids
    for n in [ref, *under_test]:
        entry = {"flags": config_flags(n, custom), "server": server_info.get(n, {})}
        if n in errors:
            entry["error"] = errors[n]
        if n in gens and n in scores:
            entry.update(score_config(gens[n], scores[n], ref_tokens, args.bin_size))
            entry["first_eos"], entry["summary"]["past_eos_frac"] = eos_summary(
                gens[n]["tokens"], eos_ids
            )
            entry["tokens"] = gens[n]["tokens"]
        elif "error" not in entry:
            entry["error"] = f"not scored (the teacher server {ref} failed?)"
        result["configs"][n] = entry

    # ---- 4. HF reference ----------------------------------------------------------
    if args.check_hf:
        if hf_sg is None:
            result["hf_check"] = {"error": f"no SGLang prompt logprobs (teacher {ref} failed?)"}
        else:
            t0 = time.time()
            try:
                ref = hf_reference(
                    model_path,
                    hf_sg["seqs"],
                    [d.strip() for d in args.hf_dtypes.split(",") if d.strip()],
                    args.hf_device,
                )
                hf = {}
                for dt, r in ref.items():
                    per = [
                        compare_logprobs(s, sg["token_lps"], sg["top"], lp)
                        for s, sg, lp in zip(hf_sg["seqs"], hf_sg["sglang"], r["logprobs"])
                    ]
                    pos = sum(p["positions"] for p in per)
                    hf[dt] = {
                        "device": r["device"],
                        "sequences": len(per),
                        "positions": pos,
                        "max_abs_dlogp": max(p["max_abs_dlogp"] for p in per),
                        "mean_abs_dlogp": sum(p["mean_abs_dlogp"] * p["positions"] for p in per)
                        / pos,
                        "top1_agreement": sum(p["top1_agreement"] * p["positions"] for p in per)
                        / pos,
                        "top1_disagree_margin_gt_0.1": sum(
                            p["top1_disagree_margin_gt_0.1"] for p in per
                        ),
                        "kl_mean": sum(p["kl_mean"] * p["positions"] for p in per) / pos,
                        "per_sequence": per,
                    }
                hf["seconds"] = round(time.time() - t0, 1)
                result["hf_check"] = hf
            except Exception as exc:
                result["hf_check"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["timings"]["total_s"] = round(time.time() - t_start, 1)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    # ---- 5. summary -----------------------------------------------------------------
    print(
        f"\n{Path(model_path).name}: {args.num_prompts} prompts x {args.max_new_tokens} greedy "
        f"tokens, teacher-forced against {ref} prefill, KL over top-{args.top_k} + rest"
    )
    print_table(result["configs"])
    print_curves(result["configs"])
    if "hf_check" in result:
        h = result["hf_check"]
        print("\nSGLang bf16 vs HF transformers (prompt + bf16 output logprobs):")
        if "error" in h:
            print(f"  ERROR: {h['error']}")
        for dt, v in h.items():
            if isinstance(v, dict) and "top1_agreement" in v:
                print(
                    f"  HF {dt:9s} ({v['device']}): {v['positions']} positions, top-1 "
                    f"{100 * v['top1_agreement']:.2f}% ({v['top1_disagree_margin_gt_0.1']} with "
                    f"margin > 0.1), |dlogp| max {v['max_abs_dlogp']:.4f} mean "
                    f"{v['mean_abs_dlogp']:.5f}, KL {v['kl_mean']:.2e}"
                )
    print(f"\nwrote {args.out} ({time.time() - t_start:.0f} s)")
    ok = not errors and all("summary" in c for c in result["configs"].values())
    if args.check_hf:
        ok = ok and "error" not in result.get("hf_check", {"error": 1})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
