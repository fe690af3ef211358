"""KV-cache fidelity of the TurboQuant *algorithm* on a real model, without SGLang or a GPU.

    python -m sglang_tq.bench fidelity-ref --model-path .models/smollm2-bf16 \\
        --configs fp8,k4v4,k3v3,k4v2 \\
        --out benchmarks/results/fidelity_ref/fidelity_ref_smollm2_cpu.json

``python -m sglang_tq.bench fidelity`` measures the engine: SGLang servers, fused kernels,
GPU. This tool measures the same quantities with the Hugging Face model and a KV cache that
stores every K/V vector the way the engine's pool does, so the numbers isolate what the
quantizer costs from what the kernels and the engine add. It runs on the CPU (two cores
are enough for a 135M–0.5B model) and on CUDA (--device cuda).

What is stored, per config (the cache layer ``RoundTripLayer`` of
:mod:`sglang_tq.bench.hf_reference`):
* ``bf16``: the model's K/V unchanged (the noise-floor row, as in fidelity);
* ``fp8``:  K/V cast to float8_e4m3fn and back, as SGLang's ``--kv-cache-dtype
  fp8_e4m3`` pool does without scales (a plain ``.to(float8_e4m3fn)``);
* ``kKvV``: K through ``TurboQuantizer(head_dim, K, seed=TQConfig.layer_seed(layer))``,
  V through the V-bit quantizer of the same seed (one rotation per layer, paper Alg. 1:
  rotate, fp16 norm, Lloyd-Max code), then dequantized (Alg. 1 lines 9–10): exactly the
  codes and norms the pool's store kernel writes (tests compare the two);
* mixed sides for diagnosis: in ``kKvV`` a side of 8 is fp8 e4m3, 16 is unquantized
  (k16v4: only V quantized; k8v4: DESIGN.md's "k8v4-like" option), and ``-prod``
  makes the keys TurboQuant_prod (Alg. 2: (b-1)-bit code + 1-bit QJL residual sketch);
* ``-c``: keys centered before quantizing, k − μ with μ from --key-centers
  (``sglang_tq/format/centers.py``; the softmax is unchanged by a common shift of the keys);
* prior-art baselines (``sglang_tq.format.priorart``, the engine's ``--kv-quant hadamard|kivi``):
  ``hqB`` QuaRot-style randomized Hadamard + per-token asymmetric B-bit int (fp16 scale
  and zero per vector; signs seeded by ``TQConfig.layer_seed``, as the engine), and
  ``kiviB`` KIVI (per-channel keys in 32-token groups, per-token values, the incomplete
  group exact). KIVI's groups span tokens, so its round trip needs the whole sequence:
  ``python -m sglang_tq.bench attn-error`` runs it, this tool's step-by-step generation
  refuses it.
K is stored after RoPE, as SGLang's ``set_kv_buffer`` receives it. When several tokens
arrive at once (the prompt), attention uses their unquantized K/V and only later steps
read them back from the cache: SGLang's extend path works the same way (new tokens from
the forward pass, the prefix from the pool; sglang-tq's default, non-packed prefill).

Metrics are those of fidelity (``fidelity_metrics.score_config``): every config generates
greedily (--max-new-tokens, EOS ignored) and records its own top-K at each step; the bf16
model with a plain cache then scores prompt + generated tokens in one forward pass (teacher
forcing); top-1 agreement, KL(bf16 || config) over top-K buckets, |dlogp|, and where the
greedy text first leaves bf16's own greedy text. The model runs in float32 by default (the
"bf16" row is then the unquantized cache; --dtype bfloat16 matches the engine on CUDA).
Prompts are decoded as one left-padded batch (--batch-size). The issue-4 criterion reads
``top1_disagreement(k4v4) <= 2 x top1_disagreement(fp8)``; the JSON records it (--out; by
default a file in benchmarks/results/fidelity_ref/ named by gpu, "cpu" here, and commit).
"""

from __future__ import annotations

import argparse
import sys
import time

from sglang_tq.bench import fidelity_metrics as fm
from sglang_tq.bench.cli import add_model_path, add_out, default_out, doc_parser
from sglang_tq.bench.hf_reference import (
    head_dim_of,
    load_model,
    make_cache,
    parse_config,
    parse_configs,
    write_result,
)
from sglang_tq.bench.prompts import build_prompts
from sglang_tq.bench.results import get_provenance

TOOL = "fidelity_ref"


def _top_rows(logprobs, k: int) -> list:
    """log-softmax [V] -> one SGLang-style top-K row [[logprob, id, None] x K]."""
    vals, ids = logprobs.topk(k)
    return [[float(v), int(i), None] for v, i in zip(vals.tolist(), ids.tolist())]


def generate(
    model,
    config: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    top_k: int,
    head_dim: int,
    seed: int = 0,
    pad_id: int = 0,
    centers=None,
) -> dict:
    """Greedy decode of all prompts as one left-padded batch with the `config` cache; EOS
    ignored (every sequence full length). Position ids skip the padding, as HF's
    generate() does; padded slots are masked out of every attention."""
    import torch

    dev = next(model.parameters()).device
    n = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = make_cache(config, model.config.num_hidden_layers, head_dim, seed, centers)
    out = {
        "tokens": [[] for _ in prompts],
        "token_lps": [[] for _ in prompts],
        "top": [[] for _ in prompts],
    }
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            lp = torch.log_softmax(logits.float(), -1)
            if not torch.isfinite(lp).all():
                raise RuntimeError(f"{config}: non-finite logits while decoding")
            tok = lp.argmax(-1)
            tok_lp = lp.gather(1, tok[:, None])[:, 0]
            for b in range(len(prompts)):
                out["tokens"][b].append(int(tok[b]))
                out["token_lps"][b].append(float(tok_lp[b]))
                out["top"][b].append(_top_rows(lp[b], top_k))
            ids = tok[:, None]
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def score(model, prompt: list[int], gen_tokens: list[int], top_k: int) -> dict:
    """bf16 teacher: one forward pass over prompt + generated tokens (plain cache)."""
    import torch

    dev = next(model.parameters()).device
    seq = torch.tensor([prompt + gen_tokens], device=dev)
    with torch.no_grad():
        logits = model(input_ids=seq, use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(gen_tokens)], -1)
    tok = torch.tensor(gen_tokens, device=dev)
    return {
        "token_lps": lp.gather(1, tok[:, None])[:, 0].tolist(),
        "top": [_top_rows(row, top_k) for row in lp],
    }


def verdict(results: dict) -> dict | None:
    """Issue 4's accuracy criterion: k4v4's top-1 disagreement at most 2x fp8's."""
    if "k4v4" not in results or "fp8" not in results:
        return None
    d = {n: 1.0 - results[n]["summary"]["top1_agreement"] for n in results}
    ratio = d["k4v4"] / d["fp8"] if d["fp8"] > 0 else float("inf")
    return {"top1_disagreement": d, "k4v4_over_fp8": ratio, "met": bool(d["k4v4"] <= 2 * d["fp8"])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.bench fidelity-ref", __doc__)
    add_model_path(ap, required=True, help="HF folder (config, tokenizer, weights)")
    ap.add_argument(
        "--configs",
        default="fp8,k4v4,k3v3",
        help="comma list: fp8 and/or kKvV, each side 2/3/4 (TurboQuant bits), 8 "
        "(fp8 e4m3) or 16 (unquantized), optional -prod (QJL keys): k4v4, "
        "k8v4, k16v4, k4v16, k4v4-prod; hqB (Hadamard + int, B in 2/3/4); "
        "bf16 is always run as the reference",
    )
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--bin-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="--kv-quant-seed of the engine (default 0)")
    ap.add_argument(
        "--key-centers",
        default=None,
        help="key centers file (python -m sglang_tq.tools.key_centers) for the '-c' configs, whose "
        "TurboQuant keys are quantized as k - mu",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["bfloat16", "float32"],
        help="model dtype (default float32: CPU bf16 matmuls without AMX run ~20x "
        "slower, and an fp32 model leaves the KV cache as the only error "
        "source; use bfloat16 on CUDA to match the engine)",
    )
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=20,
        help="prompts decoded together (left-padded; default 20)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_out(ap, TOOL)
    args = ap.parse_args(argv)
    try:
        args.config_list = parse_configs(args.configs)
    except ValueError as exc:
        ap.error(str(exc))
    kivi = [c for c in args.config_list[1:] if parse_config(c)[2] == "kivi"]
    if kivi:
        ap.error(
            f"{', '.join(kivi)}: KIVI's token groups need the whole sequence; run them with "
            f"python -m sglang_tq.bench attn-error or python -m sglang_tq.bench eval"
        )
    if any(parse_config(c)[3] for c in args.config_list[1:]) and not args.key_centers:
        ap.error(
            "a '-c' config centers keys: give --key-centers (python -m sglang_tq.tools.key_centers)"
        )
    return args


def load_centers(args, config) -> object:
    """The --key-centers tensor [layers, kv heads, head_dim] for ``config``, or None;
    SystemExit (one sentence) where the file does not fit the model."""
    if not args.key_centers:
        return None
    from sglang_tq.format.centers import load_key_centers

    try:
        return load_key_centers(
            args.key_centers,
            config.num_hidden_layers,
            config.num_key_value_heads,
            head_dim_of(config),
        )
    except ValueError as exc:
        raise SystemExit(f"--key-centers: {exc}") from None


def generate_all(args, model, prompts, centers) -> dict:
    """Every config's greedy generation of every prompt, --batch-size prompts at a time."""
    t0, hd = time.time(), head_dim_of(model.config)
    gens = {}
    for name in args.config_list:
        gens[name] = {"tokens": [], "token_lps": [], "top": []}
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            r = generate(
                model, name, batch, args.max_new_tokens, args.top_k, hd, args.seed, centers=centers
            )
            for key in gens[name]:
                gens[name][key].extend(r[key])
            print(
                f"  {name}: {len(gens[name]['tokens'])}/{len(prompts)} prompts "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    return gens


def score_all(args, model, prompts, gens) -> dict:
    """The bf16 teacher's scoring of every config's text, and its metrics per config."""
    results = {}
    for name in args.config_list:
        s = {"token_lps": [], "top": []}
        for p, toks in zip(prompts, gens[name]["tokens"]):
            r = score(model, p, toks, args.top_k)
            s["token_lps"].append(r["token_lps"])
            s["top"].append(r["top"])
        results[name] = fm.score_config(gens[name], s, gens["bf16"]["tokens"], args.bin_size)
    return results


def run(args: argparse.Namespace) -> int:
    import torch

    prov = get_provenance()  # at the start: the commit whose code runs, not HEAD at the end
    out = args.out or default_out(TOOL, prov)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = build_prompts(args.model_path, args.num_prompts)
    model = load_model(args.model_path, args.dtype, args.device)
    hd = head_dim_of(model.config)
    centers = load_centers(args, model.config)
    print(
        f"{len(prompts)} prompts, {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
        f"{args.max_new_tokens} new tokens each; {model.config.num_hidden_layers} layers, "
        f"head_dim {hd}; configs {args.config_list}",
        flush=True,
    )
    t0 = time.time()
    results = score_all(args, model, prompts, generate_all(args, model, prompts, centers))
    fm.print_table(results)
    fm.print_curves(results)
    v = verdict(results)
    if v:
        print(
            f"\ntop-1 disagreement k4v4 / fp8 = {v['k4v4_over_fp8']:.2f} "
            f"(criterion <= 2: {'met' if v['met'] else 'NOT met'})"
        )
    doc = {
        "model_path": str(args.model_path),
        "settings": {
            "configs": args.config_list,
            "num_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "top_k": args.top_k,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "key_centers": args.key_centers,
            "dtype": args.dtype,
            "device": args.device,
            "head_dim": hd,
            "prefill": "prompt unquantized (SGLang extend)",
        },
        "prompt_lens": [len(p) for p in prompts],
        "elapsed_s": round(time.time() - t0, 1),
        "criterion": v,
        "results": results,
    }
    write_result(out, "sglang_tq.bench fidelity-ref", args, prov, **doc)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
