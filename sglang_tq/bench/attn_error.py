"""Where a KV format's error enters attention: per-layer KL of the attention rows.

    python -m sglang_tq.bench attn-error --model-path .models/smollm2-bf16 \\
        --configs fp8,k4v4,k8v4 --center-text sglang_tq/bench/fidelity.py \\
        --out benchmarks/results/attn_error/attn_error_smollm2_cpu.json

One forward pass of the Hugging Face model over --text (default: this repository's
README, first --tokens tokens) records every layer's post-RoPE queries and keys (the
keys SGLang's pool receives). For each layer, KV head and config, the keys are
round-tripped through the config's pool format (``hf_reference.round_trip_fns``: TurboQuant
bits, fp8 e4m3, unquantized, or the prior-art hqB / kiviB of ``sglang_tq.format.priorart``; KIVI
over the whole text, its last incomplete 32-token group exact) and the causal attention rows softmax(q·k/√d) are compared
with the exact ones: mean KL(exact || quantized) over query positions ≥ 16 (the first
rows have almost nothing to attend to). Values do not enter: this isolates the keys, the
side issue 4's fidelity runs showed to dominate.

Key centering (--center-text): the softmax of a row is unchanged when one vector μ is
subtracted from every key of a head, since q·(k − μ) = q·k − q·μ shifts the whole row.
Quantizing k − μ instead of k shrinks the norm the error scales with. μ is the mean
post-RoPE key per layer and head over a *different* text (a calibration run); the
"oracle" row uses the evaluated text's own mean, an upper bound on what centering gains.

Centers from the k_proj bias (--bias-horizons P1,P2,...): no calibration text, only the
weights: μ = mean over positions 0..P−1 of RoPE(b) (``sglang_tq.format.centers.rope_mean_of_bias``,
what the engine's ``--kv-quant-key-centers auto`` computes at start-up); adds
<config>+bias<P> rows for models whose attention has a k_proj bias.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sglang_tq.bench.cli import REPO, add_model_path, add_out, default_out, doc_parser
from sglang_tq.bench.hf_reference import (
    head_dim_of,
    load_model,
    parse_config,
    parse_configs,
    round_trip_fns,
    write_result,
)
from sglang_tq.bench.results import get_provenance

TOOL = "attn_error"


def capture_qk(model, ids: list[int]):
    """[(q [1, Hq, T, D], k [1, Hkv, T, D])] per layer, post-RoPE, from one forward pass."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS[impl]
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.detach().float(), key.detach().float()))
        return inner(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = recording
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        ALL_ATTENTION_FUNCTIONS[impl] = inner
    if len(seen) != model.config.num_hidden_layers:
        raise RuntimeError(
            f"captured {len(seen)} attention calls for {model.config.num_hidden_layers} layers"
        )
    return seen


def bias_centers(model, horizon: int):
    """[layers, kv_heads, head_dim] centers from each layer's k_proj bias and the model's
    own RoPE (Hugging Face modules), averaged over positions 0..horizon-1."""
    import torch
    from transformers.models.llama.modeling_llama import rotate_half

    from sglang_tq.format.centers import rope_mean_of_bias

    rotary = model.model.rotary_emb
    hd = head_dim_of(model.config)

    def rotate(pos, k):  # k [n, H, D], neox-style rotate_half RoPE
        cos, sin = rotary(k, pos[None])
        return k * cos[0, :, None, :] + rotate_half(k) * sin[0, :, None, :]

    out = []
    for layer in model.model.layers:
        b = layer.self_attn.k_proj.bias
        if b is None:
            raise SystemExit("--bias-horizons: this model's k_proj has no bias")
        out.append(rope_mean_of_bias(b.detach().float().view(-1, hd), rotate, horizon))
    return torch.stack(out)


def attention_kl(q, k, k_hat, skip: int = 16):
    """Mean over query rows ≥ skip of KL(softmax(qk) || softmax(q k_hat)), per KV head."""
    import torch

    t, d = q.shape[-2], q.shape[-1]
    group = q.shape[1] // k.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()

    def logp(keys):
        s = q @ keys.repeat_interleave(group, 1).transpose(-1, -2) / d**0.5
        return s.masked_fill(~causal, float("-inf")).log_softmax(-1)

    p, p_hat = logp(k), logp(k_hat)
    kl = (p.exp() * (p - p_hat)).nan_to_num(0.0).sum(-1)[0, :, skip:].mean(-1)  # [Hq]
    return kl.view(k.shape[1], group).mean(-1)  # [Hkv]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.bench attn-error", __doc__)
    add_model_path(ap, required=True)
    ap.add_argument(
        "--configs",
        default="fp8,k4v4,k3v3",
        help="key formats, as in fidelity-ref, plus kiviB (only the K side is "
        "used), e.g. fp8,k4v4,hq4,kivi4",
    )
    ap.add_argument("--text", default=str(REPO / "README.md"), help="evaluated text file")
    ap.add_argument(
        "--center-text",
        default=None,
        help="calibration text for key centering (adds <config>+center and "
        "<config>+oracle rows for TurboQuant configs)",
    )
    ap.add_argument(
        "--bias-horizons",
        default="",
        help="comma list of RoPE horizons P: adds <config>+bias<P> rows (centers "
        "from the k_proj bias, averaged over positions 0..P-1)",
    )
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    add_out(ap, TOOL)
    args = ap.parse_args(argv)
    try:
        args.config_list = parse_configs(args.configs)[1:]
    except ValueError as exc:
        ap.error(str(exc))
    if any(parse_config(c)[3] for c in args.config_list):
        ap.error(
            "attn-error centers keys itself (--center-text adds the centered rows); "
            "drop the -c suffix"
        )
    try:
        args.horizons = [int(h) for h in args.bias_horizons.split(",") if h.strip()]
    except ValueError:
        ap.error(f"--bias-horizons takes comma-separated integers, got {args.bias_horizons!r}")
    return args


def error_rows(args, layers, calib, bias_mu: dict, head_dim: int) -> dict[str, list[list[float]]]:
    """{row name: [per layer: attention-row KL per KV head]}: each config's keys, and for
    TurboQuant configs the same keys centered by each available center."""
    rows: dict[str, list[list[float]]] = {}
    for i, (q, k) in enumerate(layers):
        for name in args.config_list:
            k_fn, _ = round_trip_fns(name, i, head_dim, args.seed)
            rows.setdefault(name, []).append(attention_kl(q, k, k_fn(k)).tolist())
            if (calib is None and not bias_mu) or parse_config(name)[0] not in (2, 3, 4):
                continue
            centers = [(f"bias{h}", mu[i][None, :, None, :]) for h, mu in bias_mu.items()]
            if calib is not None:
                centers += [
                    ("center", calib[i][1].mean(2, keepdim=True)),
                    ("oracle", k.mean(2, keepdim=True)),
                ]
            for tag, mu in centers:
                rows.setdefault(f"{name}+{tag}", []).append(
                    attention_kl(q, k, k_fn(k - mu) + mu).tolist()
                )
    return rows


def print_rows(rows: dict, summary: dict, n_layers: int, n_tokens: int) -> None:
    ref = summary.get("fp8")
    print(f"mean attention-row KL over {n_layers} layers ({n_tokens} tokens):")
    for n, v in summary.items():
        print(f"  {n:16s} {v:.5f}" + (f"   {v / ref:5.1f}x fp8" if ref else ""))
    print("per layer (mean over KV heads):")
    names = list(rows)
    print("  layer " + "".join(f"{n:>16s}" for n in names))
    for i in range(n_layers):
        print(f"  {i:5d} " + "".join(f"{sum(rows[n][i]) / len(rows[n][i]):16.5f}" for n in names))


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    prov = get_provenance()  # at the start: the commit whose code runs
    out = args.out or default_out(TOOL, prov)
    tok = AutoTokenizer.from_pretrained(args.model_path)
    model = load_model(args.model_path)

    def ids_of(path):
        ids = tok(Path(path).read_text()).input_ids[: args.tokens]
        if len(ids) < 64:
            raise SystemExit(f"{path}: only {len(ids)} tokens; give a longer text")
        return ids

    text_ids = ids_of(args.text)
    layers = capture_qk(model, text_ids)
    calib = capture_qk(model, ids_of(args.center_text)) if args.center_text else None
    bias_mu = {h: bias_centers(model, h) for h in args.horizons}
    rows = error_rows(args, layers, calib, bias_mu, head_dim_of(model.config))
    summary = {n: sum(map(sum, r)) / sum(map(len, r)) for n, r in rows.items()}
    print_rows(rows, summary, len(layers), len(text_ids))
    doc = {
        "model_path": str(args.model_path),
        "text": args.text,
        "center_text": args.center_text,
        "tokens": args.tokens,
        "bias_horizons": args.horizons,
        "summary": summary,
        "per_layer_per_kv_head": rows,
    }
    write_result(out, "sglang_tq.bench attn-error", args, prov, **doc)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
