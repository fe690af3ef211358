"""Same-run A/B of ``tq_decode`` variants: one table of medians, one JSON.

Each variant is a set of keyword overrides of :func:`tq_decode` (``block_n``, ``num_warps``,
``prefetch``, ``num_stages``, ``heads_n``, ``maxnreg``, and the small-batch switches
``fuse_rotation``, ``pdl``; ``programs_per_sm``, ``splits``,
``min_tokens_per_split`` and ``max_splits``, the ceiling, steer the split count) on top
of the launch
the backend would run; every variant runs on the same packed pool, slots and queries of
each shape, timed as CUDA-graph replays (median of ``triton.testing.do_bench``) after a
correctness check against the first variant. The split count per sequence is the
backend's (``default_num_kv_splits`` with the batch's split ceiling) for the variant's
launch, unless ``splits`` is given.

    python scripts/ab_decode.py --kv k4v4 --shapes 64x16384,128x4096 --variant table: \\
        --variant r168:prefetch=0,num_stages=3,maxnreg=168,programs_per_sm=12 --out ab.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode_shape import decode_shape

_INT_KEYS = (
    "block_n",
    "num_warps",
    "num_stages",
    "maxnreg",
    "splits",
    "programs_per_sm",
    "max_splits",
    "min_tokens_per_split",
)
_BOOL_KEYS = ("prefetch", "heads_n", "fuse_rotation", "pdl")


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` → (name, overrides); ``name:`` alone is the default."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant: expected NAME:key=value,..., got '{text}'.")
    kw = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _INT_KEYS + _BOOL_KEYS:
            raise SystemExit(
                f"--variant {name}: '{item}' is not key=value with a key among "
                f"{', '.join(_INT_KEYS + _BOOL_KEYS)}."
            )
        try:
            kw[key] = bool(int(value)) if key in _BOOL_KEYS else int(value)
        except ValueError:
            raise SystemExit(f"--variant {name}: {key} needs an integer, got '{value}'.") from None
    return name, kw


def run(args) -> int:
    import torch
    import triton

    from sglang_tq.config import TQConfig
    from sglang_tq.format.codec import LayerCodec
    from sglang_tq.kernels import tq_decode as dec
    from sglang_tq.provenance import provenance

    variants = [parse_variant(v) for v in args.variant]
    if not torch.cuda.is_available():
        raise SystemExit("ab_decode.py times the kernels on a CUDA GPU; none is visible.")
    d, hq, hkv = args.head_dim, 32, 8
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        kb, vb = TQConfig.parse_bits(args.kv)
    except ValueError as exc:
        raise SystemExit(f"--kv: {exc}") from None
    codec = LayerCodec.create(d, kb, vb, device="cuda")
    rows = []
    for shape in args.shapes.split(","):
        bsz, seq = map(int, shape.split("x"))
        sh = decode_shape(codec, bsz, seq, hq, hkv)
        bufs, indptr, indices, q, nbytes = sh.bufs, sh.indptr, sh.indices, sh.q, sh.nbytes
        ws = dec.DecodeWorkspace.create(max(bsz, dec.SPLIT_REF_BATCH), hq, d, 8, "cuda")
        first = None
        for name, kw in variants:
            kw = dict(kw)
            max_splits = kw.pop("max_splits", None) or dec.split_ceiling(bsz)
            policy = (
                {"min_tokens_per_split": kw.pop("min_tokens_per_split")}
                if "min_tokens_per_split" in kw
                else {}
            )
            launch = dec.default_launch(d, kb, vb)
            if "programs_per_sm" in kw:
                launch = dec.DecodeLaunch(
                    **{**launch.__dict__, "programs_per_sm": kw.pop("programs_per_sm")}
                )
            if "splits" in kw:
                splits = torch.full((bsz,), kw.pop("splits"), dtype=torch.int32, device="cuda")
            else:
                launch = dec.DecodeLaunch(
                    **{**launch.__dict__, **{k: kw[k] for k in kw if k in launch.__dict__}}
                )
                splits = dec.default_num_kv_splits(
                    torch.full((bsz,), seq),
                    hkv,
                    max_splits,
                    num_sms=num_sms,
                    launch=launch,
                    **policy,
                ).cuda()
            out = torch.empty(bsz, hq, d, dtype=torch.bfloat16, device="cuda")

            def fn():
                dec.tq_decode(
                    q,
                    *bufs,
                    indptr,
                    indices,
                    codec,
                    d**-0.5,
                    num_kv_splits=splits,
                    max_kv_splits=max_splits,
                    workspace=ws,
                    out=out,
                    **kw,
                )

            try:
                if int(splits.max()) > max_splits:
                    raise ValueError(
                        f"{int(splits.max())} splits exceed the ceiling {max_splits}; "
                        "raise max_splits."
                    )
                fn()
            except ValueError as exc:  # an option this shape cannot take (e.g. too few splits)
                rows.append(
                    {
                        "variant": name,
                        "overrides": kw,
                        "shape": shape,
                        "B": bsz,
                        "L": seq,
                        "kv": args.kv,
                        "head_dim": d,
                        "ms": None,
                        "refused": str(exc),
                    }
                )
                print(f"{args.kv} {shape:>9} {name:<14} refused: {exc}", flush=True)
                continue
            torch.cuda.synchronize()
            if first is None:
                first = out.clone()
            err = ((out.float() - first.float()).norm() / first.float().norm()).item()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
            row = {
                "variant": name,
                "overrides": kw,
                "shape": shape,
                "B": bsz,
                "L": seq,
                "kv": args.kv,
                "head_dim": d,
                "splits": int(splits[0]),
                "max_splits": max_splits,
                "ms": ms,
                "tbps": nbytes / ms / 1e9,
                "rel_err_vs_first": err,
            }
            rows.append(row)
            print(
                f"{args.kv} {shape:>9} {name:<14} splits {row['splits']:<3} {ms * 1e3:9.2f} us  "
                f"{row['tbps']:6.3f} TB/s  rel.diff vs {variants[0][0]} {err:.1e}",
                flush=True,
            )
            if err > 2e-2:
                print(
                    f"CHECK FAILED: {name} differs from {variants[0][0]} by {err:.3e}", flush=True
                )
        sh = bufs = indices = None  # free the shape's buffers (the closures above hold the names)
        torch.cuda.empty_cache()
    print("\n| shape | " + " | ".join(n for n, _ in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for shape in args.shapes.split(","):
        cells = [f"{r['ms'] * 1e3:.1f}" if r["ms"] else "-" for r in rows if r["shape"] == shape]
        print(f"| {shape} | " + " | ".join(cells) + " |  (us)")
    if args.out:
        doc = {
            **provenance(),
            "tool": "scripts/ab_decode.py",
            "argv": sys.argv[1:],
            "rows": rows,
            "date_end": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", default="k4v4", help="one bit pair, e.g. k4v4")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument(
        "--shapes",
        default="1x4096,1x32768,4x8192,16x8192,64x16384,128x4096",
        help="comma list of BxL",
    )
    ap.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME:key=value,... (repeatable; the first is the reference)",
    )
    ap.add_argument("--out", help="JSON with every timing")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
