"""Shared Triton helpers: packed codes → fp16 tiles, scores, online softmax.

The packed layout (``sglang_tq/format/packing.py``) keeps 8/w codes of a w-bit plane in
one byte, byte j holding coordinates j, j + D·w/8, … . Kernels keep K, V, the
query and the output as a tuple of tiles whose coordinates follow from the layout
(:func:`tile_columns`), so attention is a sum of tensor-core dots, one per tile, and
no register shuffles are needed:

* 4-bit codes are read as uint16 words w < D/4 (bytes 2w, 2w+1): four [·, D/4]
  tiles; low nibbles of even / odd bytes are coordinates 2w / 2w+1, high nibbles
  D/2 + 2w / D/2 + 2w+1.
* 2- and 3-bit codes from head_dim 128 are read as uint16 words w < D/8 (bytes 2w,
  2w+1): eight [·, D/8] tiles; field f of the even / odd byte is coordinate
  f·D/4 + 2w / f·D/4 + 2w+1 (:func:`~._lut.word_tiles`).
* 2- and 3-bit codes at head_dim 64 are read as bytes j < D/4: four [·, D/4] tiles,
  field f of byte j being coordinate f·D/4 + j (eight tiles would be 8 columns wide,
  below a tensor-core dot's 16).
"""

import triton
import triton.language as tl

from ._lut import constraints, word_tiles

_C2 = tl.constexpr(constraints(2, False))
_C3 = tl.constexpr(constraints(3, False))
_C2W = tl.constexpr(constraints(2, True))
_C3W = tl.constexpr(constraints(3, True))
_C4 = tl.constexpr(constraints(4, True))


@triton.constexpr_function
def eight_tiles(bits, head_dim):
    """Whether ``bits``-bit codes of ``head_dim`` fill eight [·, D/8] tiles (else four
    [·, D/4])."""
    return bits != 4 and word_tiles(bits, head_dim)


@triton.constexpr_function
def tile_width(bits, head_dim):
    """Columns of one tile of ``bits``-bit codes (:func:`eight_tiles`)."""
    return head_dim // 8 if eight_tiles(bits, head_dim) else head_dim // 4


@triton.jit
def tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def softmax_state(
    ROWS: tl.constexpr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_N: tl.constexpr
):
    """Empty online-softmax state: running max, running sum and one [ROWS, W] accumulator
    per tile of BITS-bit values ([W, ROWS] with HEADS_N, see :func:`online_softmax_step`)."""
    W: tl.constexpr = tile_width(BITS, HEAD_DIM)
    if HEADS_N:
        acc = tl.zeros((W, ROWS), tl.float32)
    else:
        acc = tl.zeros((ROWS, W), tl.float32)
    if eight_tiles(BITS, HEAD_DIM):
        accs = (acc, acc, acc, acc, acc, acc, acc, acc)
    else:
        accs = (acc, acc, acc, acc)
    return tl.full((ROWS,), float("-inf"), tl.float32), tl.zeros((ROWS,), tl.float32), accs


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, v, v_scale, HEADS_N: tl.constexpr):
    """One flash-attention update with scores ``s`` in log2 units (softmax by exp2).

    Heads as rows (HEADS_N = 0): ``s`` [M, N], value tiles ``v`` [N, W], accumulators
    ``acc`` [M, W] (one per tile). Heads as columns (HEADS_N = 1, the transposed problem
    Oᵀ = Vᵀ·Pᵀ): ``s`` [N, M], ``v`` [W, N], accumulators [W, M]; the tensor-core tile's
    narrow side (8) then holds the GQA group instead of its wide side (16). ``v_scale``
    [N] multiplies the probabilities (the V norms of packed tokens), so the value tiles
    stay unscaled. Heads whose scores are all −inf so far stay at zero instead of
    producing NaN.
    """
    TOKENS: tl.constexpr = 1 - HEADS_N  # the token axis of ``s``; the other holds heads
    m_new = tl.maximum(m_i, tl.max(s, axis=TOKENS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.expand_dims(tl.exp2(m_i - m_safe), TOKENS)
    p = tl.exp2(s - tl.expand_dims(m_safe, TOKENS))
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, axis=TOKENS)
    pv = (p * tl.expand_dims(v_scale, HEADS_N)).to(tl.float16)
    if len(v) == 8:
        acc = (
            _pv(pv, v[0], acc[0] * alpha, HEADS_N),
            _pv(pv, v[1], acc[1] * alpha, HEADS_N),
            _pv(pv, v[2], acc[2] * alpha, HEADS_N),
            _pv(pv, v[3], acc[3] * alpha, HEADS_N),
            _pv(pv, v[4], acc[4] * alpha, HEADS_N),
            _pv(pv, v[5], acc[5] * alpha, HEADS_N),
            _pv(pv, v[6], acc[6] * alpha, HEADS_N),
            _pv(pv, v[7], acc[7] * alpha, HEADS_N),
        )
    else:
        acc = (
            _pv(pv, v[0], acc[0] * alpha, HEADS_N),
            _pv(pv, v[1], acc[1] * alpha, HEADS_N),
            _pv(pv, v[2], acc[2] * alpha, HEADS_N),
            _pv(pv, v[3], acc[3] * alpha, HEADS_N),
        )
    return m_new, l_i, acc


@triton.jit
def _pv(p, v, acc, HEADS_N: tl.constexpr):
    """acc + P·V on tensor cores, or with HEADS_N acc + Vᵀ·Pᵀ."""
    if HEADS_N:
        return tl.dot(v, p, acc)
    else:
        return tl.dot(p, v, acc)


@triton.jit
def tile_columns(BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The coordinates held by the tiles of a BITS-bit code (module doc), as a tuple."""
    QUARTER: tl.constexpr = HEAD_DIM // 4
    if BITS == 4:
        w = tl.arange(0, QUARTER)
        return 2 * w, 2 * w + 1, HEAD_DIM // 2 + 2 * w, HEAD_DIM // 2 + 2 * w + 1
    elif eight_tiles(BITS, HEAD_DIM):
        w = 2 * tl.arange(0, HEAD_DIM // 8)
        return (
            w,
            w + 1,
            QUARTER + w,
            QUARTER + w + 1,
            2 * QUARTER + w,
            2 * QUARTER + w + 1,
            3 * QUARTER + w,
            3 * QUARTER + w + 1,
        )
    else:
        w = tl.arange(0, QUARTER)
        return w, QUARTER + w, 2 * QUARTER + w, 3 * QUARTER + w


@triton.jit
def _load_cols(rows, cols, mask):
    return tl.load(rows + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float16)


@triton.jit
def load_dense_tiles(rows, mask, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """fp16 tiles of dense rows in the tile order of BITS-bit codes; ``rows`` [M, 1]
    points at the start of each row."""
    c = tile_columns(BITS, HEAD_DIM)
    if len(c) == 8:
        return (
            _load_cols(rows, c[0], mask),
            _load_cols(rows, c[1], mask),
            _load_cols(rows, c[2], mask),
            _load_cols(rows, c[3], mask),
            _load_cols(rows, c[4], mask),
            _load_cols(rows, c[5], mask),
            _load_cols(rows, c[6], mask),
            _load_cols(rows, c[7], mask),
        )
    else:
        return (
            _load_cols(rows, c[0], mask),
            _load_cols(rows, c[1], mask),
            _load_cols(rows, c[2], mask),
            _load_cols(rows, c[3], mask),
        )


@triton.jit
def _rotated_cols(q_t, Pi, cols, HEAD_DIM: tl.constexpr):
    """[W, M] fp16 = Π[cols, :] · q_t for q_t [D, M] fp16 (rows of Π in fp16)."""
    offs_d = tl.arange(0, HEAD_DIM)
    pi = tl.load(Pi + cols[:, None] * HEAD_DIM + offs_d[None, :])
    return tl.dot(pi, q_t).to(tl.float16)


@triton.jit
def rotate_dense_tiles_t(cols_t, mask, Pi, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Transposed fp16 tiles [W, M] of the rotated rows (Πq, TurboQuant Sec. 3) in the
    tile order of BITS-bit codes: ``cols_t`` [1, M] points at the start of each (unrotated,
    any float dtype, contiguous) row, ``Pi`` at Π as fp16 [D, D]. fp16 operands with fp32
    accumulation, then fp16, as the unfused path rounds its fp32 product to fp16; the
    group's heads are the dots' N side (8 suffices), Π's rows their M side."""
    offs_d = tl.arange(0, HEAD_DIM)
    q_t = tl.load(cols_t + offs_d[:, None], mask=mask[None, :], other=0.0).to(tl.float16)
    c = tile_columns(BITS, HEAD_DIM)
    if len(c) == 8:
        return (
            _rotated_cols(q_t, Pi, c[0], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[1], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[2], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[3], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[4], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[5], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[6], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[7], HEAD_DIM),
        )
    else:
        return (
            _rotated_cols(q_t, Pi, c[0], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[1], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[2], HEAD_DIM),
            _rotated_cols(q_t, Pi, c[3], HEAD_DIM),
        )


@triton.jit
def sylvester(i, j):
    """H[i, j] = (-1)^popcount(i & j), the Sylvester Walsh-Hadamard entries (i, j < 256)."""
    b = i & j
    b ^= b >> 4
    b ^= b >> 2
    b ^= b >> 1
    return 1.0 - 2.0 * (b & 1).to(tl.float32)


@triton.jit
def hadamard_blocks(
    xs, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, E: tl.constexpr, FP16: tl.constexpr = False
):
    """The first factor of H_D = H_E ⊗ H_B (B = D/E, Sylvester order: coordinate a·B + b):
    Z[n, e, a] = Σ_b xs[n, a·B + b]·H_B[b, e] for fp32 rows xs [ROWS, D], as [ROWS, B, E],
    on tensor cores with H_B built in registers (±1 is exact in every operand type): tf32x3
    (about fp32), or with ``FP16`` fp16 operands and fp32 sums (one MMA pass, for a query
    that is rounded to fp16 anyway); under 16 rows (one token: ROWS = 1) by
    :func:`hadamard_rows` in registers. An E-point butterfly over the last axis finishes the
    transform: y[n, c·B + e] = Σ_a H_E[c, a]·Z[n, e, a]."""
    B: tl.constexpr = HEAD_DIM // E
    rows = tl.reshape(xs, (ROWS * E, B))
    if ROWS * E < 16:  # below a tensor-core tile (the store's one-token rows): in registers
        z = hadamard_rows(rows, ROWS * E, B)
    else:
        rb = tl.arange(0, B)
        h = sylvester(rb[:, None], rb[None, :])
        if FP16:
            z = tl.dot(rows.to(tl.float16), h.to(tl.float16))
        else:
            z = tl.dot(rows, h, input_precision="tf32x3")
    return tl.permute(tl.reshape(z, (ROWS, E, B)), (0, 2, 1))


@triton.jit
def hadamard_rows(x, M: tl.constexpr, L: tl.constexpr):
    """x·H_L for fp32 rows x [M, L] (Sylvester order), as H_P ⊗ H_R (L = P·R, coordinate
    p·R + r) by two broadcast reductions in registers: no dot (a few rows are below a
    tensor-core tile's 16), no matrix loaded."""
    R: tl.constexpr = 8 if L <= 128 else 16
    P: tl.constexpr = L // R
    rr, rp = tl.arange(0, R), tl.arange(0, P)
    x3 = tl.reshape(x, (M, P, R))
    z = tl.sum(x3[:, :, :, None] * sylvester(rr[:, None], rr[None, :])[None, None, :, :], axis=2)
    y = tl.sum(sylvester(rp[:, None], rp[None, :])[None, :, :, None] * z[:, None, :, :], axis=2)
    return tl.reshape(y, (M, L))


@triton.jit
def fwht_row(row, HEAD_DIM: tl.constexpr):
    """H_D · row for one fp32 row [D] (Sylvester order), by :func:`hadamard_rows`."""
    return tl.reshape(hadamard_rows(tl.reshape(row, (1, HEAD_DIM)), 1, HEAD_DIM), (HEAD_DIM,))


@triton.jit
def _pair_tiles(half, M: tl.constexpr, W: tl.constexpr, EIGHT: tl.constexpr):
    """The tiles of one natural-order half [M, D/2] of a rotated row (tile_columns order)."""
    if EIGHT:  # (q, p): coordinates Q·q + 2v + p, q < 2 within the half
        a, b = tl.split(tl.reshape(half, (M, 2, W, 2)))  # p = 0 | 1: [M, 2(q), W]
        a0, a1 = tl.split(tl.permute(a, (0, 2, 1)))
        b0, b1 = tl.split(tl.permute(b, (0, 2, 1)))
        return a0, b0, a1, b1
    else:
        return tl.split(tl.reshape(half, (M, W, 2)))  # coordinates 2w | 2w + 1


@triton.jit
def rotate_fwht_tiles(rows, mask, Pi, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, M: tl.constexpr):
    """fp16 tiles [M, W] of the rotated rows (Πq, TurboQuant Sec. 3) in the tile order of
    BITS-bit codes, as :func:`load_dense_tiles` reads an already rotated q: ``rows`` [M, 1]
    points at the start of each (unrotated, contiguous) row. Π = H·diag(s)/√D is applied
    as the fast Walsh-Hadamard transform (s: the signs of Π's first row, ``Pi`` in fp16),
    H_D = H_2 ⊗ H_{D/2} (:func:`hadamard_blocks` in fp16 operands, as the dense rotation
    rounds q to fp16, and one butterfly), so no Π product is read."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(rows + offs_d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    sign = tl.where(tl.load(Pi + offs_d).to(tl.float32) > 0, 1.0, -1.0)
    xs = q * (sign / tl.sqrt_rn(tl.full((), HEAD_DIM, tl.float32)))[None, :]
    z0, z1 = tl.split(hadamard_blocks(xs, M, HEAD_DIM, 2, FP16=True))
    lo, hi = (z0 + z1).to(tl.float16), (z0 - z1).to(tl.float16)  # coordinates < D/2 | >= D/2
    if BITS == 4:  # 2w, 2w+1, D/2+2w, D/2+2w+1
        t0, t1 = _pair_tiles(lo, M, HEAD_DIM // 4, False)
        t2, t3 = _pair_tiles(hi, M, HEAD_DIM // 4, False)
        return t0, t1, t2, t3
    elif eight_tiles(BITS, HEAD_DIM):
        t0, t1, t2, t3 = _pair_tiles(lo, M, HEAD_DIM // 8, True)
        t4, t5, t6, t7 = _pair_tiles(hi, M, HEAD_DIM // 8, True)
        return t0, t1, t2, t3, t4, t5, t6, t7
    else:  # Q·q + w, q = 0..3
        t0, t1 = tl.split(tl.permute(tl.reshape(lo, (M, 2, HEAD_DIM // 4)), (0, 2, 1)))
        t2, t3 = tl.split(tl.permute(tl.reshape(hi, (M, 2, HEAD_DIM // 4)), (0, 2, 1)))
        return t0, t1, t2, t3


@triton.jit
def trans_tiles(t):
    """Every tile of a tuple transposed."""
    if len(t) == 8:
        return (
            tl.trans(t[0]),
            tl.trans(t[1]),
            tl.trans(t[2]),
            tl.trans(t[3]),
            tl.trans(t[4]),
            tl.trans(t[5]),
            tl.trans(t[6]),
            tl.trans(t[7]),
        )
    else:
        return tl.trans(t[0]), tl.trans(t[1]), tl.trans(t[2]), tl.trans(t[3])


@triton.jit
def store_tiles(rows, mask, acc, scale, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store [M, W] accumulators in the tile order of BITS-bit codes, each row times
    ``scale`` [M]; ``rows`` [M, 1] points at the start of each output row."""
    c = tile_columns(BITS, HEAD_DIM)
    for i in tl.static_range(len(c)):
        tl.store(rows + c[i][None, :], acc[i] * scale[:, None], mask=mask[:, None])


@triton.jit
def scores(q, k, HEADS_N: tl.constexpr):
    """q·k summed over the tiles on tensor cores, from key tiles [N, W]: [M, N] fp32 from
    query tiles [M, W], or with HEADS_N [N, M] from [W, M]."""
    if HEADS_N:
        s = tl.dot(k[0], q[0])
        for i in tl.static_range(1, len(k)):
            s = tl.dot(k[i], q[i], s)
    else:
        s = tl.dot(q[0], tl.trans(k[0]))
        for i in tl.static_range(1, len(k)):
            s = tl.dot(q[i], tl.trans(k[i]), s)
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
    per program, before the KV loop, and hand them to :func:`lookup_tiles`.

    Loaded as a tensor and picked out by reductions, so they live in ordinary registers:
    scalar loads put them in uniform registers, and ptxas then copied one of them into
    an ordinary register before nearly every prmt (offline SASS, k2v2 at 32 tokens / 1
    warp without prefetch: 100 copies, 998 → 896 loop instructions)."""
    idx = tl.arange(0, 4)
    words = tl.load(Tab + idx)
    return (
        tl.sum(tl.where(idx == 0, words, 0)),
        tl.sum(tl.where(idx == 1, words, 0)),
        tl.sum(tl.where(idx == 2, words, 0)),
        tl.sum(tl.where(idx == 3, words, 0)),
    )


@triton.jit
def _hi_shift(codes, TRANS: tl.constexpr):
    """[1, W] int32 ([W, 1] for a TRANS tile) for a 3-bit code tile of W columns: column i
    reads its high bits at bit 2t + i div (W/2) of 1-bit-plane column i mod W/2 (see
    :func:`load_codes`)."""
    if TRANS:
        W: tl.constexpr = codes.shape[0]
        return (tl.arange(0, W) // (W // 2))[:, None]
    else:
        W: tl.constexpr = codes.shape[1]
        return (tl.arange(0, W) // (W // 2))[None, :]


@triton.jit
def _field_value(c, h, CB, FIELD: tl.constexpr, SHIFT: tl.constexpr):
    """fp16 codebook value of the 2-bit field at bit SHIFT + 2·FIELD of codes ``c``, its
    high bit (3-bit; zero otherwise) at the same bit of ``h`` (the interpreter's path)."""
    low = (c >> (SHIFT + 2 * FIELD)) & 3
    high = (h >> (SHIFT + 2 * FIELD)) & 1
    return tl.load(CB + (low | (high << 2))).to(tl.float16)


@triton.jit
def lookup_tiles(
    codes,
    hi,
    CB,
    LUT: tl.constexpr,
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_ASM: tl.constexpr,
    t0,
    t1,
    t2,
    t3,
    TRANS: tl.constexpr,
):
    """fp16 values of the tiles from :func:`load_codes` (same TRANS) as the tuple of tiles
    :func:`tile_columns` names, with the prmt lookup of ``_lut.py`` (``t0..t3`` from
    :func:`load_lut_words`) or, in the interpreter, codebook loads."""
    if USE_ASM:
        # table words as register operands, splat to the tile's shape
        zero = tl.full(codes.shape, 0, tl.int32)
        tab = [zero + t0, zero + t1, zero + t2, zero + t3]
        if BITS == 4:
            return tl.inline_asm_elementwise(
                LUT, _C4, [codes] + tab, dtype=(tl.float16,) * 4, is_pure=True, pack=2
            )
        elif eight_tiles(BITS, HEAD_DIM):
            # outputs: field f of the even bytes, of the odd bytes, f = 0..3
            if BITS == 3:
                return tl.inline_asm_elementwise(
                    LUT,
                    _C3W,
                    [codes, hi, zero + _hi_shift(codes, TRANS)] + tab,
                    dtype=(tl.float16,) * 8,
                    is_pure=True,
                    pack=2,
                )
            else:
                return tl.inline_asm_elementwise(
                    LUT, _C2W, [codes] + tab, dtype=(tl.float16,) * 8, is_pure=True, pack=2
                )
        else:
            # outputs: fields 0-3 of each byte, pairs (bytes 0, 1) and (2, 3) of a register
            if BITS == 3:
                o = tl.inline_asm_elementwise(
                    LUT,
                    _C3,
                    [codes, hi, zero + _hi_shift(codes, TRANS)] + tab,
                    dtype=(tl.float16,) * 4,
                    is_pure=True,
                    pack=4,
                )
            else:
                o = tl.inline_asm_elementwise(
                    LUT, _C2, [codes] + tab, dtype=(tl.float16,) * 4, is_pure=True, pack=4
                )
            return o
    else:
        c = codes.to(tl.int32)
        h = tl.zeros_like(c)
        if BITS == 3:
            h = hi.to(tl.int32) >> _hi_shift(codes, TRANS)
        if BITS == 4:
            return (
                tl.load(CB + (c & 15)).to(tl.float16),
                tl.load(CB + ((c >> 8) & 15)).to(tl.float16),
                tl.load(CB + ((c >> 4) & 15)).to(tl.float16),
                tl.load(CB + ((c >> 12) & 15)).to(tl.float16),
            )
        elif eight_tiles(BITS, HEAD_DIM):
            return (
                _field_value(c, h, CB, 0, 0),
                _field_value(c, h, CB, 0, 8),
                _field_value(c, h, CB, 1, 0),
                _field_value(c, h, CB, 1, 8),
                _field_value(c, h, CB, 2, 0),
                _field_value(c, h, CB, 2, 8),
                _field_value(c, h, CB, 3, 0),
                _field_value(c, h, CB, 3, 8),
            )
        else:
            return (
                _field_value(c, h, CB, 0, 0),
                _field_value(c, h, CB, 1, 0),
                _field_value(c, h, CB, 2, 0),
                _field_value(c, h, CB, 3, 0),
            )


@triton.jit
def load_codes(
    codes_ptr, row_off, mask_n, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, TRANS: tl.constexpr
):
    """Raw codes of N packed vectors as two [N, W] tiles for :func:`lookup_tiles` ([W, N]
    with TRANS: the vectors as columns, for Vᵀ as a tensor-core A operand).

    4-bit: the D/2 bytes as W = D/4 uint16 words (the second tile is unused). 2- and
    3-bit: the 2-bit plane as W = D/8 uint16 words (:func:`eight_tiles`) or W = D/4
    bytes; 3-bit also, per column i, the 1-bit-plane column i mod W/2 (same element
    type), whose bit 2t + i div (W/2) in each byte holds the high bit of field t (the
    lookup shifts). 2-bit: the plane, twice (the second is unused).
    """
    W: tl.constexpr = tile_width(BITS, HEAD_DIM)
    cols = tl.arange(0, W)
    if TRANS:
        rows = row_off[None, :]
        cols = cols[:, None]
        mask = mask_n[None, :]
    else:
        rows = row_off[:, None]
        cols = cols[None, :]
        mask = mask_n[:, None]
    if word_tiles(BITS, HEAD_DIM):
        base = (codes_ptr + rows).to(tl.pointer_type(tl.uint16))
    else:
        base = codes_ptr + rows
    a = tl.load(base + cols, mask=mask, other=0)
    b = a
    if BITS == 3:  # the 1-bit plane starts after the D/4 bytes of the 2-bit plane
        b = tl.load(base + W + cols % (W // 2), mask=mask, other=0)
    return a, b
