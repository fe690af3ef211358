"""Where one tq_decode step spends its time: device time per kernel (torch.profiler).

bench_decode.py times whole steps; this splits a step into its kernels (the query
rotation GEMM, stage 1 over the packed slots, stage 2's split merge and un-rotation)
so that a slow row says which part to work on. Small batches are the case in point:
at B = 1 a step is mostly fixed cost, not KV reads (bench_decode_v8: 1 x 4k 0.048 ms
against FlashInfer's 0.020).

    python scripts/profile_decode.py --shapes 1x4096,1x32768,64x16384 --kv k4v4,k3v3 \
        --out benchmarks/results/profile_decode/profile_decode_h200.json

Each (shape, kv) runs ``--steps`` eager steps after a warm-up, with the backend's split
count and ceiling (as bench_decode.py's default policy); the table gives the mean
device time per step of each kernel, their sum, and the step's wall time per call
(CUDA events, same steps), whose difference from the sum is launch gaps.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse(text: str, sep: str = ",") -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shapes",
        default="1x4096,1x32768,16x8192,64x16384",
        help="comma list of BxL or BxLxD (D defaults to --head-dim)",
    )
    ap.add_argument("--kv", default="k4v4,k3v3", help="comma list of bit pairs, e.g. k4v4,k4v2")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="profiled steps per row (default 50)")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    return ap


def _shape(text: str, d: int) -> tuple[int, int, int]:
    parts = [int(x) for x in text.lower().split("x")]
    if len(parts) not in (2, 3) or min(parts) < 1:
        raise SystemExit(f"--shapes: '{text}' is not BxL or BxLxD with positive integers.")
    return (parts[0], parts[1], parts[2] if len(parts) == 3 else d)


def _pairs(text: str) -> list[tuple[int, int]]:
    from sglang_tq.config import TQConfig

    try:
        return [(kb, vb) for _, kb, vb in TQConfig.parse_bits_list(text)]
    except ValueError as exc:
        raise SystemExit(f"--kv: {exc}") from None


def _kernel_class(name: str) -> str:
    if "stage1" in name:
        return "stage1"
    if "stage2" in name:
        return "stage2"
    if (
        "rotate_query" in name
        or "gemm" in name.lower()
        or "sm90" in name
        or "cutlass" in name.lower()
        or "matmul" in name.lower()
    ):
        return "rotate_q"
    return "other"


def profile_row(torch, B, L, D, hq, hkv, kbits, vbits, steps, sm_count):
    from torch.profiler import ProfilerActivity, profile

    from sglang_tq.format.codec import LayerCodec
    from sglang_tq.kernels.tq_decode import (
        DecodeWorkspace,
        default_num_kv_splits,
        split_ceiling,
        tq_decode,
    )
    from sglang_tq.kernels.tq_store import tq_store_kv

    dev = "cuda"
    codec = LayerCodec.create(D, kbits, vbits, seed=0, device=dev)
    S = B * L
    bufs = codec.alloc_buffers(S, hkv)
    for s0 in range(0, S, 65536):
        n = min(65536, S - s0)
        k = torch.randn(n, hkv, D, dtype=torch.bfloat16, device=dev)
        v = torch.randn(n, hkv, D, dtype=torch.bfloat16, device=dev)
        tq_store_kv(k, v, torch.arange(s0, s0 + n, device=dev), *bufs, codec)
    indptr = torch.arange(B + 1, device=dev, dtype=torch.int32) * L
    indices = torch.randperm(S, device=dev, dtype=torch.int64)
    q = torch.randn(B, hq, D, dtype=torch.bfloat16, device=dev)
    max_splits = split_ceiling(B)
    splits = default_num_kv_splits(
        torch.full((B,), L, device=dev),
        hkv,
        max_splits,
        num_sms=sm_count,
        head_dim=D,
        k_bits=kbits,
        v_bits=vbits,
    )
    ws = DecodeWorkspace.create(B, hq, D, max_splits, dev)

    def step():
        tq_decode(
            q,
            *bufs,
            indptr,
            indices,
            codec,
            D**-0.5,
            num_kv_splits=splits,
            max_kv_splits=max_splits,
            workspace=ws,
        )

    for _ in range(10):
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
            per[_kernel_class(evt.name)] += evt.device_time / steps
    return {
        "B": B,
        "L": L,
        "head_dim": D,
        "kv": f"k{kbits}v{vbits}",
        "num_kv_splits": int(splits[0]),
        "max_kv_splits": max_splits,
        "kernels_us": {k: round(v, 2) for k, v in sorted(per.items())},
        "kernel_sum_us": round(sum(per.values()), 2),
        "step_wall_us": round(wall_us, 2),
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shapes = [_shape(s, args.head_dim) for s in _parse(args.shapes)]
    pairs = _pairs(args.kv)
    import torch

    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU; run it on the GPU host.", file=sys.stderr)
        return 2
    sys.path.append(str(REPO))
    from sglang_tq.provenance import provenance

    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(
        f"{'B':>4} {'L':>6} {'D':>4} {'kv':5} {'spl':>4} {'rotate':>8} {'stage1':>8} {'stage2':>8} "
        f"{'other':>7} {'sum':>8} {'wall':>8}  (us per step)",
        flush=True,
    )
    for B, L, D in shapes:
        for kb, vb in pairs:
            r = profile_row(
                torch, B, L, D, args.num_q_heads, args.num_kv_heads, kb, vb, args.steps, sm_count
            )
            rows.append(r)
            ku = r["kernels_us"]
            print(
                f"{B:>4} {L:>6} {D:>4} {r['kv']:5} {r['num_kv_splits']:>4} "
                f"{ku.get('rotate_q', 0):>8.2f} {ku.get('stage1', 0):>8.2f} {ku.get('stage2', 0):>8.2f} "
                f"{ku.get('other', 0):>7.2f} {r['kernel_sum_us']:>8.2f} {r['step_wall_us']:>8.2f}",
                flush=True,
            )
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            **provenance(),
            "tool": "scripts/profile_decode.py",
            "argv": sys.argv[1:],
            "config": {
                "steps": args.steps,
                "num_q_heads": args.num_q_heads,
                "num_kv_heads": args.num_kv_heads,
                "timer": "torch.profiler CUDA "
                "kernel time per step (mean); wall: CUDA events over the same "
                "number of eager steps",
                "splits": "backend rule (split_ceiling, default_num_kv_splits)",
            },
            "results": rows,
        }
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
