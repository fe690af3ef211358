"""Prefill (extend) attention of one layer: the turboquant path against bf16's kernels.

The reference load test is prefill-bound (README, Serving under load): 576k prompt
tokens cost ~18 s in every KV format, and attention is ~10% of a 6k-token prompt's
FLOPs. This times one layer's extend attention, including the packed prefix's
dequant, for

* ``bf16-triton``: SGLang's Triton extend kernel over a bf16 pool (what the
  bf16 / fp8 baselines of ``scripts/loadtest.py`` run, ``--attention-backend triton``);
* ``bf16-fa3``: sgl-kernel's FlashAttention-3 over the same pool with a page table
  (SGLang's default prefill on Hopper);
* ``<kv>-triton`` / ``<kv>-fa3``: ``tq_extend`` with each ``impl``.

    python scripts/bench_extend.py --shapes 1x6000,2x4096,1x2048+6000,64x200+4000s \\
        --kv k4v4,k3v3 --out benchmarks/results/bench_extend/bench_extend_h200.json

A shape is ``BxE`` (B sequences of E new tokens), ``BxE+P`` (each after its own
P-token prefix in the cache) or ``BxE+Ps`` (all B after one shared P-token prefix, a
radix hit). Llama-3.1-8B attention by default (32 q / 8 kv heads, d = 128). Times are
medians of ``triton.testing.do_bench`` (eager; a prefill step is not graph-captured by
default); every row is checked against bf16-triton's output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_shapes(text: str) -> list[tuple[int, int, int, bool]]:
    shapes = []
    for tok in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)(?:\+(\d+)(s?))?", tok)
        if not m:
            raise SystemExit(f"bad shape {tok!r}: write BxE, BxE+P or BxE+Ps (e.g. 64x200+4000s).")
        shapes.append((int(m[1]), int(m[2]), int(m[3] or 0), bool(m[4])))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default="1x6000,2x4096,1x2048+6000,64x200+4000s,16x512+4000s")
    ap.add_argument("--kv", default="k4v4,k3v3", help="comma list of bit pairs")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from sglang_tq.config import TQConfig

    shapes = parse_shapes(args.shapes)
    try:
        pairs = TQConfig.parse_bits_list(args.kv)
    except ValueError as e:
        raise SystemExit(f"--kv: {e}") from None
    if not torch.cuda.is_available():
        raise SystemExit("bench_extend.py times CUDA kernels; run it on the GPU host.")
    from sgl_kernel.flash_attn import flash_attn_with_kvcache
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    from triton.testing import do_bench

    from sglang_tq.format.codec import LayerCodec
    from sglang_tq.kernels.tq_extend import EXTEND_IMPLS, dedup_prefix, tq_extend
    from sglang_tq.kernels.tq_store import tq_store_kv
    from sglang_tq.provenance import provenance

    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    scale = d**-0.5
    rows = []
    print(f"{'shape':>16} {'impl':>12} {'ms':>8} {'x bf16-triton':>14} {'rel err':>9}")
    for bsz, ext, pre, shared in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        prefix_slots_n = pre if shared else bsz * pre
        num_slots = prefix_slots_n + bsz * ext + 1
        t = bsz * ext
        q = torch.randn(t, hq, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(t, hkv, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(t, hkv, d, device=dev, dtype=dt, generator=g)
        k_buf = torch.randn(num_slots, hkv, d, device=dev, dtype=dt, generator=g)
        v_buf = torch.randn(num_slots, hkv, d, device=dev, dtype=dt, generator=g)
        perm = torch.randperm(num_slots - 1, device=dev, generator=g) + 1  # slot 0: padding
        own = perm[:prefix_slots_n]
        kv_indices = own.repeat(bsz) if shared else own
        qo = torch.arange(bsz + 1, device=dev, dtype=torch.int32) * ext
        kv_indptr = torch.arange(bsz + 1, device=dev, dtype=torch.int32) * pre
        chunk_slots = perm[prefix_slots_n : prefix_slots_n + t]
        k_buf[chunk_slots], v_buf[chunk_slots] = k, v
        label = f"{bsz}x{ext}" + (f"+{pre}{'s' if shared else ''}" if pre else "")
        o_ref = torch.empty_like(q)

        def bf16_triton():
            extend_attention_fwd(
                q,
                k,
                v,
                o_ref,
                k_buf,
                v_buf,
                qo,
                kv_indptr,
                kv_indices,
                None,
                True,
                None,
                ext,
                1.0,
                1.0,
                scale,
            )

        # bf16-fa3: the whole sequence (prefix + chunk) through a page table of the pool
        table = torch.zeros(bsz, pre + ext, dtype=torch.int32, device=dev)
        if pre:
            table[:, :pre] = kv_indices.view(bsz, pre)
        table[:, pre:] = chunk_slots.view(bsz, ext)
        lens = torch.full((bsz,), pre + ext, dtype=torch.int32, device=dev)
        o_fa = torch.empty_like(q)

        def bf16_fa3():
            flash_attn_with_kvcache(
                q,
                k_buf.unsqueeze(1),
                v_buf.unsqueeze(1),
                page_table=table,
                cache_seqlens=lens,
                cu_seqlens_q=qo,
                max_seqlen_q=ext,
                softmax_scale=scale,
                causal=True,
                out=o_fa,
            )

        base = None
        cases = [("bf16-triton", bf16_triton, lambda: o_ref), ("bf16-fa3", bf16_fa3, lambda: o_fa)]
        for kv, kb, vb in pairs:
            codec = LayerCodec.create(d, kb, vb, seed=0, device=dev)
            bufs = codec.alloc_buffers(num_slots, hkv, dev)
            tq_store_kv(k_buf, v_buf, torch.arange(num_slots, device=dev), *bufs, codec)
            dd = dedup_prefix(kv_indices) if pre else None
            for impl in EXTEND_IMPLS[::-1]:
                o_tq = torch.empty_like(q)

                def run(impl=impl, bufs=bufs, codec=codec, o_tq=o_tq, dd=dd):
                    tq_extend(
                        q,
                        k,
                        v,
                        *bufs,
                        qo,
                        kv_indptr,
                        kv_indices,
                        codec,
                        scale,
                        max_extend_len=ext,
                        num_prefix_tokens=bsz * pre,
                        prefix_dedup=dd,
                        out=o_tq,
                        impl=impl,
                        max_kv_len=pre + ext,
                    )

                cases.append((f"{kv}-{impl}", run, lambda o=o_tq: o))
        for name, fn, out in cases:
            fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=25, rep=100)
            base = base or ms
            o_ref_now = o_ref.float()
            err = ((out().float() - o_ref_now).norm() / o_ref_now.norm()).item()
            rows.append(
                dict(
                    shape=label,
                    batch=bsz,
                    extend=ext,
                    prefix=pre,
                    shared=shared,
                    impl=name,
                    ms=ms,
                    vs_bf16_triton=base / ms,
                    rel_err_vs_bf16=err,
                )
            )
            print(f"{label:>16} {name:>12} {ms:8.3f} {base / ms:14.2f} {err:9.4f}", flush=True)
    if args.out:
        payload = {
            **provenance(),
            "tool": "scripts/bench_extend.py",
            "argv": sys.argv[1:],
            "config": dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d),
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
