"""Compile the decode or store kernels for Hopper without a GPU and report their resources.

Triton compiles to PTX on any machine; the bundled ``ptxas`` assembles it for
sm_90a and ``cuobjdump`` disassembles it. That gives registers, spills and the
SASS instruction mix (global loads, async copies, shared-memory traffic, tensor
core ops) per launch configuration, at no GPU time: the first thing to read when
a memory-bound kernel runs far below bandwidth (device/METHOD.md).

    python -m sglang_tq.tools.kernel_resources --block-n 16,32,64 --num-warps 4,8 --num-stages 1,2
    python -m sglang_tq.tools.kernel_resources --kernel stage1 --fuse-rot 1,2 --block-n 32 \
        --num-warps 1 --heads-n 1
    python -m sglang_tq.tools.kernel_resources --kernel store --fwht 0,1 --num-warps 4 --block-n 16
    python -m sglang_tq.tools.kernel_resources --kernel store --fwht 1 --num-warps 1 --block-n 1
    python -m sglang_tq.tools.kernel_resources --kernel merge --fwht 0,1
    python -m sglang_tq.tools.kernel_resources --mla --head-dim 512 --gqa 16 --prefetch 0 \
        --block-n 16,32
    python -m sglang_tq.tools.kernel_resources --kernel mma --maxnreg 168,255 --prefetch 0,1

``--fuse-rot``: stage 1 reads a rotated q (0), rotates it by the fp16 Π product (1) or by
the fast Walsh-Hadamard transform (2); ``--fwht`` the same choice for the store's rotation
and the many-split merge's un-rotation.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from ..bench import cli
from ..bench.cli import add_kv_bits
from ..bench.results import write_json_atomic
from ..format.codec import LayerCodec
from ..kernels import tq_decode as dec

_POINTERS = {
    "QRot": "*fp32",
    "Pi16": "*fp16",
    "KCodes": "*u8",
    "KNorms": "*fp16",
    "VCodes": "*u8",
    "VNorms": "*fp16",
    "KCb": "*fp32",
    "VCb": "*fp32",
    "KTab": "*i32",
    "VTab": "*i32",
    "KvIndptr": "*i32",
    "KvIndices": "*i64",
    "NumKvSplits": "*i32",
    "MidO": "*fp32",
    "MidLse": "*fp32",
    "QPe": "*bf16",
    "KPe": "*bf16",
}
_SASS_CLASSES = {
    "LDG": r"\bLDG\.",
    "LDGSTS": r"\bLDGSTS",
    "LDS": r"\bLDS",
    "STS": r"\bSTS",
    "HMMA": r"\bHMMA",
    "HGMMA": r"\bHGMMA",
    "PRMT": r"\bPRMT",
    "LDL/STL": r"\b(LDL|STL)",
    "SHFL": r"\bSHFL",
    "BAR": r"\bBAR",
}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_mix(sass: str) -> dict:
    """Opcode histogram of the longest loop body (the KV-tile loop) in a SASS listing.

    A loop is a backward ``BRA`` to an earlier ``/*addr*/``; its body is every
    instruction between the target and the branch."""
    insts = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)
    addr = [int(a, 16) for a, _, _ in insts]
    best = (0, 0)
    for i, (_, op, rest) in enumerate(insts):
        m = re.search(r"`?\(?\.L_x_\d+\)?|0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if m and m.group(1) and int(m.group(1), 16) < addr[i]:
            start = addr.index(int(m.group(1), 16)) if int(m.group(1), 16) in addr else None
            if start is not None and i - start > best[1] - best[0]:
                best = (start, i)
    body = [op.split(".")[0] for _, op, _ in insts[best[0] : best[1] + 1]]
    return {
        "loop_instructions": len(body),
        "loop_mix": dict(collections.Counter(body).most_common()),
    }


_STORE_POINTERS = {
    "K": "*bf16",
    "V": "*bf16",
    "Loc": "*i64",
    "PiTK": "*fp32",
    "PiTV": "*fp32",
    "BoundsK": "*fp32",
    "BoundsV": "*fp32",
    "KCodes": "*u8",
    "KNorms": "*fp16",
    "VCodes": "*u8",
    "VNorms": "*fp16",
    "KCenter": "*fp32",
}
_MERGE_POINTERS = {
    "MidO": "*fp32",
    "MidLse": "*fp32",
    "Pi": "*fp32",
    "Out": "*bf16",
    "KvIndptr": "*i32",
    "NumKvSplits": "*i32",
    "Sinks": "*fp32",
}


def compile_stage1(
    head_dim,
    k_bits,
    v_bits,
    gqa,
    block_n,
    num_warps,
    num_stages,
    sass_dir=None,
    prefetch=1,
    heads_n=0,
    maxnreg=0,
    fuse_rot=0,
    mla=0,
):
    codec = LayerCodec.create(head_dim, k_bits, v_bits)
    consts = dict(
        GQA=gqa,
        BLOCK_H=dec._block_h(gqa, heads_n),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        K_BITS=k_bits,
        V_BITS=v_bits,
        HAS_CAP=False,
        K_LUT=codec.k_lut,
        V_LUT=codec.v_lut,
        USE_ASM=True,
        SLOT_I64=False,
        PREFETCH=prefetch,
        HEADS_N=heads_n,
        FUSE_ROT=fuse_rot,
        USE_PDL=0,
        EARLY_Q=0,
        SHARED_KV=bool(mla),
        ROPE_DIM=64 if mla else 0,
        HEAD_BLOCKS=1,
    )
    # with a fused rotation stage 1 reads the unrotated bf16 q
    pointers = {**_POINTERS, **({"QRot": "*bf16"} if fuse_rot else {})}
    name = (
        f"k{k_bits}v{v_bits}_d{head_dim}_bn{block_n}_w{num_warps}_s{num_stages}_p{prefetch}"
        f"_h{heads_n}_r{maxnreg}_f{fuse_rot}{'_mla' if mla else ''}"
    )
    return _resources(
        dec._tq_decode_stage1,
        pointers,
        consts,
        dict(
            num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {})
        ),
        sass_dir,
        name,
    )


def compile_store(head_dim, k_bits, v_bits, num_warps, fwht=0, block_n=16, sass_dir=None):
    from ..kernels import tq_store

    # above head_dim 256 (MLA's latent) the launcher rotates and the kernel only quantizes
    consts = dict(
        K_BITS=k_bits,
        V_BITS=v_bits,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        K_CENTER=False,
        USE_PDL=0,
        FWHT=bool(fwht),
        ROTATED=head_dim > 256,
    )
    return _resources(
        tq_store._tq_store_kernel,
        _STORE_POINTERS,
        consts,
        dict(num_warps=num_warps, num_stages=1),
        sass_dir,
        f"store_k{k_bits}v{v_bits}_d{head_dim}_bn{block_n}_w{num_warps}_f{fwht}",
    )


def compile_merge(head_dim, splits=64, fwht=0, sass_dir=None):
    p2 = triton.next_power_of_2(splits)
    consts = dict(
        GQA=4,
        BLOCK_H=16,
        HEAD_DIM=head_dim,
        MAX_KV_SPLITS=splits,
        MIN_BLOCK_KV=32,
        SPLITS_P2=p2,
        CHUNK_S=min(p2, 4096 // head_dim),
        VECTOR_MERGE=True,
        HAS_SINK=False,
        USE_PDL=0,
        UNROT_FWHT=bool(fwht),
    )
    return _resources(
        dec._tq_decode_stage2,
        _MERGE_POINTERS,
        consts,
        dict(num_warps=4),
        sass_dir,
        f"merge_d{head_dim}_s{splits}_f{fwht}",
    )


def _resources(fn, pointers, consts, options, sass_dir, name):
    sig = {}
    for arg in fn.arg_names:
        if arg in pointers:
            sig[arg] = pointers[arg]
        elif arg in consts:
            sig[arg] = "constexpr"
        else:
            sig[arg] = "fp32" if arg in ("sm_scale", "logit_cap") else "i32"
    # Triton specialises pointers and strides divisible by 16 at launch; do the same here.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n in pointers or n.startswith("stride")
    }
    src = triton.compiler.ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs=attrs,
    )
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kern.asm["ptx"])
        info = subprocess.run(
            [_tool("ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True
        )
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True
        ).stdout
    text = info.stdout + info.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {
        "regs": int(regs[1]) if regs else None,
        "spill_bytes": int(spill[1]) if spill else None,
        "shared_bytes": kern.metadata.shared,
        **sass_report(sass, sass_dir, name),
    }


def sass_report(sass: str, sass_dir: str | None, name: str) -> dict:
    """Instruction classes and the loop mix of a SASS listing (written to ``sass_dir``)."""
    counts = collections.Counter({k: len(re.findall(p, sass)) for k, p in _SASS_CLASSES.items()})
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        with open(os.path.join(sass_dir, name + ".sass"), "w") as f:
            f.write(sass)
    return {"sass_lines": sass.count("\n"), **counts, **loop_mix(sass)}


def cubin_resources(cubin: bytes, sass_dir: str | None = None, name: str = "cubin") -> dict:
    """cuobjdump's resource usage (registers, stack, local and shared bytes) and the SASS
    report of a compiled cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    res = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}
    return {
        "regs": res["reg"],
        "stack_bytes": res["stack"],
        "local_bytes": res["local"],
        "shared_bytes": res["shared"],
        **sass_report(sass, sass_dir, name),
    }


def compile_mma(slot_i64, head_rows, min_blocks, prefetch, sass_dir=None):
    """The CUDA stage 1 (tq_decode_mma.cu) through NVRTC for sm_90a."""
    from ..kernels import tq_decode_mma

    src = tq_decode_mma.render_source(slot_i64, head_rows, min_blocks, False, prefetch)
    cubin, _ = tq_decode_mma.compile_source(src, "90a")
    name = f"mma_i{int(slot_i64)}_h{head_rows}_b{min_blocks}_p{int(prefetch)}"
    return cubin_resources(cubin, sass_dir, name)


def add_launch_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--block-n",
        default=None,
        help="tokens per program, a list (default: stage1 16,32,64; store 16, or 1 for "
        "its one-token programs)",
    )
    ap.add_argument("--num-warps", default="4,8")
    ap.add_argument("--num-stages", default="1,2")
    ap.add_argument(
        "--prefetch", default="1", help="1 (register prefetch of the next tile), 0, or 1,0"
    )
    ap.add_argument(
        "--heads-n",
        default="0",
        help="1 (the GQA group as the dots' N side: the transposed problem), 0, or 0,1",
    )
    ap.add_argument(
        "--maxnreg",
        default="0",
        help="register cap per thread handed to ptxas (0: none), or a list, e.g. 0,128,168",
    )
    ap.add_argument(
        "--fuse-rot",
        default="0",
        help="stage1: 0 (q rotated before), 1 (fp16 Π product), 2 (fast Walsh-Hadamard), or a list",
    )
    ap.add_argument(
        "--fwht", default="0", help="store / merge: 0 (dense Π), 1 (fast Walsh-Hadamard), or 0,1"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = cli.doc_parser("python -m sglang_tq.tools.kernel_resources", __doc__)
    ap.add_argument("--head-dim", type=int, default=128)
    add_kv_bits(ap, "k4v4")
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument(
        "--kernel",
        choices=("stage1", "store", "merge", "mma"),
        default="stage1",
        help="decode stage 1 (default), the quantize-and-store kernel, the many-split "
        "merge (stage 2), or the CUDA stage 1 (tq_decode_mma.cu: k4v4, d = 128; --gqa picks "
        "its head rows, --maxnreg its resident programs, --prefetch its load prefetch)",
    )
    add_launch_args(ap)
    ap.add_argument(
        "--mla",
        action="store_true",
        help="stage1: MLA's shared latent (values = the key codes, 64-d bf16 RoPE "
        "scores, no prefetch); use with --head-dim 512 --gqa 16",
    )
    ap.add_argument("--out", help="JSON list of the rows")
    ap.add_argument("--sass-dir", help="also write each variant's SASS listing here")
    return ap.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def store_jobs(args) -> list:
    """store: --block-n 16 (tensor-core tiles) or 1 (one token per program, --fwht 1)."""
    grid = itertools.product(
        args.kv, ints(args.num_warps), ints(args.fwht), ints(args.block_n or "16")
    )
    return [
        (
            {"kernel": "store", "kv": kv, "num_warps": nw, "fwht": fw, "block_n": bn},
            lambda kb=kb, vb=vb, nw=nw, fw=fw, bn=bn: compile_store(
                args.head_dim, kb, vb, nw, fw, bn, sass_dir=args.sass_dir
            ),
        )
        for (kv, kb, vb), nw, fw, bn in grid
    ]


def merge_jobs(args) -> list:
    return [
        (
            {"kernel": "merge", "head_dim": args.head_dim, "fwht": fw},
            lambda fw=fw: compile_merge(args.head_dim, fwht=fw, sass_dir=args.sass_dir),
        )
        for fw in ints(args.fwht)
    ]


STAGE1_KEYS = ("block_n", "num_warps", "num_stages", "prefetch", "heads_n", "maxnreg", "fuse_rot")


def stage1_jobs(args) -> list:
    lists = (
        args.block_n or "16,32,64",
        args.num_warps,
        args.num_stages,
        args.prefetch,
        args.heads_n,
        args.maxnreg,
        args.fuse_rot,
    )
    jobs = []
    for (kv, kb, vb), *launch in itertools.product(args.kv, *map(ints, lists)):
        bn, nw, ns, pf, hn, mr, fr = launch

        def job(kb=kb, vb=vb, bn=bn, nw=nw, ns=ns, pf=pf, hn=hn, mr=mr, fr=fr):
            return compile_stage1(
                args.head_dim,
                kb,
                vb,
                args.gqa,
                bn,
                nw,
                ns,
                args.sass_dir,
                pf,
                hn,
                mr,
                fr,
                int(args.mla),
            )

        jobs.append(({"kv": kv, **dict(zip(STAGE1_KEYS, launch))}, job))
    return jobs


def mma_jobs(args) -> list:
    from ..kernels.tq_decode_mma import min_blocks_for

    rows = 16 if args.gqa > 8 else 8
    return [
        (
            {"kernel": "mma", "head_rows": rows, "maxnreg": mr, "prefetch": pf},
            lambda mr=mr, pf=pf: compile_mma(
                False, rows, min_blocks_for(mr), bool(pf), sass_dir=args.sass_dir
            ),
        )
        for mr, pf in itertools.product(ints(args.maxnreg), ints(args.prefetch))
    ]


JOBS = {"store": store_jobs, "merge": merge_jobs, "stage1": stage1_jobs, "mma": mma_jobs}


def run(args: argparse.Namespace) -> int:
    rows = []
    for key, job in JOBS[args.kernel](args):
        r = {**key, **job()}
        rows.append(r)
        print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    if args.out:
        write_json_atomic(args.out, rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
