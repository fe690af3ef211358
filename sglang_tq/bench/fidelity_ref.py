#!/usr/bin/env python3
"""KV-cache fidelity of the TurboQuant *algorithm* on a real model, without SGLang or a GPU.

    python scripts/fidelity_ref.py --model-path .models/smollm2-bf16 \\
        --configs fp8,k4v4,k3v3,k4v2 --out benchmarks/results/fidelity_ref/fidelity_ref_smollm2.json

``scripts/fidelity.py`` measures the engine: SGLang servers, fused kernels, GPU. This
script measures the same quantities with the Hugging Face model and a KV cache that
stores every K/V vector the way the engine's pool does, so the numbers isolate what the
quantizer costs from what the kernels and the engine add. It runs on the CPU (two cores
are enough for a 135M–0.5B model) and on CUDA (--device cuda).

What is stored, per config (the cache layer ``RoundTripLayer``):
* ``bf16``: the model's K/V unchanged (the noise-floor row, as in fidelity.py);
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
  ``attn_error.py`` runs it, this script's step-by-step generation refuses it.
K is stored after RoPE, as SGLang's ``set_kv_buffer`` receives it. When several tokens
arrive at once (the prompt), attention uses their unquantized K/V and only later steps
read them back from the cache: SGLang's extend path works the same way (new tokens from
the forward pass, the prefix from the pool; sglang-tq's default, non-packed prefill).

Metrics are those of fidelity.py (``score_config``): every config generates greedily
(--max-new-tokens, EOS ignored) and records its own top-K at each step; the bf16 model
with a plain cache then scores prompt + generated tokens in one forward pass (teacher
forcing); top-1 agreement, KL(bf16 || config) over top-K buckets, |dlogp|, and where the
greedy text first leaves bf16's own greedy text. The model runs in float32 by default (the
"bf16" row is then the unquantized cache; --dtype bfloat16 matches the engine on CUDA).
Prompts are decoded as one left-padded batch (--batch-size). The issue-4 criterion reads
``top1_disagreement(k4v4) <= 2 x top1_disagreement(fp8)``; the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # sglang_tq from a checkout
sys.path.insert(0, str(HERE))  # sibling scripts: fidelity (metrics, prompts, report)

import fidelity as fid  # noqa: E402

_CONFIG_RE = re.compile(r"k(2|3|4|8|16)v(2|3|4|8|16)(-prod)?(-c)?")
_PRIOR_ART_RE = re.compile(r"(hq|kivi)([2-4])")
_PRIOR_ART = {"hq": "hadamard", "kivi": "kivi"}
_ALIASES = {"fp8": "k8v8"}


def parse_config(name: str) -> tuple[int, int, str, bool]:
    """'k4v4' -> (4, 4, 'mse', False); 'k4v4-prod' -> (4, 4, 'prod', False);
    'k4v4-c' -> (4, 4, 'mse', True); 'fp8' -> (8, 8, 'mse', False);
    'hq4' -> (4, 4, 'hadamard', False); 'kivi2' -> (2, 2, 'kivi', False).

    Each side: 2/3/4 = TurboQuant at that many bits, 8 = fp8 e4m3 (SGLang's fp8 pool),
    16 = stored unquantized; '-prod' = TurboQuant_prod keys (paper Alg. 2); '-c' = keys
    centered by the --key-centers file; hqB / kiviB = the prior-art baselines at B bits."""
    c = name.strip().lower()
    p = _PRIOR_ART_RE.fullmatch(c)
    if p:
        return int(p[2]), int(p[2]), _PRIOR_ART[p[1]], False
    m = _CONFIG_RE.fullmatch(_ALIASES.get(c, c))
    if c == "bf16" or not m or ((m[3] or m[4]) and int(m[1]) not in (2, 3, 4)):
        raise ValueError(
            f"unknown config {name!r}: use fp8 or kKvV with each of K, V in 2/3/4 (TurboQuant "
            f"bits), 8 (fp8 e4m3) or 16 (unquantized), such as k4v4, k8v4, k16v4, k4v4-prod, "
            f"k4v4-c (-prod and -c need TurboQuant keys), or hqB / kiviB (B in 2/3/4)"
        )
    return int(m[1]), int(m[2]), "prod" if m[3] else "mse", bool(m[4])


def parse_configs(spec: str) -> list[str]:
    """'fp8,k4v4' -> ['bf16', 'fp8', 'k4v4']: bf16 first (reference), no duplicates."""
    names = ["bf16"]
    for c in (x.strip().lower() for x in spec.split(",")):
        if not c or c in names:
            continue
        parse_config(c)
        names.append(c)
    return names


def round_trip_fns(config: str, layer_id: int, head_dim: int, seed: int = 0, center=None):
    """(k_fn, v_fn): what the KV pool of `config` gives back for a stored K / V [B, H, T, D].

    center: this layer's key centers [H, D] (``sglang_tq.format.centers``), used by '-c'
    configs: their TurboQuant keys are stored as Q(k − μ), which attention reads as
    Q(k − μ) + μ (the same softmax: every key of a head moves by the same μ)."""
    import torch

    from sglang_tq.config import TQConfig
    from sglang_tq.format.quantizer import TurboQuantizer

    if config == "bf16":
        k_bits, v_bits, variant, centered = 16, 16, "mse", False
    else:
        k_bits, v_bits, variant, centered = parse_config(config)
    if centered and center is None:
        raise ValueError(f"config {config!r} centers keys: give --key-centers")
    layer_seed = TQConfig(head_dim=head_dim, seed=seed).layer_seed(layer_id)
    if variant in ("hadamard", "kivi"):
        return _prior_art_fns(variant, k_bits, v_bits, head_dim, layer_seed)

    def make(bits: int, var: str):
        if bits == 16:
            return lambda x: x
        if bits == 8:
            return lambda x: x.to(torch.float8_e4m3fn).to(x.dtype)
        q = TurboQuantizer(head_dim, bits, seed=layer_seed, variant=var)
        return lambda x: q.dequantize(*q.quantize(x.float())).to(x.dtype)

    k_fn = make(k_bits, variant)
    if centered:
        mu = center.float()[None, :, None, :]
        plain = k_fn
        k_fn = lambda x: (plain(x.float() - mu.to(x.device)) + mu.to(x.device)).to(x.dtype)  # noqa: E731
    return k_fn, make(v_bits, "mse")


def _prior_art_fns(variant: str, k_bits: int, v_bits: int, head_dim: int, layer_seed: int):
    """(k_fn, v_fn) of a prior-art format on [B, H, T, D]: hadamard per vector (the engine's
    per-layer signs); kivi over the whole sequence, T holding positions 0..T−1."""
    from sglang_tq.format.priorart import KIVI, HadamardInt

    if variant == "hadamard":
        kq = HadamardInt(head_dim, k_bits, seed=layer_seed)
        vq = HadamardInt(head_dim, v_bits, seed=layer_seed)
        return kq.round_trip, vq.round_trip
    q = KIVI(head_dim, k_bits, v_bits)
    return (
        lambda x: q.round_trip_keys(x.transpose(-3, -2)).transpose(-3, -2),
        lambda x: q.round_trip_values(x.transpose(-3, -2)).transpose(-3, -2),
    )


def make_cache(config: str, num_layers: int, head_dim: int, seed: int = 0, centers=None):
    """A transformers Cache whose layers store K/V as the `config` pool would."""
    import torch
    from transformers.cache_utils import Cache, DynamicLayer

    if config != "bf16" and parse_config(config)[2] == "kivi":
        raise ValueError(
            f"config {config!r} quantizes keys over 32-token groups, which this "
            f"step-by-step cache cannot see; measure it with scripts/attn_error.py "
            f"or in the engine (python -m sglang_tq.bench eval --configs {config})."
        )

    class RoundTripLayer(DynamicLayer):
        """DynamicLayer that stores round-tripped K/V; a multi-token step attends its own
        tokens unquantized (SGLang extend), a one-token step reads everything stored."""

        def __init__(self, k_fn, v_fn):
            super().__init__()
            self.k_fn, self.v_fn = k_fn, v_fn

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            old_k, old_v = self.keys, self.values
            self.keys = torch.cat([old_k, self.k_fn(key_states)], dim=-2)
            self.values = torch.cat([old_v, self.v_fn(value_states)], dim=-2)
            if key_states.shape[-2] == 1:
                return self.keys, self.values
            return torch.cat([old_k, key_states], dim=-2), torch.cat([old_v, value_states], dim=-2)

    layers = [
        RoundTripLayer(
            *round_trip_fns(config, i, head_dim, seed, None if centers is None else centers[i])
        )
        for i in range(num_layers)
    ]
    return Cache(layers=layers)


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


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def verdict(results: dict) -> dict | None:
    """Issue 4's accuracy criterion: k4v4's top-1 disagreement at most 2x fp8's."""
    if "k4v4" not in results or "fp8" not in results:
        return None
    d = {n: 1.0 - results[n]["summary"]["top1_agreement"] for n in results}
    ratio = d["k4v4"] / d["fp8"] if d["fp8"] > 0 else float("inf")
    return {"top1_disagreement": d, "k4v4_over_fp8": ratio, "met": bool(d["k4v4"] <= 2 * d["fp8"])}


def write_result(path: str, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    ap.add_argument("--model-path", required=True, help="HF folder (config, tokenizer, weights)")
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
    ap.add_argument("--out", default="fidelity_ref.json")
    args = ap.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as exc:
        ap.error(str(exc))
    kivi = [c for c in configs[1:] if parse_config(c)[2] == "kivi"]
    if kivi:
        ap.error(
            f"{', '.join(kivi)}: KIVI's token groups need the whole sequence; run them with "
            f"scripts/attn_error.py or python -m sglang_tq.bench eval"
        )

    import torch
    from transformers import AutoModelForCausalLM

    from sglang_tq.provenance import provenance

    prov = provenance()  # at the start: the commit whose code runs, not HEAD at the end
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = fid.build_prompts(args.model_path, args.num_prompts)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = (
        AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(args.device).eval()
    )
    hd = head_dim_of(model.config)
    centers = None
    if any(parse_config(c)[3] for c in configs[1:]) and not args.key_centers:
        ap.error(
            "a '-c' config centers keys: give --key-centers (python -m sglang_tq.tools.key_centers)"
        )
    if args.key_centers:
        from sglang_tq.format.centers import load_key_centers

        try:
            centers = load_key_centers(
                args.key_centers,
                model.config.num_hidden_layers,
                model.config.num_key_value_heads,
                hd,
            )
        except ValueError as exc:
            ap.error(str(exc))
    print(
        f"{len(prompts)} prompts, {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
        f"{args.max_new_tokens} new tokens each; {model.config.num_hidden_layers} layers, "
        f"head_dim {hd}; configs {configs}",
        flush=True,
    )

    t0 = time.time()
    gens = {}
    for name in configs:
        gens[name] = {"tokens": [], "token_lps": [], "top": []}
        for start in range(0, len(prompts), args.batch_size):
            r = generate(
                model,
                name,
                prompts[start : start + args.batch_size],
                args.max_new_tokens,
                args.top_k,
                hd,
                args.seed,
                centers=centers,
            )
            for key in gens[name]:
                gens[name][key].extend(r[key])
            print(
                f"  {name}: {len(gens[name]['tokens'])}/{len(prompts)} prompts "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    results = {}
    for name in configs:
        s = {"token_lps": [], "top": []}
        for p, toks in zip(prompts, gens[name]["tokens"]):
            r = score(model, p, toks, args.top_k)
            s["token_lps"].append(r["token_lps"])
            s["top"].append(r["top"])
        results[name] = fid.score_config(gens[name], s, gens["bf16"]["tokens"], args.bin_size)
    fid.print_table(results)
    fid.print_curves(results)
    v = verdict(results)
    if v:
        print(
            f"\ntop-1 disagreement k4v4 / fp8 = {v['k4v4_over_fp8']:.2f} "
            f"(criterion <= 2: {'met' if v['met'] else 'NOT met'})"
        )
    out = {
        **prov,
        "script": "fidelity_ref.py",
        "model_path": str(args.model_path),
        "settings": {
            "configs": configs,
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
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
