"""Decode attention straight from packed TurboQuant pages (split-KV flash-decoding).

Stage 1, one program per (sequence, KV head, split), serves the whole GQA group,
so each packed code is read once per KV head:

    s   = (Πq) · c_K[idx_K] · r_K · sm_scale        (QK on tensor cores)
    acc = Σ softmax(s) · r_V · c_V[idx_V]            (PV on tensor cores)

Keys and values stay in the rotated space (q·k = (Πq)·(Πk), TurboQuant Sec. 3),
and the per-token norms r factor out of the inner products: they scale the score
row and the probability row instead of the [N, D] tiles. Codes become fp16
values in registers, eight 4-bit codes per ~21 PTX instructions (``sglang_tq/kernels/_lut.py``),
as four [N, D/4] tiles whose coordinates follow the byte layout
(``sglang_tq/kernels/_codes.py``), so each product is four tensor-core dots and nothing is
shuffled between registers. The next tile's codes are prefetched into registers
while the current one is computed.

With ``HEADS_N`` (the launch table's ``heads_n``) the program solves the transposed
problem, sᵀ = c_K[idx_K]·(Πq)ᵀ and accᵀ = c_V[idx_V]ᵀ·pᵀ: the GQA group (4 heads for
Llama-3.1-8B) then sits on the tensor-core tile's narrow side (8) instead of its wide side
(16), which halves the MMAs, the padded softmax elements and the accumulator registers;
the value codes are loaded as [D/4, N] tiles so that c_V[idx_V]ᵀ is built in place.

Keys stored with a key center (k − μ, ``sglang_tq/format/centers.py``) need nothing here:
q·(k − μ) = q·k − q·μ shifts a query's whole score row, which the softmax ignores
(a logit soft-cap does not, so that combination is refused).

Stage 2, one program per (sequence, KV head), merges the splits by their
log-sum-exp and un-rotates the group's outputs once, o = (Σ p v_rot) · Π. Above 16
splits (small batches) it runs one program per query head instead, loads every
split's LSE at once and the partials as [splits, D] tiles, so a batch of one with 128
splits does not wait on 128 loads in a row; with few splits a loop that skips empty
ones is cheaper. Up to a few sequences stage 1 rotates the query itself (fp16 Π);
above, it is rotated before stage 1 by one fp32 kernel with the cast included
(:func:`rotate_query`) or, for large batches, by cast + matmul. On Hopper the stages
are chained by programmatic dependent launch (:func:`small_batch_plan`).

No host synchronisation happens in the launcher and nothing is allocated beyond the
fp32 copy of q on the cast + matmul path (from the graph's pool when captured), so it
can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from sglang_tq.config import TQConfig
from sglang_tq.env import DECODE_IMPLS, decode_impl, decode_launch_file, triton_interpreting
from sglang_tq.format.codec import LayerCodec

from . import tq_decode_mma
from ._checks import (
    check_attention_args,
    check_pdl,
    partial_strides,
    pdl_launch,
    pdl_supported,
    pool_strides,
)
from ._codes import (
    eight_tiles,
    fwht_row,
    load_codes,
    load_dense_tiles,
    load_lut_words,
    load_slots,
    lookup_tiles,
    online_softmax_step,
    rotate_dense_tiles_t,
    rotate_fwht_tiles,
    scores,
    slot_offsets_need_int64,
    softmax_state,
    store_tiles,
    tanh,
    trans_tiles,
)
from .tq_dequant import tq_dequant_ref


@triton.jit
def _split_range(KvIndptr, NumKvSplits, batch, split, sliding_window, MIN_BLOCK_KV: tl.constexpr):
    # kv_indptr may arrive as int32 or int64; lengths fit in int32
    start = tl.load(KvIndptr + batch).to(tl.int32)
    seq_len = tl.load(KvIndptr + batch + 1).to(tl.int32) - start
    first = 0
    if sliding_window > 0:
        first = tl.maximum(seq_len - sliding_window, 0)
    kv_splits = tl.load(NumKvSplits + batch)
    per_split = tl.cdiv(tl.cdiv(seq_len - first, kv_splits), MIN_BLOCK_KV) * MIN_BLOCK_KV
    lo = first + per_split * split
    hi = tl.minimum(lo + per_split, seq_len)
    return start, lo, hi


@triton.jit
def _tq_decode_stage1(
    QRot,  # [B, Hq, D] fp32 rotated query Πq, unit stride in D; FUSE_ROT: the unrotated q
    #        itself (any float dtype). MLA: the absorbed query's latent part (D = 512, Hkv = 1)
    Pi16,  # [D, D] fp16 Π (LayerCodec.pi_f16), read only with FUSE_ROT (2: its first row)
    KCodes,  # [S, Hkv, D*K_BITS/8] uint8, packed key codes (S pool slots), unit stride in bytes
    KNorms,  # [S, Hkv] fp16, key norms
    VCodes,  # [S, Hkv, D*V_BITS/8] uint8, packed value codes; = KCodes with SHARED_KV (not read)
    VNorms,  # [S, Hkv] fp16, value norms; = KNorms with SHARED_KV (not read)
    KCb,  # [2**K_BITS] fp32 key codebook in code order, read only without USE_ASM
    VCb,  # [2**V_BITS] fp32 value codebook, as KCb
    KTab,  # [4] int32 prmt table words of the key codebook (LayerCodec.k_lut_words)
    VTab,  # [4] int32 table words of the value codebook (v_lut_words)
    KvIndptr,  # [B + 1] int32/int64, sequence b's tokens are KvIndices[KvIndptr[b]:KvIndptr[b+1]]
    KvIndices,  # [total] int32/int64, the pool slot of every token of the batch
    NumKvSplits,  # [B] int32, KV splits of each sequence, in [1, max_kv_splits]
    MidO,  # [B, Hq, max_kv_splits, D] fp32, each split's normalized output (rotated space)
    MidLse,  # [B, Hq, max_kv_splits] fp32, each split's log-sum-exp, unit stride in splits
    QPe,  # ROPE_DIM: [B, Hq, R] float query RoPE part (MLA), unit stride in R; else q, not read
    KPe,  # ROPE_DIM: [S, R] bf16 RoPE key rows (MLA), unit stride in R; else q, not read
    sm_scale,  # softmax scale
    logit_cap,  # logit soft-cap (HAS_CAP)
    sliding_window,  # attend to the last sliding_window tokens only (0: all)
    stride_q_b,
    stride_q_h,
    stride_kc_s,
    stride_kc_h,
    stride_kn_s,
    stride_kn_h,
    stride_vc_s,
    stride_vc_h,
    stride_vn_s,
    stride_vn_h,
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    stride_qp_b,
    stride_qp_h,
    stride_kp_s,
    GQA: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    K_LUT: tl.constexpr,
    V_LUT: tl.constexpr,
    USE_ASM: tl.constexpr,
    SLOT_I64: tl.constexpr,
    PREFETCH: tl.constexpr,
    HEADS_N: tl.constexpr,
    FUSE_ROT: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_Q: tl.constexpr,
    SHARED_KV: tl.constexpr = False,
    ROPE_DIM: tl.constexpr = 0,
    HEAD_BLOCKS: tl.constexpr = 1,
):
    if USE_PDL and not EARLY_Q:
        # programmatic dependent launch: wait for the kernel before (it wrote q), then let
        # stage 2 launch while this grid runs (it waits for this one in turn)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    batch = tl.program_id(0)
    head_block = tl.program_id(1)  # GQA query heads; HEAD_BLOCKS of them share a KV head
    kv_head = head_block // HEAD_BLOCKS
    split = tl.program_id(2)
    start, lo, hi = _split_range(KvIndptr, NumKvSplits, batch, split, sliding_window, BLOCK_N)
    if hi > lo:
        offs_g = tl.arange(0, BLOCK_H)
        mask_h = offs_g < GQA
        heads = head_block * GQA + offs_g
        # -- rotated query of the whole GQA group, in the tile order of K's codes: rotated
        #    here from q itself (FUSE_ROT, small batches: one launch less) or read
        if FUSE_ROT == 2:  # as the fast Walsh-Hadamard transform, in the layout loaded below
            q = rotate_fwht_tiles(
                QRot + batch * stride_q_b + heads[:, None] * stride_q_h,
                mask_h,
                Pi16,
                K_BITS,
                HEAD_DIM,
                BLOCK_H,
            )
            if HEADS_N:
                q = trans_tiles(q)
        elif FUSE_ROT:
            q = rotate_dense_tiles_t(
                QRot + batch * stride_q_b + heads[None, :] * stride_q_h,
                mask_h,
                Pi16,
                K_BITS,
                HEAD_DIM,
            )
            if not HEADS_N:
                q = trans_tiles(q)
        else:
            q = load_dense_tiles(
                QRot + batch * stride_q_b + heads[:, None] * stride_q_h, mask_h, K_BITS, HEAD_DIM
            )
            if HEADS_N:
                q = trans_tiles(q)
        kc_base = KCodes + kv_head * stride_kc_h
        vc_base = VCodes + kv_head * stride_vc_h
        kt0, kt1, kt2, kt3 = load_lut_words(KTab)
        vt0, vt1, vt2, vt3 = load_lut_words(VTab)
        if ROPE_DIM > 0:
            # -- MLA: the query's RoPE part [BLOCK_H, R], scored against the bf16 k_pe rows
            offs_r = tl.arange(0, ROPE_DIM)
            q_pe = tl.load(
                QPe + batch * stride_qp_b + heads[:, None] * stride_qp_h + offs_r[None, :],
                mask=mask_h[:, None],
                other=0.0,
            ).to(tl.float16)
        if USE_PDL and EARLY_Q:
            # EARLY_Q: the kernel before is the PDL store of this step, which waited for q's
            # producer before releasing us; q and its rotation overlap the store, the codes
            # it writes are read only after this wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        m_i, l_i, acc = softmax_state(BLOCK_H, V_BITS, HEAD_DIM, HEADS_N)
        LOG2E: tl.constexpr = 1.4426950408889634
        sm_scale_log2 = sm_scale * LOG2E
        # -- codes, norms and slots of the first tile; with PREFETCH each iteration loads
        #    the next tile into registers while this one is computed (more registers,
        #    fewer resident programs: the launch table says which wins)
        if PREFETCH:
            offs_n = lo + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            slot = load_slots(KvIndices + start + offs_n, mask_n, SLOT_I64)
            ka, kb = load_codes(kc_base, slot * stride_kc_s, mask_n, K_BITS, HEAD_DIM, False)
            va, vb = load_codes(vc_base, slot * stride_vc_s, mask_n, V_BITS, HEAD_DIM, HEADS_N)
            k_norm = tl.load(
                KNorms + slot * stride_kn_s + kv_head * stride_kn_h, mask=mask_n, other=0.0
            )
            v_norm = tl.load(
                VNorms + slot * stride_vn_s + kv_head * stride_vn_h, mask=mask_n, other=0.0
            )
        for n0 in range(lo, hi, BLOCK_N):
            # -- this tile's (or, with PREFETCH, the next tile's) codes, norms and slots
            offs_x = n0 + BLOCK_N * PREFETCH + tl.arange(0, BLOCK_N)
            mask_x = offs_x < hi
            slot_x = load_slots(KvIndices + start + offs_x, mask_x, SLOT_I64)
            ka_x, kb_x = load_codes(kc_base, slot_x * stride_kc_s, mask_x, K_BITS, HEAD_DIM, False)
            k_norm_x = tl.load(
                KNorms + slot_x * stride_kn_s + kv_head * stride_kn_h, mask=mask_x, other=0.0
            )
            if SHARED_KV:  # MLA: the values are the latent codes just loaded (no prefetch)
                ka, kb, k_norm, mask_n = ka_x, kb_x, k_norm_x, mask_x
            else:
                va_x, vb_x = load_codes(
                    vc_base, slot_x * stride_vc_s, mask_x, V_BITS, HEAD_DIM, HEADS_N
                )
                v_norm_x = tl.load(
                    VNorms + slot_x * stride_vn_s + kv_head * stride_vn_h, mask=mask_x, other=0.0
                )
                if not PREFETCH:
                    ka, kb, va, vb = ka_x, kb_x, va_x, vb_x
                    k_norm, v_norm, mask_n = k_norm_x, v_norm_x, mask_x
            # -- scores: codes -> fp16 values in registers, QK on tensor cores, K norms after
            k = lookup_tiles(
                ka, kb, KCb, K_LUT, K_BITS, HEAD_DIM, USE_ASM, kt0, kt1, kt2, kt3, False
            )
            # scores in log2 units: the softmax runs on exp2 (one multiply less per score)
            qk = scores(q, k, HEADS_N)
            # per-token vectors (norms, mask) broadcast over the heads axis, axis HEADS_N
            if HAS_CAP:
                s = qk * tl.expand_dims(k_norm.to(tl.float32) * sm_scale, HEADS_N)
                if ROPE_DIM > 0:
                    s += _rope_scores(q_pe, KPe, slot_x, stride_kp_s, mask_x, ROPE_DIM) * sm_scale
                s = logit_cap * tanh(s / logit_cap) * LOG2E
            else:
                s = qk * tl.expand_dims(k_norm.to(tl.float32) * sm_scale_log2, HEADS_N)
                if ROPE_DIM > 0:
                    s += (
                        _rope_scores(q_pe, KPe, slot_x, stride_kp_s, mask_x, ROPE_DIM)
                        * sm_scale_log2
                    )
            s = tl.where(tl.expand_dims(mask_n, HEADS_N), s, float("-inf"))
            # -- online softmax and PV; V norms scale the probabilities, not the value tiles
            if SHARED_KV:
                m_i, l_i, acc = online_softmax_step(
                    s, m_i, l_i, acc, k, k_norm.to(tl.float32), HEADS_N
                )
            else:
                v = lookup_tiles(
                    va, vb, VCb, V_LUT, V_BITS, HEAD_DIM, USE_ASM, vt0, vt1, vt2, vt3, HEADS_N
                )
                m_i, l_i, acc = online_softmax_step(
                    s, m_i, l_i, acc, v, v_norm.to(tl.float32), HEADS_N
                )
            if PREFETCH and not SHARED_KV:
                ka, kb, va, vb, k_norm, v_norm, mask_n = (
                    ka_x,
                    kb_x,
                    va_x,
                    vb_x,
                    k_norm_x,
                    v_norm_x,
                    mask_x,
                )
        # -- partial output (rotated space) and its log-sum-exp
        mo = MidO + batch * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s
        if HEADS_N:
            acc = trans_tiles(acc)
        store_tiles(mo, mask_h, acc, 1.0 / l_i, V_BITS, HEAD_DIM)
        tl.store(
            MidLse + batch * stride_ml_b + heads * stride_ml_h + split,
            m_i / LOG2E + tl.log(l_i),
            mask=mask_h,
        )


@triton.jit
def _rope_scores(q_pe, KPe, slot, stride_kp_s, mask, ROPE_DIM: tl.constexpr):
    """[BLOCK_H, N] fp32 = q_pe · k_peᵀ for the tile's RoPE key rows (MLA), fp16 operands as
    for the latent (bf16 converts exactly within fp16's range) and fp32 sums."""
    offs_r = tl.arange(0, ROPE_DIM)
    k_pe = tl.load(
        KPe + slot[:, None] * stride_kp_s + offs_r[None, :], mask=mask[:, None], other=0.0
    ).to(tl.float16)
    return tl.dot(q_pe, tl.trans(k_pe))


@triton.jit
def _merge_weights(
    MidLse,
    lse_row,
    KvIndptr,
    NumKvSplits,
    batch,
    offs_s,
    sliding_window,
    MAX_KV_SPLITS: tl.constexpr,
    MIN_BLOCK_KV: tl.constexpr,
):
    """Log-sum-exp of the splits ``offs_s`` that hold tokens, from ``lse_row`` (the
    head's row of MidLse: [1] or [M, 1] offsets); empty splits read −inf."""
    _, lo, hi = _split_range(KvIndptr, NumKvSplits, batch, offs_s, sliding_window, MIN_BLOCK_KV)
    valid = (hi > lo) & (offs_s < MAX_KV_SPLITS)
    return valid, tl.load(MidLse + lse_row + offs_s, mask=valid, other=float("-inf"))


@triton.jit
def _tq_decode_stage2(
    MidO,  # [B, Hq, max_kv_splits, D] fp32, stage 1's partial outputs (rotated space)
    MidLse,  # [B, Hq, max_kv_splits] fp32, their log-sum-exps, unit stride in splits
    Pi,  # [D, D] fp32 contiguous Π (o = o_rot·Π); UNROT_FWHT (VECTOR_MERGE): its first row only
    Out,  # [B, Hq, D] output (any float dtype, bf16 by default), unit stride in D
    KvIndptr,  # [B + 1] int32/int64, as in stage 1 (the split ranges are recomputed)
    NumKvSplits,  # [B] int32, as in stage 1
    Sinks,  # [Hq] float contiguous sink logit per query head (HAS_SINK); else MidLse, not read
    sliding_window,  # as in stage 1
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    stride_o_b,
    stride_o_h,
    GQA: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MAX_KV_SPLITS: tl.constexpr,
    MIN_BLOCK_KV: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    CHUNK_S: tl.constexpr,
    VECTOR_MERGE: tl.constexpr,
    HAS_SINK: tl.constexpr,
    USE_PDL: tl.constexpr,
    UNROT_FWHT: tl.constexpr = False,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # stage 1's partials are complete and visible
    batch = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    CHUNK: tl.constexpr = 64 if HEAD_DIM <= 256 else 32  # Π's column chunk: 64 KB at most
    offs_k = tl.arange(0, CHUNK)
    if VECTOR_MERGE:
        # -- many splits (small batches): one query head per program (Hq programs instead
        #    of Hkv, no loop over the group), every split's LSE at once, the partials as
        #    [CHUNK_S, D] tiles whose loads do not wait on each other
        head = tl.program_id(1)
        _, lse = _merge_weights(
            MidLse,
            batch * stride_ml_b + head * stride_ml_h,
            KvIndptr,
            NumKvSplits,
            batch,
            tl.arange(0, SPLITS_P2),
            sliding_window,
            MAX_KV_SPLITS,
            MIN_BLOCK_KV,
        )
        e_max = tl.max(lse)
        e_max = tl.where(e_max == float("-inf"), 0.0, e_max)  # no split holds tokens
        e_sum = tl.sum(tl.exp(lse - e_max))
        if HAS_SINK:  # the head's sink logit joins the softmax, with no value
            e_sum += tl.exp(tl.load(Sinks + head).to(tl.float32) - e_max)
        e_sum = tl.where(e_sum == 0.0, 1.0, e_sum)
        row = tl.zeros((HEAD_DIM,), tl.float32)
        for c in tl.static_range(0, SPLITS_P2, CHUNK_S):
            offs_c = c + tl.arange(0, CHUNK_S)
            valid_c, lse_c = _merge_weights(
                MidLse,
                batch * stride_ml_b + head * stride_ml_h,
                KvIndptr,
                NumKvSplits,
                batch,
                offs_c,
                sliding_window,
                MAX_KV_SPLITS,
                MIN_BLOCK_KV,
            )
            part = tl.load(
                MidO
                + batch * stride_mo_b
                + head * stride_mo_h
                + offs_c[:, None] * stride_mo_s
                + offs_d[None, :],
                mask=valid_c[:, None],
                other=0.0,
            )
            row += tl.sum(part * tl.exp(lse_c - e_max)[:, None], axis=0)
        row = row / e_sum
        if UNROT_FWHT:
            # -- un-rotate: o = o_rot · Π = (H o_rot) ⊙ s/√D, Π's first row being s/√D
            out = fwht_row(row, HEAD_DIM) * tl.load(Pi + offs_d)
            tl.store(
                Out + batch * stride_o_b + head * stride_o_h + offs_d, out.to(Out.dtype.element_ty)
            )
        else:
            # -- un-rotate: o = o_rot · Π as a reduction over Π's rows (one row: no dot)
            for c0 in tl.static_range(0, HEAD_DIM, CHUNK):
                pi = tl.load(Pi + offs_d[:, None] * HEAD_DIM + (c0 + offs_k)[None, :])
                out = tl.sum(row[:, None] * pi, axis=0)
                tl.store(
                    Out + batch * stride_o_b + head * stride_o_h + c0 + offs_k,
                    out.to(Out.dtype.element_ty),
                )
    else:
        head_block = tl.program_id(1)  # the GQA query heads of one stage-1 program
        offs_g = tl.arange(0, BLOCK_H)
        mask_h = offs_g < GQA
        heads = head_block * GQA + offs_g
        # -- few splits (large batches): merge them in a loop, skipping empty splits
        e_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        e_sum = tl.zeros((BLOCK_H,), tl.float32)
        o_rot = tl.zeros((BLOCK_H, HEAD_DIM), tl.float32)
        for split in range(MAX_KV_SPLITS):
            _, lo, hi = _split_range(
                KvIndptr, NumKvSplits, batch, split, sliding_window, MIN_BLOCK_KV
            )
            if hi > lo:
                part = tl.load(
                    MidO
                    + batch * stride_mo_b
                    + heads[:, None] * stride_mo_h
                    + split * stride_mo_s
                    + offs_d[None, :],
                    mask=mask_h[:, None],
                    other=0.0,
                )
                lse = tl.load(
                    MidLse + batch * stride_ml_b + heads * stride_ml_h + split,
                    mask=mask_h,
                    other=0.0,
                )
                new_max = tl.maximum(e_max, lse)
                scale = tl.exp(e_max - new_max)
                w = tl.exp(lse - new_max)
                o_rot = o_rot * scale[:, None] + w[:, None] * part
                e_sum = e_sum * scale + w
                e_max = new_max
        if HAS_SINK:  # the sink logits join the softmax, with no value
            sink = tl.load(Sinks + heads, mask=mask_h, other=float("-inf")).to(tl.float32)
            e_sum += tl.exp(sink - tl.where(e_max == float("-inf"), sink, e_max))
        e_sum = tl.where(e_sum == 0.0, 1.0, e_sum)
        # -- un-rotate once: o = o_rot · Π, by column chunks of Π to bound shared memory
        o_rot = o_rot / e_sum[:, None]
        for c0 in tl.static_range(0, HEAD_DIM, CHUNK):
            pi = tl.load(Pi + offs_d[:, None] * HEAD_DIM + (c0 + offs_k)[None, :])
            out = tl.dot(o_rot, pi)
            tl.store(
                Out + batch * stride_o_b + heads[:, None] * stride_o_h + (c0 + offs_k)[None, :],
                out.to(Out.dtype.element_ty),
                mask=mask_h[:, None],
            )


@triton.jit
def _rotate_query_kernel(
    Q,  # [B, Hq, D] float (any float dtype), any strides
    Pi,  # [D, D] fp32 contiguous Π
    QRot,  # [B, Hq, D] fp32, out: q·Πᵀ, unit stride in D
    num_rows,  # B·Hq
    num_heads,  # Hq
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_r_b,
    stride_r_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # q_rot[m, n] = Σ_k q[m, k] · Π[n, k] in fp32 (Πq per query head, TurboQuant Sec. 3)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_rows
    b = offs_m // num_heads
    h = offs_m % num_heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.static_range(0, HEAD_DIM, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(
            Q + b[:, None] * stride_q_b + h[:, None] * stride_q_h + offs_k[None, :] * stride_q_d,
            mask=mask_m[:, None],
            other=0.0,
        ).to(tl.float32)
        pi_t = tl.load(Pi + offs_n[None, :] * HEAD_DIM + offs_k[:, None])
        acc = tl.dot(q, pi_t, acc, input_precision="ieee")
    tl.store(
        QRot + b[:, None] * stride_r_b + h[:, None] * stride_r_h + offs_n[None, :],
        acc,
        mask=mask_m[:, None],
    )


def rotate_query(q: torch.Tensor, pi: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` [B, Hq, D] fp32 = q · Πᵀ for q [B, Hq, D] of any float dtype and strides:
    the cast and the fp32 product in one launch (they were two, 11 µs at B = 1). ``pi``:
    Π as contiguous fp32 [D, D] (``LayerCodec.pi``); ``out`` has unit stride in D."""
    bsz, hq, d = q.shape
    if pi.shape != (d, d) or pi.dtype != torch.float32 or not pi.is_contiguous():
        raise ValueError(f"pi must be a contiguous float32 [{d}, {d}] rotation.")
    if out.shape != q.shape or out.dtype != torch.float32 or out.stride(2) != 1:
        raise ValueError(f"out must be float32 {tuple(q.shape)} and contiguous in head_dim.")
    block = min(64, d)
    _rotate_query_kernel[(triton.cdiv(bsz * hq, 16), d // block)](
        q,
        pi,
        out,
        bsz * hq,
        hq,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=d,
        BLOCK_M=16,
        BLOCK_N=block,
        BLOCK_K=block,
        num_warps=4,
    )
    return out


def rotate_query_ref(q: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Pure-torch twin of :func:`rotate_query`, in float64."""
    return q.double() @ pi.double().T


@dataclasses.dataclass
class DecodeWorkspace:
    """Preallocated decode buffers, sized for the largest batch (CUDA-graph safe).

    The split partials hold B·S (sequence, split) pairs: a smaller batch may use more
    splits per sequence in the same memory (:meth:`partials`)."""

    q_rot: torch.Tensor  # [B, Hq, D] fp32
    mid_o: torch.Tensor  # [B, Hq, S, D] fp32
    mid_lse: torch.Tensor  # [B, Hq, S] fp32
    out: torch.Tensor  # [B, Hq, D] bf16

    def fits(self, bsz: int, max_kv_splits: int) -> bool:
        """Whether ``bsz`` sequences with up to ``max_kv_splits`` splits fit."""
        return bsz * max_kv_splits <= self.mid_lse.shape[0] * self.mid_lse.shape[2]

    def partials(self, bsz: int, max_kv_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [bsz, Hq, S, D] and [bsz, Hq, S] of the split partials with S =
        ``max_kv_splits`` (at most B·S_created / bsz)."""
        _, hq, _, d = self.mid_o.shape
        n = bsz * hq * max_kv_splits
        return (
            self.mid_o.view(-1)[: n * d].view(bsz, hq, max_kv_splits, d),
            self.mid_lse.view(-1)[:n].view(bsz, hq, max_kv_splits),
        )

    @classmethod
    def create(
        cls, max_batch, num_q_heads, head_dim, max_kv_splits, device, out_dtype=torch.bfloat16
    ):
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            q_rot=torch.empty(max_batch, num_q_heads, head_dim, **f32),
            mid_o=torch.empty(max_batch, num_q_heads, max_kv_splits, head_dim, **f32),
            mid_lse=torch.empty(max_batch, num_q_heads, max_kv_splits, **f32),
            out=torch.empty(max_batch, num_q_heads, head_dim, dtype=out_dtype, device=device),
        )


# Measured on the H200 (A/B at 70620c9 and b633aed against 3328aec, bench_decode): the
# one-kernel query rotation beats cast + cuBLAS up to ~128k query elements (B = 1 · 32
# heads · 128: 6.2 vs 10.9 us; 2048 rows · 128: 11.8 vs 9.5; 1024 rows · 256: 2% slower
# per step), and the vectorized split merge wins only with many splits (B = 1, 64 splits:
# 11.6 vs 18.2 us; 4 of 8 splits at B = 64: 19.7 vs 12.4).
ROTATE_KERNEL_ELEMS = 128 * 1024
VECTOR_MERGE_SPLITS = 16


# Small batches: at B = 1 the step was 6 us of query rotation, 14 us of stage 1 and 10 us
# of stage 2 plus the gaps between three launches, for 4 MB of codes
# (benchmarks/results/profile_decode/profile_decode_h200_74bf82a.json). Same-run A/B on the
# H200 (benchmarks/results/ab_decode/ab_small_batch_h200_464ba0e.json, graph replay), all
# three switches against none: k4v4 1 x 4k 39.6 -> 31.8 us, 1 x 32k 63.6 -> 52.9,
# 8 x 8k 69.0 -> 59.9; the fused rotation alone 1-3 us, the per-head merge 5-7 (it
# replaced a merge per KV head's group, slower at every shape), PDL ~1 more. Keys in
# eight tiles (2/3-bit) carry eight rotated query tiles: k3v3 at 8 x 8k lost 4 us with
# the fused rotation (68.4 -> 72.1) and at 64 x 16k 718 -> 889.
FUSE_ROTATION_BATCH = 8  # stage 1 rotates q itself up to this batch (4-bit keys)
FUSE_ROTATION_BATCH_EIGHT_TILES = 4  # the same for keys in eight tiles


@dataclasses.dataclass(frozen=True)
class SmallBatchPlan:
    fuse_rotation: bool  # stage 1 rotates q (fp16 Π): one launch less
    pdl: bool  # programmatic dependent launch: stage 2 launches while stage 1 runs


@functools.cache
def small_batch_plan(bsz: int, k_bits: int = 4, head_dim: int = 128) -> SmallBatchPlan:
    """The launch rules for a batch of ``bsz`` (cached: it runs per layer and step)."""
    fuse_batch = (
        FUSE_ROTATION_BATCH_EIGHT_TILES if eight_tiles(k_bits, head_dim) else FUSE_ROTATION_BATCH
    )
    return SmallBatchPlan(fuse_rotation=bsz <= fuse_batch, pdl=pdl_supported())


def _register_cap(maxnreg: int) -> dict:
    """Launch options for a register cap (none for 0; the interpreter has no registers)."""
    return {"maxnreg": maxnreg} if maxnreg and not triton_interpreting() else {}


def _block_h(gqa: int, heads_n: bool = False) -> int:
    """Rows of the GQA group's tiles: the tensor-core tile's wide side (16) holds the heads,
    or with ``heads_n`` its narrow side (8)."""
    return max(8 if heads_n else 16, triton.next_power_of_2(gqa))


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """Stage-1 launch shape: tokens per tile, warps per program, programs resident per SM."""

    block_n: int
    num_warps: int
    programs_per_sm: int
    prefetch: bool = True  # load the next tile's codes while computing this one
    num_stages: int = 2  # Triton's software pipelining depth (acts when prefetch is off)
    heads_n: bool = False  # solve the transposed problem (GQA group as the dots' N side)
    # registers per thread ptxas may use (0: its own choice). Uncapped, ptxas takes 205-255
    # for one-warp tiles, which leaves 8 warps per SM; a cap trades a few spills for residency
    maxnreg: int = 0

    def __post_init__(self):
        if (
            self.block_n not in (16, 32, 64, 128, 256)
            or self.num_warps not in (1, 2, 4, 8)
            or not 1 <= self.programs_per_sm <= 64
            or not 1 <= self.num_stages <= 4
            or not (self.maxnreg == 0 or 32 <= self.maxnreg <= 255)
        ):
            raise ValueError(
                f"invalid decode launch {self}: block_n must be a power of two in "
                "16..256, num_warps 1, 2, 4 or 8, programs_per_sm 1..64, "
                "num_stages 1..4, maxnreg 0 (no cap) or 32..255."
            )


LAUNCH_TABLE = Path(__file__).with_name("decode_launch.json")


def builtin_launch(head_dim: int) -> DecodeLaunch:
    """The launch for a GPU the table does not name: what won most often on the H200
    (benchmarks/results/tune_decode/tune_decode_v5_h200.json; the H100 has the same SM):
    64-token tiles, 2 warps, and a split policy that assumes 8 resident programs per SM
    (more KV splits than 2 would give: 2 at 64 x 16k, 4 at 32 x 32k). d 256 keeps 4 warps,
    the k3v3 winner there."""
    if head_dim <= 128:
        return DecodeLaunch(block_n=64, num_warps=2, programs_per_sm=8)
    if head_dim <= 256:
        return DecodeLaunch(block_n=64, num_warps=4, programs_per_sm=8)
    # MLA's 512-d latent (keys and values from one tile, 16 heads on M): a first, untuned
    # launch sized so that the decoded tile and the [16, 512] accumulators fit registers
    return DecodeLaunch(block_n=32, num_warps=4, programs_per_sm=2, prefetch=False)


@functools.cache
def load_launch_table(path: str) -> dict:
    """{device name: {head_dim: {"kKvV": DecodeLaunch}}} from a table file; extra keys
    of an entry (the timings sglang_tq.tools.tune records) are ignored."""
    try:
        with open(path) as f:
            raw = json.load(f)
        fields = {f.name for f in dataclasses.fields(DecodeLaunch)}
        table = {
            dev: {
                int(d): {
                    kv: DecodeLaunch(**{k: v for k, v in e.items() if k in fields})
                    for kv, e in per_d.items()
                }
                for d, per_d in dims.items()
            }
            for dev, dims in raw.items()
            if not dev.startswith("_")
        }
        for dims in table.values():
            for per_d in dims.values():
                for kv in per_d:
                    TQConfig.parse_bits(kv)
        return table
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"the decode launch table {path} is unreadable ({exc}); regenerate it "
            "with python -m sglang_tq.tools.tune --write-table, or unset "
            "SGLANG_TQ_DECODE_LAUNCH to use the packaged one."
        ) from exc


# GPUs with the same SM as a tuned one (the launch depends on registers, shared memory and
# SM count, not on HBM): the H100 SXM is the H200's GH100 at 132 SMs with less, slower HBM,
# so it takes the H200 entries rather than the built-in launch.
SAME_SM = {"NVIDIA H100 80GB HBM3": "NVIDIA H200"}


# the mma stage 1 (tq_decode_mma.py): one-warp programs of 32-token steps, as many resident
# per SM as its register cap allows; block_n is the split granularity stage 2 is given
MMA_LAUNCH = DecodeLaunch(
    block_n=tq_decode_mma.TILE_TOKENS,
    num_warps=1,
    programs_per_sm=tq_decode_mma.min_blocks_for(None),
    prefetch=False,
    maxnreg=tq_decode_mma.DEFAULT_MAXNREG,
)


def decode_launch(impl: str, head_dim: int, k_bits: int, v_bits: int) -> DecodeLaunch:
    """The stage-1 launch of ``impl``: the mma kernel's, or the Triton kernel's measured one."""
    if impl not in DECODE_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(DECODE_IMPLS)}, got {impl!r}.")
    return MMA_LAUNCH if impl == "mma" else default_launch(head_dim, k_bits, v_bits)


@functools.cache
def _device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def default_launch(
    head_dim: int, k_bits: int = 4, v_bits: int = 4, device_name: str | None = None
) -> DecodeLaunch:
    """The measured launch for this GPU, head_dim and bit pair (``decode_launch.json``,
    tuned by ``python -m sglang_tq.tools.tune``; ``SGLANG_TQ_DECODE_LAUNCH`` names another
    table); for a pair the table lacks at this GPU and head_dim, the launch of the
    nearest pair it has (fewest bits changed, then the most even change, then the same
    key bits, then the name); a GPU the table does not name but ``SAME_SM`` maps to one it
    does takes that GPU's entries; else :func:`builtin_launch`. The H200 entries at d = 64
    and 256 agree on tile, warps and residency across the pairs tuned there, while the
    built-in launch (the v5 winner) ran k4v3 at d = 64 2x slower than k4v4
    (benchmarks/results/bench_decode/bench_decode_v8_h200.json)."""
    table = load_launch_table(decode_launch_file() or str(LAUNCH_TABLE))
    name = device_name or _device_name() or ""
    if name not in table:
        name = SAME_SM.get(name, name)
    per_d = table.get(name, {}).get(head_dim, {})
    found = per_d.get(f"k{k_bits}v{v_bits}")
    if found is None and per_d:

        def distance(kv: str) -> tuple[int, int, int, str]:
            kb, vb = TQConfig.parse_bits(kv)
            dk, dv = abs(kb - k_bits), abs(vb - v_bits)
            return dk + dv, max(dk, dv), dk, kv

        found = per_d[min(per_d, key=distance)]
    return found or builtin_launch(head_dim)


def _stage1_triton(
    q_rot, k_codes, k_norms, v_codes, v_norms, kv_indptr, kv_indices, num_kv_splits,
    mid_o, mid_lse, pe, codec, sm_scale, logit_cap, sliding_window, meta,
):  # fmt: skip
    """The Triton stage 1 over (batch, query-head block, split); ``meta`` its constexprs
    and launch options but the codec's and the pool's."""
    bsz, hq = q_rot.shape[:2]
    _tq_decode_stage1[(bsz, hq // meta["GQA"], mid_o.shape[2])](
        q_rot,
        codec.pi_f16,
        k_codes,
        k_norms,
        v_codes,
        v_norms,
        codec.k_codebook,
        codec.v_codebook,
        codec.k_lut_words,
        codec.v_lut_words,
        kv_indptr,
        kv_indices,
        num_kv_splits,
        mid_o,
        mid_lse,
        pe[0],
        pe[1],
        sm_scale,
        logit_cap,
        sliding_window,
        q_rot.stride(0),
        q_rot.stride(1),
        *pool_strides(k_codes, k_norms, v_codes, v_norms),
        *partial_strides(mid_o, mid_lse),
        pe[2],
        pe[3],
        pe[4],
        K_BITS=codec.k_bits,
        V_BITS=codec.v_bits,
        K_LUT=codec.k_lut,
        V_LUT=codec.v_lut,
        USE_ASM=not triton_interpreting(),
        SLOT_I64=slot_offsets_need_int64(k_codes, k_norms, v_codes, v_norms, *pe[1:2]),
        **meta,
    )


def tq_decode(
    q,
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    kv_indptr,
    kv_indices,
    codec: LayerCodec,
    sm_scale: float,
    *,
    num_kv_splits,
    max_kv_splits: int,
    workspace: DecodeWorkspace,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: bool | None = None,
    heads_n: bool | None = None,
    maxnreg: int | None = None,
    fuse_rotation: bool | None = None,
    pdl: bool | None = None,
    early_q: bool = False,
    sinks=None,
    out=None,
    fwht: bool = True,
    q_pe=None,
    k_pe=None,
    impl: str | None = None,
):
    """Attention of one new query token per sequence over its packed KV slots.

    q: [B, Hq, D] (any float dtype); pool buffers as made by ``LayerCodec.alloc_buffers``
    (``k_codes`` uint8 [S, Hkv, D·k_bits/8], ``k_norms`` fp16 [S, Hkv], ``v_codes`` uint8
    [S, Hkv, D·v_bits/8], ``v_norms`` fp16 [S, Hkv] for S slots);
    kv_indptr int32 [B+1] and kv_indices [total] (int32 or int64) as in SGLang's Triton
    backend; num_kv_splits int32 [B] with values in [1, max_kv_splits]. Writes ``out``
    [B, Hq, D] (any float dtype) when given (any strides along B and Hq), else a view of
    ``workspace.out``, and returns it.

    The launch options default to the measured launch (:func:`default_launch`) and the
    small-batch rules (:func:`small_batch_plan`); ``fuse_rotation`` (stage 1 rotates q)
    and ``pdl`` (programmatic dependent launch, Hopper and newer) override them.
    ``early_q`` (with pdl) promises that the kernel launched just before is
    ``tq_store_kv(..., pdl=True)``, which waits for q's producer before it lets this
    launch start: stage 1 then reads and rotates q while the store still runs.
    ``sinks`` [Hq] (any float dtype): a learned logit per query head that joins each
    softmax without a value (attention sinks), added where the splits merge.
    ``fwht`` (default): the fused query rotation and the many-split merge's un-rotation run
    as the fast Walsh-Hadamard transform Π is (no Π read per program; same-call A/B on an
    H100, ``benchmarks/results/ab_decode/ab_fwht_h100_46f802e.json``: 1 × 4k
    21.9 → 20.4 µs, 1 × 32k 46.3 → 45.1);
    ``False`` reads Π (fp16 in stage 1, fp32 in the merge).

    MLA (absorbed form, DeepSeek-V2 Sec. 2.1): ``v_codes`` and ``v_norms`` None make the
    key codes the values too (the compressed latent, D = 512, one "KV head" every query
    head shares), ``q`` is the latent part of the absorbed query, and ``q_pe`` [B, Hq, R]
    with ``k_pe`` [slots, R] (or [slots, 1, R], bf16) add the decoupled RoPE part to every
    score: s = q·k_latent + q_pe·k_pe. The output [B, Hq, D] is the attention-weighted
    latent. Groups of more than 16 query heads run as blocks of 16 per program.

    ``impl``: the stage-1 kernel, ``"triton"`` or ``"mma"`` (``tq_decode_mma.py``: the CUDA
    kernel on register MMA fragments; k4v4 at head_dim 128, no window, soft-cap or MLA);
    None reads ``SGLANG_TQ_DECODE_IMPL`` (default triton). The launch options above steer
    the Triton kernel; of them the mma kernel takes ``maxnreg`` (its register cap, hence
    the resident warps per SM), ``prefetch`` (each step's loads one step ahead) and
    ``block_n`` as the split granularity.
    """
    bsz = q.shape[0]
    shared = v_codes is None
    if shared != (v_norms is None) or (q_pe is None) != (k_pe is None):
        raise ValueError(
            "give v_codes with v_norms (or neither, for values = the key codes) "
            "and q_pe with k_pe (or neither)."
        )
    hq, d, hkv = check_attention_args(q, k_codes, v_codes, codec)
    rope = 0
    if q_pe is not None:
        rope = q_pe.shape[-1]
        k_pe = k_pe.reshape(k_pe.shape[0], -1) if k_pe.dim() == 3 and k_pe.shape[1] == 1 else k_pe
        if (
            q_pe.shape != (bsz, hq, rope)
            or q_pe.stride(2) != 1
            or k_pe.dim() != 2
            or k_pe.shape[1] != rope
            or k_pe.stride(1) != 1
            or rope not in (16, 32, 64, 128)
            or hkv != 1
        ):
            raise ValueError(
                f"q_pe must be [{bsz}, {hq}, R] and k_pe [slots, R] (contiguous in R, "
                f"R in 16/32/64/128) over one latent KV head, got {tuple(q_pe.shape)} "
                f"and {tuple(k_pe.shape)} with {hkv} KV heads."
            )
    if shared:
        # the values are the key tiles just decoded: no prefetch, heads on M, q rotated
        # before stage 1 (a 512-d Π per program would not pay)
        v_codes, v_norms = k_codes, k_norms
        prefetch, heads_n, fuse_rotation, fwht = False, False, False, False
    if kv_indptr.shape != (bsz + 1,) or num_kv_splits.shape != (bsz,):
        raise ValueError(f"kv_indptr must be [{bsz + 1}] and num_kv_splits [{bsz}].")
    ws = workspace
    if ws.q_rot.shape[0] < bsz or ws.q_rot.shape[1:] != (hq, d) or not ws.fits(bsz, max_kv_splits):
        raise ValueError(
            "the decode workspace is too small for this batch; create it with "
            "DecodeWorkspace.create(max_batch, Hq, D, max_kv_splits)."
        )
    if sinks is not None and (
        sinks.shape != (hq,) or not sinks.is_floating_point() or sinks.device != q.device
    ):
        raise ValueError(
            f"sinks must be a float tensor [{hq}] (one logit per query head) on "
            f"{q.device}, got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}."
        )
    if logit_cap > 0 and codec.k_center is not None:
        raise ValueError(
            "a logit soft-cap does not ignore the per-query shift q·μ that key "
            "centering adds to every score; run this model without key centers."
        )
    gqa = hq // hkv
    # query heads per program: the whole group, or blocks of 16 for larger groups (MLA)
    hp = 16 if gqa > 16 and gqa % 16 == 0 else gqa
    impl = impl or decode_impl()
    launch = decode_launch(impl, d, codec.k_bits, codec.v_bits)
    block_n = block_n or launch.block_n
    num_warps = num_warps or launch.num_warps
    prefetch = launch.prefetch if prefetch is None else prefetch
    num_stages = num_stages or launch.num_stages
    heads_n = launch.heads_n if heads_n is None else heads_n
    maxnreg = launch.maxnreg if maxnreg is None else maxnreg
    plan = small_batch_plan(bsz, codec.k_bits, d)
    fuse_rotation = plan.fuse_rotation if fuse_rotation is None else fuse_rotation
    pdl = plan.pdl if pdl is None else pdl
    vector_merge = max_kv_splits > VECTOR_MERGE_SPLITS
    check_pdl(pdl)
    if rope and prefetch:
        raise ValueError("q_pe/k_pe need prefetch=False (the RoPE rows are read per tile).")
    if impl == "mma":
        why = tq_decode_mma.unsupported(
            codec.k_bits,
            codec.v_bits,
            d,
            gqa,
            shared_kv=shared,
            logit_cap=logit_cap,
            sliding_window=sliding_window,
        )
        if why:
            raise ValueError(f"{why}; use impl='triton' (SGLANG_TQ_DECODE_IMPL=triton).")
        fuse_rotation = False  # the mma kernel reads the rotated fp32 query
    fuse_rotation = fuse_rotation and q.stride(2) == 1
    early_q = early_q and pdl and fuse_rotation  # no launch between the store and stage 1
    mid_o, mid_lse = ws.partials(bsz, max_kv_splits)
    if out is None:
        out = ws.out[:bsz]
    elif out.shape != (bsz, hq, d) or out.stride(2) != 1:
        raise ValueError(f"out must be [{bsz}, {hq}, {d}] and contiguous in head_dim.")
    # -- rotate q once per step (or inside stage 1)
    if fuse_rotation:
        q_rot = q
    elif bsz * hq * d <= ROTATE_KERNEL_ELEMS:
        q_rot = rotate_query(q, codec.pi, ws.q_rot[:bsz])
    else:
        q_rot = torch.matmul(q.to(torch.float32), codec.pi.T, out=ws.q_rot[:bsz])
    pe = (q_pe, k_pe, q_pe.stride(0), q_pe.stride(1), k_pe.stride(0)) if rope else (q, q, 0, 0, 0)
    if impl == "mma":
        tq_decode_mma.stage1_mma(
            q_rot,
            k_codes,
            k_norms,
            v_codes,
            v_norms,
            kv_indptr,
            kv_indices,
            num_kv_splits,
            mid_o,
            mid_lse,
            codec,
            sm_scale,
            block_n,
            min_blocks=tq_decode_mma.min_blocks_for(maxnreg),
            prefetch=prefetch,
        )
    else:
        _stage1_triton(
            q_rot, k_codes, k_norms, v_codes, v_norms, kv_indptr, kv_indices, num_kv_splits,
            mid_o, mid_lse, pe, codec, sm_scale, logit_cap, sliding_window,
            dict(
                GQA=hp, BLOCK_H=_block_h(hp, heads_n), HEAD_DIM=d, BLOCK_N=block_n,
                HAS_CAP=logit_cap > 0, PREFETCH=int(prefetch), HEADS_N=int(heads_n),
                FUSE_ROT=(2 if fwht else 1) if fuse_rotation else 0, USE_PDL=int(pdl),
                EARLY_Q=int(early_q), SHARED_KV=shared, ROPE_DIM=rope,
                HEAD_BLOCKS=gqa // hp, num_warps=num_warps, num_stages=num_stages,
                **_register_cap(maxnreg), **pdl_launch(pdl),
            ),
        )  # fmt: skip
    _tq_decode_stage2[(bsz, hq if vector_merge else hq // hp)](  # per query head / per block
        mid_o,
        mid_lse,
        codec.pi,
        out,
        kv_indptr,
        num_kv_splits,
        mid_lse if sinks is None else sinks.contiguous(),
        sliding_window,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        GQA=hp,
        BLOCK_H=_block_h(hp),
        HEAD_DIM=d,
        MAX_KV_SPLITS=max_kv_splits,
        MIN_BLOCK_KV=block_n,
        SPLITS_P2=triton.next_power_of_2(max_kv_splits),
        CHUNK_S=min(triton.next_power_of_2(max_kv_splits), 4096 // d),
        VECTOR_MERGE=vector_merge,
        HAS_SINK=sinks is not None,
        USE_PDL=int(pdl),
        UNROT_FWHT=bool(fwht),
        num_warps=4,
        **pdl_launch(pdl),
    )
    return out


def attention_ref(q, k, v, sm_scale, logit_cap=0.0, causal_offset=None, sinks=None):
    """Plain softmax attention for one sequence: q [M, Hq, D], k/v [L, Hkv, D].

    ``causal_offset`` = L − M makes query i see keys ≤ causal_offset + i. ``sinks`` [Hq]:
    one learned logit per query head that joins every softmax and carries no value
    (gpt-oss's attention sinks). Computes in the dtype of the inputs; returns [M, Hq, D].
    """
    gqa = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(gqa, dim=1)
    v = v.repeat_interleave(gqa, dim=1)
    s = torch.einsum("mhd,lhd->hml", q, k) * sm_scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    if causal_offset is not None:
        m, L = q.shape[0], k.shape[0]
        allowed = torch.arange(L)[None, :] <= causal_offset + torch.arange(m)[:, None]
        s = s.masked_fill(~allowed.to(s.device)[None], float("-inf"))
    if sinks is not None:
        sink = sinks.to(s.device, s.dtype)[:, None, None].expand(-1, s.shape[1], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1).float(), dim=-1)[..., :-1].to(q.dtype)
    else:
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.einsum("hml,lhd->mhd", p, v)


def tq_decode_ref(
    q,
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    kv_indptr,
    kv_indices,
    codec: LayerCodec,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
    dtype=torch.float64,
    sinks=None,
    q_pe=None,
    k_pe=None,
):
    """Pure-torch twin of :func:`tq_decode` on the reference quantizer's dequantization.

    Attention is computed in ``dtype`` in the original (unrotated) space, which is
    mathematically identical to the kernel's rotated-space computation. MLA as in
    :func:`tq_decode`: ``v_codes`` None takes the dequantized keys (the latent) as the
    values; ``q_pe``/``k_pe`` are concatenated to the query and the keys.
    """
    outs = []
    for b in range(q.shape[0]):
        slots = kv_indices[kv_indptr[b] : kv_indptr[b + 1]].long()
        if sliding_window > 0:
            slots = slots[-sliding_window:]
        k, v = tq_dequant_ref(k_codes, k_norms, v_codes, v_norms, slots, codec, dtype)
        if v is None:  # MLA: the latent is the values too
            v = k
        qb = q[b : b + 1].to(dtype)
        if q_pe is not None:
            qb = torch.cat([qb, q_pe[b : b + 1].to(dtype)], dim=-1)
            k = torch.cat([k, k_pe.reshape(k_pe.shape[0], 1, -1)[slots].to(dtype)], dim=-1)
        outs.append(
            attention_ref(
                qb, k, v, sm_scale, logit_cap, sinks=None if sinks is None else sinks.to(dtype)
            )[0]
        )
    return torch.stack(outs)


SPLIT_REF_BATCH = 64  # the batch whose split budget smaller batches share out
# Most splits one sequence gets, and the fewest tokens a split holds. Same-run A/B on the
# H200 (benchmarks/results/ab_decode/ab_split1_h200_dad0f90.json, k4v4, graph replay):
# 1 x 4k 30.9 us at 16 splits (the old 256-token floor) -> 19.8 at 64; 1 x 32k 53.1 at 64
# (the old cap) -> 42.8 at 128; 2 x 16k and 4 x 8k kept their counts (a second wave of
# programs costs more).
SPLIT_CAP = 128
MIN_TOKENS_PER_SPLIT = 64


def split_ceiling(
    bsz: int, base: int = 8, cap: int = SPLIT_CAP, ref_batch: int = SPLIT_REF_BATCH
) -> int:
    """Most KV splits per sequence for a decode batch of ``bsz``: ``base`` (SGLang's
    ``--triton-attention-num-kv-splits``) at ``ref_batch`` sequences and above, doubling
    as the batch halves (a power of two), at most ``max(cap, base)``. ``bsz`` times the
    ceiling never exceeds ``max(bsz, ref_batch) · base``, so one workspace sized for that
    serves every batch."""
    share = base * ref_batch // max(bsz, 1)
    return min(max(cap, base), max(base, 1 << (share.bit_length() - 1)))


def default_num_kv_splits(
    seq_lens: torch.Tensor,
    num_kv_heads: int,
    max_kv_splits: int,
    num_sms: int = 132,
    head_dim: int = 128,
    k_bits: int = 4,
    v_bits: int = 4,
    launch: DecodeLaunch | None = None,
    min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT,
) -> torch.Tensor:
    """Splits per sequence that minimise stage 1's critical path, on the device (no sync).

    With ``B·Hkv·s`` programs and ``num_sms · programs_per_sm`` resident at a time
    (``launch``, by default :func:`default_launch` of the head_dim and bits), the step
    takes ``waves(s) · (tiles(s) + 1)`` tile-times, where a program's fixed cost (query,
    tables, partial store) counts as one tile. Rounding waves up matters: at 16 × 8k with
    264 slots, 3 splits are 1.45 waves (the second mostly idle) and 2 splits one full
    wave. Ties go to fewer splits (less merging); no split is shorter than
    ``min_tokens_per_split``.
    """
    launch = launch or default_launch(head_dim, k_bits, v_bits)
    block_n = launch.block_n
    bsz = seq_lens.numel()
    slots = max(1, num_sms * launch.programs_per_sm)
    s = torch.arange(1, max_kv_splits + 1, device=seq_lens.device)
    waves = torch.div(bsz * num_kv_heads * s + slots - 1, slots, rounding_mode="floor")
    lens = seq_lens.to(torch.int64).clamp(min=1)[:, None]
    per_split = torch.div(lens + s - 1, s, rounding_mode="floor")
    tiles = torch.div(per_split + block_n - 1, block_n, rounding_mode="floor")
    cost = waves[None, :] * (tiles + 1)
    too_short = s[None, :] > torch.clamp(lens // min_tokens_per_split, min=1)
    cost = cost.masked_fill(too_short, torch.iinfo(torch.int64).max)
    return (cost.argmin(dim=1) + 1).to(torch.int32)


def mla_num_kv_splits(
    seq_lens: torch.Tensor, max_kv_splits: int, bits: int, num_sms: int = 132, latent_dim: int = 512
) -> torch.Tensor:
    """Splits per sequence of the MLA decode over the packed latent: the occupancy rule of
    :func:`default_num_kv_splits` for one KV head (the latent every query head shares) whose
    keys and values are the same ``bits``-bit codes of dimension ``latent_dim``. The MLA
    backend and ``python -m sglang_tq.bench decode-mla`` both call it, with the ceiling
    :func:`split_ceiling` of the batch."""
    return default_num_kv_splits(
        seq_lens, 1, max_kv_splits, num_sms=num_sms, head_dim=latent_dim, k_bits=bits, v_bits=bits
    )
