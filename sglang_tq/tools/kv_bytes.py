"""KV-cache bytes of a model per token and per sequence, in bf16, fp8 and TurboQuant formats.

    python -m sglang_tq.tools.kv_bytes --model-path <model dir> [--kv bf16,fp8,k4v4,k3v3]
        [--context 32768] [--tp-size 1] [--out kv.json]

Reads the model's config the way SGLang 0.5.17 does (``ModelConfig``) and counts what each
KV pool stores, by family (issue 16):

* full attention (Llama, Qwen2, ...): every layer keeps every token;
* Gemma 3 text models: SGLang serves them on its plain pool, so window layers keep every
  token too (the window limits what attention reads, not what the pool holds);
* gpt-oss (SGLang's hybrid SWA pool): window layers keep at most ``sliding_window`` tokens of
  a sequence, full layers all of them;
* hybrid linear attention (Qwen3-Next): only the full-attention layers have a KV cache (the
  recurrent state, a fixed size per sequence, is not counted);
* MLA (DeepSeek-V2/V3): one latent (512) + RoPE key (64) per token and layer, every TP rank
  holding the whole latent; TurboQuant packs the latent and keeps the RoPE key in bf16.

Packed formats count codes and fp16 norms exactly as the pools allocate them
(:func:`sglang_tq.serving.pool.bytes_per_token`, :func:`sglang_tq.serving.mla_pool.mla_bytes_per_token`).
These are computed bytes, not a server's measured ``max_total_num_tokens``.
"""

from __future__ import annotations

import argparse
import json
import sys

from sglang_tq.bench.cli import doc_parser
from sglang_tq.config import TQConfig

BASELINES = {"bf16": 2, "fp8": 1}  # bytes per stored element


def family_of(mc) -> str:
    from sglang.srt.configs.hybrid_arch import mambaish_config
    from sglang.srt.configs.model_config import AttentionArch

    if mc.attention_arch == AttentionArch.MLA:
        return "mla"
    if mambaish_config(mc) is not None:
        return "hybrid-linear"
    if getattr(mc, "is_hybrid_swa", False):
        return "hybrid-swa"
    if "sliding_attention" in (getattr(mc.hf_config, "layer_types", None) or ()):
        return "sliding-window (plain pool)"
    return "full attention"


def layer_groups(mc, family: str) -> tuple[list[int], list[int], int]:
    """(layers keeping every token, layers keeping a window, the window) of the pool."""
    from sglang.srt.configs.hybrid_arch import mambaish_config

    if family == "hybrid-linear":
        return list(mambaish_config(mc).full_attention_layer_ids), [], 0
    if family == "hybrid-swa":
        return (
            list(mc.full_attention_layer_ids),
            list(mc.swa_attention_layer_ids),
            int(mc.hf_config.sliding_window),
        )
    return list(range(mc.num_hidden_layers)), [], 0


def bytes_per_token(mc, family: str, kv: str, layers: list[int], tp_size: int) -> int:
    """KV bytes one token costs in ``layers`` for the format ``kv``."""
    from sglang_tq.serving.mla_pool import mla_bytes_per_token
    from sglang_tq.serving.pool import bytes_per_token as packed_bytes

    if family == "mla":
        width = mc.kv_lora_rank + mc.qk_rope_head_dim
        if kv in BASELINES:
            return len(layers) * width * BASELINES[kv]
        k_bits, _ = TQConfig.parse_bits(kv)
        return mla_bytes_per_token(
            TQConfig(head_dim=mc.kv_lora_rank, k_bits=k_bits, v_bits=k_bits),
            layers,
            mc.qk_rope_head_dim,
        )
    heads = mc.get_num_kv_heads(tp_size)
    if kv in BASELINES:
        return len(layers) * heads * (mc.head_dim + mc.v_head_dim) * BASELINES[kv]
    k_bits, v_bits = TQConfig.parse_bits(kv)
    return packed_bytes(TQConfig(head_dim=mc.head_dim, k_bits=k_bits, v_bits=v_bits), layers, heads)


def report(model_path: str, kvs: list[str], context: int, tp_size: int = 1) -> dict:
    from sglang.srt.configs.model_config import ModelConfig

    mc = ModelConfig(model_path)
    family = family_of(mc)
    full, window_layers, window = layer_groups(mc, family)
    rows = {}
    for kv in kvs:
        per_full = bytes_per_token(mc, family, kv, full, tp_size)
        per_window = bytes_per_token(mc, family, kv, window_layers, tp_size) if window_layers else 0
        per_seq = per_full * context + per_window * min(context, window)
        rows[kv] = {
            "bytes_per_token": per_full + per_window,
            "full_layers_bytes_per_token": per_full,
            "window_layers_bytes_per_token": per_window,
            "bytes_per_sequence": per_seq,
        }
    ref = rows.get("bf16", next(iter(rows.values())))
    for row in rows.values():
        row["tokens_vs_bf16"] = round(ref["bytes_per_sequence"] / row["bytes_per_sequence"], 2)
    arch = (getattr(mc.hf_config, "architectures", None) or ["?"])[0]
    return {
        "model_path": model_path,
        "architecture": arch,
        "family": family,
        "kv_layers": len(full) + len(window_layers),
        "window_layers": len(window_layers),
        "window": window,
        "context": context,
        "tp_size": tp_size,
        "formats": rows,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.tools.kv_bytes", __doc__)
    ap.add_argument("--model-path", required=True, help="a model folder with config.json")
    ap.add_argument(
        "--kv",
        default="bf16,fp8,k4v4,k3v3",
        help="comma list of bf16, fp8 and TurboQuant bit pairs (kXvY)",
    )
    ap.add_argument("--context", type=int, default=32768, help="tokens per sequence")
    ap.add_argument("--tp-size", type=int, default=1, help="attention tensor-parallel ranks")
    ap.add_argument("--out", help="also write the report as JSON here")
    args = ap.parse_args(argv)

    kvs = [k.strip() for k in args.kv.split(",") if k.strip()]
    for kv in kvs:
        if kv not in BASELINES:
            try:
                TQConfig.parse_bits(kv)
            except ValueError as exc:
                ap.error(f"--kv {kv!r}: {exc}")
    if args.context <= 0 or args.tp_size <= 0:
        ap.error("--context and --tp-size must be positive.")
    args.kvs = kvs
    return args


def run(args: argparse.Namespace) -> int:
    doc = report(args.model_path, args.kvs, args.context, args.tp_size)
    print(
        f"{doc['architecture']} ({doc['family']}): {doc['kv_layers']} KV layers"
        + (
            f", {doc['window_layers']} of them window layers keeping {doc['window']} tokens"
            if doc["window_layers"]
            else ""
        )
        + f"; {args.context}-token sequences, TP {args.tp_size}"
    )
    print(f"{'kv':>6} {'B/token':>10} {'MiB/sequence':>14} {'tokens vs bf16':>15}")
    for kv, row in doc["formats"].items():
        print(
            f"{kv:>6} {row['bytes_per_token']:>10,} {row['bytes_per_sequence'] / 2**20:>14.1f} "
            f"{row['tokens_vs_bf16']:>14.2f}x"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
