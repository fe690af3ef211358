"""``python -m sglang_tq.bench decode``: decode attention per step, sglang-tq packed KV vs SGLang
Triton, FlashInfer, FA3 and a copy roof.

One layer of Llama-3.1-8B attention (32 q heads, 8 kv heads, head_dim 128; plus
rows at head_dim 64 and 256), one decode token per sequence, every sequence of
length L, page size 1 and slot ids drawn as a random permutation of the pool
(scattered like a real SGLang token pool). In one run on one GPU it times:

  sglang-tq      our fused TurboQuant decode (tq_decode) on packed 2-4-bit codes,
                 one row per --kv format (k4v4, k4v3, k3v3, k4v2, k2v2);
  sglang-triton  SGLang 0.5.17's own Triton decode kernel
                 (sglang.kernels.ops.attention.decode_attention.decode_attention_fwd),
                 called as TritonAttnBackend.forward_decode calls it, bf16 and fp8_e4m3;
  flashinfer     flashinfer.BatchDecodeWithPagedKVCacheWrapper, NHD, page_size 1,
                 backend "fa2", tensor cores chosen by SGLang's rule, bf16 and fp8_e4m3;
  fa3            sgl-kernel's FlashAttention-3 (sgl_kernel.flash_attn.flash_attn_with_kvcache),
                 the kernel of SGLang's fa3 backend (its default on Hopper), called as
                 FlashAttentionBackend.forward_decode calls it: pool viewed as
                 [slots, page 1, Hkv, D], an int32 page table [B, L] of each sequence's
                 slot ids, cache_seqlens, cu_seqlens_q = arange(B+1), max_seqlen_q 1,
                 causal, num_splits 0 (its heuristic), scheduler metadata precomputed
                 once per batch (get_scheduler_metadata, outside the timed call, as
                 SGLang does once per forward for all layers); fp8_e4m3: q cast to fp8,
                 no k_descale/v_descale (what SGLang passes for a checkpoint without KV
                 scales, e.g. the dummy Llama-3.1-8B; --fa3-descale passes ones [B, Hkv]
                 as for a checkpoint with scales of 1.0), bf16 and fp8_e4m3. Where the
                 FA3 library is missing (the GPU host stages it separately,
                 dev/gpu_host/stage_fa3.sh) or the GPU cannot run it, one line says so, the
                 fa3 rows are written with "unavailable": <why> and the rest runs;
  copy           a device-to-device copy of as many bytes as the bf16 KV at that shape
                 (the bandwidth roof; TB/s counts bytes read + bytes written).

The three baselines' calling conventions live in sglang_tq.bench.decode_baselines.

It also times the write path: tq_store_kv for one new token per sequence
(N = B = 64 by default, Hkv 8, D 128) against SGLang-style bf16 / fp8 stores,
as a share of the decode step at (B=64, L=4096).

Timing: triton.testing.do_bench(..., return_mode="median"), which clears L2 before
every call; by default each implementation is captured in a CUDA graph first and the
graph replay is timed (decode runs inside CUDA graphs in SGLang; sglang_tq.bench.timing);
--no-cuda-graph times eager calls. Bytes counted ("effective TB/s" = bytes / time): the KV
bytes the format must read (ours: k_code_bytes + v_code_bytes + 4 B of fp16 norms per token
per kv head; bf16: 4*D; fp8: 2*D), the slot-id list (8 B/token for int64 kv_indices as
SGLang Triton and sglang-tq take it, 4 B/token for FlashInfer's int32 indices and FA3's
int32 page table), q (bf16; fp8 for FA3 fp8) and out (bf16). kv_indptr, num_kv_splits,
scheduler metadata and split-KV partials are not counted.

Results go to --out as JSON (rewritten after every shape, so a run cut short keeps
what it measured). Examples:

    python -m sglang_tq.bench decode              # default shapes: a few minutes on an H100,
                                                  # plus first-use JIT builds (Triton, FlashInfer)
    python -m sglang_tq.bench decode --quick      # 2 shapes, smoke test
    python -m sglang_tq.bench decode --shapes 64x16384,32x8192x256 --kv k4v4,k2v2
    python -m sglang_tq.bench decode --dry-run    # print plan, bytes and splits; no GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import cli, kernel_io
from .cli import add_kv_bits, add_out, parse_shapes
from .decode_baselines import (
    FLASHINFER_WORKSPACE_BYTES,
    SGLANG_DEFAULT_MAX_KV_SPLITS,
    Ctx,
    build_fa3,
    build_flashinfer,
    build_sglang_triton,
    cdiv,
    fa3_tables,
    load_baselines,
    sglang_num_kv_splits,
    sglang_splits_tensor,
)
from .kernel_io import log
from .results import write_doc

TOOL = "sglang_tq.bench decode"
RESULTS_FOLDER = "bench_decode"
DEFAULT_SHAPES = "1x4096,1x32768,16x8192,32x32768,64x16384,128x4096,64x16384x64,32x8192x256"
QUICK_SHAPES = "1x4096,64x16384"
DEFAULT_KV = "k4v4,k4v3,k3v3,k4v2,k2v2"
ALL_IMPLS = ("sglang-tq", "sglang-triton", "flashinfer", "fa3", "copy")
BASELINE_KV = {"bf16": "bf16", "fp8": "fp8_e4m3"}  # --baseline-dtypes value -> row "kv"
ASSUMED_SM_COUNT = 132  # H100 SXM; only used by --dry-run without a GPU
# rel. error ‖out-ref‖/‖ref‖ flagged above this (FA3 fp8: reference with q rounded to fp8 too)
TOL = {"bf16": 2e-2, "fp8_e4m3": 8e-2, "tq": 2e-2}

BYTES_NOTE = (
    "bytes.kv: packed KV the kernel must read (sglang-tq: (k_code_bytes + v_code_bytes + 4 B fp16 "
    "norms) per token per kv head; bf16: 4*D B; fp8: 2*D B per token per kv head); bytes.indices: "
    "slot ids, 8 B/token (int64 kv_indices; sglang-tq and SGLang Triton) or 4 B/token (int32; "
    "FlashInfer indices, FA3 page table); bytes.q / bytes.out: [B,Hq,D] each, bf16 (q fp8 for FA3 fp8). "
    "Not counted: kv_indptr, num_kv_splits, FA3 scheduler metadata, "
    "split-KV partial results (written and re-read by the reduce step). copy: bytes.read = bytes of "
    "the bf16 KV at that shape, bytes.write = same, tbps = (read+write)/time."
)


# --------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------
def add_workload_args(g) -> None:
    g.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of BxL or BxLxD (D defaults to --head-dim). Default: {DEFAULT_SHAPES}",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help=f"small subset: shapes {QUICK_SHAPES}, warmup/rep 10/40 ms, one timing pass "
        "(explicit --shapes/--warmup/--rep/--repeat still win)",
    )
    add_kv_bits(g, DEFAULT_KV)
    g.add_argument(
        "--impls",
        default=",".join(ALL_IMPLS),
        help=f"comma subset of {','.join(ALL_IMPLS)} (default: all)",
    )
    g.add_argument(
        "--baseline-dtypes",
        default="bf16,fp8",
        help="KV dtypes for sglang-triton, flashinfer and fa3: subset of bf16,fp8 (default both)",
    )
    g.add_argument("--num-q-heads", type=int, default=32)
    g.add_argument("--num-kv-heads", type=int, default=8)
    g.add_argument("--head-dim", type=int, default=128, help="head_dim for shapes given as BxL")
    g.add_argument(
        "--window",
        type=int,
        default=-1,
        help="sliding-window layer: SGLang's sliding_window_size W, the query attends to the "
        "last W + 1 tokens (Gemma 3 local layers: 1023 / 511, gpt-oss: 127); -1: full attention. "
        "Rows: sglang-tq and fa3 (SGLang's default backend for such models)",
    )
    g.add_argument(
        "--sinks",
        action="store_true",
        help="learned attention sinks, one logit per query head (gpt-oss); rows: sglang-tq, fa3",
    )


def add_write_path_args(g) -> None:
    g.add_argument("--no-write-path", action="store_true", help="skip the write-path (store) table")
    g.add_argument(
        "--store-batch",
        type=int,
        default=64,
        help="write path: new tokens per step N = B (default 64)",
    )
    g.add_argument(
        "--store-decode-len",
        type=int,
        default=4096,
        help="write path: L of the decode step the store is compared with (default 4096)",
    )
    g.add_argument("--store-head-dim", type=int, default=128)
    g.add_argument(
        "--store-num-warps",
        type=int,
        default=None,
        help="write path: warps per tq_store_kv program (default: the kernel's, 4)",
    )
    g.add_argument(
        "--store-row-tokens",
        type=int,
        default=0,
        help="write path: up to this many new tokens, tq_store_kv runs one token per "
        "one-warp program, its rotation in registers (default 0: 16-token tiles; "
        "the server's SGLANG_TQ_STORE_ROW_TOKENS)",
    )
    g.add_argument(
        "--store-rotation",
        choices=("fwht", "dense"),
        default="fwht",
        help="write path: tq_store_kv rotates by the fast Walsh-Hadamard transform "
        "(default, as the server) or the dense Πᵀ product",
    )


def add_split_args(g) -> None:
    g.add_argument(
        "--tq-kernel-args",
        default="{}",
        help='JSON of extra tq_decode launch arguments, e.g. \'{"block_n": 32, "num_warps": 4}\'',
    )
    g.add_argument(
        "--max-kv-splits",
        type=int,
        default=0,
        help="sglang-tq: max_kv_splits (workspace size / grid cap); 0 (default) = "
        "the turboquant backend's ceiling for the batch size "
        "(tq_decode.split_ceiling: 8 at B >= 64 up to 64 at B <= 8)",
    )
    g.add_argument(
        "--splits-policy",
        choices=("backend", "waves", "sglang", "fixed"),
        default="backend",
        help="sglang-tq num_kv_splits: 'backend' = what the turboquant backend uses "
        "(tq_decode.default_num_kv_splits, wave-aware); 'waves' = "
        "clamp(ceil(waves*SMs/(B*Hkv)), 1, max), also at most ceil(L/--min-split-tokens); "
        "'sglang' = SGLang's get_num_kv_splits heuristic with our --max-kv-splits; "
        "'fixed' = --num-kv-splits (default backend)",
    )
    g.add_argument(
        "--waves",
        type=float,
        default=4.0,
        help="'waves' policy: CTAs per SM to aim for (default 4)",
    )
    g.add_argument(
        "--min-split-tokens",
        type=int,
        default=256,
        help="'waves' policy: fewest tokens per split (default 256)",
    )
    g.add_argument(
        "--num-kv-splits", type=int, default=None, help="'fixed' policy: splits per sequence"
    )


def add_baseline_args(g) -> None:
    g.add_argument(
        "--triton-max-kv-splits",
        type=int,
        default=SGLANG_DEFAULT_MAX_KV_SPLITS,
        help="sglang-triton baseline max_kv_splits; num_kv_splits comes from SGLang's own "
        f"get_num_kv_splits_triton (default {SGLANG_DEFAULT_MAX_KV_SPLITS} = SGLang's default)",
    )
    g.add_argument(
        "--flashinfer-head-dims",
        default="all",
        help="head_dims at which to run flashinfer, e.g. 128 (default all). Each (head_dim, dtype) "
        "is a separate FlashInfer JIT build on first use, which can take minutes without a cache",
    )
    g.add_argument(
        "--flashinfer-tensor-cores",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto = SGLang's should_use_tensor_core rule (fp8: on; bf16: GQA group >= 4)",
    )
    g.add_argument(
        "--fa3-descale",
        action="store_true",
        help="fa3 fp8: pass k_descale = v_descale = ones [B, Hkv] (SGLang, for a checkpoint with "
        "KV scales); default none (SGLang, for a checkpoint without, e.g. the dummy Llama)",
    )
    g.add_argument(
        "--fa3-no-scheduler-metadata",
        action="store_true",
        help="fa3: let every call plan its own tiles instead of the precomputed scheduler metadata "
        "SGLang passes in decode",
    )


def add_timing_args(g) -> None:
    g.add_argument("--warmup", type=int, default=None, help="do_bench warmup in ms (default 25)")
    g.add_argument("--rep", type=int, default=None, help="do_bench rep in ms (default 100)")
    g.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="do_bench passes per row; ms = median of their medians, spread reported (default 2)",
    )
    g.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="time eager calls instead of CUDA-graph replays",
    )
    g.add_argument(
        "--layout",
        choices=("random", "contiguous"),
        default="random",
        help="slot ids: random permutation of the pool (default) or contiguous per sequence",
    )
    g.add_argument(
        "--check",
        choices=("first", "all", "none"),
        default="first",
        help="correctness check of sequence 0 vs a float64 reference: at the first shape of "
        "each head_dim (default), at every shape, or never",
    )
    g.add_argument(
        "--fill-chunk", type=int, default=131072, help="tokens per tq_store_kv call when filling"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="skip remaining shapes once this many seconds have passed (0 = no limit)",
    )


def add_output_args(g) -> None:
    add_out(g, RESULTS_FOLDER, "bench_decode")
    g.add_argument(
        "--cache-dir",
        default=None,
        help="set TRITON_CACHE_DIR=<dir>/triton and FLASHINFER_WORKSPACE_BASE=<dir> (JIT caches) "
        "unless already set, so a carried folder can skip recompiles",
    )
    g.add_argument(
        "--device",
        default="cuda",
        help="torch device (default cuda; others only for testing the benchmark)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (shapes, bytes, splits) without touching a GPU",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = cli.doc_parser("python -m sglang_tq.bench decode", __doc__)
    add_workload_args(ap.add_argument_group("what to run"))
    add_write_path_args(ap.add_argument_group("write path"))
    add_split_args(ap.add_argument_group("split-KV (sglang-tq)"))
    add_baseline_args(ap.add_argument_group("baselines"))
    add_timing_args(ap.add_argument_group("timing"))
    add_output_args(ap.add_argument_group("output / environment"))
    return ap


def shape_list(args) -> list[tuple[int, int, int]]:
    """(B, L, D) of every shape, D from --head-dim where a shape has none; repeats dropped."""
    text = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    try:
        shapes = parse_shapes(text, head_dim=True)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return list(dict.fromkeys((s.batch, s.length, s.head_dim or args.head_dim) for s in shapes))


def choices(text: str, allowed, flag: str) -> list[str]:
    """The comma list ``text``, each item among ``allowed`` (SystemExit naming the others)."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = set(chosen) - set(allowed)
    if bad:
        raise SystemExit(f"unknown {flag} {sorted(bad)}; choose from {', '.join(allowed)}")
    return chosen


def finalize_args(args):
    args.shapes_list = shape_list(args)
    args.kv_list = args.kv
    args.impl_set = set(choices(args.impls, ALL_IMPLS, "--impls"))
    args.base_dtypes = choices(args.baseline_dtypes, BASELINE_KV, "--baseline-dtypes")
    hd = args.flashinfer_head_dims.strip().lower()
    args.fi_head_dims = None if hd in ("", "all") else {int(x) for x in hd.split(",") if x.strip()}
    if args.warmup is None:
        args.warmup = 10 if args.quick else 25
    if args.rep is None:
        args.rep = 40 if args.quick else 100
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2
    if args.num_q_heads % args.num_kv_heads:
        raise SystemExit("--num-q-heads must be a multiple of --num-kv-heads")
    if args.splits_policy == "fixed" and not args.num_kv_splits:
        raise SystemExit("--splits-policy fixed needs --num-kv-splits")
    if args.max_kv_splits < 0 or args.triton_max_kv_splits < 1:
        raise SystemExit(
            "--max-kv-splits must be >= 0 (0: the backend's ceiling) and "
            "--triton-max-kv-splits >= 1"
        )
    if args.window < -1:
        raise SystemExit("--window must be -1 (full attention) or a window size >= 0")
    if args.window >= 0 or args.sinks:
        dropped = sorted(args.impl_set & {"sglang-triton", "flashinfer"})
        if dropped:
            log(f"[note] --window / --sinks: no {', '.join(dropped)} rows (fa3 is the baseline)")
        args.impl_set -= {"sglang-triton", "flashinfer"}
    args.cuda_graph = not args.no_cuda_graph
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = kernel_io.argv_of(argv)
    args = finalize_args(build_parser().parse_args(argv))
    args.argv = argv
    return args


# --------------------------------------------------------------------------------------
# sglang-tq's split-KV policies
# --------------------------------------------------------------------------------------
def tq_max_splits(args, B) -> int:
    """sglang-tq's split ceiling at batch B: --max-kv-splits, or the backend's rule."""
    from ..kernels.tq_decode import split_ceiling

    return args.max_kv_splits or split_ceiling(B)


def tq_num_kv_splits(args, B, L, sm_count, D=None, kbits=4, vbits=4) -> int:
    if args.splits_policy == "fixed":
        n = args.num_kv_splits
    elif args.splits_policy == "backend":
        import torch

        from ..kernels.tq_decode import DecodeLaunch, default_launch, default_num_kv_splits

        launch = default_launch(D or args.head_dim, kbits, vbits)
        block_n = json.loads(args.tq_kernel_args or "{}").get("block_n")
        if block_n:
            launch = DecodeLaunch(block_n, launch.num_warps, launch.programs_per_sm)
        n = int(
            default_num_kv_splits(
                torch.full((B,), L),
                args.num_kv_heads,
                tq_max_splits(args, B),
                num_sms=sm_count,
                launch=launch,
            )[0]
        )
    elif args.splits_policy == "sglang":
        n = sglang_num_kv_splits(
            [L] * B, args.num_q_heads, args.num_kv_heads, tq_max_splits(args, B), sm_count
        )[0]
    else:
        n = cdiv(int(math.ceil(args.waves * sm_count)), B * args.num_kv_heads)
        n = min(n, cdiv(L, max(1, args.min_split_tokens)))
    return max(1, min(n, tq_max_splits(args, B), L))


# --------------------------------------------------------------------------------------
# bytes
# --------------------------------------------------------------------------------------
def kv_bytes_per_token_head(kv: str, D: int, k_code_bytes=None, v_code_bytes=None) -> int:
    if kv == "bf16":
        return 2 * D * 2
    if kv == "fp8_e4m3":
        return 2 * D
    return k_code_bytes + v_code_bytes + 4


def count_bytes(kv, B, L, Hq, Hkv, D, index_bytes, kcb=None, vcb=None, q_elt=2) -> dict:
    T = B * L
    d = {
        "kv": T * Hkv * kv_bytes_per_token_head(kv, D, kcb, vcb),
        "indices": T * index_bytes,
        "q": B * Hq * D * q_elt,
        "out": B * Hq * D * 2,
    }
    d["total"] = sum(d.values())
    d["per_token_per_kv_head"] = kv_bytes_per_token_head(kv, D, kcb, vcb)
    d["index_bytes_per_token"] = index_bytes
    return d


def code_bytes(D: int, bits: int) -> int:
    return D * bits // 8  # split-plane packing: D*b/8 bytes (mse variant)


# --------------------------------------------------------------------------------------
# timing, reference and checks
# --------------------------------------------------------------------------------------
def time_it(ctx: Ctx, args, fn):
    """Median ms over args.repeat do_bench passes of the graph replay, plus details
    (sglang_tq.bench.timing.time_replay)."""
    from .timing import time_replay

    res = time_replay(fn, args.warmup, args.rep, args.repeat, args.cuda_graph)
    if res["timing_note"]:
        log(f"    [note] {res['timing_note']}")
    return res


def ref_attention(torch, q0, K0, V0, sm_scale, sinks=None):
    """float64 attention of one decode token. q0 [Hq,D]; K0, V0 [L,Hkv,D] -> [Hq,D].
    q head h attends with kv head h // (Hq/Hkv) (SGLang's and FlashInfer's GQA mapping);
    ``sinks`` [Hq]: a logit per query head that joins the softmax without a value."""
    Hq, D = q0.shape
    L, Hkv, _ = K0.shape
    G = Hq // Hkv
    qg = q0.double().reshape(Hkv, G, D)
    K = K0.double().permute(1, 0, 2)  # [Hkv, L, D]
    V = V0.double().permute(1, 0, 2)
    s = torch.matmul(qg, K.transpose(1, 2)) * sm_scale  # [Hkv, G, L]
    if sinks is not None:
        s = torch.cat([s, sinks.double().reshape(Hkv, G, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :L]
    return torch.matmul(p, V).reshape(Hq, V0.shape[-1])


def gather_rows(torch, buf, idx):
    """buf[idx] as float32; fp8 rows are gathered through a uint8 view (index ops may lack fp8)."""
    if buf.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return buf.view(torch.uint8)[idx].view(buf.dtype).float()
    return buf[idx].float()


def compare(torch, name, out0, ref, tol):
    out0 = out0.double()
    finite = bool(torch.isfinite(out0).all().item())
    diff = out0 - ref
    max_abs = float(diff.abs().max().item()) if finite else float("nan")
    rel = float((diff.norm() / ref.norm().clamp_min(1e-30)).item()) if finite else float("nan")
    ok = finite and rel <= tol
    res = {"against": name, "max_abs_err": max_abs, "rel_err": rel, "tol": tol, "ok": ok}
    return res


def alarm(*lines) -> None:
    """Lines that must not scroll by unnoticed, between two bars of '!'."""
    log("!" * 78)
    for line in lines:
        log(line)
    log("!" * 78)


def record_check(row, key, res, checks, label) -> None:
    """Log a check, keep it in the run's list and its summary in the row under ``key``."""
    if res["ok"]:
        log(
            f"    check {label} vs {res['against']}: max|err| {res['max_abs_err']:.3e}  "
            f"rel {res['rel_err']:.3e}  ok"
        )
    else:
        alarm(
            f"!!! CHECK FAILED: {label} vs {res['against']}: max|err| {res['max_abs_err']:.3e}  "
            f"rel {res['rel_err']:.3e} (tol {res['tol']:.1e}). Timings of this row are suspect."
        )
    res["label"] = label
    checks.append(res)
    row[key] = {k: res[k] for k in ("max_abs_err", "rel_err", "ok")}


def post_checks(ctx, row, out, ref, kvname, checks, label):
    torch = ctx.torch
    finite = bool(torch.isfinite(out).all().item())
    row["output_finite"] = finite
    if not finite:
        alarm(
            f"!!! {label}: output has NaN/Inf (unwritten or broken elements). Timings are suspect."
        )
        checks.append({"label": label, "against": "finite", "ok": False})
    if ref is not None:
        res = compare(torch, "float64 reference (seq 0)", out[0], ref, TOL[kvname])
        record_check(row, "check", res, checks, label)


def check_vs_triton_dequant(ctx, args, row, out, q, kd, vd, sm_scale, checks, label):
    """Ours vs SGLang's Triton bf16 decode run on our dequantized K/V (sequence 0)."""
    torch = ctx.torch
    try:
        L = kd.shape[0]
        kb = kd.to(torch.bfloat16).contiguous()
        vb = vd.to(torch.bfloat16).contiguous()
        indptr = torch.tensor([0, L], dtype=torch.int32, device=ctx.device)
        ind = torch.arange(L, dtype=torch.int64, device=ctx.device)
        splits = sglang_splits_tensor(ctx, args, 1, L, args.triton_max_kv_splits)
        fn, o = build_sglang_triton(
            ctx,
            q[:1].contiguous(),
            kb,
            vb,
            indptr,
            ind,
            sm_scale,
            args.triton_max_kv_splits,
            splits,
        )
        o_tri = fn()[0]
        torch.cuda.synchronize()
        res = compare(
            torch,
            "sglang-triton bf16 on dequantized K/V (seq 0)",
            out[0],
            o_tri.double(),
            TOL["tq"],
        )
        record_check(row, "check_vs_triton_dequant", res, checks, label)
    except Exception as e:
        log(f"    [note] {label}: check vs SGLang Triton on dequantized K/V failed to run: {e!r}")


# --------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------
def make_indices(ctx, args, B, L):
    torch = ctx.torch
    S = B * L
    if args.layout == "random":
        slots = torch.randperm(S, device=ctx.device, dtype=torch.int64)
    else:
        slots = torch.arange(S, device=ctx.device, dtype=torch.int64)
    indptr = torch.arange(B + 1, device=ctx.device, dtype=torch.int32) * L
    return S, indptr, slots


def row_base(impl, kv, B, L, D, args):
    return {
        "impl": impl,
        "kv": kv,
        "B": B,
        "L": L,
        "head_dim": D,
        "num_q_heads": args.num_q_heads,
        "num_kv_heads": args.num_kv_heads,
    }


def finish_row(row, timing, nbytes):
    row.update(timing)
    row["bytes"] = nbytes
    tot = nbytes.get("total_for_tbps", nbytes["total"])
    row["tbps"] = tot / (row["ms"] * 1e-3) / 1e12
    return row


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def run_impl(label, row, results, fn_build):
    """Build + first call + time, recording an error row instead of raising."""
    try:
        fn_build(row)
        results.append(row)
        extra = ""
        if "num_kv_splits" in row:
            extra = f" splits {row['num_kv_splits']}/{row['max_kv_splits']}"
        log(
            f"    {label:<24} {row['ms']:9.4f} ms  {row['tbps']:6.3f} TB/s  (first call {row['first_call_s']:.1f} s"
            f"{', eager' if not row.get('cuda_graph') else ''}{extra})"
        )
    except Exception as e:
        row["error"] = error_text(e)
        results.append(row)
        log(f"    [skip] {label}: {row['error'][:300]}")
        tb = traceback.format_exc()
        log("      " + "\n      ".join(tb.strip().splitlines()[-6:]))


def first_call(ctx, fn):
    torch = ctx.torch
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def release(ctx) -> None:
    """Drop what the last row left behind before the next one allocates its pool."""
    gc.collect()
    ctx.torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# one shape
# --------------------------------------------------------------------------------------
@dataclass
class ShapeRun:
    """One decode shape: its sizes, slot layout and queries, shared by every row, and the
    lists the rows and checks go to."""

    ctx: Ctx
    args: argparse.Namespace
    B: int
    L: int
    D: int
    results: list
    checks: list
    do_check: bool
    codecs: dict
    S: int = 0
    indptr: object = None  # int32 [B + 1]
    slots: object = None  # int64 [B·L]: sglang-tq and SGLang Triton take int64 slot ids
    indices32: object = None  # int32 slot ids of FlashInfer (None without its rows)
    q: object = None  # bf16 [B, Hq, D]
    sinks: object = None  # fp32 [Hq] with --sinks

    def __post_init__(self):
        torch = self.ctx.torch
        self.S, self.indptr, self.slots = make_indices(self.ctx, self.args, self.B, self.L)
        if self.args.sinks:
            # bf16-representable, so FA3 (which reads them in bf16) gets the same values
            self.sinks = torch.randn(self.args.num_q_heads, device=self.ctx.device)
            self.sinks = self.sinks.to(torch.bfloat16).float()
        if "flashinfer" in self.args.impl_set:
            self.indices32 = self.slots.to(torch.int32)
        self.q = torch.randn(
            self.B, self.args.num_q_heads, self.D, dtype=torch.bfloat16, device=self.ctx.device
        )

    @property
    def idx0(self):
        return self.slots[: self.L]  # slot ids of sequence 0

    @property
    def attended(self) -> int:
        """Tokens one query attends to: L, or the last W + 1 with --window W."""
        return self.L if self.args.window < 0 else min(self.L, self.args.window + 1)

    @property
    def ref_idx0(self):
        return self.idx0[self.L - self.attended :]  # the slots sequence 0's query attends to

    @property
    def tq_extra(self) -> dict:
        """tq_decode's window (the keys kept, query included) and sinks."""
        extra = {"sinks": self.sinks} if self.sinks is not None else {}
        if self.args.window >= 0:
            extra["sliding_window"] = self.args.window + 1
        return extra

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.D)

    @property
    def bf16_kv_bytes(self) -> int:
        return self.S * self.args.num_kv_heads * 2 * self.D * 2

    def row(self, impl: str, kv: str) -> dict:
        row = row_base(impl, kv, self.B, self.L, self.D, self.args)
        if self.args.window >= 0 or self.args.sinks:
            row.update(window=self.args.window, sinks=self.args.sinks, attended=self.attended)
        return row

    def label(self, impl: str, kv: str) -> str:
        return f"{impl} {kv} {self.B}x{self.L}x{self.D}"

    def bytes(self, kv: str, index_bytes: int, **kw) -> dict:
        a = self.args
        return count_bytes(
            kv, self.B, self.attended, a.num_q_heads, a.num_kv_heads, self.D, index_bytes, **kw
        )


BASELINE_LIBRARY = {
    "sglang-triton": "decode_attention_fwd",
    "flashinfer": "flashinfer",
    "fa3": "fa3",
}


@dataclass
class BaselinePool:
    """The dense K/V pool of one baseline dtype and sequence 0's float64 reference output."""

    kv: str  # row "kv": bf16 or fp8_e4m3
    k: object
    v: object
    ref: object  # None without a check at this shape


def bench_shape(ctx, args, B, L, D, results, checks, do_check, codecs):
    sr = ShapeRun(ctx, args, B, L, D, results, checks, do_check, codecs)
    if "copy" in args.impl_set:
        run_impl(
            "copy (bf16 KV bytes)", sr.row("copy", "bf16"), results, lambda r: measure_copy(sr, r)
        )
        ctx.torch.cuda.empty_cache()
    bench_baselines(sr)
    if "sglang-tq" in args.impl_set:
        bench_tq(sr)
    release(ctx)


def measure_copy(sr: ShapeRun, row: dict) -> None:
    """The copy roof: a device copy of as many bytes as the shape's bf16 KV."""
    torch, nbytes = sr.ctx.torch, sr.bf16_kv_bytes
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=sr.ctx.device).normal_()
    dst = torch.empty_like(src)
    try:
        _, row["first_call_s"] = first_call(sr.ctx, lambda: dst.copy_(src))
        t = time_it(sr.ctx, sr.args, lambda: dst.copy_(src))
    finally:
        src = dst = None
    finish_row(row, t, {"read": nbytes, "write": nbytes, "total": 2 * nbytes})
    row["bf16_kv_read_ms_at_copy_bw"] = nbytes / (row["tbps"] * 1e12) * 1e3


def bench_baselines(sr: ShapeRun) -> None:
    """The sglang-triton, flashinfer and fa3 rows of each --baseline-dtypes pool; one pool
    alive at a time (the fp8 pool is cast from the bf16 one, which is then dropped)."""
    ctx, args, torch = sr.ctx, sr.args, sr.ctx.torch
    want_tri = "sglang-triton" in args.impl_set
    want_fi = "flashinfer" in args.impl_set and (
        args.fi_head_dims is None or sr.D in args.fi_head_dims
    )
    want_fa3 = "fa3" in args.impl_set
    if not ((want_tri or want_fi or want_fa3) and args.base_dtypes):
        return
    tri_splits = None
    if want_tri and ctx.decode_attention_fwd is not None:
        tri_splits = sglang_splits_tensor(ctx, args, sr.B, sr.L, args.triton_max_kv_splits)
    fa3_meta = fa3_tables(ctx, sr.slots, sr.B, sr.L) if want_fa3 and ctx.fa3 is not None else None
    shape = (sr.S, args.num_kv_heads, sr.D)
    kb = torch.empty(shape, dtype=torch.bfloat16, device=ctx.device).normal_()
    vb = torch.empty(shape, dtype=torch.bfloat16, device=ctx.device).normal_()
    for dt in ("bf16", "fp8"):
        if dt not in args.base_dtypes:
            continue
        if dt == "fp8":
            kbuf, vbuf = kb.to(torch.float8_e4m3fn), vb.to(torch.float8_e4m3fn)
            kb = vb = None  # the bf16 pool is not needed any more: one format alive at a time
            torch.cuda.empty_cache()
        else:
            kbuf, vbuf = kb, vb
        pool = BaselinePool(BASELINE_KV[dt], kbuf, vbuf, None)
        if sr.do_check:
            pool.ref = dense_ref(sr, sr.q[0], kbuf, vbuf)
        if want_tri:
            baseline_row(
                sr, "sglang-triton", pool, lambda r: measure_triton(sr, pool, tri_splits, r)
            )
        if want_fi:
            baseline_row(sr, "flashinfer", pool, lambda r: measure_flashinfer(sr, pool, r))
        if want_fa3:
            baseline_row(sr, "fa3", pool, lambda r: measure_fa3(sr, pool, fa3_meta, r))
        kbuf = vbuf = pool = None  # every reference gone before the next format is built
        release(ctx)
    del kb, vb
    release(ctx)


def dense_ref(sr: ShapeRun, q0, kbuf, vbuf):
    """float64 attention of sequence 0 over the dense pool's values."""
    torch = sr.ctx.torch
    k0, v0 = gather_rows(torch, kbuf, sr.ref_idx0), gather_rows(torch, vbuf, sr.ref_idx0)
    return ref_attention(torch, q0, k0, v0, sr.sm_scale, sr.sinks)


def baseline_row(sr: ShapeRun, impl: str, pool: BaselinePool, measure) -> None:
    """The row of one baseline: measured, or marked with why its library is missing."""
    row = sr.row(impl, pool.kv)
    if getattr(sr.ctx, BASELINE_LIBRARY[impl]) is not None:
        run_impl(f"{impl} {pool.kv}", row, sr.results, measure)
        return
    why = sr.ctx.import_errors.get(impl, "unavailable")
    if impl == "fa3":
        row.update(unavailable=why, error=f"unavailable: {why}")
    else:
        row["error"] = why
    sr.results.append(row)


def measure_triton(sr: ShapeRun, pool: BaselinePool, splits, row: dict) -> None:
    ctx, args = sr.ctx, sr.args
    fn, o = build_sglang_triton(
        ctx,
        sr.q,
        pool.k,
        pool.v,
        sr.indptr,
        sr.slots,
        sr.sm_scale,
        args.triton_max_kv_splits,
        splits,
    )
    o.fill_(float("nan"))  # poison: every element must be written
    out, row["first_call_s"] = first_call(ctx, fn)
    label = sr.label("sglang-triton", pool.kv)
    post_checks(ctx, row, out, pool.ref, pool.kv, sr.checks, label)
    row["max_kv_splits"] = args.triton_max_kv_splits
    row["num_kv_splits"] = int(splits[0].item())
    finish_row(row, time_it(ctx, args, fn), sr.bytes(pool.kv, 8))


def measure_flashinfer(sr: ShapeRun, pool: BaselinePool, row: dict) -> None:
    ctx, args = sr.ctx, sr.args
    t0 = time.perf_counter()
    fn, out, meta = build_flashinfer(
        ctx, args, sr.q, pool.k, pool.v, sr.indptr, sr.indices32, sr.sm_scale, pool.kv
    )
    row.update(meta)
    out.fill_(float("nan"))
    out, _ = first_call(ctx, fn)
    row["first_call_s"] = time.perf_counter() - t0  # includes plan() / JIT build
    post_checks(ctx, row, out, pool.ref, pool.kv, sr.checks, sr.label("flashinfer", pool.kv))
    finish_row(row, time_it(ctx, args, fn), sr.bytes(pool.kv, 4))


def measure_fa3(sr: ShapeRun, pool: BaselinePool, fa3_meta, row: dict) -> None:
    ctx, args = sr.ctx, sr.args
    t0 = time.perf_counter()
    fn, out, meta = build_fa3(
        ctx, args, sr.q, pool.k, pool.v, *fa3_meta, sr.sm_scale, pool.kv, sr.args.window, sr.sinks
    )
    row.update(meta)
    out.fill_(float("nan"))
    out, _ = first_call(ctx, fn)
    row["first_call_s"] = time.perf_counter() - t0
    fp8 = pool.kv == "fp8_e4m3"
    ref = pool.ref
    if ref is not None and fp8:  # FA3 also rounds q to fp8
        ref = dense_ref(sr, sr.q[0].to(pool.k.dtype).float(), pool.k, pool.v)
    post_checks(ctx, row, out, ref, pool.kv, sr.checks, sr.label("fa3", pool.kv))
    finish_row(row, time_it(ctx, args, fn), sr.bytes(pool.kv, 4, q_elt=1 if fp8 else 2))


def bench_tq(sr: ShapeRun) -> None:
    """One sglang-tq row per --kv bit pair, each on its own packed pool."""
    for kvname, kbits, vbits in sr.args.kv_list:
        n_splits = tq_num_kv_splits(sr.args, sr.B, sr.L, sr.ctx.sm_count, sr.D, kbits, vbits)
        row = sr.row("sglang-tq", kvname)
        if "sglang-tq" in sr.ctx.import_errors:
            row["error"] = sr.ctx.import_errors["sglang-tq"]
            sr.results.append(row)
            continue
        run_impl(
            f"sglang-tq {kvname}",
            row,
            sr.results,
            lambda r, kb=kbits, vb=vbits, n=n_splits: measure_tq(sr, r, kb, vb, n),
        )


def measure_tq(sr: ShapeRun, row: dict, kbits: int, vbits: int, n_splits: int) -> None:
    ctx, args, kvname = sr.ctx, sr.args, row["kv"]
    codec = get_codec(ctx, sr.codecs, sr.D, kbits, vbits)
    bufs = None
    try:
        bufs = alloc_and_fill_tq(ctx, args, codec, sr.S, args.num_kv_heads, sr.D)
        sanity_pool(ctx, bufs, sr.idx0, kvname)
        fn, _ = build_tq(
            ctx, args, sr.q, bufs, sr.indptr, sr.slots, codec, sr.sm_scale, n_splits, sr.tq_extra
        )
        out, row["first_call_s"] = first_call(ctx, fn)
        check_tq(sr, row, out, codec, bufs)
        row["max_kv_splits"] = tq_max_splits(args, sr.B)
        row["num_kv_splits"] = n_splits
        row["splits_policy"] = args.splits_policy
        row["launch"] = tq_launch(args, sr.D, kbits, vbits)
        row["k_code_bytes"] = codec.k_code_bytes
        row["v_code_bytes"] = codec.v_code_bytes
        nbytes = sr.bytes(kvname, 8, kcb=codec.k_code_bytes, vcb=codec.v_code_bytes)
        finish_row(row, time_it(ctx, args, fn), nbytes)
    finally:
        del bufs
        release(ctx)


def check_tq(sr: ShapeRun, row: dict, out, codec, bufs) -> None:
    """The output finite; with a check at this shape also sequence 0 against float64 attention
    over its dequantized K/V, and against SGLang's Triton kernel run on the same K/V."""
    idx0, label = sr.ref_idx0, sr.label("sglang-tq", row["kv"])
    ref = None
    if sr.do_check:
        kd = codec.k_quant.dequantize(bufs[0][idx0], bufs[1][idx0])
        vd = codec.v_quant.dequantize(bufs[2][idx0], bufs[3][idx0])
        ref = ref_attention(sr.ctx.torch, sr.q[0], kd, vd, sr.sm_scale, sr.sinks)
    post_checks(sr.ctx, row, out, ref, "tq", sr.checks, label)
    plain = sr.args.window < 0 and sr.sinks is None  # SGLang's Triton call has neither
    if sr.do_check and plain and sr.ctx.decode_attention_fwd is not None:
        check_vs_triton_dequant(
            sr.ctx, sr.args, row, out, sr.q, kd, vd, sr.sm_scale, sr.checks, label
        )


# --------------------------------------------------------------------------------------
# sglang-tq's pool and decode call
# --------------------------------------------------------------------------------------
def get_codec(ctx, codecs, D, kbits, vbits):
    key = (D, kbits, vbits)
    if key not in codecs:
        from ..format.codec import LayerCodec

        codecs[key] = LayerCodec.create(D, kbits, vbits, seed=0, device=ctx.device)
    return codecs[key]


def alloc_and_fill_tq(ctx, args, codec, S, Hkv, D):
    """Allocate packed buffers for S slots and fill every slot through tq_store_kv from random
    bf16 K/V (never zeros)."""
    torch = ctx.torch
    from ..kernels.tq_store import tq_store_kv

    bufs = codec.alloc_buffers(S, Hkv)
    k_codes, k_norms, v_codes, v_norms = bufs
    chunk = max(1, args.fill_chunk)
    for s0 in range(0, S, chunk):
        n = min(chunk, S - s0)
        k = torch.randn(n, Hkv, D, dtype=torch.bfloat16, device=ctx.device)
        v = torch.randn(n, Hkv, D, dtype=torch.bfloat16, device=ctx.device)
        loc = torch.arange(s0, s0 + n, dtype=torch.int64, device=ctx.device)
        tq_store_kv(k, v, loc, k_codes, k_norms, v_codes, v_norms, codec)
        del k, v, loc
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return bufs


def sanity_pool(ctx, bufs, idx0, kvname):
    """Loud warning if sequence 0's slots look unwritten (zero norms)."""
    zk = int((bufs[1][idx0] == 0).sum().item())
    zv = int((bufs[3][idx0] == 0).sum().item())
    if zk or zv:
        alarm(
            f"!!! sglang-tq {kvname}: {zk} K and {zv} V norms of sequence 0 are zero after tq_store_kv: "
            "pool not (fully) written?"
        )


def tq_launch(args, D, kbits, vbits) -> dict:
    """The stage-1 launch this row ran: the table's (or built-in) choice, then --tq-kernel-args."""
    from ..kernels.tq_decode import default_launch

    chosen = dataclasses.asdict(default_launch(D, kbits, vbits))
    over = json.loads(args.tq_kernel_args or "{}")
    return {**chosen, **{k: over[k] for k in ("block_n", "num_warps") if k in over}}


def build_tq(ctx, args, q, bufs, indptr, indices64, codec, sm_scale, n_splits, extra=None):
    torch = ctx.torch
    from ..kernels.tq_decode import DecodeWorkspace, tq_decode

    B, Hq, D = q.shape
    max_kv_splits = tq_max_splits(args, B)
    ws = DecodeWorkspace.create(B, Hq, D, max_kv_splits, ctx.device)
    num_kv_splits = torch.full((B,), n_splits, dtype=torch.int32, device=ctx.device)
    k_codes, k_norms, v_codes, v_norms = bufs

    def fn():
        return tq_decode(
            q,
            k_codes,
            k_norms,
            v_codes,
            v_norms,
            indptr,
            indices64,
            codec,
            sm_scale,
            num_kv_splits=num_kv_splits,
            max_kv_splits=max_kv_splits,
            workspace=ws,
            **{**json.loads(args.tq_kernel_args), **(extra or {})},
        )

    return fn, ws


# --------------------------------------------------------------------------------------
# write path
# --------------------------------------------------------------------------------------
@dataclass
class StoreRun:
    """The write path's step: N = B new tokens (one per sequence) stored into distinct random
    slots of a pool of B·L tokens, and the decode step at (B, L) the store is compared with."""

    ctx: Ctx
    args: argparse.Namespace
    rows: list
    S: int = 0
    indptr: object = None
    slots: object = None
    q: object = None
    loc: object = None  # int64 [B]: the new tokens' slots
    k_new: object = None  # bf16 [B, Hkv, D]
    v_new: object = None

    def __post_init__(self):
        torch, dev, a = self.ctx.torch, self.ctx.device, self.args
        B, L, D, Hkv = self.B, self.L, self.D, a.num_kv_heads
        self.S, self.indptr, self.slots = make_indices(self.ctx, a, B, L)
        self.q = torch.randn(B, a.num_q_heads, D, dtype=torch.bfloat16, device=dev)
        self.loc = self.slots[torch.randperm(self.S, device=dev)[:B]].contiguous()
        self.k_new = torch.randn(B, Hkv, D, dtype=torch.bfloat16, device=dev)
        self.v_new = torch.randn(B, Hkv, D, dtype=torch.bfloat16, device=dev)

    @property
    def B(self) -> int:
        return self.args.store_batch

    @property
    def L(self) -> int:
        return self.args.store_decode_len

    @property
    def D(self) -> int:
        return self.args.store_head_dim

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.D)

    @property
    def new_in_bytes(self) -> int:
        return 2 * self.B * self.args.num_kv_heads * self.D * 2 + self.B * 8  # bf16 k, v + loc

    def row(self, impl: str, kv: str) -> dict:
        return {
            "impl": impl,
            "kv": kv,
            "N": self.B,
            "num_kv_heads": self.args.num_kv_heads,
            "head_dim": self.D,
            "pool_slots": self.S,
            "decode_B": self.B,
            "decode_L": self.L,
        }

    def record(self, row: dict, label: str) -> None:
        self.rows.append(row)
        if "error" in row:
            log(f"    [skip] {label}: {row['error'][:300]}")
            return
        pct = row.get("pct_of_decode")
        log(
            f"    {label:<28} store {row['ms'] * 1e3:8.2f} us"
            + (
                f"   decode {row['decode_ms']:.4f} ms ({row['decode_impl']})  store = {pct:.1f}% of decode"
                if pct is not None
                else ""
            )
        )


def bench_write_path(ctx, args, codecs, write_rows):
    log(
        f"\n== write path: N = {args.store_batch} new tokens (one per sequence), "
        f"Hkv {args.num_kv_heads}, D {args.store_head_dim}; decode step for comparison at "
        f"B={args.store_batch}, L={args.store_decode_len}"
    )
    sr = StoreRun(ctx, args, write_rows)
    bench_plain_stores(sr)
    if "sglang-tq" in ctx.import_errors:
        write_rows.append(
            {**sr.row("sglang-tq-store", "*"), "error": ctx.import_errors["sglang-tq"]}
        )
        log(f"    [skip] sglang-tq store: {ctx.import_errors['sglang-tq']}")
    else:
        for kvname, kbits, vbits in args.kv_list:
            sr.record(measure_tq_store(sr, codecs, kvname, kbits, vbits), f"tq_store_kv {kvname}")
    release(ctx)


def time_decode(sr: StoreRun, label: str, build) -> float | None:
    """ms of the decode step ``build()`` returns (fn, ...), or None (logged) where it fails."""
    try:
        fn = build()[0]
        first_call(sr.ctx, fn)
        return time_it(sr.ctx, sr.args, fn)["ms"]
    except Exception as e:
        log(f"    [note] {label} decode at {sr.B}x{sr.L} failed: {e!r}")
        return None


def time_store(sr: StoreRun, row: dict, fn, write_bytes: int, decode_ms, decode_impl, **extra):
    """Time the store ``fn`` into ``row``: bytes moved, TB/s and its share of the decode step."""
    first_call(sr.ctx, fn)
    row.update(time_it(sr.ctx, sr.args, fn))
    read = sr.new_in_bytes
    row["bytes"] = {"read_new_kv_and_loc": read, "write": write_bytes, "total": read + write_bytes}
    row["tbps"] = row["bytes"]["total"] / (row["ms"] * 1e-3) / 1e12
    if decode_ms:
        row.update(
            decode_ms=decode_ms,
            decode_impl=decode_impl,
            pct_of_decode=100.0 * row["ms"] / decode_ms,
            **extra,
        )


def load_store_cache(sr: StoreRun):
    """SGLang's JIT store kernel where it takes this row size, else None (logged)."""
    row_bytes = sr.args.num_kv_heads * sr.D
    try:
        from sglang.kernels.ops.kvcache.kvcache import can_use_store_cache, store_cache

        if can_use_store_cache(row_bytes * 2) and can_use_store_cache(row_bytes):
            return store_cache
    except Exception as e:
        log(f"    [note] SGLang store_cache (JIT) unavailable: {e!r}")
    return None


def bench_plain_stores(sr: StoreRun) -> None:
    """bf16 / fp8 stores as SGLang's pool does them, against SGLang Triton's decode of the
    same format."""
    ctx, args, torch = sr.ctx, sr.args, sr.ctx.torch
    shape = (sr.S, args.num_kv_heads, sr.D)
    kb = torch.empty(shape, dtype=torch.bfloat16, device=ctx.device).normal_()
    vb = torch.empty(shape, dtype=torch.bfloat16, device=ctx.device).normal_()
    store_cache = load_store_cache(sr)
    for kvname in ("bf16", "fp8_e4m3"):
        if kvname == "bf16":
            kc, vc = kb, vb
        else:
            kc, vc = kb.to(torch.float8_e4m3fn), vb.to(torch.float8_e4m3fn)
        decode_ms = None
        if ctx.decode_attention_fwd is not None:

            def build(kc=kc, vc=vc):
                splits = sglang_splits_tensor(ctx, args, sr.B, sr.L, args.triton_max_kv_splits)
                return build_sglang_triton(
                    ctx,
                    sr.q,
                    kc,
                    vc,
                    sr.indptr,
                    sr.slots,
                    sr.sm_scale,
                    args.triton_max_kv_splits,
                    splits,
                )

            decode_ms = time_decode(sr, f"sglang-triton {kvname}", build)
        out_bytes = 2 * sr.B * args.num_kv_heads * sr.D * (2 if kvname == "bf16" else 1)
        for impl, fn in plain_store_fns(sr, kvname, kc, vc, store_cache):
            row = sr.row(impl, kvname)
            try:
                time_store(sr, row, fn, out_bytes, decode_ms, f"sglang-triton {kvname}")
            except Exception as e:
                row["error"] = error_text(e)
            sr.record(row, f"{impl} {kvname}")
        kc = vc = fn = None
        torch.cuda.empty_cache()
    del kb, vb
    release(ctx)


def plain_store_fns(sr: StoreRun, kvname: str, kc, vc, store_cache) -> list:
    """(impl, store) of a bf16 or fp8 pool: torch index stores as SGLang's MHATokenToKVPool
    does them (fp8: cast, then scatter through a uint8 view, its store_dtype), and SGLang's
    store_cache kernel where it is available."""
    torch, B, S, loc = sr.ctx.torch, sr.B, sr.S, sr.loc
    fp8 = kvname != "bf16"

    def new_rows():
        if not fp8:
            return sr.k_new, sr.v_new
        cast = (x.to(torch.float8_e4m3fn).view(torch.uint8) for x in (sr.k_new, sr.v_new))
        return tuple(cast)

    kcv, vcv = (kc.view(torch.uint8), vc.view(torch.uint8)) if fp8 else (kc, vc)

    def torch_store():
        kk, vv = new_rows()
        kcv[loc] = kk
        vcv[loc] = vv

    fns = [("torch-index-store", torch_store)]
    if store_cache is not None:
        rb = sr.args.num_kv_heads * sr.D * (1 if fp8 else 2)

        def sgl_store():
            kk, vv = new_rows()
            store_cache(
                kk.view(B, -1),
                vv.view(B, -1),
                kcv.view(S, -1),
                vcv.view(S, -1),
                loc,
                row_bytes=rb,
                v_row_bytes=rb,
                size_limit=S,
                reserved_skip_index=-1,
            )

        fns.append(("sglang-store_cache", sgl_store))
    return fns


def tq_store(sr: StoreRun, bufs, codec, pdl: bool = False) -> None:
    """tq_store_kv of the new tokens with the --store-* launch options."""
    from ..kernels.tq_store import tq_store_kv

    args = sr.args
    tq_store_kv(
        sr.k_new,
        sr.v_new,
        sr.loc,
        *bufs,
        codec,
        pdl=pdl,
        num_warps=args.store_num_warps,
        fwht=args.store_rotation == "fwht",
        row_tokens=args.store_row_tokens,
    )


def measure_tq_store(sr: StoreRun, codecs, kvname: str, kbits: int, vbits: int) -> dict:
    """tq_store_kv against our decode step at (B, L), and the two as one layer's chain."""
    ctx, args = sr.ctx, sr.args
    n_splits = tq_num_kv_splits(args, sr.B, sr.L, ctx.sm_count, sr.D, kbits, vbits)
    row = sr.row("sglang-tq-store", kvname)
    bufs = None
    try:
        codec = get_codec(ctx, codecs, sr.D, kbits, vbits)
        bufs = alloc_and_fill_tq(ctx, args, codec, sr.S, args.num_kv_heads, sr.D)
        dec_ms = time_decode(
            sr,
            f"sglang-tq {kvname}",
            lambda: build_tq(
                ctx, args, sr.q, bufs, sr.indptr, sr.slots, codec, sr.sm_scale, n_splits
            ),
        )
        time_store(
            sr,
            row,
            lambda: tq_store(sr, bufs, codec),
            sr.B * args.num_kv_heads * (codec.k_code_bytes + codec.v_code_bytes + 4),
            dec_ms,
            f"sglang-tq {kvname}",
            num_kv_splits=n_splits,
            max_kv_splits=tq_max_splits(args, sr.B),
        )
        row["chain"] = bench_store_decode_chain(sr, bufs, codec, n_splits)
        chain = ", ".join(
            f"{k} {v * 1e3:.2f} us" for k, v in row["chain"].items() if isinstance(v, float)
        )
        log(f"    store + decode chain {kvname}: {chain}")
    except Exception as e:
        row["error"] = error_text(e)
    finally:
        bufs = None
        release(ctx)
    return row


def bench_store_decode_chain(sr: StoreRun, bufs, codec, n_splits) -> dict:
    """One decode layer's attention as the backend launches it: tq_store_kv of the new
    tokens, then tq_decode; serial launches against programmatic dependent launch with
    stage 1 rotating q while the store runs (``early_q``). ms of each, same buffers."""
    from ..kernels.tq_decode import pdl_supported

    ctx, args = sr.ctx, sr.args
    step = (ctx, args, sr.q, bufs, sr.indptr, sr.slots, codec, sr.sm_scale, n_splits)
    decode, _ = build_tq(*step)
    early, _ = build_tq(*step, extra={"early_q": True})
    out = {}
    variants = [("serial_ms", False, decode)] + (
        [("pdl_early_q_ms", True, early)] if pdl_supported() else []
    )
    for name, pdl, dec in variants:

        def chain(pdl=pdl, dec=dec):
            tq_store(sr, bufs, codec, pdl=pdl)
            return dec()

        first_call(ctx, chain)
        out[name] = time_it(ctx, args, chain)["ms"]
    return out


# --------------------------------------------------------------------------------------
# derived columns, table, JSON
# --------------------------------------------------------------------------------------
def add_derived(results, copy_roof_tbps):
    by_shape = {}
    for r in results:
        if "error" not in r:
            by_shape.setdefault((r["B"], r["L"], r["head_dim"]), {})[(r["impl"], r["kv"])] = r
    for r in results:
        if "error" in r or r["impl"] == "copy":
            continue
        ref = by_shape.get((r["B"], r["L"], r["head_dim"]), {})
        for key, name in (
            (("flashinfer", "bf16"), "speedup_vs_flashinfer_bf16"),
            (("flashinfer", "fp8_e4m3"), "speedup_vs_flashinfer_fp8"),
            (("sglang-triton", "bf16"), "speedup_vs_sglang_triton_bf16"),
            (("sglang-triton", "fp8_e4m3"), "speedup_vs_sglang_triton_fp8"),
            (("fa3", "bf16"), "speedup_vs_fa3_bf16"),
            (("fa3", "fp8_e4m3"), "speedup_vs_fa3_fp8"),
        ):
            if key in ref:
                r[name] = ref[key]["ms"] / r["ms"]
            else:
                r.pop(name, None)
        cp = ref.get(("copy", "bf16"))
        if cp:
            r["frac_of_copy_bw"] = r["tbps"] / cp["tbps"]
        if copy_roof_tbps:
            r["roof_ms"] = r["bytes"]["total"] / (copy_roof_tbps * 1e12) * 1e3


def print_table(results):
    hdr = (
        f"{'impl':<14} {'kv':<9} {'B':>4} {'L':>6} {'D':>4} {'spl':>4} {'ms':>9} {'TB/s':>6} "
        f"{'%copy':>6} {'xFI-bf16':>8} {'xFI-fp8':>8} {'xTri-bf16':>9} {'xFA3-bf16':>9} {'xFA3-fp8':>8}  check"
    )
    log("\n" + hdr)
    log("-" * len(hdr))
    last = None
    for r in results:
        shape = (r["B"], r["L"], r["head_dim"])
        if last is not None and shape != last:
            log("")
        last = shape
        if "unavailable" in r:
            log(
                f"{r['impl']:<14} {r['kv']:<9} {r['B']:>4} {r['L']:>6} {r['head_dim']:>4}  "
                f"not run (unavailable): {r['unavailable'][:90]}"
            )
            continue
        if "error" in r:
            log(
                f"{r['impl']:<14} {r['kv']:<9} {r['B']:>4} {r['L']:>6} {r['head_dim']:>4}  ERROR: {r['error'][:80]}"
            )
            continue

        def f(x, fmt):
            return format(x, fmt) if x is not None else "-"

        chk = ""
        if r["impl"] == "copy" and "bf16_kv_read_ms_at_copy_bw" in r:
            chk = f"bf16 KV read at copy bw: {r['bf16_kv_read_ms_at_copy_bw']:.4f} ms"
        if "check" in r:
            chk = ("ok " if r["check"]["ok"] else "FAIL ") + f"{r['check']['rel_err']:.1e}"
        if r.get("output_finite") is False:
            chk += " NaN!"
        pc = r.get("frac_of_copy_bw")
        log(
            f"{r['impl']:<14} {r['kv']:<9} {r['B']:>4} {r['L']:>6} {r['head_dim']:>4} "
            f"{f(r.get('num_kv_splits'), 'd') if 'num_kv_splits' in r else '-':>4} {r['ms']:9.4f} "
            f"{r['tbps']:6.3f} {f(pc * 100 if pc is not None else None, '.0f'):>6} "
            f"{f(r.get('speedup_vs_flashinfer_bf16'), '.2f'):>8} {f(r.get('speedup_vs_flashinfer_fp8'), '.2f'):>8} "
            f"{f(r.get('speedup_vs_sglang_triton_bf16'), '.2f'):>9} {f(r.get('speedup_vs_fa3_bf16'), '.2f'):>9} "
            f"{f(r.get('speedup_vs_fa3_fp8'), '.2f'):>8}  {chk}"
        )


def print_write_table(rows):
    if not rows:
        return
    hdr = f"{'write path':<20} {'kv':<9} {'N':>4} {'store us':>9} {'decode ms':>10} {'store/decode':>12}  decode impl"
    log("\n" + hdr)
    log("-" * len(hdr))
    for r in rows:
        if "error" in r:
            log(f"{r['impl']:<20} {r['kv']:<9} {r['N']:>4}  ERROR: {r['error'][:80]}")
            continue
        dm = r.get("decode_ms")
        pct = r.get("pct_of_decode")
        log(
            f"{r['impl']:<20} {r['kv']:<9} {r['N']:>4} {r['ms'] * 1e3:9.2f} "
            f"{(format(dm, '.4f') if dm else '-'):>10} {(format(pct, '.1f') + '%' if pct else '-'):>12}  "
            f"{r.get('decode_impl', '-')}"
        )


def baseline_config(args) -> dict:
    """How the fa3 and flashinfer rows call their kernels (the results' config)."""
    return {
        "fa3": {
            "kernel": "sgl_kernel.flash_attn.flash_attn_with_kvcache (SGLang fa3 backend, forward_decode)",
            "page_size": 1,
            "page_table": "int32 [B, L] slot ids",
            "cu_seqlens_q": "arange(B+1)",
            "max_seqlen_q": 1,
            "causal": True,
            "num_splits": 0,
            "scheduler_metadata": "none"
            if args.fa3_no_scheduler_metadata
            else "get_scheduler_metadata once per batch, outside the timed call",
            "fp8": "q cast to float8_e4m3fn; "
            + (
                "k/v_descale ones [B, Hkv]"
                if args.fa3_descale
                else "no k/v_descale (checkpoint without KV scales)"
            ),
        },
        "flashinfer": {
            "wrapper": "BatchDecodeWithPagedKVCacheWrapper",
            "kv_layout": "NHD",
            "backend": "fa2",
            "head_dims": sorted(args.fi_head_dims) if args.fi_head_dims else "all",
            "tensor_cores": args.flashinfer_tensor_cores,
            "workspace_bytes": FLASHINFER_WORKSPACE_BYTES,
        },
    }


def config_dict(args, ctx=None):
    from ..env import decode_launch_file

    cfg = {
        "tq_kernel_args": json.loads(args.tq_kernel_args),
        "shapes": [list(s) for s in args.shapes_list],
        "kv": [k for k, _, _ in args.kv_list],
        "impls": sorted(args.impl_set),
        "baseline_dtypes": args.base_dtypes,
        "num_q_heads": args.num_q_heads,
        "num_kv_heads": args.num_kv_heads,
        "page_size": 1,
        "slot_layout": args.layout,
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "repeat": args.repeat,
        "timer": "triton.testing.do_bench(return_mode='median'), L2 cleared before each call; "
        "ms = median over 'repeat' passes",
        "cuda_graph": args.cuda_graph,
        "store_num_warps": args.store_num_warps or "kernel default",
        "store_row_tokens": args.store_row_tokens,
        "store_rotation": args.store_rotation,
        "sglang_tq_max_kv_splits": args.max_kv_splits or "backend ceiling (split_ceiling)",
        "sglang_tq_splits_policy": args.splits_policy,
        "sglang_tq_waves": args.waves,
        "sglang_tq_min_split_tokens": args.min_split_tokens,
        "sglang_tq_fixed_num_kv_splits": args.num_kv_splits,
        "sglang_tq_decode_launch_table": decode_launch_file() or "packaged",
        "sglang_triton_max_kv_splits": args.triton_max_kv_splits,
        "sglang_triton_num_kv_splits": "SGLang get_num_kv_splits_triton (TritonAttnBackend.get_num_kv_splits)",
        **baseline_config(args),
        "q_dtype": "bfloat16",
        "sm_scale": "1/sqrt(head_dim)",
        "data": "K, V, q ~ N(0,1) bf16 (fp8 baselines: the bf16 values cast to float8_e4m3fn; "
        "sglang-tq: fresh N(0,1) bf16 K/V quantized by tq_store_kv)",
        "bytes_counted": BYTES_NOTE,
        "check_tolerance_rel": TOL,
        "seed": args.seed,
        "argv": args.argv,
    }
    if ctx is not None:
        cfg["sm_count"] = ctx.sm_count
        cfg["use_pdl_sglang_triton"] = ctx.use_pdl
    return cfg


def dry_run(args):
    sm = ASSUMED_SM_COUNT
    log(f"dry run (no GPU; assuming {sm} SMs). Hq {args.num_q_heads}, Hkv {args.num_kv_heads}")
    hdr = f"{'B':>4} {'L':>6} {'D':>4} {'pool GiB bf16':>13} {'tq splits':>9} {'tri splits':>10}  bytes/token/head"
    log(hdr)
    for B, L, D in args.shapes_list:
        S = B * L
        gib = S * args.num_kv_heads * 4 * D / 2**30
        tri = sglang_num_kv_splits(
            [L] * B, args.num_q_heads, args.num_kv_heads, args.triton_max_kv_splits, sm
        )[0]
        tq = tq_num_kv_splits(args, B, L, sm, D)
        per = {"bf16": 4 * D, "fp8": 2 * D}
        for name, kb, vb in args.kv_list:
            per[name] = code_bytes(D, kb) + code_bytes(D, vb) + 4
        log(
            f"{B:>4} {L:>6} {D:>4} {gib:13.3f} {tq:>9} {tri:>10}  "
            + " ".join(f"{k}={v}" for k, v in per.items())
        )
    log("\nbytes counted: " + BYTES_NOTE)


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------
def make_ctx(args) -> Ctx | None:
    """The run's context on --device (None, logged, where CUDA is asked for and missing)."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("No CUDA device: this benchmark needs a GPU (use --dry-run to see the plan).")
        return None
    ctx = Ctx()
    ctx.torch = torch
    ctx.device = torch.device(args.device)
    if ctx.device.type == "cuda":
        if ctx.device.index is not None:
            torch.cuda.set_device(ctx.device)
        ctx.sm_count = torch.cuda.get_device_properties(ctx.device).multi_processor_count
    else:
        ctx.sm_count = ASSUMED_SM_COUNT
    torch.manual_seed(args.seed)
    return ctx


def try_import(ctx: Ctx, args) -> None:
    """The baselines' libraries (decode_baselines.load_baselines), then sglang-tq's kernels
    where its rows or the write path need them."""
    load_baselines(ctx, args)
    if "sglang-tq" in args.impl_set or not args.no_write_path:
        try:
            from ..format.codec import LayerCodec  # noqa: F401
            from ..kernels.tq_decode import DecodeWorkspace, tq_decode  # noqa: F401
            from ..kernels.tq_store import tq_store_kv  # noqa: F401
        except Exception as e:
            ctx.import_errors["sglang-tq"] = f"import failed: {e!r}"
            log(f"[skip] sglang-tq: {ctx.import_errors['sglang-tq']}")


def measure_copy_roof(ctx: Ctx, args, payload: dict) -> float | None:
    """The device copy roof in TB/s: one large copy (2 GiB read + 2 GiB written)."""
    torch = ctx.torch
    try:
        n = (2 << 30) // 2
        src = torch.empty(n, dtype=torch.bfloat16, device=ctx.device).normal_()
        dst = torch.empty_like(src)
        t = time_it(ctx, args, lambda: dst.copy_(src))
        copy_roof = 2 * n * 2 / (t["ms"] * 1e-3) / 1e12
        payload["copy_roof"] = {"bytes_read": 2 * n, "ms": t["ms"], "tbps": copy_roof}
        log(f"copy roof: 2 GiB D2D copy {t['ms']:.3f} ms = {copy_roof:.3f} TB/s (read+write)")
        src = dst = None
        torch.cuda.empty_cache()
        return copy_roof
    except Exception as e:
        log(f"[note] copy roof failed: {e!r}")
        return None


def over_budget(args, t_start: float) -> float | None:
    """Seconds spent, where --time-budget-s is set and spent; else None."""
    el = time.perf_counter() - t_start
    return el if args.time_budget_s and el > args.time_budget_s else None


def bench_shapes(ctx: Ctx, args, payload: dict, save, t_start: float) -> None:
    """Every shape's rows, the derived columns and a rewrite of the results after each."""
    results, checks, codecs = payload["results"], payload["checks"], {}
    seen_d = set()
    for i, (B, L, D) in enumerate(args.shapes_list):
        spent = over_budget(args, t_start)
        if spent is not None:
            log(
                f"[skip] time budget {args.time_budget_s:.0f} s spent ({spent:.0f} s): skipping {B}x{L}x{D}"
            )
            results.append({**row_base("*", "*", B, L, D, args), "error": "skipped: time budget"})
            continue
        do_check = args.check == "all" or (args.check == "first" and D not in seen_d)
        seen_d.add(D)
        log(
            f"\n== shape {i + 1}/{len(args.shapes_list)}: B={B} L={L} head_dim={D} "
            f"(Hq {args.num_q_heads}, Hkv {args.num_kv_heads}; bf16 KV "
            f"{B * L * args.num_kv_heads * 4 * D / 2**30:.2f} GiB)  "
            f"t={time.perf_counter() - t_start:.0f} s"
        )
        try:
            bench_shape(ctx, args, B, L, D, results, checks, do_check, codecs)
        except Exception as e:
            log(f"[error] shape {B}x{L}x{D}: {e!r}")
            log(traceback.format_exc())
            results.append({**row_base("*", "*", B, L, D, args), "error": error_text(e)})
            release(ctx)
        add_derived(results, payload.get("copy_roof", {}).get("tbps"))
        save()
    if args.no_write_path:
        return
    spent = over_budget(args, t_start)
    if spent is not None:
        log(f"[skip] write path: time budget spent ({spent:.0f} s)")
        return
    try:
        bench_write_path(ctx, args, codecs, payload["write_path"])
    except Exception as e:
        log(f"[error] write path: {e!r}")
        log(traceback.format_exc())
        payload["write_path"].append({"impl": "*", "error": error_text(e)})


def report(ctx: Ctx, payload: dict) -> None:
    """The tables, and every failed check again at the end where it cannot be missed."""
    print_table(payload["results"])
    if "fa3" in ctx.import_errors:
        log(f"FA3 rows not run: {ctx.import_errors['fa3']}")
    print_write_table(payload["write_path"])
    failed = [c for c in payload["checks"] if not c.get("ok")]
    if failed:
        log("")
        alarm(
            *(
                f"!!! CHECK FAILED: {c['label']} vs {c['against']}"
                + (f": rel {c['rel_err']:.3e}" if "rel_err" in c else "")
                for c in failed
            )
        )


def set_cache_dir(cache_dir: str) -> None:
    cd = Path(cache_dir).resolve()
    cd.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", str(cd / "triton"))
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", str(cd))


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        dry_run(args)
        return 0
    if args.cache_dir:
        set_cache_dir(args.cache_dir)
    t_start = time.perf_counter()
    ctx = make_ctx(args)
    if ctx is None:
        return 2
    from .results import get_provenance

    prov = get_provenance()
    out = kernel_io.out_path(args.out, RESULTS_FOLDER, prov, "bench_decode")
    log(
        f"GPU {prov['gpu']} ({ctx.sm_count} SMs), commit {prov['commit']}, "
        f"cuda_graph={args.cuda_graph}, warmup/rep {args.warmup}/{args.rep} ms x{args.repeat}"
    )
    try_import(ctx, args)
    log(
        f"imports done in {time.perf_counter() - t_start:.1f} s; SGLang Triton use_pdl={ctx.use_pdl}"
    )
    payload = {
        "config": config_dict(args, ctx),
        "results": [],
        "write_path": [],
        "checks": [],
        "import_errors": ctx.import_errors,
    }

    def save():
        payload["elapsed_s"] = time.perf_counter() - t_start
        write_doc(out, TOOL, args.argv, prov, **payload)

    measure_copy_roof(ctx, args, payload)
    bench_shapes(ctx, args, payload, save, t_start)
    add_derived(payload["results"], payload.get("copy_roof", {}).get("tbps"))
    save()
    report(ctx, payload)
    log(f"\nwrote {out}  ({payload['elapsed_s']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
