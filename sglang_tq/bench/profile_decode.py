"""``python -m sglang_tq.bench profile-decode``: where one tq_decode step spends its time,
device time per kernel (torch.profiler).

``python -m sglang_tq.bench decode`` times whole steps; this splits a step into its kernels
(the query rotation GEMM, stage 1 over the packed slots, stage 2's split merge and
un-rotation) so that a slow row says which part to work on. Small batches are the case in
point: at B = 1 a step is mostly fixed cost, not KV reads (bench_decode_v8: 1 x 4k 0.048 ms
against FlashInfer's 0.020).

    python -m sglang_tq.bench profile-decode --shapes 1x4096,1x32768,64x16384 --kv k4v4,k3v3

Each (shape, kv) runs ``--steps`` eager steps after a warm-up on the pool of
:mod:`sglang_tq.bench.decode_shape`, with the backend's split count and ceiling (as the
decode benchmark's default policy); the table gives the mean device time per step of each
kernel, their sum, and the step's wall time per call (CUDA events, same steps), whose
difference from the sum is launch gaps. The JSON goes under benchmarks/results/profile_decode/
unless ``--out`` names another file.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from . import cli, kernel_io
from .cli import add_kv_bits, add_out, add_shapes

TOOL = "sglang_tq.bench profile-decode"
RESULTS_FOLDER = "profile_decode"
WARMUP_STEPS = 10
CONFIG = {
    "timer": "torch.profiler CUDA kernel time per step (mean); wall: CUDA events over the "
    "same number of eager steps",
    "splits": "backend rule (split_ceiling, default_num_kv_splits)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = kernel_io.argv_of(argv)
    ap = cli.doc_parser("python -m sglang_tq.bench profile-decode", __doc__)
    add_shapes(
        ap,
        "1x4096,1x32768,16x8192,64x16384",
        head_dim=True,
        help="comma list of shapes (D defaults to --head-dim)",
    )
    add_kv_bits(ap, "k4v4,k3v3")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="profiled steps per row (default 50)")
    add_out(ap, RESULTS_FOLDER)
    args = ap.parse_args(argv)
    args.argv = argv
    return args


def kernel_class(name: str) -> str:
    """The part of a decode step a CUDA kernel belongs to, by its name."""
    if "stage1" in name:
        return "stage1"
    if "stage2" in name:
        return "stage2"
    low = name.lower()
    if (
        "rotate_query" in name
        or "sm90" in name
        or any(s in low for s in ("gemm", "cutlass", "matmul"))
    ):
        return "rotate_q"
    return "other"


def decode_step(sh, codec, hkv: int, sm_count: int):
    """The backend's tq_decode call on a packed shape, with its split count and ceiling."""
    import torch

    from ..kernels.tq_decode import DecodeWorkspace, default_num_kv_splits, split_ceiling

    B, hq, D = sh.q.shape
    L = sh.indices.numel() // B
    max_splits = split_ceiling(B)
    splits = default_num_kv_splits(
        torch.full((B,), L, device="cuda"),
        hkv,
        max_splits,
        num_sms=sm_count,
        head_dim=D,
        k_bits=codec.k_bits,
        v_bits=codec.v_bits,
    )
    ws = DecodeWorkspace.create(B, hq, D, max_splits, "cuda")
    return sh.decode_fn(codec, splits, max_splits, ws), int(splits[0]), max_splits


def profile_step(step, steps: int) -> tuple[dict, float]:
    """(mean device µs per step of each kernel class, wall µs per step) over ``steps`` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    wall_us = start.elapsed_time(end) * 1000 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for evt in prof.events():
        if evt.device_type.name == "CUDA":
            per[kernel_class(evt.name)] += evt.device_time / steps
    return per, wall_us


def profile_row(B, L, D, hq, hkv, kbits, vbits, steps, sm_count) -> dict:
    from ..format.codec import LayerCodec
    from .decode_shape import decode_shape

    codec = LayerCodec.create(D, kbits, vbits, seed=0, device="cuda")
    step, n_splits, max_splits = decode_step(
        decode_shape(codec, B, L, hq, hkv), codec, hkv, sm_count
    )
    per, wall_us = profile_step(step, steps)
    return {
        "B": B,
        "L": L,
        "head_dim": D,
        "kv": f"k{kbits}v{vbits}",
        "num_kv_splits": n_splits,
        "max_kv_splits": max_splits,
        "kernels_us": {k: round(v, 2) for k, v in sorted(per.items())},
        "kernel_sum_us": round(sum(per.values()), 2),
        "step_wall_us": round(wall_us, 2),
    }


def row_line(r: dict) -> str:
    ku = r["kernels_us"]
    return (
        f"{r['B']:>4} {r['L']:>6} {r['head_dim']:>4} {r['kv']:5} {r['num_kv_splits']:>4} "
        f"{ku.get('rotate_q', 0):>8.2f} {ku.get('stage1', 0):>8.2f} {ku.get('stage2', 0):>8.2f} "
        f"{ku.get('other', 0):>7.2f} {r['kernel_sum_us']:>8.2f} {r['step_wall_us']:>8.2f}"
    )


def run(args: argparse.Namespace) -> int:
    if not kernel_io.require_cuda("profile-decode"):
        return 2
    import torch

    from .results import get_provenance

    prov = get_provenance()
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(
        f"{'B':>4} {'L':>6} {'D':>4} {'kv':5} {'spl':>4} {'rotate':>8} {'stage1':>8} {'stage2':>8} "
        f"{'other':>7} {'sum':>8} {'wall':>8}  (us per step)",
        flush=True,
    )
    for shape in args.shapes:
        D = shape.head_dim or args.head_dim
        for _, kb, vb in args.kv:
            heads = (args.num_q_heads, args.num_kv_heads)
            r = profile_row(shape.batch, shape.length, D, *heads, kb, vb, args.steps, sm_count)
            rows.append(r)
            print(row_line(r), flush=True)
            torch.cuda.empty_cache()
    heads = {"num_q_heads": args.num_q_heads, "num_kv_heads": args.num_kv_heads}
    config = {"steps": args.steps, **heads, **CONFIG}
    kernel_io.write_results(args, TOOL, RESULTS_FOLDER, prov, config=config, results=rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
