"""Compute a model's key centers (mean post-RoPE key per layer and KV head).

    python -m sglang_tq.tools.key_centers --model-path .models/qwen2.5-coder-0.5b-bf16 \\
        --out .models/qwen2.5-coder-0.5b-bf16/key_centers.safetensors

Runs the Hugging Face model (float32, CPU by default) over a calibration text — by
default the installed sglang_tq package's Python sources, ~--tokens tokens in
--chunk-token pieces, so positions 0..chunk are covered like in serving — and averages
the keys the KV cache receives. See ``sglang_tq/format/centers.py`` for why and for the file
format. The server then takes the file as ``--kv-quant-key-centers FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from sglang_tq.bench.cli import doc_parser

PACKAGE = Path(__file__).resolve().parents[1]


def default_text() -> str:
    """The package's own Python sources: present in every install, so the default
    calibration is the same text wherever the tool runs."""
    files = sorted(PACKAGE.rglob("*.py"))
    return "\n\n".join(p.read_text() for p in files)


def mean_keys(model, chunks: list[list[int]]):
    """float32 [layers, kv_heads, head_dim]: the mean over all chunks and positions."""
    import torch

    total, count = None, 0
    dev = next(model.parameters()).device
    for ids in chunks:
        with torch.no_grad():
            cache = model(input_ids=torch.tensor([ids], device=dev), use_cache=True).past_key_values
        s = torch.stack([layer.keys[0].float().sum(1) for layer in cache.layers])  # [L, H, D]
        total = s if total is None else total + s
        count += len(ids)
    return (total / count).cpu()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.tools.key_centers", __doc__)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--text", default=None, help="calibration text file (default: repo sources)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> int:

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_tq.format.centers import save_key_centers
    from sglang_tq.provenance import git_commit

    text = Path(args.text).read_text() if args.text else default_text()
    tok = AutoTokenizer.from_pretrained(args.model_path)
    ids = tok(text).input_ids[: args.tokens]
    if len(ids) < args.chunk_tokens:
        raise SystemExit(
            f"the calibration text has {len(ids)} tokens, fewer than "
            f"--chunk-tokens {args.chunk_tokens}; give a longer --text"
        )
    chunks = [
        ids[i : i + args.chunk_tokens]
        for i in range(0, len(ids) - args.chunk_tokens + 1, args.chunk_tokens)
    ]
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    model = model.to(args.device).eval()
    print(f"{len(chunks)} chunks x {args.chunk_tokens} tokens", flush=True)
    centers = mean_keys(model, chunks)
    meta = {
        "model_path": str(args.model_path),
        "tokens": str(len(chunks) * args.chunk_tokens),
        "chunk_tokens": str(args.chunk_tokens),
        "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "commit": git_commit(),
    }
    save_key_centers(args.out, centers, meta)
    norms = centers.norm(dim=-1)
    print(
        f"wrote {args.out}: {list(centers.shape)}, |mu| per layer "
        f"{[round(float(x), 1) for x in norms.mean(-1)]}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
