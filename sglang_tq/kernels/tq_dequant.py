"""Dequantize packed slots back to dense K and V (the prefill path's prefix reader).

Prefill is compute-bound: every query block of a chunk visits the whole prefix,
so decoding codes inside the attention loop would repeat the codebook lookup
once per query block and per query head. Instead the prefix (radix-cache hit or
earlier chunks) is dequantized once per token and KV head into a dense
[N, Hkv, D] buffer, and an exact attention kernel attends to it
(``tq_extend.py``); only the few-MB scratch buffer lives between the two.

Per token and KV head (TurboQuant Alg. 1, DeQuant): x̃ = r · Πᵀ c[idx] (+ μ for keys
stored with a key center, ``sglang_tq/format/centers.py``). The
codes become fp16 codebook values in registers exactly as in decode
(``sglang_tq/kernels/_lut.py``, tiles in byte order, ``sglang_tq/kernels/_codes.py``),
and the un-rotation is one tensor-core dot per tile and output column chunk with the
rows of Π that each tile's coordinates select, x[:, c] = Σ_j c[idx_j] Π[j, c].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_tq.env import triton_interpreting
from sglang_tq.format.codec import LayerCodec

from ._checks import check_pool, pool_strides
from ._codes import (
    load_codes,
    load_lut_words,
    load_slots,
    lookup_tiles,
    slot_offsets_need_int64,
    tile_columns,
)


@triton.jit
def _dequant_tile(
    slot,
    mask_n,
    head,
    Codes,
    Norms,
    Cb,
    Tab,
    Pi,
    Center,
    Out,
    offs_n,
    stride_c_s,
    stride_c_h,
    stride_nrm_s,
    stride_nrm_h,
    stride_o_t,
    stride_o_h,
    BITS: tl.constexpr,
    LUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_ASM: tl.constexpr,
    HAS_CENTER: tl.constexpr,
):
    # -- codes -> fp16 tiles in byte order, norms
    a, b = load_codes(Codes + head * stride_c_h, slot * stride_c_s, mask_n, BITS, HEAD_DIM, False)
    w0, w1, w2, w3 = load_lut_words(Tab)
    t = lookup_tiles(a, b, Cb, LUT, BITS, HEAD_DIM, USE_ASM, w0, w1, w2, w3, False)
    norm = tl.load(Norms + slot * stride_nrm_s + head * stride_nrm_h, mask=mask_n, other=0.0)
    c = tile_columns(BITS, HEAD_DIM)
    # -- un-rotate by column chunks of Π (bounded shared memory at head_dim 256)
    CHUNK: tl.constexpr = 64
    offs_c = tl.arange(0, CHUNK)
    rows = Out + offs_n[:, None] * stride_o_t + head * stride_o_h
    for cc in tl.static_range(0, HEAD_DIM, CHUNK):
        cols = (cc + offs_c)[None, :]
        acc = tl.dot(t[0], tl.load(Pi + c[0][:, None] * HEAD_DIM + cols).to(tl.float16))
        for i in tl.static_range(1, len(t)):
            acc = tl.dot(t[i], tl.load(Pi + c[i][:, None] * HEAD_DIM + cols).to(tl.float16), acc)
        acc = acc * norm.to(tl.float32)[:, None]
        if HAS_CENTER:  # the store quantized k − μ: add the head's key center back
            acc += tl.load(Center + head * HEAD_DIM + cc + offs_c)[None, :]
        tl.store(rows + cols, acc.to(Out.dtype.element_ty), mask=mask_n[:, None])


# num_tokens varies with every batch: one compiled variant for all, not one per N % 16
@triton.jit(do_not_specialize=["num_tokens"])
def _tq_dequant_kernel(
    Slots,  # [N] int (any int dtype), the pool slots to decode, in output row order
    KCodes,  # [S, Hkv, D*K_BITS/8] uint8, packed key codes (S pool slots), unit stride in bytes
    KNorms,  # [S, Hkv] fp16, key norms
    VCodes,  # [S, Hkv, D*V_BITS/8] uint8, packed value codes; = KCodes with KEYS_ONLY (not read)
    VNorms,  # [S, Hkv] fp16, value norms; = KNorms with KEYS_ONLY (not read)
    KCb,  # [2**K_BITS] fp32 key codebook in code order, read only without USE_ASM
    VCb,  # [2**V_BITS] fp32 value codebook, as KCb
    KTab,  # [4] int32 prmt table words of the key codebook (LayerCodec.k_lut_words)
    VTab,  # [4] int32 table words of the value codebook (v_lut_words)
    Pi,  # [D, D] fp32 contiguous Π (x = r·Πᵀc: rows of Π by each tile's coordinates)
    KCenter,  # [Hkv, D] fp32 contiguous key center μ (K_CENTER); else Π, a dummy never read
    KOut,  # [N, Hkv, D] out, dense keys (any float dtype, bf16 by default), unit stride in D
    VOut,  # [N, Hkv, D] out, dense values like KOut; = KOut with KEYS_ONLY (not written)
    num_tokens,  # N, rows of Slots, KOut and VOut (DEVICE_COUNT: replaced by Count)
    Count,  # [1] int32 on the device, slots to decode (DEVICE_COUNT); else Slots, not read
    stride_kc_s,
    stride_kc_h,
    stride_kn_s,
    stride_kn_h,
    stride_vc_s,
    stride_vc_h,
    stride_vn_s,
    stride_vn_h,
    stride_ko_t,
    stride_ko_h,
    stride_vo_t,
    stride_vo_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    K_LUT: tl.constexpr,
    V_LUT: tl.constexpr,
    USE_ASM: tl.constexpr,
    SLOT_I64: tl.constexpr,
    K_CENTER: tl.constexpr,
    DEVICE_COUNT: tl.constexpr,
    KEYS_ONLY: tl.constexpr = False,
):
    head = tl.program_id(1)
    # -- how many leading slots to decode: the launch's N, or a count on the device (the
    #    unique slots of a deduplicated prefix; the grid covers the upper bound N)
    if DEVICE_COUNT:
        num_tokens = tl.load(Count)
    start = tl.program_id(0) * BLOCK_N
    if start < num_tokens:
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < num_tokens
        slot = load_slots(Slots + offs_n, mask_n, SLOT_I64)
        _dequant_tile(
            slot,
            mask_n,
            head,
            KCodes,
            KNorms,
            KCb,
            KTab,
            Pi,
            KCenter,
            KOut,
            offs_n,
            stride_kc_s,
            stride_kc_h,
            stride_kn_s,
            stride_kn_h,
            stride_ko_t,
            stride_ko_h,
            K_BITS,
            K_LUT,
            HEAD_DIM,
            USE_ASM,
            K_CENTER,
        )
        if not KEYS_ONLY:
            _dequant_tile(
                slot,
                mask_n,
                head,
                VCodes,
                VNorms,
                VCb,
                VTab,
                Pi,
                KCenter,
                VOut,
                offs_n,
                stride_vc_s,
                stride_vc_h,
                stride_vn_s,
                stride_vn_h,
                stride_vo_t,
                stride_vo_h,
                V_BITS,
                V_LUT,
                HEAD_DIM,
                USE_ASM,
                False,
            )


def tq_dequant(
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    slots,
    codec: LayerCodec,
    dtype=torch.bfloat16,
    block_n: int = 64,
    num_warps: int = 4,
    count=None,
    out=None,
):
    """Dense K and V [N, Hkv, D] in ``dtype`` of the packed ``slots`` [N] (any int dtype).

    ``count`` (int32 [1] on the device) decodes only the first ``count`` slots and leaves
    the remaining rows unwritten, without a host sync (see ``tq_extend.dedup_prefix``).
    ``out`` = (k, v), two [N, Hkv, D] tensors with unit stride in D, receives the rows
    (e.g. the head of a larger buffer) instead of new tensors.

    ``v_codes`` and ``v_norms`` None: keys only (MLA's latent, D = 512), returned as (k, None);
    ``out`` is then (k, None).

    ``k_codes`` uint8 [S, Hkv, D·k_bits/8], ``k_norms`` fp16 [S, Hkv], ``v_codes`` uint8
    [S, Hkv, D·v_bits/8], ``v_norms`` fp16 [S, Hkv]: the pool of S slots as
    ``LayerCodec.alloc_buffers`` makes it.
    """
    keys_only = v_codes is None
    hkv = check_pool(k_codes, v_codes, codec)
    if keys_only:
        v_codes, v_norms = k_codes, k_norms  # not read: the grid skips the V tile
    if slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D index tensor, got shape {tuple(slots.shape)}.")
    if count is not None and (
        count.shape != (1,) or count.dtype != torch.int32 or count.device != slots.device
    ):
        raise ValueError("count must be an int32 tensor of shape [1] on the slots' device.")
    n, d = slots.numel(), codec.head_dim
    if out is None:
        k = torch.empty(n, hkv, d, dtype=dtype, device=k_codes.device)
        v = None if keys_only else torch.empty(n, hkv, d, dtype=dtype, device=k_codes.device)
    else:
        k, v = out
        if (v is None) != keys_only:
            raise ValueError("out must be (k, v) with values, or (k, None) for keys only.")
        for t in (k,) if keys_only else (k, v):
            if (
                t.shape != (n, hkv, d)
                or t.stride(2) != 1
                or t.device != k_codes.device
                or t.dtype != dtype
            ):
                raise ValueError(
                    f"out must be two [{n}, {hkv}, {d}] {dtype} tensors on "
                    f"{k_codes.device} with unit stride in the last dimension."
                )
    if n == 0:
        return k, v
    vo = k if keys_only else v
    _tq_dequant_kernel[(triton.cdiv(n, block_n), hkv)](
        slots,
        k_codes,
        k_norms,
        v_codes,
        v_norms,
        codec.k_codebook,
        codec.v_codebook,
        codec.k_lut_words,
        codec.v_lut_words,
        codec.pi,
        codec.pi if codec.k_center is None else codec.k_center,
        k,
        vo,
        n,
        slots if count is None else count,
        *pool_strides(k_codes, k_norms, v_codes, v_norms),
        k.stride(0),
        k.stride(1),
        vo.stride(0),
        vo.stride(1),
        HEAD_DIM=d,
        BLOCK_N=block_n,
        K_BITS=codec.k_bits,
        V_BITS=codec.v_bits,
        K_LUT=codec.k_lut,
        V_LUT=codec.v_lut,
        USE_ASM=not triton_interpreting(),
        SLOT_I64=slot_offsets_need_int64(k_codes, k_norms, v_codes, v_norms),
        K_CENTER=codec.k_center is not None,
        DEVICE_COUNT=count is not None,
        KEYS_ONLY=keys_only,
        num_warps=num_warps,
    )
    return k, v


def tq_dequant_ref(
    k_codes, k_norms, v_codes, v_norms, slots, codec: LayerCodec, dtype=torch.float64
):
    """Pure-torch twin of :func:`tq_dequant` on the reference quantizer."""
    s = slots.long()
    k = codec.k_quant.dequantize(k_codes[s], k_norms[s]).to(dtype)
    if codec.k_center is not None:
        k = k + codec.k_center.to(k.device, dtype)
    if v_codes is None:
        return k, None
    return k, codec.v_quant.dequantize(v_codes[s], v_norms[s]).to(dtype)
