"""One decode-benchmark shape on the GPU, shared by ``python -m sglang_tq.bench ab-decode`` and
``profile-decode`` and by ``python -m sglang_tq.tools.tune`` (no subcommand imports another,
so what they share lives here).

A packed pool of B·L random bf16 K/V tokens (written by ``tq_store_kv`` in chunks of
256k tokens), the slots of every sequence scattered by a random permutation, one query
token per sequence, the packed bytes one decode step reads, and that step as a
no-argument call (:meth:`DecodeShape.decode_fn`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.tq_store import tq_store_kv


@dataclass
class DecodeShape:
    bufs: tuple  # k_codes, k_norms, v_codes, v_norms
    indptr: torch.Tensor  # [B + 1] int32
    indices: torch.Tensor  # [B·L] slot ids
    q: torch.Tensor  # [B, Hq, D] bf16
    nbytes: int  # packed KV bytes one step reads

    def decode_fn(self, codec, num_kv_splits, max_kv_splits: int, workspace, **launch):
        """A no-argument ``tq_decode`` of this shape's queries over its pool (softmax scale
        D^-0.5); ``launch``: tq_decode's keyword overrides (tiles, switches, ``out``)."""
        from ..kernels.tq_decode import tq_decode

        scale = codec.head_dim**-0.5

        def fn():
            return tq_decode(
                self.q,
                *self.bufs,
                self.indptr,
                self.indices,
                codec,
                scale,
                num_kv_splits=num_kv_splits,
                max_kv_splits=max_kv_splits,
                workspace=workspace,
                **launch,
            )

        return fn


def decode_shape(codec, bsz: int, seq: int, hq: int, hkv: int) -> DecodeShape:
    d, slots = codec.head_dim, bsz * seq
    bufs = codec.alloc_buffers(slots, hkv)
    for s0 in range(0, slots, 1 << 18):
        n = min(1 << 18, slots - s0)
        kvx = torch.randn(2, n, hkv, d, device="cuda", dtype=torch.bfloat16)
        tq_store_kv(kvx[0], kvx[1], torch.arange(s0, s0 + n, device="cuda"), *bufs, codec)
    return DecodeShape(
        bufs=bufs,
        indptr=torch.arange(0, slots + 1, seq, device="cuda", dtype=torch.int32),
        indices=torch.randperm(slots, device="cuda"),
        q=torch.randn(bsz, hq, d, device="cuda", dtype=torch.bfloat16),
        nbytes=slots * hkv * (codec.k_code_bytes + codec.v_code_bytes + 4),
    )
