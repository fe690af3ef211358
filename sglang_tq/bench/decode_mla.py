"""``python -m sglang_tq.bench decode-mla``: MLA decode attention per step, the packed latent
against SGLang's default Hopper MLA path (FA3) with a bf16 and an fp8 cache.

DeepSeek-V2 (Sec. 2.1) caches per token one compressed latent c (512-d) and one decoupled
RoPE key k_pe (64-d) that every query head shares. Decode runs the absorbed form: W_UK is
folded into the query, so a head scores q_nope·c + q_pe·k_pe and returns the
probability-weighted latent (W_UV is applied afterwards), i.e. multi-query attention over
one 576-wide key whose first 512 columns are also the value. This benchmark times that
attention for one layer and one new token per sequence: ``--shapes`` B x L (B sequences of
L cached tokens; slot ids a random permutation of a page-size-1 pool, as SGLang's allocator
scatters them), bf16 queries, ``--num-heads`` query heads (16: DeepSeek-V2-Lite; 128:
DeepSeek-V3), softmax scale (128 + 64)^-0.5 (qk_nope + rope dims).

Rows per shape:

* ``sglang-tq`` kN (``--kv``): the turboquant MLA backend's decode, ``tq_decode`` over the
  latent packed as N-bit keys-only codes with the RoPE keys in bf16, codec and store as
  ``TQMLATokenToKVPool`` builds and fills them (``LayerCodec.create(512, N, N,
  seed=TQConfig.layer_seed(0))``, ``tq_store_kv`` keys only), split counts by the
  backend's rule (``mla_num_kv_splits`` under ``split_ceiling`` of the batch and
  ``--max-kv-splits``, SGLang's ``--triton-attention-num-kv-splits``), its workspace and
  output buffer.
* ``fa3`` bf16 / fp8_e4m3: SGLang's default attention backend for MLA on Hopper
  (``ServerArgs._get_default_attn_backend``: "fa3" where ``is_hopper_with_cuda_12_3``),
  sgl-kernel's ``flash_attn_with_kvcache`` called as ``FlashAttentionBackend.forward_decode``
  calls it for MLA: the layer's [slots, 1, 576] buffer cast to the query dtype
  (``get_key_buffer(...).to(q.dtype)``), q = q_rope against the RoPE columns as the keys,
  qv = q_nope against the latent columns as the values, page size 1 (an int32 page table
  [B, L]), cache_seqlens, cu_seqlens_q = arange(B+1), max_seqlen_q 1, causal, num_splits 0
  and no scheduler metadata (the backend computes none for MLA). SGLang accepts
  ``--kv-cache-dtype fp8_e4m3`` on this path but its 576-wide head is above the fp8 branch's
  head_dim <= 256, so q stays bf16, no descale is passed, and the cast above converts the
  whole fp8 layer buffer to bf16 in every call: the fp8 row times that cast with the
  kernel. The cast grows with the pool, not the batch: ``--pool-tokens`` sizes the pool
  (default the shape's B·L tokens, a lower bound of what a server's larger pool pays).

Timing: each step is captured once in a CUDA graph (SGLang decodes in graphs) and the replay
timed by ``triton.testing.do_bench`` (median, L2 cleared before each call), ``--repeat``
passes, median of the medians. Attention only: the new token's cache write
(``tq_store_kv`` / SGLang's ``set_mla_kv_buffer``) is not in the step.

Checks before timing, on the first sequence: sglang-tq against ``tq_decode_ref`` (float64 on
the same codes) within relative error ``TQ_TOL``; fa3 output finite, its relative error
against float64 attention over the dense cache recorded. A row that fails its check is
still timed, and flagged.

Results: a table (ms, ratio to the shape's fa3 bf16 and fa3 fp8 rows) and ``--out``
(:mod:`sglang_tq.bench.results`), one entry per (shape, impl, kv) with its config,
rewritten after every shape. Exit status: 0 every row measured and checked, 1 no CUDA,
2 bad arguments, 3 some row failed its check or could not run (FA3 missing: its rows carry
``error`` and the rest runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable

import torch

from ..config import TQConfig
from ..env import fwht_rotations
from ..format.codec import LayerCodec
from ..kernels.tq_decode import (
    SPLIT_REF_BATCH,
    DecodeWorkspace,
    attention_ref,
    mla_num_kv_splits,
    split_ceiling,
    tq_decode,
    tq_decode_ref,
)
from ..kernels.tq_store import tq_store_kv
from . import results, timing
from .cli import Shape, parse_shapes

TOOL = "sglang_tq.bench decode-mla"
KEY = ("shape", "impl", "kv")
LATENT, ROPE = 512, 64
QK_NOPE = 128  # DeepSeek-V2/V3 qk_nope_head_dim
SM_SCALE = (QK_NOPE + ROPE) ** -0.5  # DeepSeek's softmax scale (no YaRN mscale)
IMPLS = ("sglang-tq", "fa3")
BASELINE_KV = {"bf16": "bf16", "fp8": "fp8_e4m3"}  # --baseline-dtypes value -> row kv
FA3_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}
DEFAULT_SHAPES = "1x4096,1x32768,16x8192,64x8192"
DEFAULT_KV = "k4,k3,k2"
DEFAULT_HEADS = 16
SGLANG_NUM_KV_SPLITS = 8  # SGLang's default --triton-attention-num-kv-splits
DEFAULT_NUM_SMS = 132  # what the backend assumes where the device reports no SM count
STORE_CHUNK = 32768  # tokens per tq_store_kv call while the pool is filled
TQ_TOL = 2e-2  # relative error of sglang-tq against its float64 twin on the same codes
DENSE_TOL = 2e-2  # fa3 against float64 attention over the dense cache (recorded, not gating)
NO_CUDA = "decode-mla times CUDA kernels; run it on a GPU host."
SPLITS_POLICY = (
    "TQMLAAttnBackend.get_num_kv_splits: mla_num_kv_splits(seq_lens, "
    "split_ceiling(B, base_kv_splits), bits, num_sms)"
)
FP8_NOTE = (
    "SGLang's fa3 MLA decode casts the whole fp8 layer buffer to bf16 per call "
    "(head_dim 576 is above FA3's fp8 limit of 256); timed: cast + bf16 kernel, the cast "
    "scaling with pool_slots"
)

EPILOG = f"""\
One MLA layer (DeepSeek-V2 Sec. 2.1, absorbed: scores q_nope.c + q_pe.k_pe, output the
weighted latent c), one new token per sequence, slots a random permutation of the pool.
  sglang-tq kN   tq_decode over the 512-d latent packed at N bits (keys only, values = the
                 same codes) + bf16 RoPE keys; split counts by the MLA backend's rule
  fa3 bf16/fp8   SGLang's default MLA backend on Hopper: sgl-kernel flash_attn_with_kvcache
                 as FlashAttentionBackend.forward_decode calls it (q = q_rope vs the RoPE
                 keys, qv = q_nope vs the latent as values, page size 1); fp8: SGLang casts
                 the whole layer buffer to bf16 per call, timed with the kernel
Timing: CUDA-graph replay, triton do_bench median, --repeat passes. Checks first (sequence
0): sglang-tq vs tq_decode_ref within {TQ_TOL}; fa3 output finite. Missing FA3: its rows
carry an error, the rest runs. Exit 0 ok, 1 no CUDA, 2 bad arguments, 3 a row failed.
Example: python -m sglang_tq.bench decode-mla --num-heads 128 --shapes 1x32768,64x8192"""


# ----------------------------------------------------------------------------- arguments


def parse_kv(text: str) -> list[int]:
    """``"k4,k3,k2"`` (``k4v4`` reads as k4) -> latent bits in order, repeats dropped."""
    bits = []
    for item in (s.strip() for s in str(text).split(",")):
        m = re.fullmatch(r"k([234])(?:v\1)?", item.lower())
        if not m:
            raise ValueError(
                f"--kv takes the latent's bits as k4, k3 or k2 (the latent is key and "
                f"value, so one width), got {item!r}."
            )
        bits.append(int(m[1]))
    return list(dict.fromkeys(bits))


def parse_choices(text: str, allowed, flag: str) -> list[str]:
    chosen = [s.strip() for s in str(text).split(",") if s.strip()]
    for c in chosen:
        if c not in allowed:
            raise ValueError(f"{flag} takes {', '.join(allowed)}, got {c!r}.")
    if not chosen:
        raise ValueError(f"{flag} is empty: choose from {', '.join(allowed)}.")
    return list(dict.fromkeys(chosen))


def parse_args(argv: list[str]) -> argparse.Namespace:
    argv = list(argv)
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tq.bench decode-mla",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MLA (DeepSeek-V2/V3) decode attention time per step: sglang-tq's packed "
        "latent against SGLang's default Hopper MLA path (FA3), bf16 and fp8 KV.",
    )
    ap.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help="BxL list: B sequences of L cached tokens (default %(default)s)",
    )
    ap.add_argument(
        "--num-heads",
        type=int,
        default=DEFAULT_HEADS,
        help="query heads: 16 DeepSeek-V2-Lite, 128 DeepSeek-V3 (default %(default)s)",
    )
    ap.add_argument(
        "--kv", default=DEFAULT_KV, help="sglang-tq latent bits, of k4,k3,k2 (default %(default)s)"
    )
    ap.add_argument("--impl", default=",".join(IMPLS), help="implementations (default %(default)s)")
    ap.add_argument(
        "--baseline-dtypes",
        default=",".join(BASELINE_KV),
        help="fa3 KV cache dtypes, of bf16,fp8 (fp8_e4m3) (default %(default)s)",
    )
    ap.add_argument(
        "--max-kv-splits",
        type=int,
        default=SGLANG_NUM_KV_SPLITS,
        help="SGLang's --triton-attention-num-kv-splits, the base of the MLA backend's "
        "split ceiling (default %(default)s)",
    )
    ap.add_argument(
        "--pool-tokens",
        type=int,
        default=0,
        help="token slots in the pool (default 0: each shape's B*L); the fa3 fp8 "
        "row casts the whole pool per call",
    )
    ap.add_argument(
        "--warmup", type=float, default=25.0, help="do_bench warmup, ms (default %(default)s)"
    )
    ap.add_argument(
        "--rep", type=float, default=100.0, help="do_bench rep, ms (default %(default)s)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="do_bench passes per row; ms = median of their medians (default %(default)s)",
    )
    ap.add_argument(
        "--no-cuda-graph", action="store_true", help="time eager calls, not graph replays"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="inputs and slot permutation (default %(default)s)"
    )
    ap.add_argument(
        "--out", default="decode_mla_results.json", help="results JSON (default %(default)s)"
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep --out's entries; rows measured again replace theirs",
    )
    args = ap.parse_args(argv)
    try:
        args.shape_list = parse_shapes(args.shapes)
        args.bits = parse_kv(args.kv)
        args.impls = parse_choices(args.impl, IMPLS, "--impl")
        args.baseline_kv = [
            BASELINE_KV[d]
            for d in parse_choices(args.baseline_dtypes, tuple(BASELINE_KV), "--baseline-dtypes")
        ]
    except ValueError as exc:
        ap.error(str(exc))
    for flag, value in (
        ("--num-heads", args.num_heads),
        ("--max-kv-splits", args.max_kv_splits),
        ("--repeat", args.repeat),
    ):
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}.")
    biggest = max(args.shape_list, key=lambda s: s.tokens)
    if args.pool_tokens < 0:
        ap.error(f"--pool-tokens must be 0 or positive, got {args.pool_tokens}.")
    if 0 < args.pool_tokens < biggest.tokens:
        ap.error(
            f"--pool-tokens {args.pool_tokens} cannot hold shape {biggest} "
            f"({biggest.tokens} tokens); give at least that, or 0."
        )
    args.argv = argv
    return args


def planned_rows(args) -> list[tuple[str, str]]:
    """(impl, kv) of every row of a shape, in table order."""
    rows = [("sglang-tq", f"k{b}") for b in args.bits] if "sglang-tq" in args.impls else []
    return rows + ([("fa3", kv) for kv in args.baseline_kv] if "fa3" in args.impls else [])


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class MLAInputs:
    """One decode step of one MLA layer: the pool's dense rows and the batch's metadata."""

    shape: Shape
    kv_rows: torch.Tensor  # [slots, 1, 576] bf16, latent | RoPE key; row 0 is SGLang's padding slot
    q: torch.Tensor  # [B, H, 576] bf16 absorbed query: q_nope·W_UK | q_pe
    kv_indptr: torch.Tensor  # int32 [B+1]
    kv_indices: torch.Tensor  # int64 [B·L]: slot ids, the Triton-family metadata sglang-tq reads
    page_table: torch.Tensor  # int32 [B, L]: the same slots as FA3's page-size-1 table
    seq_lens: torch.Tensor  # int32 [B]
    sm_scale: float

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_slots(self) -> int:
        return self.kv_rows.shape[0]

    @property
    def q_nope(self) -> torch.Tensor:
        return self.q[..., :LATENT]

    @property
    def q_pe(self) -> torch.Tensor:
        return self.q[..., LATENT:]


def make_inputs(shape: Shape, num_heads: int, pool_tokens: int, device, seed: int = 0) -> MLAInputs:
    """Random bf16 pool rows and queries; the batch's B·L slots a random permutation of the
    pool's token slots 1..max(pool_tokens, B·L) (slot 0 stays SGLang's padding slot)."""
    device = torch.device(device)
    slots = max(pool_tokens, shape.tokens) + 1
    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = dict(dtype=torch.bfloat16, device=device)
    kv_rows = torch.randn(slots, 1, LATENT + ROPE, generator=g, **bf16)
    q = torch.randn(shape.batch, num_heads, LATENT + ROPE, generator=g, **bf16)
    kv_indices = torch.randperm(slots - 1, generator=g, device=device)[: shape.tokens] + 1
    i32 = dict(dtype=torch.int32, device=device)
    return MLAInputs(
        shape=shape,
        kv_rows=kv_rows,
        q=q,
        kv_indptr=torch.arange(shape.batch + 1, **i32) * shape.length,
        kv_indices=kv_indices,
        page_table=kv_indices.view(shape.batch, shape.length).to(torch.int32),
        seq_lens=torch.full((shape.batch,), shape.length, **i32),
        sm_scale=SM_SCALE,
    )


def compare(out0: torch.Tensor, ref: torch.Tensor, tol: float, against: str) -> dict:
    """Relative and max error of one sequence's output [H, 512] against ``ref``."""
    out0 = out0.double()
    finite = bool(torch.isfinite(out0).all())
    diff = out0 - ref.double()
    rel = float(diff.norm() / ref.double().norm().clamp_min(1e-30)) if finite else float("nan")
    max_abs = float(diff.abs().max()) if finite else float("nan")
    return {
        "against": against,
        "rel_err": rel,
        "max_abs_err": max_abs,
        "tol": tol,
        "finite": finite,
        "ok": finite and rel <= tol,
    }


# ----------------------------------------------------------------------------- sglang-tq


@dataclasses.dataclass
class PackedLatent:
    """One packed MLA layer as ``TQMLATokenToKVPool`` holds it."""

    codec: LayerCodec
    codes: torch.Tensor  # uint8 [slots, 1, 512·bits/8]
    norms: torch.Tensor  # fp16 [slots, 1]
    k_pe: torch.Tensor  # bf16 [slots, 64]


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    ceiling: int  # max_kv_splits of the launch
    counts: torch.Tensor  # int32 [B]


def pack_latent(inputs: MLAInputs, bits: int) -> PackedLatent:
    """The pool's codec for layer 0 and every pool row's latent stored keys-only, in chunks."""
    device = inputs.kv_rows.device
    codec = LayerCodec.create(
        LATENT, bits, bits, seed=TQConfig(LATENT, bits, bits).layer_seed(0), device=device
    )
    codes, norms, _, _ = codec.alloc_buffers(inputs.num_slots, 1, device)
    fwht = fwht_rotations()
    for lo in range(0, inputs.num_slots, STORE_CHUNK):
        hi = min(lo + STORE_CHUNK, inputs.num_slots)
        tq_store_kv(
            inputs.kv_rows[lo:hi, :, :LATENT],
            None,
            torch.arange(lo, hi, device=device),
            codes,
            norms,
            None,
            None,
            codec,
            fwht=fwht,
            pdl=False,
        )
    return PackedLatent(codec, codes, norms, inputs.kv_rows[:, 0, LATENT:].contiguous())


def split_plan(seq_lens: torch.Tensor, bits: int, base_splits: int, num_sms: int) -> SplitPlan:
    """The MLA backend's split counts for this batch (its max_splits and get_num_kv_splits)."""
    ceiling = split_ceiling(seq_lens.numel(), base_splits)
    return SplitPlan(ceiling, mla_num_kv_splits(seq_lens, ceiling, bits, num_sms=num_sms))


def tq_step(
    inputs: MLAInputs, packed: PackedLatent, plan: SplitPlan, base_splits: int, **launch
) -> Callable[[], torch.Tensor]:
    """The backend's forward_decode call on this batch, as a no-argument step; ``launch``
    overrides tq_decode's launch options (the tests' interpreter tiles)."""
    bsz, device = inputs.shape.batch, inputs.q.device
    ws = DecodeWorkspace.create(
        max(bsz, SPLIT_REF_BATCH),
        inputs.num_heads,
        LATENT,
        base_splits,
        device,
        out_dtype=inputs.q.dtype,
    )
    out = torch.empty(bsz, inputs.num_heads, LATENT, dtype=inputs.q.dtype, device=device)
    fwht = fwht_rotations()

    def step() -> torch.Tensor:
        return tq_decode(
            inputs.q_nope,
            packed.codes,
            packed.norms,
            None,
            None,
            inputs.kv_indptr,
            inputs.kv_indices,
            packed.codec,
            inputs.sm_scale,
            num_kv_splits=plan.counts,
            max_kv_splits=plan.ceiling,
            workspace=ws,
            out=out,
            fwht=fwht,
            q_pe=inputs.q_pe,
            k_pe=packed.k_pe,
            **launch,
        )

    return step


def check_tq(inputs: MLAInputs, packed: PackedLatent, out: torch.Tensor) -> dict:
    """Sequence 0 against ``tq_decode_ref`` in float64 on the same codes."""
    ref = tq_decode_ref(
        inputs.q_nope[:1],
        packed.codes,
        packed.norms,
        None,
        None,
        inputs.kv_indptr[:2],
        inputs.kv_indices,
        packed.codec,
        inputs.sm_scale,
        q_pe=inputs.q_pe[:1],
        k_pe=packed.k_pe,
    )[0]
    return compare(out[0], ref, TQ_TOL, "tq_decode_ref (float64, same codes), sequence 0")


# ----------------------------------------------------------------------------- fa3


def load_fa3() -> Callable:
    """sgl-kernel's ``flash_attn_with_kvcache`` (ImportError where the FA3 library is missing)."""
    from sgl_kernel.flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache


def fa3_buffer(inputs: MLAInputs, kv: str) -> torch.Tensor:
    """The layer's buffer as SGLang's ``MLATokenToKVPool`` holds it: [slots, 1, 576] in the
    cache dtype (fp8: the plain cast its set_kv_buffer does)."""
    return inputs.kv_rows.to(FA3_DTYPES[kv])


def fa3_step(
    inputs: MLAInputs, buffer: torch.Tensor, flash_attn_with_kvcache
) -> Callable[[], torch.Tensor]:
    """``FlashAttentionBackend.forward_decode``'s absorbed-MLA call (module docstring)."""
    bsz, device = inputs.shape.batch, inputs.q.device
    cu_seqlens_q = torch.arange(bsz + 1, dtype=torch.int32, device=device)
    cu_seqlens_k = torch.nn.functional.pad(
        torch.cumsum(inputs.seq_lens, 0, dtype=torch.int32), (1, 0)
    )

    def step() -> torch.Tensor:
        kv_cache = buffer.to(inputs.q.dtype)
        return flash_attn_with_kvcache(
            q=inputs.q_pe,
            k_cache=kv_cache[:, :, LATENT:].view(-1, 1, 1, ROPE),
            v_cache=kv_cache[:, :, :LATENT].view(-1, 1, 1, LATENT),
            qv=inputs.q_nope,
            page_table=inputs.page_table,
            cache_seqlens=inputs.seq_lens,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k_new=cu_seqlens_k,
            max_seqlen_q=1,
            softmax_scale=inputs.sm_scale,
            causal=True,
            softcap=0.0,
            k_descale=None,
            v_descale=None,
            return_softmax_lse=False,
            num_splits=0,
            ver=3,
        )

    return step


def check_fa3(inputs: MLAInputs, buffer: torch.Tensor, out: torch.Tensor) -> dict:
    """Sequence 0: finite (the gate), and its error against float64 attention over the
    cache's values (fp8: the rounded ones) recorded."""
    slots = inputs.kv_indices[: inputs.shape.length]
    rows = buffer.view(torch.uint8)[slots].view(buffer.dtype).double()
    ref = attention_ref(inputs.q[:1].double(), rows, rows[..., :LATENT], inputs.sm_scale)[0]
    res = compare(
        out.reshape(inputs.shape.batch, inputs.num_heads, LATENT)[0],
        ref,
        DENSE_TOL,
        "float64 attention over the dense cache, sequence 0",
    )
    res["matches_dense"], res["ok"] = res["ok"], res["finite"]
    return res


# ----------------------------------------------------------------------------- timing


def time_replay(step: Callable, args) -> dict:
    """The step's CUDA-graph replay (eager with --no-cuda-graph) timed as
    :func:`sglang_tq.bench.timing.time_replay` does, with the run's do_bench settings."""
    return timing.time_replay(step, args.warmup, args.rep, args.repeat, not args.no_cuda_graph)


# ----------------------------------------------------------------------------- rows


def entry_config(args, shape: Shape, num_sms: int) -> dict:
    """What an entry was measured with (the pool's slots: its tokens plus the padding slot)."""
    return {
        "num_heads": args.num_heads,
        "latent": LATENT,
        "rope": ROPE,
        "sm_scale": SM_SCALE,
        "q_dtype": "bf16",
        "page_size": 1,
        "pool_slots": max(args.pool_tokens, shape.tokens) + 1,
        "shapes": [str(s) for s in args.shape_list],
        "splits_policy": SPLITS_POLICY,
        "base_kv_splits": args.max_kv_splits,
        "num_sms": num_sms,
        "step": "attention only (no cache write)",
        "timing": {
            "cuda_graph": not args.no_cuda_graph,
            "warmup_ms": args.warmup,
            "rep_ms": args.rep,
            "repeat": args.repeat,
            "method": "triton.testing.do_bench median; median over passes",
        },
    }


def measure_tq(args, inputs: MLAInputs, bits: int, num_sms: int, timer) -> dict:
    packed = pack_latent(inputs, bits)
    plan = split_plan(inputs.seq_lens, bits, args.max_kv_splits, num_sms)
    step = tq_step(inputs, packed, plan, args.max_kv_splits)
    check = check_tq(inputs, packed, step())
    return {
        "kv_quant_bits": f"k{bits}v{bits}",
        "check": check,
        "max_kv_splits": plan.ceiling,
        "num_kv_splits": int(plan.counts[0]),
        **timer(step, args),
    }


def measure_fa3(args, inputs: MLAInputs, kv: str, fa3, timer) -> dict:
    buffer = fa3_buffer(inputs, kv)
    step = fa3_step(inputs, buffer, fa3)
    check = check_fa3(inputs, buffer, step())
    note = {} if kv == "bf16" else {"note": FP8_NOTE}
    return {"check": check, "sglang_attention_backend": "fa3", **note, **timer(step, args)}


def row_ok(row: dict) -> bool:
    return "error" not in row and bool(row.get("check", {}).get("ok")) and row.get("ms") is not None


def _one_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _progress(row: dict) -> str:
    head = f"  {row['impl']} {row['kv']}:"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    c = row["check"]
    check = f"check rel {c['rel_err']:.2e} {'ok' if c['ok'] else 'FAILED: timing suspect'}"
    ms = f"{row['ms']:.4f} ms, " if row.get("ms") is not None else ""
    splits = (
        f"splits {row['num_kv_splits']} of {row['max_kv_splits']}, "
        if "num_kv_splits" in row
        else ""
    )
    return f"{head} {ms}{splits}{check}"


def bench_shape(args, shape: Shape, device, timer, fa3, fa3_error: str | None) -> list[dict]:
    """Every planned row of one shape, each with its config, check and timing or error."""
    num_sms = num_sms_of(device)
    base = {
        "shape": str(shape),
        "batch": shape.batch,
        "seq_len": shape.length,
        "config": entry_config(args, shape, num_sms),
    }
    rows = []
    try:
        inputs = make_inputs(shape, args.num_heads, args.pool_tokens, device, args.seed)
    except Exception as exc:
        print(f"  ERROR building the inputs: {_one_line(exc)}", flush=True)
        return [
            {**base, "impl": impl, "kv": kv, "error": _one_line(exc)}
            for impl, kv in planned_rows(args)
        ]
    for impl, kv in planned_rows(args):
        row = {**base, "impl": impl, "kv": kv}
        try:
            if impl == "sglang-tq":
                row.update(measure_tq(args, inputs, int(kv[1:]), num_sms, timer))
            elif fa3 is None:
                row["error"] = fa3_error
            else:
                row.update(measure_fa3(args, inputs, kv, fa3, timer))
        except Exception as exc:
            row["error"] = _one_line(exc)
        rows.append(row)
        print(_progress(row), flush=True)
        _release(device)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_bf16 / ratio_vs_fp8: ms over the shape's fa3 bf16 / fp8_e4m3 row (None
    where either is missing)."""
    base = {r["kv"]: r.get("ms") for r in rows if r["impl"] == "fa3"}
    for r in rows:
        for kv, key in (("bf16", "ratio_vs_bf16"), ("fp8_e4m3", "ratio_vs_fp8")):
            r[key] = r["ms"] / base[kv] if r.get("ms") and base.get(kv) else None


def table_lines(rows: list[dict]) -> list[str]:
    lines = [
        f"{'shape':<10} {'impl':<10} {'kv':<9} {'ms':>9} {'vs bf16':>8} {'vs fp8':>8} "
        f"{'splits':>7}  check"
    ]
    for r in rows:
        ms = "-" if r.get("ms") is None else f"{r['ms']:.4f}"
        vs = [
            "-" if r.get(k) is None else f"{r[k]:.2f}x" for k in ("ratio_vs_bf16", "ratio_vs_fp8")
        ]
        splits = str(r.get("num_kv_splits", "-"))
        if "error" in r:
            check = f"error: {r['error']}"
        else:
            check = f"{'ok' if r['check']['ok'] else 'FAILED'} {r['check']['rel_err']:.1e}"
        lines.append(
            f"{r['shape']:<10} {r['impl']:<10} {r['kv']:<9} {ms:>9} {vs[0]:>8} {vs[1]:>8} "
            f"{splits:>7}  {check}"
        )
    return lines


# ----------------------------------------------------------------------------- run


def num_sms_of(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count or DEFAULT_NUM_SMS


def _release(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def fa3_or_error(loader: Callable) -> tuple[Callable | None, str | None]:
    try:
        return loader(), None
    except Exception as exc:
        return None, f"sgl-kernel's FA3 is unavailable ({_one_line(exc)})"


def run_benchmark(args, device, timer=time_replay, fa3_loader: Callable = load_fa3) -> int:
    """Every shape on ``device``; results to ``args.out``; the exit status (module docstring)."""
    try:
        rf = results.ResultsFile(
            args.out, TOOL, args.argv, results.get_provenance(), key=KEY, keep_existing=args.append
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fa3, fa3_error = fa3_or_error(fa3_loader) if "fa3" in args.impls else (None, None)
    print(
        f"gpu: {rf.provenance.get('gpu')}  commit: {rf.provenance.get('commit')}  -> {args.out}\n"
        f"baseline: fa3 (SGLang's default MLA attention backend on Hopper), KV "
        f"{', '.join(args.baseline_kv)}; {args.num_heads} heads, latent {LATENT} + rope {ROPE}",
        flush=True,
    )
    if fa3_error:
        print(f"note: {fa3_error}; the fa3 rows carry this error, the rest runs", flush=True)
    rows = []
    for i, shape in enumerate(args.shape_list, 1):
        print(
            f"[{i}/{len(args.shape_list)}] {str(shape)}: B = {shape.batch} sequences, "
            f"L = {shape.length} cached tokens each",
            flush=True,
        )
        shape_rows = bench_shape(args, shape, device, timer, fa3, fa3_error)
        for row in shape_rows:
            rf.put(row, write=False)
        rf.write()
        rows += shape_rows
    print("\n" + "\n".join(table_lines(rows)) + f"\n\nJSON: {args.out}", flush=True)
    return 0 if all(row_ok(r) for r in rows) else 3


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print(f"error: {NO_CUDA}", file=sys.stderr)
        return 1
    return run_benchmark(args, torch.device("cuda"))
