"""``python -m sglang_tq.bench extend``: prefill (extend) attention of one layer, the turboquant
path against bf16's kernels.

The reference load test is prefill-bound (README, Serving under load): 576k prompt
tokens cost ~18 s in every KV format, and attention is ~10% of a 6k-token prompt's
FLOPs. This times one layer's extend attention, including the packed prefix's
dequant, for

* ``bf16-triton``: SGLang's Triton extend kernel over a bf16 pool (what the
  bf16 / fp8 baselines of the load test run, ``--attention-backend triton``);
* ``bf16-fa3``: sgl-kernel's FlashAttention-3 over the same pool with a page table
  (SGLang's default prefill on Hopper);
* ``<kv>-triton`` / ``<kv>-fa3``: ``tq_extend`` with each ``impl``.

    python -m sglang_tq.bench extend --shapes 1x6000,2x4096,1x2048+6000,64x200+4000s \\
        --kv k4v4,k3v3    # JSON under benchmarks/results/bench_extend/

A shape is ``BxE`` (B sequences of E new tokens), ``BxE+P`` (each after its own
P-token prefix in the cache) or ``BxE+Ps`` (all B after one shared P-token prefix, a
radix hit). Llama-3.1-8B attention by default (32 q / 8 kv heads, d = 128). Times are
means of ``triton.testing.do_bench`` (its default; eager: a prefill step is not
graph-captured by default); every row is checked against bf16-triton's output.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from . import cli, kernel_io
from .cli import Shape, add_kv_bits, add_out, add_shapes

TOOL = "sglang_tq.bench extend"
RESULTS_FOLDER = "bench_extend"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = kernel_io.argv_of(argv)
    ap = cli.doc_parser("python -m sglang_tq.bench extend", __doc__)
    add_shapes(ap, "1x6000,2x4096,1x2048+6000,64x200+4000s,16x512+4000s", prefix=True)
    add_kv_bits(ap, "k4v4,k3v3")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    add_out(ap, RESULTS_FOLDER)
    args = ap.parse_args(argv)
    args.argv = argv
    return args


@dataclass
class ExtendInputs:
    """One extend batch: the new tokens' q/k/v, a bf16 pool holding the prefixes and the new
    tokens at randomly permuted slots (slot 0: padding), and SGLang's extend metadata."""

    shape: Shape
    q: object  # [B·E, Hq, D] bf16
    k: object  # [B·E, Hkv, D]
    v: object
    k_buf: object  # [slots, Hkv, D] bf16 pool
    v_buf: object
    qo_indptr: object  # int32 [B+1], E apart
    kv_indptr: object  # int32 [B+1], P apart: the prefix slots of each sequence
    kv_indices: object  # prefix slot ids (the shared prefix repeated per sequence)
    chunk_slots: object  # the new tokens' slots

    @property
    def num_slots(self) -> int:
        return self.k_buf.shape[0]


def make_inputs(shape: Shape, hq: int, hkv: int, d: int) -> ExtendInputs:
    import torch

    dev, dt = torch.device("cuda"), torch.bfloat16
    bsz, ext, pre = shape.batch, shape.length, shape.prefix
    g = torch.Generator(device=dev).manual_seed(0)
    prefix_slots_n = pre if shape.shared else bsz * pre
    num_slots = prefix_slots_n + bsz * ext + 1
    t = bsz * ext
    q = torch.randn(t, hq, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(t, hkv, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(t, hkv, d, device=dev, dtype=dt, generator=g)
    k_buf = torch.randn(num_slots, hkv, d, device=dev, dtype=dt, generator=g)
    v_buf = torch.randn(num_slots, hkv, d, device=dev, dtype=dt, generator=g)
    perm = torch.randperm(num_slots - 1, device=dev, generator=g) + 1  # slot 0: padding
    own = perm[:prefix_slots_n]
    chunk_slots = perm[prefix_slots_n : prefix_slots_n + t]
    k_buf[chunk_slots], v_buf[chunk_slots] = k, v
    return ExtendInputs(
        shape=shape,
        q=q,
        k=k,
        v=v,
        k_buf=k_buf,
        v_buf=v_buf,
        qo_indptr=torch.arange(bsz + 1, device=dev, dtype=torch.int32) * ext,
        kv_indptr=torch.arange(bsz + 1, device=dev, dtype=torch.int32) * pre,
        kv_indices=own.repeat(bsz) if shape.shared else own,
        chunk_slots=chunk_slots,
    )


def bf16_triton_case(inp: ExtendInputs, scale: float):
    """SGLang's Triton extend kernel over the bf16 pool; its output is every row's reference."""
    import torch
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    o_ref = torch.empty_like(inp.q)
    q, k, v = inp.q, inp.k, inp.v

    def step():
        extend_attention_fwd(
            q,
            k,
            v,
            o_ref,
            inp.k_buf,
            inp.v_buf,
            inp.qo_indptr,
            inp.kv_indptr,
            inp.kv_indices,
            None,
            True,
            None,
            inp.shape.length,
            1.0,
            1.0,
            scale,
        )

    return "bf16-triton", step, lambda: o_ref


def bf16_fa3_case(inp: ExtendInputs, scale: float):
    """sgl-kernel's FA3: the whole sequence (prefix + chunk) through a page table of the pool."""
    import torch
    from sgl_kernel.flash_attn import flash_attn_with_kvcache

    bsz, ext, pre = inp.shape.batch, inp.shape.length, inp.shape.prefix
    dev = inp.q.device
    table = torch.zeros(bsz, pre + ext, dtype=torch.int32, device=dev)
    if pre:
        table[:, :pre] = inp.kv_indices.view(bsz, pre)
    table[:, pre:] = inp.chunk_slots.view(bsz, ext)
    lens = torch.full((bsz,), pre + ext, dtype=torch.int32, device=dev)
    o_fa = torch.empty_like(inp.q)

    def step():
        flash_attn_with_kvcache(
            inp.q,
            inp.k_buf.unsqueeze(1),
            inp.v_buf.unsqueeze(1),
            page_table=table,
            cache_seqlens=lens,
            cu_seqlens_q=inp.qo_indptr,
            max_seqlen_q=ext,
            softmax_scale=scale,
            causal=True,
            out=o_fa,
        )

    return "bf16-fa3", step, lambda: o_fa


def tq_cases(inp: ExtendInputs, pairs, scale: float) -> list:
    """``tq_extend`` with each impl per bit pair, over the pool packed by ``tq_store_kv``."""
    import torch

    from ..format.codec import LayerCodec
    from ..kernels.tq_extend import EXTEND_IMPLS, dedup_prefix, tq_extend
    from ..kernels.tq_store import tq_store_kv

    bsz, ext, pre = inp.shape.batch, inp.shape.length, inp.shape.prefix
    dev, d, hkv = inp.q.device, inp.q.shape[-1], inp.k.shape[1]
    cases = []
    for kv, kb, vb in pairs:
        codec = LayerCodec.create(d, kb, vb, seed=0, device=dev)
        bufs = codec.alloc_buffers(inp.num_slots, hkv, dev)
        tq_store_kv(inp.k_buf, inp.v_buf, torch.arange(inp.num_slots, device=dev), *bufs, codec)
        dd = dedup_prefix(inp.kv_indices) if pre else None
        for impl in EXTEND_IMPLS[::-1]:
            o_tq = torch.empty_like(inp.q)

            def step(impl=impl, bufs=bufs, codec=codec, o_tq=o_tq, dd=dd):
                tq_extend(
                    inp.q,
                    inp.k,
                    inp.v,
                    *bufs,
                    inp.qo_indptr,
                    inp.kv_indptr,
                    inp.kv_indices,
                    codec,
                    scale,
                    max_extend_len=ext,
                    num_prefix_tokens=bsz * pre,
                    prefix_dedup=dd,
                    out=o_tq,
                    impl=impl,
                    max_kv_len=pre + ext,
                )

            cases.append((f"{kv}-{impl}", step, lambda o=o_tq: o))
    return cases


def time_cases(shape: Shape, cases: list) -> list[dict]:
    """Each case run once, timed, and checked against the first case's (bf16-triton's) output."""
    import torch
    from triton.testing import do_bench

    rows, base = [], None
    for name, fn, out in cases:
        fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=25, rep=100)
        base = base or ms
        o_ref = cases[0][2]().float()
        err = ((out().float() - o_ref).norm() / o_ref.norm()).item()
        rows.append(
            dict(
                shape=str(shape),
                batch=shape.batch,
                extend=shape.length,
                prefix=shape.prefix,
                shared=shape.shared,
                impl=name,
                ms=ms,
                vs_bf16_triton=base / ms,
                rel_err_vs_bf16=err,
            )
        )
        print(f"{str(shape):>16} {name:>12} {ms:8.3f} {base / ms:14.2f} {err:9.4f}", flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    if not kernel_io.require_cuda("extend"):
        return 1
    from .results import get_provenance

    prov = get_provenance()
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    scale = d**-0.5
    rows = []
    print(f"{'shape':>16} {'impl':>12} {'ms':>8} {'x bf16-triton':>14} {'rel err':>9}")
    for shape in args.shapes:
        inp = make_inputs(shape, hq, hkv, d)
        cases = [bf16_triton_case(inp, scale), bf16_fa3_case(inp, scale)]
        rows += time_cases(shape, cases + tq_cases(inp, args.kv, scale))
    config = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    kernel_io.write_results(args, TOOL, RESULTS_FOLDER, prov, config=config, rows=rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
