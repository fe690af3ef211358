"""``python -m sglang_tq.bench ab-decode``: same-run A/B of ``tq_decode`` variants, one table
of medians, one JSON.

Each variant is a set of keyword overrides of :func:`tq_decode` (``block_n``, ``num_warps``,
``prefetch``, ``num_stages``, ``heads_n``, ``maxnreg``, and the small-batch switches
``fuse_rotation``, ``pdl``, the stage-1 kernel ``impl`` (triton | mma); ``programs_per_sm``,
``splits``,
``min_tokens_per_split`` and ``max_splits``, the ceiling, steer the split count) on top
of the launch the backend would run; every variant runs on the same packed pool, slots and
queries of each shape (:mod:`sglang_tq.bench.decode_shape`), timed as CUDA-graph replays
(median of ``triton.testing.do_bench``, :mod:`sglang_tq.bench.timing`) after a correctness
check against the first variant. The split count per sequence is the backend's
(``default_num_kv_splits`` with the batch's split ceiling) for the variant's launch, unless
``splits`` is given. Why a separate tool: two kernel versions compared in one call on one
GPU differ by less than two runs of the full decode benchmark do.

    python -m sglang_tq.bench ab-decode --kv k4v4 --shapes 64x16384,128x4096 --variant table: \\
        --variant r168:prefetch=0,num_stages=3,maxnreg=168,programs_per_sm=12 --out ab.json
"""

from __future__ import annotations

import argparse
import sys
import time

from ..env import DECODE_IMPLS, decode_impl
from . import cli, kernel_io
from .cli import add_out, add_shapes, parse_kv_bits

TOOL = "sglang_tq.bench ab-decode"
RESULTS_FOLDER = "ab_decode"
HEAD_COUNTS = (32, 8)  # q heads, kv heads: Llama-3.1-8B attention
CHECK_TOL = 2e-2  # relative difference from the first variant flagged above this
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
_STR_KEYS = {"impl": DECODE_IMPLS}  # the stage-1 kernel (tq_decode's impl)


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` → (name, overrides); ``name:`` alone is the default."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant: expected NAME:key=value,..., got '{text}'.")
    kw = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _INT_KEYS + _BOOL_KEYS + tuple(_STR_KEYS):
            raise SystemExit(
                f"--variant {name}: '{item}' is not key=value with a key among "
                f"{', '.join(_INT_KEYS + _BOOL_KEYS + tuple(_STR_KEYS))}."
            )
        if key in _STR_KEYS:
            if value not in _STR_KEYS[key]:
                raise SystemExit(
                    f"--variant {name}: {key} must be one of {', '.join(_STR_KEYS[key])}, "
                    f"got '{value}'."
                )
            kw[key] = value
            continue
        try:
            kw[key] = bool(int(value)) if key in _BOOL_KEYS else int(value)
        except ValueError:
            raise SystemExit(f"--variant {name}: {key} needs an integer, got '{value}'.") from None
    return name, kw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = kernel_io.argv_of(argv)
    ap = cli.doc_parser("python -m sglang_tq.bench ab-decode", __doc__)
    ap.add_argument("--kv", default="k4v4", help="one bit pair, e.g. k4v4 (default %(default)s)")
    ap.add_argument("--head-dim", type=int, default=128)
    add_shapes(ap, "1x4096,1x32768,4x8192,16x8192,64x16384,128x4096")
    ap.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME:key=value,... (repeatable; the first is the reference)",
    )
    add_out(ap, RESULTS_FOLDER, "ab")
    args = ap.parse_args(argv)
    try:
        pairs = parse_kv_bits(args.kv)
    except ValueError as exc:
        ap.error(str(exc))
    if len(pairs) != 1:
        ap.error(f"--kv takes one bit pair (each call times one format), got {args.kv!r}.")
    args.kv, args.kbits, args.vbits = pairs[0]
    args.variants = [parse_variant(v) for v in args.variant]
    args.argv = argv
    return args


def variant_launch(dec, kw: dict, args, bsz: int, seq: int, num_sms: int):
    """(tq_decode overrides, split counts [B] on the GPU, split ceiling) of one variant: the
    split-steering keys are taken out of ``kw``, the rest also shape the split policy."""
    import torch

    kw = dict(kw)
    max_splits = kw.pop("max_splits", None) or dec.split_ceiling(bsz)
    policy = (
        {"min_tokens_per_split": kw.pop("min_tokens_per_split")}
        if "min_tokens_per_split" in kw
        else {}
    )
    launch = dec.decode_launch(
        kw.get("impl") or decode_impl(), args.head_dim, args.kbits, args.vbits
    )
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
            HEAD_COUNTS[1],
            max_splits,
            num_sms=num_sms,
            launch=launch,
            **policy,
        ).cuda()
    return kw, splits, max_splits


def measure_variant(dec, sh, ws, codec, args, shape, variant, num_sms, first):
    """One variant on one shape: its row, and the output the later variants are checked
    against (the first variant's)."""
    import torch

    from .timing import time_replay

    name, kw = variant
    bsz, seq, d = shape.batch, shape.length, args.head_dim
    kw, splits, max_splits = variant_launch(dec, kw, args, bsz, seq, num_sms)
    out = torch.empty(bsz, HEAD_COUNTS[0], d, dtype=torch.bfloat16, device="cuda")
    fn = sh.decode_fn(codec, splits, max_splits, ws, out=out, **kw)

    row = {"variant": name, "overrides": kw, "shape": str(shape), "B": bsz, "L": seq}
    row.update(kv=args.kv, head_dim=d)
    try:
        if int(splits.max()) > max_splits:
            raise ValueError(
                f"{int(splits.max())} splits exceed the ceiling {max_splits}; raise max_splits."
            )
        fn()
    except ValueError as exc:  # an option this shape cannot take (e.g. too few splits)
        print(f"{args.kv} {str(shape):>9} {name:<14} refused: {exc}", flush=True)
        return {**row, "ms": None, "refused": str(exc)}, first
    torch.cuda.synchronize()
    first = out.clone() if first is None else first
    err = ((out.float() - first.float()).norm() / first.float().norm()).item()
    ms = time_replay(fn, 25, 100, 1)["ms"]
    row.update(splits=int(splits[0]), max_splits=max_splits, ms=ms)
    row.update(tbps=sh.nbytes / ms / 1e9, rel_err_vs_first=err)
    reference = args.variants[0][0]
    print(
        f"{args.kv} {str(shape):>9} {name:<14} splits {row['splits']:<3} {ms * 1e3:9.2f} us  "
        f"{row['tbps']:6.3f} TB/s  rel.diff vs {reference} {err:.1e}",
        flush=True,
    )
    if err > CHECK_TOL:
        print(f"CHECK FAILED: {name} differs from {reference} by {err:.3e}", flush=True)
    return row, first


def print_table(args, rows: list[dict]) -> None:
    print("\n| shape | " + " | ".join(n for n, _ in args.variants) + " |")
    print("|---|" + "---|" * len(args.variants))
    for shape in map(str, args.shapes):
        cells = [f"{r['ms'] * 1e3:.1f}" if r["ms"] else "-" for r in rows if r["shape"] == shape]
        print(f"| {shape} | " + " | ".join(cells) + " |  (us)")


def run(args: argparse.Namespace) -> int:
    if not kernel_io.require_cuda("ab-decode"):
        return 1
    import torch

    from ..format.codec import LayerCodec
    from ..kernels import tq_decode as dec
    from .decode_shape import decode_shape
    from .results import get_provenance

    prov = get_provenance()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    codec = LayerCodec.create(args.head_dim, args.kbits, args.vbits, device="cuda")
    rows = []
    for shape in args.shapes:
        sh = decode_shape(codec, shape.batch, shape.length, *HEAD_COUNTS)
        ws = dec.DecodeWorkspace.create(
            max(shape.batch, dec.SPLIT_REF_BATCH), HEAD_COUNTS[0], args.head_dim, 8, "cuda"
        )
        first = None
        for variant in args.variants:
            row, first = measure_variant(dec, sh, ws, codec, args, shape, variant, num_sms, first)
            rows.append(row)
        sh = ws = first = None  # free the shape's buffers before the next one
        torch.cuda.empty_cache()
    print_table(args, rows)
    date_end = time.strftime("%Y-%m-%dT%H:%M:%S")
    kernel_io.write_results(args, TOOL, RESULTS_FOLDER, prov, "ab", rows=rows, date_end=date_end)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
