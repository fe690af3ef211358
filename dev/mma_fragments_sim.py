"""Warp-level numpy simulation of sglang_tq/kernels/tq_decode_mma.cu's fragment logic.

A development aid, not a test of the kernel: it mirrors, lane by lane, what each thread of
one program (one sequence, KV head and split) loads, decodes, multiplies and shuffles, with
mma.sync.m16n8k16's documented fragment layouts (PTX ISA, "Matrix Fragments for
mma.m16n8k16"), and compares the result with softmax attention over the dequantized codes.
Written in session 19 before the kernel had run on a GPU; rerun it after changing dim_k,
dim_v, the nibble merge or the Pᵀ transposition in the .cu (and mirror the change here):

    python dev/mma_fragments_sim.py
"""

import numpy as np

rng = np.random.default_rng(0)
D = 128
cb = np.sort(rng.random(8)) + 0.1
cb = np.concatenate([cb, -cb])  # sign-magnitude order: code 8+m = -code m


def pack(idx):  # [L, 128] -> [L, 64]: byte j = idx[j] | idx[j+64] << 4
    return (idx[:, :64] | (idx[:, 64:] << 4)).astype(np.uint8)


def lut4(word):  # "bytes" pairing: 4 pairs (lo, hi nibble value) for bytes 0..3
    b = [(word >> (8 * k)) & 0xFF for k in range(4)]
    return [(cb[x & 15], cb[x >> 4]) for x in b]


def dim_k(t, s, r, e):
    h = 2 * s + r
    i = h >> 2
    o = h & 3
    return 16 * t + 4 * i + o + 64 * e


def dim_v(mt, r, c):
    u = 2 * mt + r
    w = u >> 2
    o = u & 3
    return 64 * (w >> 1) + 8 * c + 4 * (w & 1) + o


def merge(a, b, lo):
    return (
        ((a & 0x0F0F0F0F) | ((b << 4) & 0xF0F0F0F0))
        if lo
        else (((a >> 4) & 0x0F0F0F0F) | (b & 0xF0F0F0F0))
    )


def mma(A, B, C):
    """A[lane] = 4 pairs, B[lane] = 2 pairs, C[lane] = 4 floats -> D[lane]."""
    Am = np.zeros((16, 16))
    Bm = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e in range(2):
            Am[g, 2 * t + e] = A[lane][0][e]
            Am[g + 8, 2 * t + e] = A[lane][1][e]
            Am[g, 2 * t + 8 + e] = A[lane][2][e]
            Am[g + 8, 2 * t + 8 + e] = A[lane][3][e]
            Bm[2 * t + e, g] = B[lane][0][e]
            Bm[2 * t + 8 + e, g] = B[lane][1][e]
    M = Am @ Bm
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out.append(
            [
                C[lane][0] + M[g, 2 * t],
                C[lane][1] + M[g, 2 * t + 1],
                C[lane][2] + M[g + 8, 2 * t],
                C[lane][3] + M[g + 8, 2 * t + 1],
            ]
        )
    return out


def words(row_bytes, start, n):  # little-endian 32-bit words of bytes [start, start + 4n)
    return [
        int.from_bytes(bytes(row_bytes[start + 4 * i : start + 4 * i + 4]), "little")
        for i in range(n)
    ]


def run(gqa, L, scale):
    idx_k = rng.integers(0, 16, (L, D))
    idx_v = rng.integers(0, 16, (L, D))
    kc, vc = pack(idx_k), pack(idx_v)
    kn = rng.random(L) + 0.5
    vn = rng.random(L) + 0.5
    q = rng.standard_normal((gqa, D))
    HT = 1 if gqa <= 8 else 2
    qfl = {}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for ht in range(HT):
            h = 8 * ht + g
            qfl[(lane, ht)] = [
                [
                    (q[h, dim_k(t, s, r, 0)], q[h, dim_k(t, s, r, 1)]) if h < gqa else (0.0, 0.0)
                    for r in range(2)
                ]
                for s in range(8)
            ]
    m_i = {(ln, ht, e): -np.inf for ln in range(32) for ht in range(HT) for e in range(2)}
    l_i = {k: 0.0 for k in m_i}
    acc = {(ln, ht): [[0.0] * 4 for _ in range(8)] for ln in range(32) for ht in range(HT)}
    for n0 in range(0, L, 32):

        def valid(tok):
            return n0 + tok < L

        def row(arr, tok):
            return arr[n0 + tok] if valid(tok) else arr[0]

        sc = {}
        for mt in range(2):
            ka = {}
            kb = {}
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                ka[lane] = sum((lut4(w) for w in words(row(kc, 16 * mt + g), 16 * t, 4)), [])
                kb[lane] = sum((lut4(w) for w in words(row(kc, 16 * mt + g + 8), 16 * t, 4)), [])
            for ht in range(HT):
                C = [[0.0] * 4 for _ in range(32)]
                for s in range(8):
                    A = [
                        [ka[ln][2 * s], kb[ln][2 * s], ka[ln][2 * s + 1], kb[ln][2 * s + 1]]
                        for ln in range(32)
                    ]
                    B = [qfl[(ln, ht)][s] for ln in range(32)]
                    C = mma(A, B, C)
                sc[(mt, ht)] = C
        pb = {}
        for ht in range(HT):
            mx = {}
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for e in range(2):
                    mx[(lane, e)] = -np.inf
                for mt in range(2):
                    for c in range(4):
                        nt = 2 * mt + (c >> 1)
                        tok = 8 * nt + g
                        x = sc[(mt, ht)][lane][c] * row(kn, tok) * scale if valid(tok) else -np.inf
                        sc[(mt, ht)][lane][c] = x
                        mx[(lane, c & 1)] = max(mx[(lane, c & 1)], x)
            for e in range(2):  # reduce over g (xor 4, 8, 16)
                for t in range(4):
                    m = max(mx[(4 * g + t, e)] for g in range(8))
                    for g in range(8):
                        mx[(4 * g + t, e)] = m
            alpha = {}
            msafe = {}
            for lane in range(32):
                for e in range(2):
                    mn = max(m_i[(lane, ht, e)], mx[(lane, e)])
                    msafe[(lane, e)] = 0.0 if mn == -np.inf else mn
                    alpha[(lane, e)] = 2 ** (m_i[(lane, ht, e)] - msafe[(lane, e)])
                    m_i[(lane, ht, e)] = mn
                    l_i[(lane, ht, e)] *= alpha[(lane, e)]
                for mt in range(8):
                    a = acc[(lane, ht)][mt]
                    a[0] *= alpha[(lane, 0)]
                    a[1] *= alpha[(lane, 1)]
                    a[2] *= alpha[(lane, 0)]
                    a[3] *= alpha[(lane, 1)]
            for mt in range(2):
                plo = {}
                phi = {}
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    pv = []
                    for c in range(4):
                        p = 2 ** (sc[(mt, ht)][lane][c] - msafe[(lane, c & 1)])
                        l_i[(lane, ht, c & 1)] += p
                        pv.append(p * row(vn, 8 * (2 * mt + (c >> 1)) + g))
                    plo[lane] = (pv[0], pv[1])
                    phi[lane] = (pv[2], pv[3])
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    src = 8 * t + (g >> 1)
                    odd = g & 1
                    x0, x1, y0, y1 = plo[src], plo[src + 4], phi[src], phi[src + 4]
                    pb[(lane, mt, ht)] = [(x0[odd], x1[odd]), (y0[odd], y1[odd])]
        for ks in range(2):
            va = {}
            vb = {}
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                toks = [
                    16 * ks + 2 * t,
                    16 * ks + 2 * t + 1,
                    16 * ks + 8 + 2 * t,
                    16 * ks + 8 + 2 * t + 1,
                ]
                wds = [words(row(vc, tk), 8 * g, 2) for tk in toks]  # [.x, .y] each
                va[lane] = []
                vb[lane] = []
                for w in range(4):
                    lo = w < 2
                    j = w & 1
                    va[lane] += lut4(merge(wds[0][j], wds[1][j], lo))
                    vb[lane] += lut4(merge(wds[2][j], wds[3][j], lo))
            for ht in range(HT):
                for mt in range(8):
                    A = [
                        [va[ln][2 * mt], va[ln][2 * mt + 1], vb[ln][2 * mt], vb[ln][2 * mt + 1]]
                        for ln in range(32)
                    ]
                    B = [pb[(ln, ks, ht)] for ln in range(32)]
                    C = [acc[(ln, ht)][mt] for ln in range(32)]
                    Dd = mma(A, B, C)
                    for ln in range(32):
                        acc[(ln, ht)][mt] = Dd[ln]
    out = np.full((gqa, D), np.nan)
    lse = np.full(gqa, np.nan)
    for ht in range(HT):
        for e in range(2):
            for t in range(4):
                total = sum(l_i[(4 * g + t, ht, e)] for g in range(8))
                h = 8 * ht + 2 * t + e
                if h >= gqa:
                    continue
                for g in range(8):
                    lane = 4 * g + t
                    for mt in range(8):
                        out[h, dim_v(mt, 0, g)] = acc[(lane, ht)][mt][e] / total
                        out[h, dim_v(mt, 1, g)] = acc[(lane, ht)][mt][2 + e] / total
                lse[h] = m_i[(t, ht, e)] / np.log2(np.e) + np.log(total)
    # reference
    K = cb[idx_k] * kn[:, None]
    V = cb[idx_v] * vn[:, None]
    s = q @ K.T * scale / np.log2(np.e)  # natural units (scale is in log2 units)
    p = np.exp(s - s.max(1, keepdims=True))
    ref = (p / p.sum(1, keepdims=True)) @ V
    ref_lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    return np.abs(out - ref).max(), np.abs(lse - ref_lse).max(), np.isnan(out).any()


for gqa, L in [(4, 45), (8, 64), (1, 7), (6, 33), (12, 40), (16, 17)]:
    print(gqa, L, run(gqa, L, 0.1 * 1.4427))
