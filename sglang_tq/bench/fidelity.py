"""KV-cache fidelity on a real model: quantized KV against bf16, teacher-forced, at decode time.

    python -m sglang_tq.bench fidelity --model-path /tmp/models/smollm2-bf16 \\
        --configs fp8,k4v4,k3v3 --check-hf --out fidelity_smollm2.json

On the GPU host (after the model pieces were staged, see dev/gpu_host/fetch_models.py), in the
call that carries the SGLang bundle:

    export PYTHONUNBUFFERED=1 SGLANG_TQ_COMMIT=<commit>; source dev/gpu_host/gpu_host_setup.sh \\
      && M=$(bash dev/gpu_host/unpack_model.sh smollm2) \\
      && timeout -s TERM 540 python3 -m sglang_tq.bench fidelity --model-path "$M" \\
           --configs fp8,k4v4,k3v3 --check-hf --log-dir $OUT/logs --out $OUT/fidelity_smollm2.json

A run cut off by `timeout` stops its server (SIGTERM is handled) and the same command
in the next call resumes from the work files in /tmp/fidelity/<model> (while the host
keeps its /tmp, i.e. calls back to back).

Long generation (issue 14: does the error accumulate?), then the plot here:

    python -m sglang_tq.bench fidelity --model-path "$M" --long \\
        --configs fp8,k4v4,k4v4-nc,k3v3 --out $OUT/fidelity_long.json
    python -m sglang_tq.bench plot-fidelity fidelity_long.json --out fidelity_long.png

What it does
------------
1. Builds --num-prompts (20) chat prompts with the model's chat template (math word
   problems, code, explanations, writing; with --long the LONG_PROMPTS), tokenized here,
   sent as input_ids (:mod:`sglang_tq.bench.prompts`).
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
   the config's own greedy text), :mod:`sglang_tq.bench.fidelity_metrics`:
   * top1: is the generated token (the config's argmax) the bf16 argmax?
   * KL(bf16 || config), from the two top-K lists (``kl_topk``; the approximation is
     described there);
   * |dlogp|: |config's logprob of its token - bf16's logprob of it|, exact;
   * bf16 NLL of the generated token, exact.
   Means over all prompts x positions, a curve binned by position (--bin-size), the
   trend over position (``trend``, below), and the first position where the config's
   greedy text leaves the teacher's own greedy text.
   The teacher's row (named after it, e.g. bf16-triton) is the noise floor: bf16 decode
   kernels scored by bf16 prefill kernels of the same backend.
5. --check-hf: the bf16 server also returns prompt logprobs (``logprob_start_len=0``) for
   the first --hf-prompts sequences (prompt + bf16 output); after the servers stop, the
   Hugging Face model computes the same positions (``--hf-dtypes``, default bf16 and fp32)
   and we report the max / mean |logprob difference| of the actual tokens, top-1 agreement
   and KL(HF || SGLang). This is the "SGLang bf16 matches the HF reference" check; a wrong
   RoPE base or weight layout shows up as top-1 agreement far below 95%.

The requests, and the checks of SGLang's logprob rows, are those of
:mod:`sglang_tq.bench.generation` (its docstring names the SGLang API they rely on).

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
models see the same prefix) but is text it would not produce in use; ``first_eos`` per
prompt and ``past_eos_frac`` record how much of it there is.
``trend`` fits one least-squares line to KL(position) over all prompts x positions
(position in units of 1000 generated tokens) and gives its slope with a 95% interval from
a bootstrap over prompts (2000 resamples, seed 0; prompts are the independent units), the
mean of the first and of the last quarter of the positions and their ratio; the same for
top-1 disagreement (1 - top1). The slope also moves with the text: a run of easy tokens
late in the answers lowers KL whatever the cache does, so read a config's slope against
the teacher row's. ``python -m sglang_tq.bench plot-fidelity`` draws the per-bin curves
as a PNG.

Servers run with --skip-tokenizer-init (token ids in and out) plus --common-server-args;
each config adds its flags (``config_flags``). Work files (raw generations, scores) go to
--work-dir and are reused on a rerun with identical settings (--fresh to redo), so a run
cut off by a time limit resumes where it stopped. Provenance is taken in a child process
(:func:`sglang_tq.bench.results.get_provenance`), so no CUDA context lives here while the
servers size their pools; the result is written once, at the end (--out; by default a
file in benchmarks/results/fidelity/ named by gpu and commit).

This module imports numpy and the standard library; transformers (the tokenizer, the HF
check) and torch are imported only inside the functions that need them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sglang_tq.bench import fidelity_metrics as fm
from sglang_tq.bench.cli import add_model_path, add_out, default_out, doc_parser
from sglang_tq.bench.configs import kv_server_flags
from sglang_tq.bench.generation import (
    add_centered_configs,
    add_server_options,
    check_alignment,
    config_flags,
    exit_on_sigterm,
    parse_config_specs,
    parse_generation,
    parse_scoring,
    post_generate,
    split_flags,
    started,
)
from sglang_tq.bench.hf_reference import full_logprobs
from sglang_tq.bench.prompts import LONG_PROMPTS, PROMPTS, build_prompts
from sglang_tq.bench.results import get_provenance, write_doc, write_lines_atomic
from sglang_tq.bench.server import SGLangServer, flush

TOOL = "fidelity"
# The bf16 server that scores every config (the teacher) and whose own greedy generation
# is the noise-floor row; a label of sglang_tq.bench.configs that keeps bf16 KV.
DEFAULT_TEACHER = "bf16-triton"
TEACHER_LABELS = ("bf16-triton", "bf16", "bf16-fa3")
LONG_MIN_TOKENS = 1024
KL_APPROXIMATION = (
    "bucketed top-K: P's top-K tokens + rest bucket; Q imputed "
    "min(Q K-th prob, Q unlisted mass / #missing) where missing"
)


# ----------------------------------------------------------------------------- requests
def generate(base_url: str, prompts, max_new_tokens: int, top_k: int, ignore_eos: bool) -> dict:
    """Greedy generation of every prompt with its own top-K per step (one batch request)."""
    t0 = time.time()
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": ignore_eos}
    reply = post_generate(base_url, prompts, sampling, top_k=top_k, logprob_start_len=-1)
    items = [parse_generation(r, max_new_tokens) for r in reply]
    return {
        "tokens": [g["tokens"] for g in items],
        "token_lps": [g["token_lps"] for g in items],
        "top": [g["top"] for g in items],
        "seconds": round(time.time() - t0, 2),
    }


def score(base_url: str, prompts, gen_tokens, top_k: int) -> dict:
    """The teacher's logprob and top-K at every generated position of prompt + tokens."""
    t0 = time.time()
    seqs = [list(p) + list(g) for p, g in zip(prompts, gen_tokens)]
    reply = post_generate(
        base_url,
        seqs,
        {"max_new_tokens": 1, "temperature": 0.0},
        top_k=top_k,
        logprob_start_len=[len(p) - 1 for p in prompts],
    )
    items = [parse_scoring(r, len(p), g) for r, p, g in zip(reply, prompts, gen_tokens)]
    return {
        "token_lps": [s["token_lps"] for s in items],
        "top": [s["top"] for s in items],
        "seconds": round(time.time() - t0, 2),
    }


def prompt_logprobs(base_url: str, seqs, top_k: int) -> list[dict]:
    """Logprob and top-K of every token of each sequence (``logprob_start_len=0``)."""
    reply = post_generate(
        base_url, seqs, {"max_new_tokens": 1, "temperature": 0.0}, top_k=top_k, logprob_start_len=0
    )
    out = []
    for r, s in zip(reply, seqs):
        itl, itop = r["meta_info"]["input_token_logprobs"], r["meta_info"]["input_top_logprobs"]
        if len(itl) != len(s) or [int(e[1]) for e in itl] != list(s):
            raise RuntimeError("prompt logprobs not aligned with the input tokens")
        check_alignment(s[1:], [e[0] for e in itl[1:]], itop[1:])
        out.append({"token_lps": [e[0] for e in itl], "top": itop})
    return out


# ----------------------------------------------------------------------------- work files
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
    write_lines_atomic(path, [json.dumps(data)])


# ----------------------------------------------------------------------------- one run
@dataclass
class FidelityRun:
    """The state of one run: settings, generations, teacher scores and errors per config."""

    args: argparse.Namespace
    model_path: str
    prompts: list[list[int]]
    work: Path
    log_dir: Path
    common: list[str]
    settings: dict
    gens: dict[str, dict] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    server_info: dict[str, dict] = field(default_factory=dict)
    hf_sg: dict | None = None

    @classmethod
    def create(cls, args: argparse.Namespace) -> FidelityRun:
        model_path = str(Path(args.model_path).resolve())
        work = Path(args.work_dir or f"/tmp/fidelity/{Path(model_path).name}")
        work.mkdir(parents=True, exist_ok=True)
        log_dir = Path(args.log_dir or work)
        log_dir.mkdir(parents=True, exist_ok=True)
        common = split_flags(args.common_server_args, args.server_args)
        prompts = build_prompts(model_path, args.num_prompts, args.texts)
        print(
            f"{len(prompts)} prompts, {min(map(len, prompts))}-{max(map(len, prompts))} "
            f"tokens; {args.max_new_tokens} new tokens each, top-{args.top_k}",
            flush=True,
        )
        weights = sorted(Path(model_path).glob("*.safetensors"))
        settings = {
            "prompts": prompts,
            "max_new_tokens": args.max_new_tokens,
            "top_k": args.top_k,
            "ignore_eos": True,  # every sequence is exactly --max-new-tokens long
            "common": common,
            "model": model_path,
            "weights": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights],
        }
        return cls(args, model_path, prompts, work, log_dir, common, settings)

    @property
    def teacher(self) -> str:
        return self.args.teacher

    def flags(self, name: str) -> list[str]:
        return config_flags(name, self.args.custom)

    def gen_key(self, name: str) -> str:
        return _digest({**self.settings, "flags": self.flags(name)})

    def score_key(self, name: str) -> str:
        tokens = self.gens[name]["tokens"]
        return _digest(
            {"gen": self.gen_key(name), "bf16": self.gen_key(self.teacher), "tokens": tokens}
        )

    def server(self, name: str, role: str = "server") -> SGLangServer:
        flags = self.flags(name)
        print(f"[{name}] starting {role}: {' '.join(flags)}", flush=True)
        return SGLangServer(
            self.model_path, [*self.common, *flags], self.log_dir / f"server_{name}.log"
        )

    def generate_on(self, srv: SGLangServer, name: str) -> dict:
        a = self.args
        g = generate(srv.base_url, self.prompts, a.max_new_tokens, a.top_k, True)
        self.gens[name] = g
        self.server_info[name] = {
            "flags": self.flags(name),
            "startup_s": srv.startup_s,
            "generate_s": g["seconds"],
            "log": str(srv.log_path),
        }
        info = {"key": self.gen_key(name), "gen": g, "server": self.server_info[name]}
        _save(self.work / f"gen_{name}.json", info)
        return g

    def load_generation(self, name: str) -> bool:
        cached = _cached(self.work / f"gen_{name}.json", self.gen_key(name), self.args.fresh)
        if cached:
            self.gens[name] = cached["gen"]
            self.server_info[name] = cached.get("server", {})
        return bool(cached)

    def fail(self, name: str, exc: Exception) -> None:
        self.errors[name] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {self.errors[name][:2000]}", flush=True)

    # ---- 1. each config under test generates
    def generate_under_test(self) -> None:
        for name in self.args.under_test:
            if self.load_generation(name):
                print(f"[{name}] generation cached in {self.work / f'gen_{name}.json'}", flush=True)
                continue
            srv = self.server(name)
            try:
                with started(srv, self.args.startup_timeout):
                    g = self.generate_on(srv, name)
            except Exception as exc:
                self.fail(name, exc)
                continue
            print(
                f"[{name}] generated {len(g['tokens'])} x {self.args.max_new_tokens} tokens in "
                f"{g['seconds']} s (startup {srv.startup_s} s)",
                flush=True,
            )

    # ---- 2. the teacher (bf16): own generation, scoring, HF prompt logprobs
    def run_teacher(self) -> None:
        ref, a = self.teacher, self.args
        self.load_generation(ref)
        for n in self.gens:
            c = _cached(self.work / f"score_{n}.json", self.score_key(n), a.fresh)
            if c:
                self.scores[n] = c["score"]
        hf_key = _digest({"bf16": self.gen_key(ref), "n": a.hf_prompts})
        need_hf = a.check_hf
        if need_hf and ref in self.gens:
            c = _cached(self.work / "hf_sglang.json", hf_key, a.fresh)
            if c:
                self.hf_sg, need_hf = c["data"], False
        if ref in self.gens and all(n in self.scores for n in self.gens) and not need_hf:
            return
        srv = self.server(ref, "the teacher server")
        try:
            with started(srv, a.startup_timeout):
                self.teacher_session(srv, hf_key if need_hf else None)
        except Exception as exc:
            self.fail(ref, exc)

    def teacher_session(self, srv: SGLangServer, hf_key: str | None) -> None:
        ref, a = self.teacher, self.args
        if ref not in self.gens:
            g = self.generate_on(srv, ref)
            print(f"[{ref}] generated in {g['seconds']} s (startup {srv.startup_s} s)", flush=True)
        try:  # not essential: logprob_start_len already stops prefix reuse of the scored part
            flush(srv.base_url)
        except RuntimeError as exc:
            print(f"[{ref}] note: /flush_cache failed ({exc}); continuing", flush=True)
        for n in [*[x for x in a.under_test if x in self.gens], ref]:
            if n in self.scores:
                continue
            s = score(srv.base_url, self.prompts, self.gens[n]["tokens"], a.top_k)
            self.scores[n] = s
            _save(self.work / f"score_{n}.json", {"key": self.score_key(n), "score": s})
            print(f"[{ref}] scored {n} in {s['seconds']} s", flush=True)
        if hf_key is not None:
            n = a.hf_prompts
            pairs = zip(self.prompts[:n], self.gens[ref]["tokens"][:n])
            seqs = [list(p) + list(t) for p, t in pairs]
            self.hf_sg = {"seqs": seqs, "sglang": prompt_logprobs(srv.base_url, seqs, a.top_k)}
            _save(self.work / "hf_sglang.json", {"key": hf_key, "data": self.hf_sg})

    # ---- 3. metrics
    def config_entries(self, eos_ids: list[int]) -> dict:
        ref = self.teacher
        ref_tokens = self.gens.get(ref, {}).get("tokens")
        out = {}
        for n in [ref, *self.args.under_test]:
            entry = {"flags": self.flags(n), "server": self.server_info.get(n, {})}
            if n in self.errors:
                entry["error"] = self.errors[n]
            if n in self.gens and n in self.scores:
                entry.update(
                    fm.score_config(self.gens[n], self.scores[n], ref_tokens, self.args.bin_size)
                )
                entry["first_eos"], entry["summary"]["past_eos_frac"] = fm.eos_summary(
                    self.gens[n]["tokens"], eos_ids
                )
                entry["tokens"] = self.gens[n]["tokens"]
            elif "error" not in entry:
                entry["error"] = f"not scored (the teacher server {ref} failed?)"
            out[n] = entry
        return out

    # ---- 4. HF reference
    def hf_check(self) -> dict:
        if self.hf_sg is None:
            return {"error": f"no SGLang prompt logprobs (teacher {self.teacher} failed?)"}
        t0 = time.time()
        a, seqs, sg = self.args, self.hf_sg["seqs"], self.hf_sg["sglang"]
        try:
            dtypes = [d.strip() for d in a.hf_dtypes.split(",") if d.strip()]
            hf = {}
            for dt, r in full_logprobs(self.model_path, seqs, dtypes, a.hf_device).items():
                per = [
                    fm.compare_logprobs(s, x["token_lps"], x["top"], lp)
                    for s, x, lp in zip(seqs, sg, r["logprobs"])
                ]
                hf[dt] = {"device": r["device"], **fm.pool_logprob_checks(per)}
            hf["seconds"] = round(time.time() - t0, 1)
            return hf
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    def new_result(self, prov: dict) -> dict:
        a = self.args
        result = {
            **prov,
            "model_path": self.model_path,
            "teacher": self.teacher,
            "settings": {
                **{k: v for k, v in self.settings.items() if k != "prompts"},
                "bin_size": a.bin_size,
                "long": a.long,
                "prompt_set": "LONG_PROMPTS" if a.long else "PROMPTS",
            },
            "prompts": a.texts[: a.num_prompts],
            "prompt_lens": [len(p) for p in self.prompts],
            "kl_approximation": KL_APPROXIMATION,
            "configs": {},
            "timings": {},
        }
        try:
            conv = json.loads((Path(self.model_path) / "conversion.json").read_text())
            keys = ("source_gguf", "source_sha256", "rope_theta", "weights_sha256", "fixes")
            result["model_conversion"] = {k: conv.get(k) for k in keys}
        except (OSError, json.JSONDecodeError):
            pass
        return result


# ----------------------------------------------------------------------------- report
def print_summary(result: dict, args: argparse.Namespace) -> None:
    print(
        f"\n{Path(result['model_path']).name}: {args.num_prompts} prompts x "
        f"{args.max_new_tokens} greedy tokens, teacher-forced against {args.teacher} "
        f"prefill, KL over top-{args.top_k} + rest"
    )
    fm.print_table(result["configs"])
    fm.print_curves(result["configs"])
    if "hf_check" not in result:
        return
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


# ----------------------------------------------------------------------------- arguments
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


def resolve_configs(args, error) -> None:
    """Set ``args.custom`` ({name: flags}: --config, the -c and -b names) and
    ``args.under_test`` (--configs without the teacher, in order); ``error`` (argparse's)
    for an unknown name, before any server starts."""
    ref = args.teacher
    args.custom = parse_config_specs(args.config, error)
    args.under_test = []
    for c in (c.strip() for c in args.configs.split(",")):
        if c and c != ref and c not in args.under_test:
            args.under_test.append(c)
    add_centered_configs(args.under_test, args.custom, args.key_centers, error)
    for c in [ref, *args.under_test]:
        try:
            if c not in args.custom and c.endswith("-b"):  # boundary layers: count the model's
                args.custom[c] = kv_server_flags(c, args.model_path)
            config_flags(c, args.custom)
        except ValueError as exc:
            error(str(exc))


def _add_config_args(ap: argparse.ArgumentParser) -> None:
    add_model_path(ap, required=True, help="bf16 HF folder (config, tokenizer, weights)")
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
        "--key-centers",
        default=None,
        metavar="FILE",
        help="key centers file (python -m sglang_tq.tools.key_centers) for configs named "
        "<config>-c, e.g. k4v4-c",
    )
    add_server_options(ap)


def _add_run_args(ap: argparse.ArgumentParser) -> None:
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
    add_out(ap, TOOL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.bench fidelity", __doc__)
    _add_config_args(ap)
    _add_run_args(ap)
    args = ap.parse_args(argv)
    args.texts = apply_preset(args, ap.error)
    resolve_configs(args, ap.error)
    return args


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    t_start = time.time()
    prov = get_provenance()  # in a child: no CUDA context here while servers size pools
    out = args.out or default_out(TOOL, prov)
    fr = FidelityRun.create(args)
    result = fr.new_result(prov)
    fr.generate_under_test()
    fr.run_teacher()
    result["timings"]["servers_done_s"] = round(time.time() - t_start, 1)
    result["eos_token_ids"] = eos_ids = eos_token_ids(fr.model_path)
    result["configs"] = fr.config_entries(eos_ids)
    if args.check_hf:
        result["hf_check"] = fr.hf_check()
    result["timings"]["total_s"] = round(time.time() - t_start, 1)
    write_doc(out, "sglang_tq.bench fidelity", args.argv, {}, **result)
    print_summary(result, args)
    print(f"\nwrote {out} ({time.time() - t_start:.0f} s)")
    ok = not fr.errors and all("summary" in c for c in result["configs"].values())
    if args.check_hf:
        ok = ok and "error" not in result.get("hf_check", {"error": 1})
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
