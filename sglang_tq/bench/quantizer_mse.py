"""Measure the reference quantizer's distortion against the Lloyd-Max optimum.

Draws random unit vectors in R^d, quantizes and dequantizes them with
``TurboQuantizer`` at 1-4 bits and reports E‖x − x̂‖² next to the optimum of
the paper's Theorem 1 (0.361 / 0.116 / 0.0340 / 0.0093 at d = 128).

    python -m sglang_tq.bench quantizer-mse --device cuda \\
        --out benchmarks/results/quantizer_mse/quantizer_mse_h200.json

Without --out the table is printed and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sglang_tq import TurboQuantizer
from sglang_tq.bench.cli import doc_parser
from sglang_tq.bench.results import get_provenance, write_doc
from sglang_tq.format.codebook import optimal_mse

PUBLISHED_D128 = {1: 0.361, 2: 0.116, 3: 0.0340, 4: 0.0093}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.bench quantizer-mse", __doc__)
    ap.add_argument("--dim", type=int, default=128, help="vector dimension (head_dim)")
    ap.add_argument("--n", type=int, default=100_000, help="number of random unit vectors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON result here")
    return ap.parse_args(argv)


def measure(dim: int, n: int, device: str, seed: int) -> list[dict]:
    """One row per bit width 1-4: measured MSE, the Lloyd-Max optimum, the paper's value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = (x / x.norm(dim=-1, keepdim=True)).float().to(device)
    rows = []
    for bits in (1, 2, 3, 4):
        q = TurboQuantizer(dim, bits, seed=seed)
        t0 = time.perf_counter()
        xhat = q.dequantize(*q.quantize(x))
        mse = ((x - xhat) ** 2).sum(-1).mean().item()
        rows.append(
            {
                "bits": bits,
                "measured_mse": mse,
                "lloyd_max_optimum": optimal_mse(dim, bits),
                "published": PUBLISHED_D128.get(bits) if dim == 128 else None,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    rows = measure(args.dim, args.n, args.device, args.seed)
    print(f"d={args.dim}, n={args.n}, device={args.device}")
    print(f"{'bits':>4} {'measured':>10} {'optimum':>10} {'published':>10} {'rel.err':>8}")
    for r in rows:
        rel = r["measured_mse"] / r["lloyd_max_optimum"] - 1
        pub = f"{r['published']:.4f}" if r["published"] else "-"
        print(
            f"{r['bits']:>4} {r['measured_mse']:>10.5f} {r['lloyd_max_optimum']:>10.5f} "
            f"{pub:>10} {rel:>+8.2%}"
        )
    if args.out:
        write_doc(
            args.out,
            "sglang_tq.bench quantizer-mse",
            args.argv,
            get_provenance(),
            device=args.device,
            dim=args.dim,
            n=args.n,
            rows=rows,
        )
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
