"""Extend (prefill) attention with a packed prefix: chunked prefill and radix hits.

For each sequence, the new chunk's queries attend to

* the prefix already in the cache (a radix-cache hit or earlier chunks), read
  from packed TurboQuant slots and dequantized on chip exactly as in
  ``tq_decode.py`` (codes → codebook → tensor-core dot, norms factored out);
* the chunk itself, causally, from its bf16 K and V.

Both parts are computed in the rotated space (q·k = (Πq)·(Πk)): the launcher
rotates q and the chunk's K and V, and un-rotates the output once. As in decode,
every tile is kept as four coordinate quarters (``kernels/_codes.py``). With ``attend_packed=True`` the chunk is read
back from the packed cache instead (its slots then end the prefix index list),
so a cold prefill sees exactly the values a later radix hit or decode step sees.

One program per (sequence, query head, block of BLOCK_M new tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_tq.codec import LayerCodec

from sglang_tq.env import triton_interpreting

from ._codes import (load_codes, load_dense_tiles, lookup_quarters, online_softmax_step, softmax_state,
                     scores, store_tiles, tanh)
from .tq_decode import attention_ref
from ._checks import check_attention_args


@triton.jit
def _tq_extend_kernel(
    QRot, KExt, VExt, KCodes, KNorms, VCodes, VNorms, KCb, VCb,
    QoIndptr, KvIndptr, KvIndices, ORot,
    sm_scale, logit_cap, sliding_window,
    stride_q_t, stride_q_h, stride_ke_t, stride_ke_h, stride_ve_t, stride_ve_h,
    stride_kc_s, stride_kc_h, stride_kn_s, stride_kn_h,
    stride_vc_s, stride_vc_h, stride_vn_s, stride_vn_h, stride_o_t, stride_o_h,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, HAS_CAP: tl.constexpr,
    PACKED_CHUNK: tl.constexpr, K_LUT: tl.constexpr, V_LUT: tl.constexpr, USE_ASM: tl.constexpr,
):
    batch = tl.program_id(0)
    head = tl.program_id(1)
    mblock = tl.program_id(2)
    kv_head = head // GQA
    # index pointers may arrive as int32 or int64; positions fit in int32
    q_start = tl.load(QoIndptr + batch).to(tl.int32)
    q_len = tl.load(QoIndptr + batch + 1).to(tl.int32) - q_start
    if mblock * BLOCK_M < q_len:
        QUARTER: tl.constexpr = HEAD_DIM // 4
        offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < q_len
        q0, q1, q2, q3 = load_dense_tiles(
            QRot + (q_start + offs_m)[:, None] * stride_q_t + head * stride_q_h, mask_m,
            K_BITS, HEAD_DIM)
        kv_start = tl.load(KvIndptr + batch).to(tl.int32)
        packed_len = tl.load(KvIndptr + batch + 1).to(tl.int32) - kv_start
        # Absolute position of each query; packed key j sits at position j.
        prefix_len = packed_len - q_len if PACKED_CHUNK else packed_len
        q_pos = prefix_len + offs_m
        m_i, l_i, acc0, acc1, acc2, acc3 = softmax_state(BLOCK_M, QUARTER)
        lo = 0
        if sliding_window > 0:
            lo = tl.maximum(prefix_len + mblock * BLOCK_M - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        hi = packed_len
        if PACKED_CHUNK:
            hi = tl.minimum(packed_len, prefix_len + (mblock + 1) * BLOCK_M)
        kc_base = KCodes + kv_head * stride_kc_h
        vc_base = VCodes + kv_head * stride_vc_h
        # -- packed part: prefix (and, with PACKED_CHUNK, the chunk itself)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            slot = tl.load(KvIndices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
            ka, kb = load_codes(kc_base, slot * stride_kc_s, mask_n, K_BITS, HEAD_DIM)
            k0, k1, k2, k3 = lookup_quarters(ka, kb, KCb, K_LUT, K_BITS, USE_ASM)
            k_norm = tl.load(KNorms + slot * stride_kn_s + kv_head * stride_kn_h,
                             mask=mask_n, other=0.0).to(tl.float32)
            s = scores(q0, q1, q2, q3, k0, k1, k2, k3) * (k_norm * sm_scale)[None, :]
            if HAS_CAP:
                s = logit_cap * tanh(s / logit_cap)
            visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if sliding_window > 0:
                visible = visible & (offs_n[None, :] > q_pos[:, None] - sliding_window)
            s = tl.where(visible, s, float("-inf"))
            va, vb = load_codes(vc_base, slot * stride_vc_s, mask_n, V_BITS, HEAD_DIM)
            v0, v1, v2, v3 = lookup_quarters(va, vb, VCb, V_LUT, V_BITS, USE_ASM)
            v_norm = tl.load(VNorms + slot * stride_vn_s + kv_head * stride_vn_h,
                             mask=mask_n, other=0.0).to(tl.float32)
            m_i, l_i, acc0, acc1, acc2, acc3 = online_softmax_step(
                s, m_i, l_i, acc0, acc1, acc2, acc3, v0, v1, v2, v3, v_norm)
        # -- new chunk in bf16 (rotated), causal
        if not PACKED_CHUNK:
            e_hi = tl.minimum(q_len, (mblock + 1) * BLOCK_M)
            e_lo = 0
            if sliding_window > 0:
                e_lo = tl.maximum(mblock * BLOCK_M - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
            ones = tl.full((BLOCK_N,), 1.0, tl.float32)
            for n0 in range(e_lo, e_hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < e_hi
                rows = (q_start + offs_n)[:, None]
                k0, k1, k2, k3 = load_dense_tiles(
                    KExt + rows * stride_ke_t + kv_head * stride_ke_h, mask_n, K_BITS, HEAD_DIM)
                s = scores(q0, q1, q2, q3, k0, k1, k2, k3) * sm_scale
                if HAS_CAP:
                    s = logit_cap * tanh(s / logit_cap)
                visible = mask_n[None, :] & (offs_n[None, :] <= offs_m[:, None])
                if sliding_window > 0:
                    visible = visible & (offs_n[None, :] > offs_m[:, None] - sliding_window)
                s = tl.where(visible, s, float("-inf"))
                v0, v1, v2, v3 = load_dense_tiles(
                    VExt + rows * stride_ve_t + kv_head * stride_ve_h, mask_n, V_BITS, HEAD_DIM)
                m_i, l_i, acc0, acc1, acc2, acc3 = online_softmax_step(
                    s, m_i, l_i, acc0, acc1, acc2, acc3, v0, v1, v2, v3, ones)
        # -- rotated output, natural coordinate order
        o = ORot + (q_start + offs_m)[:, None] * stride_o_t + head * stride_o_h
        store_tiles(o, mask_m, acc0, acc1, acc2, acc3, 1.0 / l_i, V_BITS, HEAD_DIM)


def tq_extend(q, k, v, k_codes, k_norms, v_codes, v_norms, qo_indptr, kv_indptr, kv_indices,
              codec: LayerCodec, sm_scale: float, *, max_extend_len: int, logit_cap: float = 0.0,
              sliding_window: int = 0, attend_packed: bool = False,
              block_m: int = 64, block_n: int = 32, num_warps: int = 4, num_stages: int = 1):
    """Causal attention of new tokens over a packed prefix plus themselves.

    q [T, Hq, D], k/v [T, Hkv, D]: the new tokens of all sequences, concatenated
    as delimited by ``qo_indptr`` [B+1]. ``kv_indptr``/``kv_indices`` list each
    sequence's prefix slots (with ``attend_packed``, prefix then chunk slots,
    already written by ``tq_store_kv``). ``max_extend_len`` ≥ every chunk
    length; pass it from host metadata to avoid a device sync. Returns [T, Hq, D]
    in q's dtype.
    """
    t = q.shape[0]
    hq, d, hkv = check_attention_args(q, k_codes, v_codes, codec)
    if k.shape != (t, hkv, d) or v.shape != (t, hkv, d):
        raise ValueError(f"k and v must be [{t}, {hkv}, {d}], got {tuple(k.shape)} and {tuple(v.shape)}.")
    bsz = qo_indptr.numel() - 1
    if kv_indptr.shape != (bsz + 1,):
        raise ValueError(f"kv_indptr must have {bsz + 1} entries like qo_indptr.")
    # -- rotate once: q and the chunk's K and V (q·k = Πq·Πk; the output is un-rotated below)
    f32 = torch.float32
    q_rot = torch.matmul(q.to(f32), codec.pi.T)
    k_rot = torch.matmul(k.to(f32), codec.pi.T)
    v_rot = torch.matmul(v.to(f32), codec.pi.T)
    o_rot = torch.empty(t, hq, d, dtype=f32, device=q.device)
    if t == 0:
        return o_rot.to(q.dtype)
    grid = (bsz, hq, triton.cdiv(max_extend_len, block_m))
    _tq_extend_kernel[grid](
        q_rot, k_rot, v_rot, k_codes, k_norms, v_codes, v_norms,
        codec.k_codebook, codec.v_codebook, qo_indptr, kv_indptr, kv_indices, o_rot,
        sm_scale, logit_cap, sliding_window,
        q_rot.stride(0), q_rot.stride(1), k_rot.stride(0), k_rot.stride(1),
        v_rot.stride(0), v_rot.stride(1),
        k_codes.stride(0), k_codes.stride(1), k_norms.stride(0), k_norms.stride(1),
        v_codes.stride(0), v_codes.stride(1), v_norms.stride(0), v_norms.stride(1),
        o_rot.stride(0), o_rot.stride(1),
        GQA=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        K_BITS=codec.k_bits, V_BITS=codec.v_bits, HAS_CAP=logit_cap > 0,
        PACKED_CHUNK=attend_packed, K_LUT=codec.k_lut, V_LUT=codec.v_lut,
        USE_ASM=not triton_interpreting(), num_warps=num_warps, num_stages=num_stages,
    )
    return torch.matmul(o_rot, codec.pi).to(q.dtype)


def tq_extend_ref(q, k, v, k_codes, k_norms, v_codes, v_norms, qo_indptr, kv_indptr, kv_indices,
                  codec: LayerCodec, sm_scale: float, logit_cap: float = 0.0,
                  sliding_window: int = 0, attend_packed: bool = False, dtype=torch.float64):
    """Pure-torch twin of :func:`tq_extend`, on the reference quantizer's dequantization."""
    outs = []
    for b in range(qo_indptr.numel() - 1):
        qs, qe = int(qo_indptr[b]), int(qo_indptr[b + 1])
        slots = kv_indices[int(kv_indptr[b]): int(kv_indptr[b + 1])].long()
        kp = codec.k_quant.dequantize(k_codes[slots], k_norms[slots]).to(dtype)
        vp = codec.v_quant.dequantize(v_codes[slots], v_norms[slots]).to(dtype)
        if not attend_packed:
            kp = torch.cat([kp, k[qs:qe].to(dtype)])
            vp = torch.cat([vp, v[qs:qe].to(dtype)])
        qb = q[qs:qe].to(dtype)
        offset = kp.shape[0] - qb.shape[0]
        if sliding_window > 0:
            out = torch.stack([
                attention_ref(qb[i : i + 1], kp[max(0, offset + i - sliding_window + 1): offset + i + 1],
                              vp[max(0, offset + i - sliding_window + 1): offset + i + 1],
                              sm_scale, logit_cap)[0]
                for i in range(qb.shape[0])
            ]) if qb.shape[0] else qb
        else:
            out = attention_ref(qb, kp, vp, sm_scale, logit_cap, causal_offset=offset)
        outs.append(out)
    return torch.cat(outs)
