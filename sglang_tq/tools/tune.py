"""Tune the packed decode kernel's launch per GPU, head_dim and bit pair; write the table.

For each bit pair, times ``tq_decode`` (stage 1 + merge, as the server runs it) at
every shape over a grid of (block_n, num_warps, programs_per_sm). programs_per_sm
feeds the split policy (``default_num_kv_splits``), so the grid also covers how
many KV splits each shape gets. The winner of a bit pair is the configuration with
the smallest geometric mean of ms over the shapes (every shape counts the same);
the table also records each shape's own best, so the cost of one launch for all
shapes is visible. ``--write-table`` stores the winners under this GPU's name in
the format of ``sglang_tq/kernels/decode_launch.json``; ``SGLANG_TQ_DECODE_LAUNCH=<file>``
makes the kernels use it before it is committed. A tool rather than a benchmark: its
product is the launch table the kernels read, the timings are its evidence.

    python -m sglang_tq.tools.tune --kv k4v4,k3v3 --write-table launch.json
    python -m sglang_tq.tools.tune --merge-tables a.json b.json --write-table launch.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

from ..bench import cli, kernel_io
from ..bench.cli import add_kv_bits, add_shapes
from ..bench.results import write_doc

TOOL = "sglang_tq.tools.tune"
HEAD_COUNTS = (32, 8)  # q heads, kv heads: Llama-3.1-8B attention
LAUNCH_KEYS = (
    "block_n",
    "num_warps",
    "programs_per_sm",
    "prefetch",
    "num_stages",
    "heads_n",
    "maxnreg",
)


def parse_ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"{name}: expected a comma list of integers, got '{text}'.") from None


def parse_tiles(text: str) -> list[tuple[int, int]]:
    """``"32x1,64x2"`` → [(block_n, num_warps), ...]."""
    try:
        tiles = [tuple(int(v) for v in t.split("x")) for t in text.split(",")]
    except ValueError:
        tiles = [()]
    if any(len(t) != 2 for t in tiles):
        raise SystemExit(f"--tiles: expected BLOCKxWARPS pairs such as 32x1,64x2, got '{text}'.")
    return tiles


def launch_grid(
    tiles, programs_per_sm, prefetch, num_stages, heads_n=(0,), maxnreg=(0,)
) -> list[dict]:
    """Every launch to time; pipelining depth only varies without the register prefetch
    (with it, the loads feed inline asm and Triton's pipeliner leaves them alone)."""
    grid = []
    for (bn, nw), pps, pf, hn, mr in itertools.product(
        tiles, programs_per_sm, prefetch, heads_n, maxnreg
    ):
        for ns in num_stages if not pf else num_stages[:1]:
            grid.append(dict(zip(LAUNCH_KEYS, (bn, nw, pps, bool(pf), ns, bool(hn), mr))))
    return grid


def choose(rows: list[dict], shapes: list[str]) -> dict | None:
    """The configuration with the smallest geometric mean of ms over all shapes."""
    by_cfg: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "ms" in r:
            # rows timed before a knob existed ran at its default (maxnreg 0: no cap)
            by_cfg.setdefault(tuple(r.get(k, 0) for k in LAUNCH_KEYS), {})[r["shape"]] = r["ms"]
    full = {cfg: t for cfg, t in by_cfg.items() if all(s in t for s in shapes)}
    if not full:
        return None
    geo = {
        cfg: math.exp(sum(math.log(t[s]) for s in shapes) / len(shapes)) for cfg, t in full.items()
    }
    best = min(geo, key=geo.get)
    per_shape = {s: min(t[s] for t in full.values()) for s in shapes}
    return {
        **dict(zip(LAUNCH_KEYS, best)),
        "geomean_ms": round(geo[best], 5),
        "ms": {s: round(full[best][s], 5) for s in shapes},
        "best_ms_per_shape": {s: round(v, 5) for s, v in per_shape.items()},
    }


def merge_tables(paths: list[str]) -> dict:
    table: dict = {}
    for p in paths:
        with open(p) as f:
            part = json.load(f)
        for dev, dims in part.items():
            if dev.startswith("_"):
                table.setdefault(dev, dims)
                continue
            for d, per_kv in dims.items():
                table.setdefault(dev, {}).setdefault(d, {}).update(per_kv)
    return table


def write_table(path: str, table: dict) -> None:
    from ..kernels.tq_decode import load_launch_table

    Path(path).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    load_launch_table.cache_clear()
    load_launch_table(path)  # refuse to leave an unreadable table behind
    print(f"wrote {path}")


def save_winners(path: str, device_name: str, head_dim: int, winners: dict, prov: dict) -> None:
    stamp = {"commit": prov.get("commit"), "date": prov.get("date")}
    table = merge_tables([path]) if Path(path).exists() else {}
    table.setdefault(device_name, {}).setdefault(str(head_dim), {}).update(
        {kv: {**w, **stamp} for kv, w in winners.items()}
    )
    write_table(path, table)


def time_launch(dec, sh, ws, codec, args, shape, kv: str, cfg: dict, num_sms: int) -> dict:
    """One launch on one packed shape (``ws``: its workspace): its row, with ms and TB/s or
    the error."""
    import torch

    from ..bench.timing import time_replay

    d, bsz, seq = args.head_dim, shape.batch, shape.length
    launch = dec.DecodeLaunch(**cfg)
    splits = dec.default_num_kv_splits(
        torch.full((bsz,), seq), HEAD_COUNTS[1], args.max_kv_splits, num_sms=num_sms, launch=launch
    ).cuda()
    row = {"kv": kv, "shape": str(shape), "B": bsz, "L": seq, "head_dim": d, **cfg}
    row["splits"] = int(splits[0])
    launch_kw = {k: getattr(launch, k) for k in LAUNCH_KEYS if k != "programs_per_sm"}
    fn = sh.decode_fn(codec, splits, args.max_kv_splits, ws, **launch_kw)

    try:
        fn()
        ms = time_replay(fn, 10, 40, 1, cuda_graph=False)["ms"]
    except Exception as exc:
        row["error"] = repr(exc)[:200]
        print(f"{kv} {shape} {cfg}: {exc!r}"[:160], flush=True)
        return row
    row.update(ms=ms, tbps=sh.nbytes / ms / 1e9)
    print(
        f"{kv} {str(shape):>9} d={d} bn={launch.block_n:<3} warps={launch.num_warps} "
        f"pps={launch.programs_per_sm:<2} prefetch={int(launch.prefetch)} "
        f"stages={launch.num_stages} heads_n={int(launch.heads_n)} "
        f"maxnreg={launch.maxnreg:<3} splits={row['splits']:<2} "
        f"{ms:8.4f} ms  {row['tbps']:6.3f} TB/s",
        flush=True,
    )
    return row


def tune_pair(dec, args, grid: list[dict], kv: str, kb: int, vb: int, num_sms: int) -> list[dict]:
    """Every launch of the grid at every shape for one bit pair."""
    import torch

    from ..bench.decode_shape import decode_shape
    from ..format.codec import LayerCodec

    codec = LayerCodec.create(args.head_dim, kb, vb, device="cuda")
    rows = []
    for shape in args.shapes:
        sh = decode_shape(codec, shape.batch, shape.length, *HEAD_COUNTS)
        ws = dec.DecodeWorkspace.create(
            shape.batch, HEAD_COUNTS[0], args.head_dim, args.max_kv_splits, "cuda"
        )
        rows += [time_launch(dec, sh, ws, codec, args, shape, kv, cfg, num_sms) for cfg in grid]
        sh = ws = None  # free the shape's buffers before the next one
        torch.cuda.empty_cache()
    return rows


def print_best(kv: str, d: int, win: dict) -> None:
    print(
        f"BEST {kv} d={d}: block_n {win['block_n']} warps {win['num_warps']} "
        f"programs/SM {win['programs_per_sm']} prefetch {int(win['prefetch'])} "
        f"stages {win['num_stages']} heads_n {int(win['heads_n'])} "
        f"maxnreg {win['maxnreg']}: "
        + ", ".join(
            f"{s} {win['ms'][s]:.4f} (best {win['best_ms_per_shape'][s]:.4f})" for s in win["ms"]
        ),
        flush=True,
    )


def tune(args) -> int:
    if not kernel_io.require_cuda(TOOL):
        return 1
    import torch

    from ..bench.results import get_provenance
    from ..kernels import tq_decode as dec

    prov = get_provenance()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = launch_grid(
        parse_tiles(args.tiles),
        parse_ints(args.programs_per_sm, "--programs-per-sm"),
        parse_ints(args.prefetch, "--prefetch"),
        parse_ints(args.num_stages, "--num-stages"),
        parse_ints(args.heads_n, "--heads-n"),
        parse_ints(args.maxnreg, "--maxnreg"),
    )
    shapes = [str(s) for s in args.shapes]
    t0 = time.time()
    rows, winners = [], {}
    for kv, kb, vb in args.kv:
        kv_rows = tune_pair(dec, args, grid, kv, kb, vb, num_sms)
        rows += kv_rows
        win = choose(kv_rows, shapes)
        if win:
            winners[kv] = win
            if args.write_table:  # after every bit pair: a run cut short keeps what it found
                device = torch.cuda.get_device_name()
                save_winners(args.write_table, device, args.head_dim, {kv: win}, prov)
            print_best(kv, args.head_dim, win)
    if args.out:
        result = {"head_dim": args.head_dim, "num_sms": num_sms, "grid": grid, "shapes": shapes}
        result.update(rows=rows, winners=winners, elapsed_s=round(time.time() - t0, 1))
        write_doc(Path(args.out), TOOL, args.argv, prov, **result)
        print(f"wrote {args.out}")
    return 0 if winners else 1


def add_grid_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--tiles",
        default="32x1,64x2,64x4",
        help="tile shapes BLOCK_NxNUM_WARPS to try (32 tokens per warp won on the "
        "H200: 64x2; 32x1 does the same without cross-warp exchanges)",
    )
    ap.add_argument(
        "--programs-per-sm",
        default="4,8,16",
        help="resident programs per SM assumed by the split policy (more: more splits)",
    )
    ap.add_argument(
        "--prefetch",
        default="1,0",
        help="1: register prefetch of the next tile; 0: loads at the top of the tile, "
        "pipelined by Triton over --num-stages",
    )
    ap.add_argument("--num-stages", default="2,3", help="pipelining depths tried without prefetch")
    ap.add_argument(
        "--heads-n",
        default="0,1",
        help="1: the transposed problem (GQA group as the dots' N side); 0: heads as rows",
    )
    ap.add_argument(
        "--maxnreg",
        default="0",
        help="register caps per thread to try (0: ptxas's choice); a cap lets more "
        "one-warp programs share an SM, e.g. 0,168,128",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = kernel_io.argv_of(argv)
    ap = cli.doc_parser("python -m sglang_tq.tools.tune", __doc__)
    add_shapes(
        ap,
        "64x16384,32x32768,128x4096,16x8192,64x6144",
        help="comma list of shapes (default: the B·L >= 64k rows of the decode benchmark "
        "and the load test's 64 x 6k)",
    )
    add_kv_bits(ap, "k4v4,k4v3,k3v3,k4v2,k2v2")
    add_grid_args(ap)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--max-kv-splits", type=int, default=32)
    ap.add_argument("--out", help="JSON with every timing")
    ap.add_argument("--write-table", help="launch table to create or update with the winners")
    ap.add_argument(
        "--merge-tables",
        nargs="+",
        metavar="TABLE",
        help="merge these tables into --write-table instead of tuning",
    )
    args = ap.parse_args(argv)
    args.argv = argv
    return args


def run(args: argparse.Namespace) -> int:
    if args.merge_tables:
        if not args.write_table:
            raise SystemExit("--merge-tables needs --write-table OUT.")
        write_table(args.write_table, merge_tables(args.merge_tables))
        return 0
    return tune(args)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
