"""Measure the reference quantizer's distortion against the Lloyd-Max optimum.

Draws random unit vectors in R^d, quantizes and dequantizes them with
``TurboQuantizer`` at 1-4 bits and reports E‖x − x̂‖² next to the optimum of
the paper's Theorem 1 (0.361 / 0.116 / 0.0340 / 0.0093 at d = 128).

    python scripts/quantizer_mse.py --device cuda --out benchmarks/results/quantizer_mse/quantizer_mse.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sglang_tq import TurboQuantizer
from sglang_tq.format.codebook import optimal_mse
from sglang_tq.provenance import provenance

PUBLISHED_D128 = {1: 0.361, 2: 0.116, 3: 0.0340, 4: 0.0093}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=128, help="vector dimension (head_dim)")
    ap.add_argument("--n", type=int, default=100_000, help="number of random unit vectors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64)
    x = (x / x.norm(dim=-1, keepdim=True)).float().to(args.device)
    rows = []
    for bits in (1, 2, 3, 4):
        q = TurboQuantizer(args.dim, bits, seed=args.seed)
        t0 = time.perf_counter()
        xhat = q.dequantize(*q.quantize(x))
        mse = ((x - xhat) ** 2).sum(-1).mean().item()
        rows.append(
            {
                "bits": bits,
                "measured_mse": mse,
                "lloyd_max_optimum": optimal_mse(args.dim, bits),
                "published": PUBLISHED_D128.get(bits) if args.dim == 128 else None,
                "seconds": time.perf_counter() - t0,
            }
        )
    print(f"d={args.dim}, n={args.n}, device={args.device}")
    print(f"{'bits':>4} {'measured':>10} {'optimum':>10} {'published':>10} {'rel.err':>8}")
    for r in rows:
        rel = r["measured_mse"] / r["lloyd_max_optimum"] - 1
        pub = f"{r['published']:.4f}" if r["published"] else "-"
        print(
            f"{r['bits']:>4} {r['measured_mse']:>10.5f} {r['lloyd_max_optimum']:>10.5f} {pub:>10} {rel:>+8.2%}"
        )
    if args.out:
        result = {**provenance(), "device": args.device, "dim": args.dim, "n": args.n, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
