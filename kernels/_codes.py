"""Shared Triton helpers: unpack split-plane codes into a register tile, online softmax.

The packed layout (``sglang_tq/packing.py``) keeps E = 8/w codes of a w-bit
plane in one byte, byte j holding coordinates j, j + D/E, … . Loading byte
columns j = 0..D/E−1 and joining the E shifted fields along a new last axis
gives a [N, D] tile whose column m = j·E + k holds coordinate k·D/E + j
(``sglang_tq.codec.unpacked_order``). The query and the output are loaded and
stored in the same column order, so no register shuffles are needed.
E = 2 for 4-bit codes and 4 for 2- and 3-bit codes (3-bit = 2-bit plane + 1-bit
plane of high bits).
"""

import triton
import triton.language as tl


@triton.jit
def unpack_codes(codes_ptr, row_off, mask_n, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """int32 [N, HEAD_DIM] code indices of N packed vectors starting at ``codes_ptr + row_off``."""
    if BITS == 4:
        cols = tl.arange(0, HEAD_DIM // 2)
        b = tl.load(codes_ptr + row_off[:, None] + cols[None, :], mask=mask_n[:, None], other=0)
        b = b.to(tl.int32)
        idx = tl.join(b & 15, b >> 4)
    else:
        QUARTER: tl.constexpr = HEAD_DIM // 4
        cols = tl.arange(0, QUARTER)
        b = tl.load(codes_ptr + row_off[:, None] + cols[None, :], mask=mask_n[:, None], other=0)
        b = b.to(tl.int32)
        c0 = b & 3
        c1 = (b >> 2) & 3
        c2 = (b >> 4) & 3
        c3 = (b >> 6) & 3
        if BITS == 3:
            # High bit of coordinate k·D/4 + i: byte i mod D/8 of the 1-bit plane,
            # bit 2k + i div D/8.
            EIGHTH: tl.constexpr = HEAD_DIM // 8
            h = tl.load(
                codes_ptr + row_off[:, None] + QUARTER + (cols % EIGHTH)[None, :],
                mask=mask_n[:, None],
                other=0,
            ).to(tl.int32)
            h = h >> (cols // EIGHTH)[None, :]
            c0 |= (h & 1) << 2
            c1 |= ((h >> 2) & 1) << 2
            c2 |= ((h >> 4) & 1) << 2
            c3 |= ((h >> 6) & 1) << 2
        idx = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.reshape(idx, (row_off.shape[0], HEAD_DIM))


@triton.jit
def unpacked_column(HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Coordinate index held by each column of an :func:`unpack_codes` tile."""
    E: tl.constexpr = 2 if BITS == 4 else 4
    m = tl.arange(0, HEAD_DIM)
    return (m % E) * (HEAD_DIM // E) + m // E


@triton.jit
def tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, v, v_scale):
    """One flash-attention update with scores ``s`` [M, N] and values ``v`` [N, D].

    ``v_scale`` [N] multiplies the probabilities (the V norms of packed tokens),
    so the [N, D] tile stays unscaled. Rows whose scores are all −inf so far
    stay at zero instead of producing NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot((p * v_scale[None, :]).to(tl.float16), v)
    return m_new, l_i, acc


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
