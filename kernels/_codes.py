"""Shared Triton helpers: packed codes → fp16 quarter tiles, scores, online softmax.

The packed layout (``sglang_tq/packing.py``) keeps 8/w codes of a w-bit plane in
one byte, byte j holding coordinates j, j + D·w/8, … . Every field of a byte
column range therefore covers a contiguous block of coordinates: for 4-bit codes
bytes [0, D/4) give coordinates [0, D/4) (low nibbles) and [D/2, 3D/4) (high
nibbles), bytes [D/4, D/2) give the other two quarters; for 2- and 3-bit codes
the four 2-bit fields of bytes [0, D/4) are the four quarters. Kernels keep K, V,
the query and the output as four [·, D/4] quarter tiles, so attention is a sum of
tensor-core dots over quarters and no register shuffles are needed.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def online_softmax_step(s, m_i, l_i, acc0, acc1, acc2, acc3, v0, v1, v2, v3, v_scale):
    """One flash-attention update with scores ``s`` [M, N] and value quarters ``v*`` [N, D/4].

    ``v_scale`` [N] multiplies the probabilities (the V norms of packed tokens), so
    the value tiles stay unscaled. Rows whose scores are all −inf so far stay at
    zero instead of producing NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = (p * v_scale[None, :]).to(tl.float16)
    acc0 = tl.dot(pv, v0, acc0 * alpha[:, None])
    acc1 = tl.dot(pv, v1, acc1 * alpha[:, None])
    acc2 = tl.dot(pv, v2, acc2 * alpha[:, None])
    acc3 = tl.dot(pv, v3, acc3 * alpha[:, None])
    return m_new, l_i, acc0, acc1, acc2, acc3


@triton.jit
def load_dense_quarters(ptrs, mask):
    """Four fp16 quarter tiles of dense rows; ``ptrs`` [M, D/4] points at the first quarter."""
    QUARTER: tl.constexpr = ptrs.shape[1]
    x0 = tl.load(ptrs, mask=mask[:, None], other=0.0).to(tl.float16)
    x1 = tl.load(ptrs + QUARTER, mask=mask[:, None], other=0.0).to(tl.float16)
    x2 = tl.load(ptrs + 2 * QUARTER, mask=mask[:, None], other=0.0).to(tl.float16)
    x3 = tl.load(ptrs + 3 * QUARTER, mask=mask[:, None], other=0.0).to(tl.float16)
    return x0, x1, x2, x3


@triton.jit
def store_quarters(ptrs, mask, acc0, acc1, acc2, acc3, scale):
    """Store four [M, D/4] accumulators, each row times ``scale`` [M], at ``ptrs`` (first quarter)."""
    QUARTER: tl.constexpr = ptrs.shape[1]
    tl.store(ptrs, acc0 * scale[:, None], mask=mask[:, None])
    tl.store(ptrs + QUARTER, acc1 * scale[:, None], mask=mask[:, None])
    tl.store(ptrs + 2 * QUARTER, acc2 * scale[:, None], mask=mask[:, None])
    tl.store(ptrs + 3 * QUARTER, acc3 * scale[:, None], mask=mask[:, None])


@triton.jit
def scores(q0, q1, q2, q3, k0, k1, k2, k3):
    """q·k over four coordinate quarters on tensor cores: [M, N] fp32."""
    s = tl.dot(q0, tl.trans(k0))
    s = tl.dot(q1, tl.trans(k1), s)
    s = tl.dot(q2, tl.trans(k2), s)
    return tl.dot(q3, tl.trans(k3), s)


@triton.jit
def _lookup(codes, CB, LUT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, hi=None):
    """fp16 codebook values of every field of a packed byte tile (see ``_lut.py``)."""
    if USE_ASM:
        if BITS == 4:
            return tl.inline_asm_elementwise(LUT, "=r,=r,=r,=r,r", [codes],
                                             dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        elif BITS == 3:
            return tl.inline_asm_elementwise(LUT, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [codes, hi],
                                             dtype=(tl.float16,) * 4, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(LUT, "=r,=r,=r,=r,=r,=r,=r,=r,r", [codes],
                                             dtype=(tl.float16,) * 4, is_pure=True, pack=4)
    else:
        c = codes.to(tl.int32)
        if BITS == 4:
            return (tl.load(CB + (c & 15)).to(tl.float16), tl.load(CB + (c >> 4)).to(tl.float16))
        else:
            h = tl.zeros_like(c)
            if BITS == 3:
                h = hi.to(tl.int32)
            return (
                tl.load(CB + ((c & 3) | ((h & 1) << 2))).to(tl.float16),
                tl.load(CB + (((c >> 2) & 3) | (((h >> 2) & 1) << 2))).to(tl.float16),
                tl.load(CB + (((c >> 4) & 3) | (((h >> 4) & 1) << 2))).to(tl.float16),
                tl.load(CB + (((c >> 6) & 3) | (((h >> 6) & 1) << 2))).to(tl.float16),
            )


@triton.jit
def load_codes(codes_ptr, row_off, mask_n, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Raw code bytes of N packed vectors as two uint8 [N, D/4] tiles for :func:`lookup_quarters`.

    4-bit: bytes [0, D/4) and [D/4, D/2). 3-bit: the 2-bit plane and, per column i,
    the 1-bit-plane byte i mod D/8 shifted right by i div D/8, so that bit 2t holds
    the high bit of coordinate t·D/4 + i. 2-bit: the plane, twice (the second is unused).
    """
    QUARTER: tl.constexpr = HEAD_DIM // 4
    cols = tl.arange(0, QUARTER)
    ptrs = codes_ptr + row_off[:, None] + cols[None, :]
    a = tl.load(ptrs, mask=mask_n[:, None], other=0)
    if BITS == 4:
        b = tl.load(ptrs + QUARTER, mask=mask_n[:, None], other=0)
    elif BITS == 3:
        EIGHTH: tl.constexpr = HEAD_DIM // 8
        b = tl.load(codes_ptr + row_off[:, None] + QUARTER + (cols % EIGHTH)[None, :],
                    mask=mask_n[:, None], other=0)
        b = b >> (cols // EIGHTH)[None, :].to(tl.uint8)
    else:
        b = a
    return a, b


@triton.jit
def lookup_quarters(a, b, CB, LUT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 values of the tiles from :func:`load_codes`, as four [N, D/4] tiles holding
    coordinates [t·D/4, (t+1)·D/4), t = 0..3: QK and PV become four tensor-core dots
    over contiguous quarters, and no register shuffles are needed."""
    if BITS == 4:
        # byte j holds coordinates j (low nibble) and j + D/2 (high nibble)
        a_lo, a_hi = _lookup(a, CB, LUT, BITS, USE_ASM)
        b_lo, b_hi = _lookup(b, CB, LUT, BITS, USE_ASM)
        return a_lo, b_lo, a_hi, b_hi
    else:
        return _lookup(a, CB, LUT, BITS, USE_ASM, b)
