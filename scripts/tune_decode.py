"""Sweep launch parameters of the packed decode kernel and report registers and spills.

Times ``tq_decode`` at a few shapes over a grid of (block_n, num_warps,
num_stages), prints a table with the compiled stage-1 kernel's register count
and spills, and writes JSON; the last line names the fastest configuration at
the largest shape, in the form ``bench_decode.py --tq-kernel-args`` takes.

    python scripts/tune_decode.py --out tune_decode.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from sglang_tq.codec import LayerCodec
from sglang_tq.kernels import tq_decode as dec
from sglang_tq.kernels.tq_store import tq_store_kv
from sglang_tq.provenance import provenance


def _stage1_resources():
    """(n_regs, n_spills) of each compiled stage-1 variant, keyed by its constants."""
    found = {}
    for cache in getattr(dec._tq_decode_stage1, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for key, kern in kernels.items():
            found[str(key)] = (getattr(kern, "n_regs", None), getattr(kern, "n_spills", None))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x16384,1x32768", help="comma list of BxL")
    ap.add_argument("--kv", default="k4v4,k2v2")
    ap.add_argument("--block-n", default="64,128")
    ap.add_argument("--num-warps", default="2,4,8")
    ap.add_argument("--num-stages", default="1,2,3")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--max-kv-splits", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    d, hq, hkv = args.head_dim, 32, 8
    rows = []
    for kv in args.kv.split(","):
        kb, vb = int(kv[1]), int(kv[3])
        codec = LayerCodec.create(d, kb, vb, device="cuda")
        for shape in args.shapes.split(","):
            bsz, seq = map(int, shape.split("x"))
            slots = bsz * seq
            bufs = codec.alloc_buffers(slots, hkv)
            for s0 in range(0, slots, 1 << 18):
                n = min(1 << 18, slots - s0)
                kvx = torch.randn(2, n, hkv, d, device="cuda", dtype=torch.bfloat16)
                tq_store_kv(kvx[0], kvx[1], torch.arange(s0, s0 + n, device="cuda"), *bufs, codec)
            indices = torch.randperm(slots, device="cuda")
            indptr = torch.arange(0, slots + 1, seq, device="cuda", dtype=torch.int32)
            q = torch.randn(bsz, hq, d, device="cuda", dtype=torch.bfloat16)
            splits = dec.default_num_kv_splits(torch.full((bsz,), seq), hkv, args.max_kv_splits,
                                               num_sms=torch.cuda.get_device_properties(0).multi_processor_count,
                                               head_dim=d)
            splits = splits.cuda()
            ws = dec.DecodeWorkspace.create(bsz, hq, d, args.max_kv_splits, "cuda")
            for bn, nw, ns in itertools.product(*(map(int, x.split(",")) for x in
                                                   (args.block_n, args.num_warps, args.num_stages))):
                kw = dict(block_n=bn, num_warps=nw, num_stages=ns)
                fn = lambda: dec.tq_decode(q, *bufs, indptr, indices, codec, d**-0.5,  # noqa: E731
                                           num_kv_splits=splits, max_kv_splits=args.max_kv_splits,
                                           workspace=ws, **kw)
                try:
                    fn()
                    ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result
                    rows.append({"kv": kv, "B": bsz, "L": seq, **kw, "error": repr(exc)[:200]})
                    print(f"{kv} {bsz}x{seq} {kw}: {exc!r}"[:160], flush=True)
                    continue
                nbytes = bsz * seq * hkv * (codec.k_code_bytes + codec.v_code_bytes + 4)
                rows.append({"kv": kv, "B": bsz, "L": seq, **kw, "ms": ms, "tbps": nbytes / ms / 1e9,
                             "splits": int(splits[0])})
                print(f"{kv} {bsz:>4}x{seq:<6} bn={bn:<3} warps={nw} stages={ns}  {ms:8.4f} ms  "
                      f"{nbytes / ms / 1e9:6.3f} TB/s", flush=True)
            del bufs, indices
            torch.cuda.empty_cache()
    resources = _stage1_resources()
    for key, (regs, spills) in resources.items():
        print(f"stage1 variant regs={regs} spills={spills}  {key[:150]}")
    result = {**provenance(), "rows": rows, "stage1_resources": resources}
    ok = [r for r in rows if "ms" in r]
    biggest = max(r["B"] * r["L"] for r in ok)
    best = min((r for r in ok if r["B"] * r["L"] == biggest and r["kv"] == ok[0]["kv"]),
               key=lambda r: r["ms"])
    result["best"] = {k: best[k] for k in ("block_n", "num_warps", "num_stages")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print("BEST", json.dumps(result["best"]))


if __name__ == "__main__":
    main()
