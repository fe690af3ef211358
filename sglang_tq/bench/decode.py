"""Decode-attention benchmark: sglang-tq packed KV vs SGLang Triton, FlashInfer, FA3 and a copy roof.

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

It also times the write path: tq_store_kv for one new token per sequence
(N = B = 64 by default, Hkv 8, D 128) against SGLang-style bf16 / fp8 stores,
as a share of the decode step at (B=64, L=4096).

Timing: triton.testing.do_bench(..., return_mode="median"), which clears L2 before
every call; by default each implementation is captured in a CUDA graph first and the
graph replay is timed (decode runs inside CUDA graphs in SGLang); --no-cuda-graph
times eager calls. Bytes counted ("effective TB/s" = bytes / time): the KV bytes the
format must read (ours: k_code_bytes + v_code_bytes + 4 B of fp16 norms per token per
kv head; bf16: 4*D; fp8: 2*D), the slot-id list (8 B/token for int64 kv_indices as
SGLang Triton and sglang-tq take it, 4 B/token for FlashInfer's int32 indices and FA3's
int32 page table), q (bf16; fp8 for FA3 fp8) and out (bf16). kv_indptr, num_kv_splits,
scheduler metadata and split-KV partials are not counted.

Results go to --out as JSON (rewritten after every shape, so a run cut short keeps
what it measured). Examples:

    python scripts/bench_decode.py                       # default shapes: a few minutes on an H100,
                                                         # plus first-use JIT builds (Triton, FlashInfer)
    python scripts/bench_decode.py --quick               # 2 shapes, smoke test
    python scripts/bench_decode.py --shapes 64x16384,32x8192x256 --kv k4v4,k2v2
    python scripts/bench_decode.py --dry-run             # print plan, bytes and splits; no GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_SHAPES = "1x4096,1x32768,16x8192,32x32768,64x16384,128x4096,64x16384x64,32x8192x256"
QUICK_SHAPES = "1x4096,64x16384"
DEFAULT_KV = "k4v4,k4v3,k3v3,k4v2,k2v2"
ALL_IMPLS = ("sglang-tq", "sglang-triton", "flashinfer", "fa3", "copy")
BASELINE_KV = {"bf16": "bf16", "fp8": "fp8_e4m3"}  # --baseline-dtypes value -> row "kv"
# SGLang's default FlashInfer workspace (srt/environ.py SGLANG_FLASHINFER_WORKSPACE_SIZE).
FLASHINFER_WORKSPACE_BYTES = 384 * 1024 * 1024
# SGLang's default --triton-attention-num-kv-splits (srt/server_args.py).
SGLANG_DEFAULT_MAX_KV_SPLITS = 8
ASSUMED_SM_COUNT = 132  # H100 SXM; only used by --dry-run without a GPU
TOL = {
    "bf16": 2e-2,
    "fp8_e4m3": 8e-2,
    "tq": 2e-2,
}  # FA3 fp8: reference with q rounded to fp8 too  # rel. error ‖out-ref‖/‖ref‖ flagged above this

BYTES_NOTE = (
    "bytes.kv: packed KV the kernel must read (sglang-tq: (k_code_bytes + v_code_bytes + 4 B fp16 "
    "norms) per token per kv head; bf16: 4*D B; fp8: 2*D B per token per kv head); bytes.indices: "
    "slot ids, 8 B/token (int64 kv_indices; sglang-tq and SGLang Triton) or 4 B/token (int32; "
    "FlashInfer indices, FA3 page table); bytes.q / bytes.out: [B,Hq,D] each, bf16 (q fp8 for FA3 fp8). "
    "Not counted: kv_indptr, num_kv_splits, FA3 scheduler metadata, "
    "split-KV partial results (written and re-read by the reduce step). copy: bytes.read = bytes of "
    "the bf16 KV at that shape, bytes.write = same, tbps = (read+write)/time."
)


def log(*a):
    print(*a, flush=True)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------
def parse_shapes(text: str, default_d: int) -> list[tuple[int, int, int]]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        parts = re.split(r"[x:]", tok)
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError(
                f"bad shape {tok!r}: expected BxL or BxLxD, e.g. 64x16384x128"
            )
        b, n = int(parts[0]), int(parts[1])
        d = int(parts[2]) if len(parts) == 3 else default_d
        if b < 1 or n < 1 or d < 8:
            raise argparse.ArgumentTypeError(f"bad shape {tok!r}")
        out.append((b, n, d))
    if not out:
        raise argparse.ArgumentTypeError("no shapes given")
    return out


def parse_kv(text: str) -> list[tuple[str, int, int]]:
    """Comma-separated bit pairs (``k4v4,k3v3``) by the server's own rule."""
    from sglang_tq.config import TQConfig

    try:
        return TQConfig.parse_bits_list(text)
    except ValueError as exc:
        raise SystemExit(f"--kv: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = ap.add_argument_group("what to run")
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
    g.add_argument("--kv", default=DEFAULT_KV, help=f"our formats to time (default {DEFAULT_KV})")
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

    g = ap.add_argument_group("split-KV")
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

    g = ap.add_argument_group("timing")
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

    g = ap.add_argument_group("output / environment")
    g.add_argument(
        "--out",
        default="benchmarks/results/bench_decode/bench_decode.json",
        help="JSON output path, relative to the repo root unless absolute",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="set TRITON_CACHE_DIR=<dir>/triton and FLASHINFER_WORKSPACE_BASE=<dir> (JIT caches) "
        "unless already set, so a carried folder can skip recompiles",
    )
    g.add_argument(
        "--device",
        default="cuda",
        help="torch device (default cuda; others only for testing the script)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (shapes, bytes, splits) without touching a GPU",
    )
    return ap


def finalize_args(args):
    args.shapes_list = parse_shapes(
        args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES), args.head_dim
    )
    args.kv_list = parse_kv(args.kv)
    args.impl_set = {s.strip() for s in args.impls.split(",") if s.strip()}
    bad = args.impl_set - set(ALL_IMPLS)
    if bad:
        raise SystemExit(f"unknown --impls {sorted(bad)}; choose from {ALL_IMPLS}")
    args.base_dtypes = [s.strip() for s in args.baseline_dtypes.split(",") if s.strip()]
    bad = set(args.base_dtypes) - set(BASELINE_KV)
    if bad:
        raise SystemExit(f"unknown --baseline-dtypes {sorted(bad)}; choose from bf16,fp8")
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
    args.cuda_graph = not args.no_cuda_graph
    out = Path(args.out)
    args.out_path = out if out.is_absolute() else REPO / out
    return args


# --------------------------------------------------------------------------------------
# split-KV policies
# --------------------------------------------------------------------------------------
def sglang_num_kv_splits(seq_lens, num_head, num_kv_head, max_kv_splits, core_count, num_group=1):
    """Python mirror of sglang.kernels.ops.attention.metadata.get_num_kv_splits_triton
    (SGLang 0.5.17), as TritonAttnBackend.get_num_kv_splits launches it."""
    max_len, min_len = max(seq_lens), min(seq_lens)
    num_seq = len(seq_lens)
    if max_len * 8 < min_len * 10:
        min_len = max_len
    s1 = min(cdiv(max_len, min_len), max_kv_splits)
    chunk1 = cdiv(max_len, s1)
    ext_seq_len = max_len / 64.0
    ext_core = int(core_count * max(math.log2(ext_seq_len), 1.0)) if ext_seq_len > 0 else core_count
    group = num_head // num_kv_head
    if group == 1:
        token_grid = num_seq * num_group * num_head
    else:
        block_h = min(16, group)
        token_grid = num_seq * num_group * cdiv(num_head, block_h)
    s2 = min(cdiv(ext_core, token_grid), max_kv_splits)
    chunk2 = cdiv(max_len, s2)
    return [max(cdiv(n, chunk1), cdiv(n, chunk2)) for n in seq_lens]


def tq_max_splits(args, B) -> int:
    """sglang-tq's split ceiling at batch B: --max-kv-splits, or the backend's rule."""
    from sglang_tq.kernels.tq_decode import split_ceiling

    return args.max_kv_splits or split_ceiling(B)


def tq_num_kv_splits(args, B, L, sm_count, D=None, kbits=4, vbits=4) -> int:
    if args.splits_policy == "fixed":
        n = args.num_kv_splits
    elif args.splits_policy == "backend":
        import torch

        from sglang_tq.kernels.tq_decode import DecodeLaunch, default_launch, default_num_kv_splits

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
# device helpers (torch imported lazily so --help and --dry-run stay fast)
# --------------------------------------------------------------------------------------
class Ctx:
    """Lazily imported modules and shared per-run state."""

    torch = None
    triton = None
    device = None
    sm_count = None
    decode_attention_fwd = None
    get_num_kv_splits_triton = None
    flashinfer = None
    fi_workspace = None
    fa3 = None  # sgl_kernel.flash_attn.flash_attn_with_kvcache
    fa3_sched = None  # sgl_kernel.flash_attn.get_scheduler_metadata (None: not in this build)
    use_pdl = False
    import_errors: dict = {}


def probe_fa3(ctx) -> str | None:
    """Load sgl-kernel's FA3 into ctx; return None, or why the fa3 rows cannot run."""
    torch = ctx.torch
    if ctx.device is None or ctx.device.type != "cuda":
        return f"FA3 needs a CUDA device, got {ctx.device}"
    try:
        from sgl_kernel import flash_attn as fa
    except Exception as e:
        return (
            f"sgl-kernel's FA3 library did not import ({type(e).__name__}: {str(e)[:200]}); "
            f"on the GPU host stage it with dev/gpu_host/stage_fa3.sh"
        )
    try:
        ok = bool(fa.is_fa3_supported(ctx.device))
    except Exception as e:
        return f"sgl_kernel.flash_attn.is_fa3_supported failed: {e!r}"
    if not ok:
        cap = torch.cuda.get_device_capability(ctx.device)
        return f"FA3 needs sm80/sm90 with CUDA >= 12.3, got sm{cap[0]}{cap[1]} with CUDA {torch.version.cuda}"
    ctx.fa3 = fa.flash_attn_with_kvcache
    ctx.fa3_sched = getattr(fa, "get_scheduler_metadata", None)
    return None


def try_import(ctx: Ctx, args):
    torch = ctx.torch
    if "sglang-triton" in args.impl_set or "sglang-tq" in args.impl_set or not args.no_write_path:
        try:
            from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

            ctx.decode_attention_fwd = decode_attention_fwd
        except Exception as e:
            ctx.import_errors["sglang-triton"] = f"import decode_attention_fwd failed: {e!r}"
            log(f"[skip] sglang-triton: {ctx.import_errors['sglang-triton']}")
        try:
            from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

            ctx.get_num_kv_splits_triton = get_num_kv_splits_triton
        except Exception as e:
            log(f"[note] get_num_kv_splits_triton unavailable ({e!r}); using the Python mirror")
        try:
            from sgl_kernel.utils import is_arch_support_pdl

            ctx.use_pdl = bool(is_arch_support_pdl())
        except Exception:
            ctx.use_pdl = (
                ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device)[0] >= 9
            )
        if ctx.device.type != "cuda":
            ctx.use_pdl = False
    if "flashinfer" in args.impl_set:
        try:
            import flashinfer

            ctx.flashinfer = flashinfer
            ctx.fi_workspace = torch.zeros(
                FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=ctx.device
            )
        except Exception as e:
            ctx.import_errors["flashinfer"] = f"import flashinfer failed: {e!r}"
            log(f"[skip] flashinfer: {ctx.import_errors['flashinfer']}")
    if "fa3" in args.impl_set:
        why = probe_fa3(ctx)
        if why:
            ctx.import_errors["fa3"] = why
            log(f"[skip] FA3 rows not run: {why}")
    if "sglang-tq" in args.impl_set or not args.no_write_path:
        try:
            from sglang_tq.format.codec import LayerCodec  # noqa: F401
            from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode  # noqa: F401
            from sglang_tq.kernels.tq_store import tq_store_kv  # noqa: F401
        except Exception as e:
            ctx.import_errors["sglang-tq"] = f"import failed: {e!r}"
            log(f"[skip] sglang-tq: {ctx.import_errors['sglang-tq']}")


def sglang_splits_tensor(ctx: Ctx, args, B, L, max_kv_splits):
    """num_kv_splits [B] int32 for the SGLang Triton baseline, from SGLang's own kernel if importable
    (cross-checked against the Python mirror), else from the mirror."""
    torch = ctx.torch
    mirror = sglang_num_kv_splits(
        [L] * B, args.num_q_heads, args.num_kv_heads, max_kv_splits, ctx.sm_count
    )
    t = torch.tensor(mirror, dtype=torch.int32, device=ctx.device)
    if ctx.get_num_kv_splits_triton is not None:
        try:
            import triton

            out = torch.empty(B, dtype=torch.int32, device=ctx.device)
            seq_lens = torch.full((B,), L, dtype=torch.int64, device=ctx.device)
            sched = 256 if B < 256 else triton.next_power_of_2(B)
            ctx.get_num_kv_splits_triton[(1,)](
                out,
                seq_lens,
                B,
                1,
                args.num_q_heads,
                args.num_kv_heads,
                max_kv_splits,
                ctx.sm_count,
                MAX_NUM_SEQ=sched,
            )
            if out.tolist() != mirror:
                log(
                    f"[note] SGLang get_num_kv_splits_triton gave {out[:4].tolist()}.., mirror {mirror[:4]}..; "
                    "using SGLang's"
                )
            t = out
        except Exception as e:
            log(f"[note] get_num_kv_splits_triton failed ({e!r}); using the Python mirror")
    return t


def time_it(ctx: Ctx, args, fn):
    """Median ms over args.repeat do_bench passes of the graph replay, plus details
    (sglang_tq.bench.timing.time_replay)."""
    from sglang_tq.bench.timing import time_replay

    res = time_replay(fn, args.warmup, args.rep, args.repeat, args.cuda_graph)
    if res["timing_note"]:
        log(f"    [note] {res['timing_note']}")
    return res


# --------------------------------------------------------------------------------------
# reference and checks
# --------------------------------------------------------------------------------------
def ref_attention(torch, q0, K0, V0, sm_scale):
    """float64 attention of one decode token. q0 [Hq,D]; K0, V0 [L,Hkv,D] -> [Hq,D].
    q head h attends with kv head h // (Hq/Hkv) (SGLang's and FlashInfer's GQA mapping)."""
    Hq, D = q0.shape
    L, Hkv, _ = K0.shape
    G = Hq // Hkv
    qg = q0.double().reshape(Hkv, G, D)
    K = K0.double().permute(1, 0, 2)  # [Hkv, L, D]
    V = V0.double().permute(1, 0, 2)
    s = torch.matmul(qg, K.transpose(1, 2)) * sm_scale  # [Hkv, G, L]
    p = torch.softmax(s, dim=-1)
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


def report_check(label, res):
    if res["ok"]:
        log(
            f"    check {label} vs {res['against']}: max|err| {res['max_abs_err']:.3e}  "
            f"rel {res['rel_err']:.3e}  ok"
        )
    else:
        bar = "!" * 78
        log(bar)
        log(
            f"!!! CHECK FAILED: {label} vs {res['against']}: max|err| {res['max_abs_err']:.3e}  "
            f"rel {res['rel_err']:.3e} (tol {res['tol']:.1e}). Timings of this row are suspect."
        )
        log(bar)


# --------------------------------------------------------------------------------------
# implementations: each builder returns fn() -> output tensor [B, Hq, D]
# --------------------------------------------------------------------------------------
def build_sglang_triton(
    ctx, q, kbuf, vbuf, indptr, indices64, sm_scale, max_kv_splits, num_kv_splits
):
    """Mirrors TritonAttnBackend.forward_decode (srt/layers/attention/triton_backend.py)."""
    torch = ctx.torch
    B, Hq, D = q.shape
    Dv = vbuf.shape[-1]
    o = torch.empty((B, Hq, Dv), dtype=q.dtype, device=q.device)
    attn_logits = torch.empty((B, Hq, max_kv_splits, Dv), dtype=torch.float32, device=q.device)
    attn_lse = torch.empty((B, Hq, max_kv_splits), dtype=torch.float32, device=q.device)
    f = ctx.decode_attention_fwd
    use_pdl = ctx.use_pdl

    def fn():
        f(
            q,
            kbuf,
            vbuf,
            o,
            indptr,
            indices64,
            attn_logits,
            attn_lse,
            num_kv_splits,
            max_kv_splits,
            sm_scale,
            1.0,
            1.0,  # sm_scale, k_scale, v_scale (forward_decode passes 1.0 without scales)
            logit_cap=0.0,
            sinks=None,
            xai_temperature_len=-1,
            has_mla=False,
            use_pdl=use_pdl,
            page_size=1,
        )
        return o

    return fn, o


def flashinfer_use_tc(args, kv_dtype_name):
    if args.flashinfer_tensor_cores != "auto":
        return args.flashinfer_tensor_cores == "on"
    # sglang/srt/layers/attention/flashinfer_backend.py should_use_tensor_core
    if kv_dtype_name == "fp8_e4m3":
        return True
    return args.num_q_heads // args.num_kv_heads >= 4


def build_flashinfer(ctx, args, q, kbuf, vbuf, indptr32, indices32, sm_scale, kv_dtype_name):
    """Mirrors FlashInferAttnBackend decode: wrapper(workspace, "NHD", backend="fa2",
    use_tensor_cores=...), plan(indptr, indices, last_page_len, Hq, Hkv, D, page_size=1, ...), run."""
    torch = ctx.torch
    fi = ctx.flashinfer
    B, Hq, D = q.shape
    use_tc = flashinfer_use_tc(args, kv_dtype_name)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(
        ctx.fi_workspace, "NHD", use_tensor_cores=use_tc, backend="fa2"
    )
    last_page_len = torch.ones(B, dtype=torch.int32, device=q.device)
    w.plan(
        indptr32,
        indices32,
        last_page_len,
        Hq,
        args.num_kv_heads,
        D,
        1,
        q_data_type=q.dtype,
        kv_data_type=kbuf.dtype,
        sm_scale=sm_scale,
    )
    out = torch.empty_like(q)
    scale = (
        1.0 if kv_dtype_name == "fp8_e4m3" else None
    )  # SGLang passes layer.k_scale_float (1.0 / None)

    def fn():
        w.run(q, (kbuf, vbuf), k_scale=scale, v_scale=scale, out=out)
        return out

    return fn, out, {"use_tensor_cores": use_tc, "backend": "fa2"}


def build_fa3(
    ctx, args, q, kbuf, vbuf, page_table, cache_seqlens, cu_seqlens_q, sm_scale, kv_dtype_name
):
    """Mirrors FlashAttentionBackend.forward_decode (srt/layers/attention/flashattention_backend.py,
    SGLang 0.5.17, MHA, page_size 1, no SWA / cascade / sinks): q [B, Hq, D] (cast to the KV
    dtype for fp8 KV), k/v cache viewed as [-1, page_size, Hkv, D], page_table int32 [B, L],
    cache_seqlens int32, cu_seqlens_q arange(B+1), max_seqlen_q 1, softmax_scale, causal=True,
    window (-1, -1), softcap 0, num_splits 0, scheduler_metadata precomputed per batch."""
    torch = ctx.torch
    B, Hq, D = q.shape
    Hkv = kbuf.shape[1]
    fp8 = kv_dtype_name == "fp8_e4m3"
    q_in = q.to(kbuf.dtype) if fp8 else q  # forward_decode: q = q.to(self.kv_cache_dtype)
    k_cache = kbuf.view(-1, 1, Hkv, D)
    v_cache = vbuf.view(-1, 1, Hkv, vbuf.shape[-1])
    kw = {}
    if fp8 and args.fa3_descale:  # layer.k_scale.expand((batch_size, tp_k_head_num)) with scale 1.0
        kw["k_descale"] = torch.ones(1, 1, dtype=torch.float32, device=q.device).expand(B, Hkv)
        kw["v_descale"] = torch.ones(1, 1, dtype=torch.float32, device=q.device).expand(B, Hkv)
    meta = {
        "q_dtype": str(q_in.dtype).replace("torch.", ""),
        "descale": bool(kw),
        "num_splits": 0,
        "scheduler_metadata": False,
    }
    sched = None
    if ctx.fa3_sched is not None and not args.fa3_no_scheduler_metadata:
        # FlashAttentionBackend._compute_scheduler_metadata: once per batch, for all layers
        sched = ctx.fa3_sched(
            batch_size=B,
            max_seqlen_q=1,
            max_seqlen_k=page_table.shape[1],
            num_heads=Hq,
            num_heads_k=Hkv,
            headdim=D,
            cache_seqlens=cache_seqlens,
            qkv_dtype=kbuf.dtype,
            cu_seqlens_q=cu_seqlens_q,
            page_size=1,
            causal=True,
            has_softcap=False,
            num_splits=0,
        )
        meta["scheduler_metadata"] = sched is not None
    out = torch.empty(B, Hq, vbuf.shape[-1], dtype=torch.bfloat16, device=q.device)
    f = ctx.fa3

    def fn():
        o = f(
            q=q_in,
            k_cache=k_cache,
            v_cache=v_cache,
            page_table=page_table,
            cache_seqlens=cache_seqlens,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=1,
            softmax_scale=sm_scale,
            causal=True,
            window_size=(-1, -1),
            softcap=0.0,
            return_softmax_lse=False,
            num_splits=0,
            scheduler_metadata=sched,
            out=out,
            **kw,
        )
        return o[0] if isinstance(o, (tuple, list)) else o

    return fn, out, meta


def fa3_tables(ctx, slots, B, L):
    """FlashAttentionBackend's decode metadata for B sequences of L tokens (page size 1):
    page_table = req_to_token rows (int32 slot ids), cache_seqlens, cu_seqlens_q."""
    torch = ctx.torch
    page_table = slots.view(B, L).to(torch.int32)
    cache_seqlens = torch.full((B,), L, dtype=torch.int32, device=slots.device)
    cu_seqlens_q = torch.arange(B + 1, dtype=torch.int32, device=slots.device)
    return page_table, cache_seqlens, cu_seqlens_q


# --------------------------------------------------------------------------------------
# one shape
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


def run_impl(label, row, results, fn_build, on_error=None):
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
        msg = f"{type(e).__name__}: {e}"
        row["error"] = msg[:2000]
        results.append(row)
        log(f"    [skip] {label}: {msg[:300]}")
        tb = traceback.format_exc()
        log("      " + "\n      ".join(tb.strip().splitlines()[-6:]))
        if on_error:
            on_error()


def first_call(ctx, fn):
    torch = ctx.torch
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_shape(ctx, args, B, L, D, results, checks, do_check, codecs):
    torch = ctx.torch
    Hq, Hkv = args.num_q_heads, args.num_kv_heads
    dev = ctx.device
    sm_scale = 1.0 / math.sqrt(D)
    S, indptr, slots = make_indices(ctx, args, B, L)
    indices64 = slots  # sglang-tq and SGLang Triton take int64 slot ids
    indices32 = slots.to(torch.int32) if "flashinfer" in args.impl_set else None
    idx0 = slots[:L]  # slot ids of sequence 0
    q = torch.randn(B, Hq, D, dtype=torch.bfloat16, device=dev)
    bf16_kv_bytes = S * Hkv * 2 * D * 2

    # ---- copy roof ---------------------------------------------------------------
    if "copy" in args.impl_set:
        row = row_base("copy", "bf16", B, L, D, args)

        def do_copy(row):
            n = bf16_kv_bytes // 2
            src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
            dst = torch.empty_like(src)
            try:
                _, row["first_call_s"] = first_call(ctx, lambda: dst.copy_(src))
                t = time_it(ctx, args, lambda: dst.copy_(src))
            finally:
                src = dst = None
            nb = {"read": bf16_kv_bytes, "write": bf16_kv_bytes, "total": 2 * bf16_kv_bytes}
            finish_row(row, t, nb)
            row["bf16_kv_read_ms_at_copy_bw"] = bf16_kv_bytes / (row["tbps"] * 1e12) * 1e3

        run_impl("copy (bf16 KV bytes)", row, results, do_copy)
        torch.cuda.empty_cache()

    # ---- bf16 / fp8 baselines ---------------------------------------------------------
    want_tri = "sglang-triton" in args.impl_set
    want_fi = "flashinfer" in args.impl_set and (
        args.fi_head_dims is None or D in args.fi_head_dims
    )
    want_fa3 = "fa3" in args.impl_set
    fa3_meta = fa3_tables(ctx, slots, B, L) if want_fa3 and ctx.fa3 is not None else None
    if (want_tri or want_fi or want_fa3) and args.base_dtypes:
        tri_splits = None
        if want_tri and ctx.decode_attention_fwd is not None:
            tri_splits = sglang_splits_tensor(ctx, args, B, L, args.triton_max_kv_splits)
        kb = torch.empty(S, Hkv, D, dtype=torch.bfloat16, device=dev).normal_()
        vb = torch.empty(S, Hkv, D, dtype=torch.bfloat16, device=dev).normal_()
        for dt in ("bf16", "fp8"):
            if dt not in args.base_dtypes:
                continue
            kvname = BASELINE_KV[dt]
            if dt == "fp8":
                kbuf, vbuf = kb.to(torch.float8_e4m3fn), vb.to(torch.float8_e4m3fn)
                kb = vb = (
                    None  # the bf16 pool is not needed any more: keep one format alive at a time
                )
                torch.cuda.empty_cache()
            else:
                kbuf, vbuf = kb, vb
            ref = None
            if do_check:
                ref = ref_attention(
                    torch,
                    q[0],
                    gather_rows(torch, kbuf, idx0),
                    gather_rows(torch, vbuf, idx0),
                    sm_scale,
                )

            if want_tri:
                row = row_base("sglang-triton", kvname, B, L, D, args)
                if ctx.decode_attention_fwd is None:
                    row["error"] = ctx.import_errors.get("sglang-triton", "unavailable")
                    results.append(row)
                else:

                    def do_tri(row, kbuf=kbuf, vbuf=vbuf, kvname=kvname, ref=ref):
                        fn, o = build_sglang_triton(
                            ctx,
                            q,
                            kbuf,
                            vbuf,
                            indptr,
                            indices64,
                            sm_scale,
                            args.triton_max_kv_splits,
                            tri_splits,
                        )
                        o.fill_(float("nan"))  # poison: every element must be written
                        out, row["first_call_s"] = first_call(ctx, fn)
                        post_checks(
                            ctx,
                            row,
                            out,
                            ref,
                            kvname,
                            checks,
                            f"sglang-triton {kvname} {B}x{L}x{D}",
                        )
                        row["max_kv_splits"] = args.triton_max_kv_splits
                        row["num_kv_splits"] = int(tri_splits[0].item())
                        finish_row(
                            row, time_it(ctx, args, fn), count_bytes(kvname, B, L, Hq, Hkv, D, 8)
                        )

                    run_impl(f"sglang-triton {kvname}", row, results, do_tri)

            if want_fi:
                row = row_base("flashinfer", kvname, B, L, D, args)
                if ctx.flashinfer is None:
                    row["error"] = ctx.import_errors.get("flashinfer", "unavailable")
                    results.append(row)
                else:

                    def do_fi(row, kbuf=kbuf, vbuf=vbuf, kvname=kvname, ref=ref):
                        t0 = time.perf_counter()
                        fn, out, meta = build_flashinfer(
                            ctx, args, q, kbuf, vbuf, indptr, indices32, sm_scale, kvname
                        )
                        row.update(meta)
                        out.fill_(float("nan"))
                        out, fc = first_call(ctx, fn)
                        row["first_call_s"] = (
                            time.perf_counter() - t0
                        )  # includes plan() / JIT build
                        post_checks(
                            ctx, row, out, ref, kvname, checks, f"flashinfer {kvname} {B}x{L}x{D}"
                        )
                        finish_row(
                            row, time_it(ctx, args, fn), count_bytes(kvname, B, L, Hq, Hkv, D, 4)
                        )

                    run_impl(f"flashinfer {kvname}", row, results, do_fi)

            if want_fa3:
                row = row_base("fa3", kvname, B, L, D, args)
                if ctx.fa3 is None:
                    why = ctx.import_errors.get("fa3", "unavailable")
                    row.update(unavailable=why, error=f"unavailable: {why}")
                    results.append(row)
                else:

                    def do_fa3(row, kbuf=kbuf, vbuf=vbuf, kvname=kvname, ref=ref):
                        t0 = time.perf_counter()
                        fn, out, meta = build_fa3(
                            ctx, args, q, kbuf, vbuf, *fa3_meta, sm_scale, kvname
                        )
                        row.update(meta)
                        out.fill_(float("nan"))
                        out, _ = first_call(ctx, fn)
                        row["first_call_s"] = time.perf_counter() - t0
                        ref8 = ref
                        if ref is not None and kvname == "fp8_e4m3":  # FA3 also rounds q to fp8
                            ref8 = ref_attention(
                                torch,
                                q[0].to(kbuf.dtype).float(),
                                gather_rows(torch, kbuf, idx0),
                                gather_rows(torch, vbuf, idx0),
                                sm_scale,
                            )
                        post_checks(
                            ctx, row, out, ref8, kvname, checks, f"fa3 {kvname} {B}x{L}x{D}"
                        )
                        finish_row(
                            row,
                            time_it(ctx, args, fn),
                            count_bytes(
                                kvname, B, L, Hq, Hkv, D, 4, q_elt=1 if kvname == "fp8_e4m3" else 2
                            ),
                        )

                    run_impl(f"fa3 {kvname}", row, results, do_fa3)
            # drop every reference (closures included) before the next format is built
            do_tri = do_fi = do_fa3 = None
            del kbuf, vbuf, ref
            gc.collect()
            torch.cuda.empty_cache()
        del kb, vb
        gc.collect()
        torch.cuda.empty_cache()
    fa3_meta = None

    # ---- ours ----------------------------------------------------------------------
    if "sglang-tq" in args.impl_set:
        for kvname, kbits, vbits in args.kv_list:
            n_splits = tq_num_kv_splits(args, B, L, ctx.sm_count, D, kbits, vbits)
            row = row_base("sglang-tq", kvname, B, L, D, args)
            if "sglang-tq" in ctx.import_errors:
                row["error"] = ctx.import_errors["sglang-tq"]
                results.append(row)
                continue

            def do_tq(row, kvname=kvname, kbits=kbits, vbits=vbits):
                codec = get_codec(ctx, codecs, D, kbits, vbits)
                bufs = None
                try:
                    bufs = alloc_and_fill_tq(ctx, args, codec, S, Hkv, D)
                    sanity_pool(ctx, bufs, idx0, kvname)
                    fn, ws = build_tq(
                        ctx, args, q, bufs, indptr, indices64, codec, sm_scale, n_splits
                    )
                    out, row["first_call_s"] = first_call(ctx, fn)
                    ref = None
                    if do_check:
                        kd = codec.k_quant.dequantize(bufs[0][idx0], bufs[1][idx0])
                        vd = codec.v_quant.dequantize(bufs[2][idx0], bufs[3][idx0])
                        ref = ref_attention(torch, q[0], kd, vd, sm_scale)
                    post_checks(ctx, row, out, ref, "tq", checks, f"sglang-tq {kvname} {B}x{L}x{D}")
                    if do_check and ctx.decode_attention_fwd is not None:
                        check_vs_triton_dequant(
                            ctx,
                            args,
                            row,
                            out,
                            q,
                            kd,
                            vd,
                            sm_scale,
                            checks,
                            f"sglang-tq {kvname} {B}x{L}x{D}",
                        )
                    row["max_kv_splits"] = tq_max_splits(args, B)
                    row["num_kv_splits"] = n_splits
                    row["splits_policy"] = args.splits_policy
                    row["launch"] = tq_launch(args, D, kbits, vbits)
                    row["k_code_bytes"] = codec.k_code_bytes
                    row["v_code_bytes"] = codec.v_code_bytes
                    finish_row(
                        row,
                        time_it(ctx, args, fn),
                        count_bytes(
                            kvname, B, L, Hq, Hkv, D, 8, codec.k_code_bytes, codec.v_code_bytes
                        ),
                    )
                finally:
                    del bufs
                    gc.collect()
                    torch.cuda.empty_cache()

            run_impl(f"sglang-tq {kvname}", row, results, do_tq)
    gc.collect()
    torch.cuda.empty_cache()


def post_checks(ctx, row, out, ref, kvname, checks, label):
    torch = ctx.torch
    finite = bool(torch.isfinite(out).all().item())
    row["output_finite"] = finite
    if not finite:
        bar = "!" * 78
        log(bar)
        log(f"!!! {label}: output has NaN/Inf (unwritten or broken elements). Timings are suspect.")
        log(bar)
        checks.append({"label": label, "against": "finite", "ok": False})
    if ref is not None:
        res = compare(torch, "float64 reference (seq 0)", out[0], ref, TOL[kvname])
        report_check(label, res)
        res["label"] = label
        checks.append(res)
        row["check"] = {k: res[k] for k in ("max_abs_err", "rel_err", "ok")}


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
        report_check(label, res)
        res["label"] = label
        checks.append(res)
        row["check_vs_triton_dequant"] = {k: res[k] for k in ("max_abs_err", "rel_err", "ok")}
    except Exception as e:
        log(f"    [note] {label}: check vs SGLang Triton on dequantized K/V failed to run: {e!r}")


def get_codec(ctx, codecs, D, kbits, vbits):
    key = (D, kbits, vbits)
    if key not in codecs:
        from sglang_tq.format.codec import LayerCodec

        codecs[key] = LayerCodec.create(D, kbits, vbits, seed=0, device=ctx.device)
    return codecs[key]


def alloc_and_fill_tq(ctx, args, codec, S, Hkv, D):
    """Allocate packed buffers for S slots and fill every slot through tq_store_kv from random
    bf16 K/V (never zeros)."""
    torch = ctx.torch
    from sglang_tq.kernels.tq_store import tq_store_kv

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
    torch.cuda.synchronize()
    return bufs


def sanity_pool(ctx, bufs, idx0, kvname):
    """Loud warning if sequence 0's slots look unwritten (zero norms)."""
    zk = int((bufs[1][idx0] == 0).sum().item())
    zv = int((bufs[3][idx0] == 0).sum().item())
    if zk or zv:
        log("!" * 78)
        log(
            f"!!! sglang-tq {kvname}: {zk} K and {zv} V norms of sequence 0 are zero after tq_store_kv: "
            "pool not (fully) written?"
        )
        log("!" * 78)


def tq_launch(args, D, kbits, vbits) -> dict:
    """The stage-1 launch this row ran: the table's (or built-in) choice, then --tq-kernel-args."""
    import dataclasses

    from sglang_tq.kernels.tq_decode import default_launch

    chosen = dataclasses.asdict(default_launch(D, kbits, vbits))
    over = json.loads(args.tq_kernel_args or "{}")
    return {**chosen, **{k: over[k] for k in ("block_n", "num_warps") if k in over}}


def build_tq(ctx, args, q, bufs, indptr, indices64, codec, sm_scale, n_splits, extra=None):
    torch = ctx.torch
    from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode

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
def bench_write_path(ctx, args, codecs, write_rows):
    torch = ctx.torch
    B, L, D = args.store_batch, args.store_decode_len, args.store_head_dim
    Hq, Hkv = args.num_q_heads, args.num_kv_heads
    dev = ctx.device
    sm_scale = 1.0 / math.sqrt(D)
    log(
        f"\n== write path: N = {B} new tokens (one per sequence), Hkv {Hkv}, D {D}; "
        f"decode step for comparison at B={B}, L={L}"
    )
    S, indptr, slots = make_indices(ctx, args, B, L)
    q = torch.randn(B, Hq, D, dtype=torch.bfloat16, device=dev)
    # one new token per sequence, written to distinct random slots of the pool
    loc = slots[torch.randperm(S, device=dev)[:B]].contiguous()
    k_new = torch.randn(B, Hkv, D, dtype=torch.bfloat16, device=dev)
    v_new = torch.randn(B, Hkv, D, dtype=torch.bfloat16, device=dev)
    new_in_bytes = 2 * B * Hkv * D * 2 + B * 8  # bf16 k and v read + int64 loc

    def wrow(impl, kv):
        return {
            "impl": impl,
            "kv": kv,
            "N": B,
            "num_kv_heads": Hkv,
            "head_dim": D,
            "pool_slots": S,
            "decode_B": B,
            "decode_L": L,
        }

    def record(row, label):
        write_rows.append(row)
        if "error" in row:
            log(f"    [skip] {label}: {row['error'][:300]}")
        else:
            pct = row.get("pct_of_decode")
            log(
                f"    {label:<28} store {row['ms'] * 1e3:8.2f} us"
                + (
                    f"   decode {row['decode_ms']:.4f} ms ({row['decode_impl']})  store = {pct:.1f}% of decode"
                    if pct is not None
                    else ""
                )
            )

    # bf16 / fp8 plain stores, vs SGLang Triton decode of the same format
    kb = torch.empty(S, Hkv, D, dtype=torch.bfloat16, device=dev).normal_()
    vb = torch.empty(S, Hkv, D, dtype=torch.bfloat16, device=dev).normal_()
    store_cache = None
    try:
        from sglang.kernels.ops.kvcache.kvcache import can_use_store_cache
        from sglang.kernels.ops.kvcache.kvcache import store_cache as _sc

        if can_use_store_cache(Hkv * D * 2) and can_use_store_cache(Hkv * D):
            store_cache = _sc
    except Exception as e:
        log(f"    [note] SGLang store_cache (JIT) unavailable: {e!r}")
    for kvname in ("bf16", "fp8_e4m3"):
        if kvname == "bf16":
            kc, vc = kb, vb
        else:
            kc, vc = kb.to(torch.float8_e4m3fn), vb.to(torch.float8_e4m3fn)
        elt = 2 if kvname == "bf16" else 1
        out_bytes = 2 * B * Hkv * D * elt
        decode_ms = None
        if ctx.decode_attention_fwd is not None:
            try:
                splits = sglang_splits_tensor(ctx, args, B, L, args.triton_max_kv_splits)
                fn, _ = build_sglang_triton(
                    ctx, q, kc, vc, indptr, slots, sm_scale, args.triton_max_kv_splits, splits
                )
                first_call(ctx, fn)
                decode_ms = time_it(ctx, args, fn)["ms"]
            except Exception as e:
                log(f"    [note] sglang-triton {kvname} decode at {B}x{L} failed: {e!r}")

        if kvname == "bf16":

            def torch_store():
                kc[loc] = k_new
                vc[loc] = v_new
        else:
            kc8, vc8 = kc.view(torch.uint8), vc.view(torch.uint8)

            def torch_store():  # SGLang MHATokenToKVPool: cast, view as uint8 (store_dtype), scatter
                kc8[loc] = k_new.to(torch.float8_e4m3fn).view(torch.uint8)
                vc8[loc] = v_new.to(torch.float8_e4m3fn).view(torch.uint8)

        impls = [("torch-index-store", torch_store)]
        if store_cache is not None:
            rb = Hkv * D * elt
            kcv, vcv = (
                kc.view(torch.uint8 if elt == 1 else kc.dtype),
                vc.view(torch.uint8 if elt == 1 else vc.dtype),
            )

            def sgl_store(kcv=kcv, vcv=vcv, rb=rb, kvname=kvname):
                if kvname == "bf16":
                    kk, vv = k_new, v_new
                else:
                    kk = k_new.to(torch.float8_e4m3fn).view(torch.uint8)
                    vv = v_new.to(torch.float8_e4m3fn).view(torch.uint8)
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

            impls.append(("sglang-store_cache", sgl_store))
        for impl, fn in impls:
            row = wrow(impl, kvname)
            try:
                first_call(ctx, fn)
                row.update(time_it(ctx, args, fn))
                row["bytes"] = {
                    "read_new_kv_and_loc": new_in_bytes,
                    "write": out_bytes,
                    "total": new_in_bytes + out_bytes,
                }
                row["tbps"] = row["bytes"]["total"] / (row["ms"] * 1e-3) / 1e12
                if decode_ms:
                    row.update(
                        decode_ms=decode_ms,
                        decode_impl=f"sglang-triton {kvname}",
                        pct_of_decode=100.0 * row["ms"] / decode_ms,
                    )
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
            record(row, f"{impl} {kvname}")
        impls = fn = torch_store = sgl_store = None
        kc = vc = kc8 = vc8 = kcv = vcv = None
        torch.cuda.empty_cache()
    del kb, vb
    gc.collect()
    torch.cuda.empty_cache()

    # ours: tq_store_kv vs our decode step
    if "sglang-tq" in ctx.import_errors:
        write_rows.append({**wrow("sglang-tq-store", "*"), "error": ctx.import_errors["sglang-tq"]})
        log(f"    [skip] sglang-tq store: {ctx.import_errors['sglang-tq']}")
    else:
        from sglang_tq.kernels.tq_store import tq_store_kv

        for kvname, kbits, vbits in args.kv_list:
            n_splits = tq_num_kv_splits(args, B, L, ctx.sm_count, D, kbits, vbits)
            row = wrow("sglang-tq-store", kvname)
            bufs = None
            try:
                codec = get_codec(ctx, codecs, D, kbits, vbits)
                bufs = alloc_and_fill_tq(ctx, args, codec, S, Hkv, D)
                k_codes, k_norms, v_codes, v_norms = bufs
                dec_ms = None
                try:
                    fn, _ = build_tq(ctx, args, q, bufs, indptr, slots, codec, sm_scale, n_splits)
                    first_call(ctx, fn)
                    dec_ms = time_it(ctx, args, fn)["ms"]
                except Exception as e:
                    log(f"    [note] sglang-tq {kvname} decode at {B}x{L} failed: {e!r}")

                def store():
                    tq_store_kv(
                        k_new,
                        v_new,
                        loc,
                        k_codes,
                        k_norms,
                        v_codes,
                        v_norms,
                        codec,
                        num_warps=args.store_num_warps,
                        fwht=args.store_rotation == "fwht",
                        row_tokens=args.store_row_tokens,
                    )

                first_call(ctx, store)
                row.update(time_it(ctx, args, store))
                wb = B * Hkv * (codec.k_code_bytes + codec.v_code_bytes + 4)
                row["bytes"] = {
                    "read_new_kv_and_loc": new_in_bytes,
                    "write": wb,
                    "total": new_in_bytes + wb,
                }
                row["tbps"] = row["bytes"]["total"] / (row["ms"] * 1e-3) / 1e12
                if dec_ms:
                    row.update(
                        decode_ms=dec_ms,
                        decode_impl=f"sglang-tq {kvname}",
                        pct_of_decode=100.0 * row["ms"] / dec_ms,
                        num_kv_splits=n_splits,
                        max_kv_splits=tq_max_splits(args, B),
                    )
                row["chain"] = bench_store_decode_chain(
                    ctx, args, q, k_new, v_new, loc, bufs, indptr, slots, codec, sm_scale, n_splits
                )
                log(
                    f"    store + decode chain {kvname}: "
                    + ", ".join(
                        f"{k} {v * 1e3:.2f} us"
                        for k, v in row["chain"].items()
                        if isinstance(v, float)
                    )
                )
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
            finally:
                del bufs
                gc.collect()
                torch.cuda.empty_cache()
            record(row, f"tq_store_kv {kvname}")
    gc.collect()
    torch.cuda.empty_cache()


def bench_store_decode_chain(
    ctx, args, q, k_new, v_new, loc, bufs, indptr, slots, codec, sm_scale, n_splits
) -> dict:
    """One decode layer's attention as the backend launches it: tq_store_kv of the new
    tokens, then tq_decode; serial launches against programmatic dependent launch with
    stage 1 rotating q while the store runs (``early_q``). ms of each, same buffers."""
    from sglang_tq.kernels.tq_decode import pdl_supported
    from sglang_tq.kernels.tq_store import tq_store_kv

    decode, _ = build_tq(ctx, args, q, bufs, indptr, slots, codec, sm_scale, n_splits)
    early, _ = build_tq(
        ctx, args, q, bufs, indptr, slots, codec, sm_scale, n_splits, extra={"early_q": True}
    )
    out = {}
    variants = [("serial_ms", False, decode)] + (
        [("pdl_early_q_ms", True, early)] if pdl_supported() else []
    )
    for name, pdl, dec in variants:

        def chain(pdl=pdl, dec=dec):
            tq_store_kv(
                k_new,
                v_new,
                loc,
                *bufs,
                codec,
                pdl=pdl,
                num_warps=args.store_num_warps,
                fwht=args.store_rotation == "fwht",
                row_tokens=args.store_row_tokens,
            )
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


def write_json(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def config_dict(args, ctx=None):
    from sglang_tq.env import decode_launch_file

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
        "q_dtype": "bfloat16",
        "sm_scale": "1/sqrt(head_dim)",
        "data": "K, V, q ~ N(0,1) bf16 (fp8 baselines: the bf16 values cast to float8_e4m3fn; "
        "sglang-tq: fresh N(0,1) bf16 K/V quantized by tq_store_kv)",
        "bytes_counted": BYTES_NOTE,
        "check_tolerance_rel": TOL,
        "seed": args.seed,
        "argv": sys.argv[1:],
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


def main(argv=None):
    args = finalize_args(build_parser().parse_args(argv))
    if args.dry_run:
        dry_run(args)
        return 0
    if args.cache_dir:
        cd = Path(args.cache_dir).resolve()
        cd.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TRITON_CACHE_DIR", str(cd / "triton"))
        os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", str(cd))

    t_start = time.perf_counter()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("No CUDA device: this benchmark needs a GPU (use --dry-run to see the plan).")
        return 2
    try:
        import sglang_tq  # noqa: F401  (installed, e.g. pip -e; else the checkout's sglang_tq/)
    except ImportError:
        sys.path.append(str(REPO))
    from sglang_tq.provenance import provenance

    ctx = Ctx()
    ctx.import_errors = {}
    ctx.torch = torch
    ctx.device = torch.device(args.device)
    if ctx.device.type == "cuda":
        if ctx.device.index is not None:
            torch.cuda.set_device(ctx.device)
        ctx.sm_count = torch.cuda.get_device_properties(ctx.device).multi_processor_count
    else:
        ctx.sm_count = ASSUMED_SM_COUNT
    torch.manual_seed(args.seed)
    prov = provenance()
    log(
        f"GPU {prov['gpu']} ({ctx.sm_count} SMs), commit {prov['commit']}, "
        f"cuda_graph={args.cuda_graph}, warmup/rep {args.warmup}/{args.rep} ms x{args.repeat}"
    )
    try_import(ctx, args)
    log(
        f"imports done in {time.perf_counter() - t_start:.1f} s; SGLang Triton use_pdl={ctx.use_pdl}"
    )

    results, checks, write_rows, codecs = [], [], [], {}
    payload = {
        **prov,
        "config": config_dict(args, ctx),
        "results": results,
        "write_path": write_rows,
        "checks": checks,
        "import_errors": ctx.import_errors,
    }

    # device copy roof: one large copy (2 GiB read + 2 GiB written)
    copy_roof = None
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
    except Exception as e:
        log(f"[note] copy roof failed: {e!r}")

    seen_d = set()
    for i, (B, L, D) in enumerate(args.shapes_list):
        el = time.perf_counter() - t_start
        if args.time_budget_s and el > args.time_budget_s:
            log(
                f"[skip] time budget {args.time_budget_s:.0f} s spent ({el:.0f} s): skipping {B}x{L}x{D}"
            )
            results.append({**row_base("*", "*", B, L, D, args), "error": "skipped: time budget"})
            continue
        do_check = args.check == "all" or (args.check == "first" and D not in seen_d)
        seen_d.add(D)
        log(
            f"\n== shape {i + 1}/{len(args.shapes_list)}: B={B} L={L} head_dim={D} "
            f"(Hq {args.num_q_heads}, Hkv {args.num_kv_heads}; bf16 KV "
            f"{B * L * args.num_kv_heads * 4 * D / 2**30:.2f} GiB)  t={el:.0f} s"
        )
        try:
            bench_shape(ctx, args, B, L, D, results, checks, do_check, codecs)
        except Exception as e:
            log(f"[error] shape {B}x{L}x{D}: {e!r}")
            log(traceback.format_exc())
            results.append(
                {**row_base("*", "*", B, L, D, args), "error": f"{type(e).__name__}: {e}"[:2000]}
            )
            gc.collect()
            torch.cuda.empty_cache()
        add_derived(results, copy_roof)
        payload["elapsed_s"] = time.perf_counter() - t_start
        write_json(args.out_path, payload)

    if not args.no_write_path:
        el = time.perf_counter() - t_start
        if args.time_budget_s and el > args.time_budget_s:
            log(f"[skip] write path: time budget spent ({el:.0f} s)")
        else:
            try:
                bench_write_path(ctx, args, codecs, write_rows)
            except Exception as e:
                log(f"[error] write path: {e!r}")
                log(traceback.format_exc())
                write_rows.append({"impl": "*", "error": f"{type(e).__name__}: {e}"[:2000]})

    add_derived(results, copy_roof)
    payload["elapsed_s"] = time.perf_counter() - t_start
    write_json(args.out_path, payload)
    print_table(results)
    if "fa3" in ctx.import_errors:
        log(f"FA3 rows not run: {ctx.import_errors['fa3']}")
    print_write_table(write_rows)
    failed = [c for c in checks if not c.get("ok")]
    if failed:
        log("\n" + "!" * 78)
        for c in failed:
            log(
                f"!!! CHECK FAILED: {c['label']} vs {c['against']}"
                + (f": rel {c['rel_err']:.3e}" if "rel_err" in c else "")
            )
        log("!" * 78)
    log(f"\nwrote {args.out_path}  ({payload['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
