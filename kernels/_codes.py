"""Shared Triton helpers: packed codes → four fp16 tiles, scores, online softmax.

The packed layout (``sglang_tq/packing.py``) keeps 8/w codes of a w-bit plane in
one byte, byte j holding coordinates j, j + D·w/8, … . Kernels keep K, V, the
query and the output as four [·, D/4] tiles whose coordinates follow from the
layout (:func:`tile_columns`), so attention is a sum of four tensor-core dots and
no register shuffles are needed:

* 2- and 3-bit codes: the four 2-bit fields of bytes [0, D/4) are the four
  contiguous quarters [t·D/4, (t+1)·D/4);
* 4-bit codes are read as uint16 words w < D/4 (bytes 2w, 2w+1): low nibbles of
  even / odd bytes are coordinates 2w / 2w+1, high nibbles D/2 + 2w / D/2 + 2w+1.
"""

import triton
import triton.language as tl

from ._lut import constraints

_C2 = tl.constexpr(constraints(2))
_C3 = tl.constexpr(constraints(3))
_C4 = tl.constexpr(constraints(4))


@triton.jit
def tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def softmax_state(ROWS: tl.constexpr, QUARTER: tl.constexpr, HEADS_N: tl.constexpr):
    """Empty online-softmax state: running max, running sum and four [ROWS, D/4]
    accumulators ([D/4, ROWS] with HEADS_N, see :func:`online_softmax_step`)."""
    if HEADS_N:
        acc = tl.zeros((QUARTER, ROWS), tl.float32)
    else:
        acc = tl.zeros((ROWS, QUARTER), tl.float32)
    return (tl.full((ROWS,), float("-inf"), tl.float32), tl.zeros((ROWS,), tl.float32),
            acc, acc, acc, acc)


@triton.jit
def online_softmax_step(s, m_i, l_i, acc0, acc1, acc2, acc3, v0, v1, v2, v3, v_scale,
                        HEADS_N: tl.constexpr):
    """One flash-attention update with scores ``s`` in log2 units (softmax by exp2).

    Heads as rows (HEADS_N = 0): ``s`` [M, N], value quarters ``v*`` [N, D/4],
    accumulators [M, D/4]. Heads as columns (HEADS_N = 1, the transposed problem
    Oᵀ = Vᵀ·Pᵀ): ``s`` [N, M], ``v*`` [D/4, N], accumulators [D/4, M]; the tensor-core
    tile's narrow side (8) then holds the GQA group instead of its wide side (16).
    ``v_scale`` [N] multiplies the probabilities (the V norms of packed tokens), so
    the value tiles stay unscaled. Heads whose scores are all −inf so far stay at
    zero instead of producing NaN.
    """
    TOKENS: tl.constexpr = 1 - HEADS_N  # the token axis of ``s``; the other holds heads
    m_new = tl.maximum(m_i, tl.max(s, axis=TOKENS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - tl.expand_dims(m_safe, TOKENS))
    l_i = l_i * alpha + tl.sum(p, axis=TOKENS)
    pv = (p * tl.expand_dims(v_scale, HEADS_N)).to(tl.float16)
    acc0 = _pv(pv, v0, acc0 * tl.expand_dims(alpha, TOKENS), HEADS_N)
    acc1 = _pv(pv, v1, acc1 * tl.expand_dims(alpha, TOKENS), HEADS_N)
    acc2 = _pv(pv, v2, acc2 * tl.expand_dims(alpha, TOKENS), HEADS_N)
    acc3 = _pv(pv, v3, acc3 * tl.expand_dims(alpha, TOKENS), HEADS_N)
    return m_new, l_i, acc0, acc1, acc2, acc3


@triton.jit
def _pv(p, v, acc, HEADS_N: tl.constexpr):
    """acc + P·V on tensor cores, or with HEADS_N acc + Vᵀ·Pᵀ."""
    if HEADS_N:
        return tl.dot(v, p, acc)
    else:
        return tl.dot(p, v, acc)


@triton.jit
def tile_columns(BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The coordinates held by the four [·, D/4] tiles of a BITS-bit code (module doc)."""
    QUARTER: tl.constexpr = HEAD_DIM // 4
    w = tl.arange(0, QUARTER)
    if BITS == 4:
        return 2 * w, 2 * w + 1, HEAD_DIM // 2 + 2 * w, HEAD_DIM // 2 + 2 * w + 1
    else:
        return w, QUARTER + w, 2 * QUARTER + w, 3 * QUARTER + w


@triton.jit
def load_dense_tiles(rows, mask, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Four fp16 tiles of dense rows in the tile order of BITS-bit codes; ``rows`` [M, 1]
    points at the start of each row."""
    c0, c1, c2, c3 = tile_columns(BITS, HEAD_DIM)
    x0 = tl.load(rows + c0[None, :], mask=mask[:, None], other=0.0).to(tl.float16)
    x1 = tl.load(rows + c1[None, :], mask=mask[:, None], other=0.0).to(tl.float16)
    x2 = tl.load(rows + c2[None, :], mask=mask[:, None], other=0.0).to(tl.float16)
    x3 = tl.load(rows + c3[None, :], mask=mask[:, None], other=0.0).to(tl.float16)
    return x0, x1, x2, x3


@triton.jit
def store_tiles(rows, mask, acc0, acc1, acc2, acc3, scale, BITS: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Store four [M, D/4] accumulators in the tile order of BITS-bit codes, each row times
    ``scale`` [M]; ``rows`` [M, 1] points at the start of each output row."""
    c0, c1, c2, c3 = tile_columns(BITS, HEAD_DIM)
    tl.store(rows + c0[None, :], acc0 * scale[:, None], mask=mask[:, None])
    tl.store(rows + c1[None, :], acc1 * scale[:, None], mask=mask[:, None])
    tl.store(rows + c2[None, :], acc2 * scale[:, None], mask=mask[:, None])
    tl.store(rows + c3[None, :], acc3 * scale[:, None], mask=mask[:, None])


@triton.jit
def scores(q0, q1, q2, q3, k0, k1, k2, k3, HEADS_N: tl.constexpr):
    """q·k over four coordinate quarters on tensor cores, from key quarters [N, D/4]:
    [M, N] fp32 from query quarters [M, D/4], or with HEADS_N [N, M] from [D/4, M]."""
    if HEADS_N:
        s = tl.dot(k0, q0)
        s = tl.dot(k1, q1, s)
        s = tl.dot(k2, q2, s)
        s = tl.dot(k3, q3, s)
    else:
        s = tl.dot(q0, tl.trans(k0))
        s = tl.dot(q1, tl.trans(k1), s)
        s = tl.dot(q2, tl.trans(k2), s)
        s = tl.dot(q3, tl.trans(k3), s)
    return s


@triton.jit
def load_slots(ptr, mask, SLOT_I64: tl.constexpr):
    """Slot ids as the offset type: int32 when every byte offset into the pool fits (the
    launcher checks), which halves the address arithmetic of the gathers."""
    slot = tl.load(ptr, mask=mask, other=0)
    if SLOT_I64:
        return slot.to(tl.int64)
    else:
        return slot.to(tl.int32)


def slot_offsets_need_int64(*buffers) -> bool:
    """Whether a gather into these pool buffers can overflow int32 offsets."""
    return any(b.numel() >= 2**31 for b in buffers)


@triton.jit
def load_lut_words(Tab):
    """The four prmt table words of a codebook (``LayerCodec.k_lut_words``): load them once
    per program, before the KV loop, and hand them to :func:`lookup_quarters`.

    Loaded as a tensor and picked out by reductions, so they live in ordinary registers:
    scalar loads put them in uniform registers, and ptxas then copied one of them into
    an ordinary register before nearly every prmt (offline SASS, k2v2 at 32 tokens / 1
    warp without prefetch: 100 copies, 998 → 896 loop instructions)."""
    idx = tl.arange(0, 4)
    words = tl.load(Tab + idx)
    return (tl.sum(tl.where(idx == 0, words, 0)), tl.sum(tl.where(idx == 1, words, 0)),
            tl.sum(tl.where(idx == 2, words, 0)), tl.sum(tl.where(idx == 3, words, 0)))


@triton.jit
def _hi_shift(codes, TRANS: tl.constexpr):
    """[1, D/4] int32 ([D/4, 1] for a TRANS tile): column i of a 3-bit tile reads its high
    bits at bit 2t + i div D/8 of 1-bit-plane byte i mod D/8 (see :func:`load_codes`)."""
    if TRANS:
        QUARTER: tl.constexpr = codes.shape[0]
        return (tl.arange(0, QUARTER) // (QUARTER // 2))[:, None]
    else:
        QUARTER: tl.constexpr = codes.shape[1]
        return (tl.arange(0, QUARTER) // (QUARTER // 2))[None, :]


@triton.jit
def _lookup(codes, CB, LUT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, hi, t0, t1, t2,
            t3, TRANS: tl.constexpr):
    """fp16 codebook values of every field of a packed byte tile (see ``_lut.py``)."""
    if USE_ASM:
        # table words as register operands, splat to the tile's shape
        zero = tl.full(codes.shape, 0, tl.int32)
        tab = [zero + t0, zero + t1, zero + t2, zero + t3]
        if BITS == 4:
            return tl.inline_asm_elementwise(LUT, _C4, [codes] + tab,
                                             dtype=(tl.float16,) * 4, is_pure=True, pack=2)
        elif BITS == 3:
            return tl.inline_asm_elementwise(LUT, _C3, [codes, hi, zero + _hi_shift(codes, TRANS)] + tab,
                                             dtype=(tl.float16,) * 4, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(LUT, _C2, [codes] + tab,
                                             dtype=(tl.float16,) * 4, is_pure=True, pack=4)
    else:
        c = codes.to(tl.int32)
        if BITS == 4:
            return (
                tl.load(CB + (c & 15)).to(tl.float16),
                tl.load(CB + ((c >> 8) & 15)).to(tl.float16),
                tl.load(CB + ((c >> 4) & 15)).to(tl.float16),
                tl.load(CB + ((c >> 12) & 15)).to(tl.float16),
            )
        else:
            h = tl.zeros_like(c)
            if BITS == 3:
                h = hi.to(tl.int32) >> _hi_shift(codes, TRANS)
            return (
                tl.load(CB + ((c & 3) | ((h & 1) << 2))).to(tl.float16),
                tl.load(CB + (((c >> 2) & 3) | (((h >> 2) & 1) << 2))).to(tl.float16),
                tl.load(CB + (((c >> 4) & 3) | (((h >> 4) & 1) << 2))).to(tl.float16),
                tl.load(CB + (((c >> 6) & 3) | (((h >> 6) & 1) << 2))).to(tl.float16),
            )


@triton.jit
def load_codes(codes_ptr, row_off, mask_n, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
               TRANS: tl.constexpr):
    """Raw codes of N packed vectors as two [N, D/4] tiles for :func:`lookup_quarters`
    ([D/4, N] with TRANS: the vectors as columns, for Vᵀ as a tensor-core A operand).

    4-bit: the D/2 bytes as uint16 words (the second tile is unused). 3-bit: the
    2-bit plane and, per column i, the 1-bit-plane byte i mod D/8, whose bit
    2t + i div D/8 holds the high bit of coordinate t·D/4 + i (the lookup shifts).
    2-bit: the plane, twice (the second is unused).
    """
    QUARTER: tl.constexpr = HEAD_DIM // 4
    cols = tl.arange(0, QUARTER)
    if TRANS:
        rows = row_off[None, :]
        cols = cols[:, None]
        mask = mask_n[None, :]
    else:
        rows = row_off[:, None]
        cols = cols[None, :]
        mask = mask_n[:, None]
    if BITS == 4:
        words = (codes_ptr + rows).to(tl.pointer_type(tl.uint16))
        a = tl.load(words + cols, mask=mask, other=0)
        b = a
    else:
        a = tl.load(codes_ptr + rows + cols, mask=mask, other=0)
        b = a
        if BITS == 3:
            EIGHTH: tl.constexpr = HEAD_DIM // 8
            b = tl.load(codes_ptr + rows + QUARTER + cols % EIGHTH, mask=mask, other=0)
    return a, b


@triton.jit
def lookup_quarters(a, b, CB, LUT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, t0, t1,
                    t2, t3, TRANS: tl.constexpr):
    """fp16 values of the tiles from :func:`load_codes` (same TRANS), as four [N, D/4]
    tiles ([D/4, N] with TRANS) holding the coordinates :func:`tile_columns` names;
    ``t0..t3`` from :func:`load_lut_words`."""
    return _lookup(a, CB, LUT, BITS, USE_ASM, b, t0, t1, t2, t3, TRANS)
