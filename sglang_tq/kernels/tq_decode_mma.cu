// TurboQuant decode, stage 1, on tensor-core fragments in registers (issue 13).
//
// Rendered and compiled at run time by tq_decode_mma.py (NVRTC): the 4-bit lookup PTX is
// _lut.py's (@LUT4@, its "bytes" pairing), and these macros are defined before this text:
//   INDPTR_T    int or long long, the type of kv_indptr
//   SLOT_T      int or long long, the type of kv_indices
//   HEAD_ROWS   8 or 16: query heads per KV head, padded to whole 8-column head tiles
//   MIN_BLOCKS  resident one-warp programs per SM asked of ptxas (its register cap)
//   TILE        tokens per step (32: 2 tiles of 16 score rows / output k-steps)
//   PREFETCH    1: each step issues the next step's loads before its own math (registers
//               for latency), 0: loads at the top of each step
//
// Why: the Triton kernel (tq_decode.py) decodes codes into registers, then moves K and V
// through shared memory into the MMA operand layout; its loop of 32 tokens runs under one
// long dependency chain with the integer pipe at ~45% (notes/perf.md). Here each thread
// decodes exactly the codes of its own mma.sync.m16n8k16 fragments, so no code or value
// crosses shared memory. Tokens take the tiles' 16-row side and the GQA group the 8-column
// side (8 heads per head tile, HEAD_ROWS / 8 tiles), so a group of up to 8 heads wastes no
// tensor-core rows:
//   scores  Sᵀ[n, h] = Σ_d k̃[n, d]·q̃[h, d]: A = K̃ (16 tokens × 16 coordinates per k-step),
//           B = q̃ᵀ (loaded once). Thread (g, t) (g = lane/4, t = lane%4) holds A columns
//           {2t, 2t+1, 2t+8, 2t+9} of every k-step for tokens g and g + 8: 32 coordinates
//           in 8 k-steps, exactly the 16 code bytes [16t, 16t+16) of each of the two rows.
//           The coordinate at each k position is whatever those bytes hold (packing.py:
//           byte j holds coordinates j and j + 64); q̃ is gathered once into the same
//           positions (dim_k below), so the sum is unchanged (TurboQuant's rotation leaves
//           the coordinate order free, paper Sec. 3.1).
//   output  Oᵀ[d, h] += Σ_n Ṽᵀ[d, n]·Pᵀ[n, h]: A = Ṽᵀ (16 coordinates × 16 tokens), B = Pᵀ.
//           Thread (g, t) holds tokens {2t, 2t+1, 2t+8, 2t+9} of coordinate rows g and
//           g + 8 of every coordinate tile: code bytes [8g, 8g+8) of those four token rows,
//           16 coordinates = 8 tiles × 2 rows (dim_v). A fragment register pairs two
//           tokens, so two rows' words are merged nibble by nibble first and the "bytes"
//           lookup pairs each byte's two nibbles (the same lookup as the keys'). Pᵀ's B fragment is Sᵀ's accumulator
//           transposed by four shuffles per 16 tokens.
// Softmax in log2 units as stage 1 of tq_decode.py (V norms scale the probabilities), and
// the same outputs: each split's normalized partial output in rotated coordinates and its
// log-sum-exp, merged by tq_decode.py's stage 2.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define HEAD_DIM 128
#define HEAD_TILES (HEAD_ROWS / 8)
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

// 8 packed 4-bit codes -> 4 fp16x2: the (low, high) nibble pair of byte 0, 1, 2, 3
__device__ __forceinline__ void lut4(u32 w, const u32 (&tab)[4], u32 (&o)[4]) {
  asm(@LUT4@
      : "=r"(o[0]), "=r"(o[1]), "=r"(o[2]), "=r"(o[3])
      : "r"(w), "r"(tab[0]), "r"(tab[0]), "r"(tab[1]), "r"(tab[1]), "r"(tab[2]), "r"(tab[2]),
        "r"(tab[3]), "r"(tab[3]));
}

__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float half_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void mma_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                          u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The coordinate at score k-step s, A column pair r (0: columns 2t, 2t+1; 1: 2t+8, 2t+9),
// element e of thread column t: lut4 output o (byte o) of word i of the thread's 16 code
// bytes, whose low nibble (e = 0) is coordinate 16t + 4i + o and high nibble that + 64.
__device__ __forceinline__ int dim_k(int t, int s, int r, int e) {
  const int h = 2 * s + r, i = h >> 2, o = h & 3;
  return 16 * t + 4 * i + o + 64 * e;
}

// The coordinate of output tile mt, row r (0: row g, 1: row g + 8) for lane group c, which
// loaded code bytes [8c, 8c+8): lut4 output o of merged word w, u = 2·mt + r = 4w + o
// (w: low nibbles of bytes [8c, 8c+4), of [8c+4, 8c+8), then their high nibbles).
__device__ __forceinline__ int dim_v(int mt, int r, int c) {
  const int u = 2 * mt + r, w = u >> 2, o = u & 3;
  return 64 * (w >> 1) + 8 * c + 4 * (w & 1) + o;
}

// Two tokens' code words -> one word whose byte k holds token a's and token b's code of
// the same coordinate: low nibbles of a and b (lo = true), or their high nibbles.
__device__ __forceinline__ u32 merge_nibbles(u32 a, u32 b, bool lo) {
  return lo ? ((a & 0x0F0F0F0Fu) | ((b << 4) & 0xF0F0F0F0u))
            : (((a >> 4) & 0x0F0F0F0Fu) | (b & 0xF0F0F0F0u));
}

// One fp16 of each of two fp16x2 registers, as a pair: the low halves (hi = false) or the
// high halves.
__device__ __forceinline__ u32 pick_halves(u32 a, u32 b, bool hi) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(hi ? 0x7632u : 0x5410u));
  return r;
}

// One step's raw loads: the score rows (tokens 8·nt + g: code bytes [16t, 16t + 16) and
// both norms) and the value columns (tokens 8·nt + 2t + e: code bytes [8g, 8g + 8)); slots
// come from lane i's read of token n0 + i by shuffle, tokens past hi read slot 0.
struct Step {
  uint4 kw[4];
  u16 kn[4], vn[4];
  uint2 vw[4][2];
};

__device__ __forceinline__ Step load_step(int n0, int hi, int start,
                                          const SLOT_T* __restrict__ kv_indices, const u8* kc,
                                          const u16* kn, const u8* vc, const u16* vn,
                                          int stride_kc_s, int stride_kn_s, int stride_vc_s,
                                          int stride_vn_s, int g, int t, int lane) {
  Step st;
  const SLOT_T my_slot = n0 + lane < hi ? kv_indices[start + n0 + lane] : (SLOT_T)0;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const long long slot = (long long)__shfl_sync(0xffffffffu, my_slot, 8 * nt + g);
    st.kw[nt] = *reinterpret_cast<const uint4*>(kc + slot * stride_kc_s + 16 * t);
    st.kn[nt] = kn[slot * stride_kn_s];
    st.vn[nt] = vn[slot * stride_vn_s];
  }
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const long long slot = (long long)__shfl_sync(0xffffffffu, my_slot, 8 * nt + 2 * t + e);
      st.vw[nt][e] = *reinterpret_cast<const uint2*>(vc + slot * stride_vc_s + 8 * g);
    }
  return st;
}

extern "C" __global__ void __launch_bounds__(32, MIN_BLOCKS) tq_decode_mma_stage1(
    const float* __restrict__ q_rot, const u8* __restrict__ k_codes,
    const u16* __restrict__ k_norms, const u8* __restrict__ v_codes,
    const u16* __restrict__ v_norms, const int* __restrict__ k_tab,
    const int* __restrict__ v_tab, const INDPTR_T* __restrict__ kv_indptr,
    const SLOT_T* __restrict__ kv_indices, const int* __restrict__ num_kv_splits,
    float* __restrict__ mid_o, float* __restrict__ mid_lse, double sm_scale_log2, int gqa,
    int min_block_kv, int stride_q_b, int stride_q_h, int stride_kc_s, int stride_kc_h,
    int stride_kn_s, int stride_kn_h, int stride_vc_s, int stride_vc_h, int stride_vn_s,
    int stride_vn_h, int stride_mo_b, int stride_mo_h, int stride_mo_s, int stride_ml_b,
    int stride_ml_h) {
  const int batch = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  // -- this split's token range, as _split_range in tq_decode.py
  const int start = (int)kv_indptr[batch];
  const int seq_len = (int)kv_indptr[batch + 1] - start;
  const int splits = num_kv_splits[batch];
  const int per_split = ((seq_len + splits - 1) / splits + min_block_kv - 1) / min_block_kv *
                        min_block_kv;
  const int lo = per_split * split;
  const int hi = min(lo + per_split, seq_len);
  if (hi <= lo) return;

  // -- the group's rotated queries as B fragments (fp16): head 8·ht + g, dim_k order
  const int head0 = kv_head * gqa;
  u32 qf[HEAD_TILES][8][2];
#pragma unroll
  for (int ht = 0; ht < HEAD_TILES; ++ht) {
    const int h = 8 * ht + g;
    const float* qh = q_rot + (long long)batch * stride_q_b + (long long)(head0 + h) * stride_q_h;
#pragma unroll
    for (int s = 0; s < 8; ++s)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        qf[ht][s][r] = h < gqa ? pack_half2(qh[dim_k(t, s, r, 0)], qh[dim_k(t, s, r, 1)]) : 0u;
  }
  // table words through a shuffle: a vector register the lookups read in place (loaded as
  // uniform values, ptxas copied them into vector registers before every lookup)
  u32 ktab[4], vtab[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ktab[i] = __shfl_sync(0xffffffffu, (u32)k_tab[i], 0);
    vtab[i] = __shfl_sync(0xffffffffu, (u32)v_tab[i], 0);
  }
  const float scale = (float)sm_scale_log2;
  const u8* kc = k_codes + (long long)kv_head * stride_kc_h;
  const u8* vc = v_codes + (long long)kv_head * stride_vc_h;
  const u16* kn = k_norms + (long long)kv_head * stride_kn_h;
  const u16* vn = v_norms + (long long)kv_head * stride_vn_h;
  const bool odd_head = g & 1;
  const int src_lane = 8 * t + (g >> 1);  // holds Sᵀ[token 2t, heads 2(g/2), 2(g/2) + 1]

  // -- online softmax state of heads 8·ht + 2t + e; l is this thread's partial sum over
  //    its token rows, reduced over the column's eight lanes at the end
  float m_i[HEAD_TILES][2], l_i[HEAD_TILES][2];
  float acc[HEAD_TILES][8][4];
#pragma unroll
  for (int ht = 0; ht < HEAD_TILES; ++ht) {
    m_i[ht][0] = m_i[ht][1] = NEG_INF;
    l_i[ht][0] = l_i[ht][1] = 0.f;
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) acc[ht][mt][0] = acc[ht][mt][1] = acc[ht][mt][2] = acc[ht][mt][3] = 0.f;
  }

  // -- a step's loads: with PREFETCH the next step's are issued before this step's math
#if PREFETCH
  Step cur = load_step(lo, hi, start, kv_indices, kc, kn, vc, vn, stride_kc_s, stride_kn_s,
                       stride_vc_s, stride_vn_s, g, t, lane);
#endif
  for (int n0 = lo; n0 < hi; n0 += TILE) {
#if PREFETCH
    const Step nxt = n0 + TILE < hi ? load_step(n0 + TILE, hi, start, kv_indices, kc, kn, vc, vn,
                                                stride_kc_s, stride_kn_s, stride_vc_s,
                                                stride_vn_s, g, t, lane)
                                    : cur;
#else
    const Step cur = load_step(n0, hi, start, kv_indices, kc, kn, vc, vn, stride_kc_s,
                               stride_kn_s, stride_vc_s, stride_vn_s, g, t, lane);
#endif
    const uint4(&kw)[4] = cur.kw;
    const uint2(&vw)[4][2] = cur.vw;
    float k_nrm[4], v_nrm[4];
    bool valid[4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      k_nrm[nt] = half_to_float(cur.kn[nt]);
      v_nrm[nt] = half_to_float(cur.vn[nt]);
      valid[nt] = n0 + 8 * nt + g < hi;
    }
    // -- scores: each token row's 32 codes are its A registers of the 8 k-steps
    float sc[2][HEAD_TILES][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      u32 ka[16], kb[16];  // rows g and g + 8
      lut4(kw[2 * mt].x, ktab, *reinterpret_cast<u32(*)[4]>(&ka[0]));
      lut4(kw[2 * mt].y, ktab, *reinterpret_cast<u32(*)[4]>(&ka[4]));
      lut4(kw[2 * mt].z, ktab, *reinterpret_cast<u32(*)[4]>(&ka[8]));
      lut4(kw[2 * mt].w, ktab, *reinterpret_cast<u32(*)[4]>(&ka[12]));
      lut4(kw[2 * mt + 1].x, ktab, *reinterpret_cast<u32(*)[4]>(&kb[0]));
      lut4(kw[2 * mt + 1].y, ktab, *reinterpret_cast<u32(*)[4]>(&kb[4]));
      lut4(kw[2 * mt + 1].z, ktab, *reinterpret_cast<u32(*)[4]>(&kb[8]));
      lut4(kw[2 * mt + 1].w, ktab, *reinterpret_cast<u32(*)[4]>(&kb[12]));
#pragma unroll
      for (int ht = 0; ht < HEAD_TILES; ++ht) {
        sc[mt][ht][0] = sc[mt][ht][1] = sc[mt][ht][2] = sc[mt][ht][3] = 0.f;
#pragma unroll
        for (int s = 0; s < 8; ++s)
          mma_16816(sc[mt][ht], ka[2 * s], kb[2 * s], ka[2 * s + 1], kb[2 * s + 1], qf[ht][s][0],
                    qf[ht][s][1]);
      }
    }
    // -- per head tile: K norms and scale, masked; running max over the column's lanes;
    //    probabilities times the V norms, transposed into Pᵀ's B fragments
    u32 pb[2][HEAD_TILES][2];
#pragma unroll
    for (int ht = 0; ht < HEAD_TILES; ++ht) {
      float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int nt = 2 * mt + (c >> 1);
          const float x = valid[nt] ? sc[mt][ht][c] * k_nrm[nt] * scale : NEG_INF;
          sc[mt][ht][c] = x;
          mx[c & 1] = fmaxf(mx[c & 1], x);
        }
      float alpha[2], m_safe[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 4));
        mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 8));
        mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 16));
        const float m_new = fmaxf(m_i[ht][e], mx[e]);
        m_safe[e] = m_new == NEG_INF ? 0.f : m_new;
        alpha[e] = exp2_approx(m_i[ht][e] - m_safe[e]);
        m_i[ht][e] = m_new;
        l_i[ht][e] *= alpha[e];
      }
#pragma unroll
      for (int mt = 0; mt < 8; ++mt) {
        acc[ht][mt][0] *= alpha[0];
        acc[ht][mt][1] *= alpha[1];
        acc[ht][mt][2] *= alpha[0];
        acc[ht][mt][3] *= alpha[1];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        float pv[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float p = exp2_approx(sc[mt][ht][c] - m_safe[c & 1]);
          l_i[ht][c & 1] += p;
          pv[c] = p * v_nrm[2 * mt + (c >> 1)];
        }
        // Sᵀ rows g / g + 8 (heads 2t, 2t+1) -> Pᵀ's B rows 2t, 2t+1 / 2t+8, 2t+9, column g
        const u32 p_lo = pack_half2(pv[0], pv[1]), p_hi = pack_half2(pv[2], pv[3]);
        const u32 x0 = __shfl_sync(0xffffffffu, p_lo, src_lane);
        const u32 x1 = __shfl_sync(0xffffffffu, p_lo, src_lane + 4);
        const u32 y0 = __shfl_sync(0xffffffffu, p_hi, src_lane);
        const u32 y1 = __shfl_sync(0xffffffffu, p_hi, src_lane + 4);
        pb[mt][ht][0] = pick_halves(x0, x1, odd_head);
        pb[mt][ht][1] = pick_halves(y0, y1, odd_head);
      }
    }
    // -- output: per 16-token k-step, the value fragments of tokens (2t, 2t+1) and
    //    (2t+8, 2t+9), four merged words each
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const uint2 a0 = vw[2 * ks][0], a1 = vw[2 * ks][1];
      const uint2 b0 = vw[2 * ks + 1][0], b1 = vw[2 * ks + 1][1];
      u32 va[16], vb[16];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const bool lo_nib = w < 2;
        const u32 wa0 = (w & 1) ? a0.y : a0.x, wa1 = (w & 1) ? a1.y : a1.x;
        const u32 wb0 = (w & 1) ? b0.y : b0.x, wb1 = (w & 1) ? b1.y : b1.x;
        lut4(merge_nibbles(wa0, wa1, lo_nib), vtab, *reinterpret_cast<u32(*)[4]>(&va[4 * w]));
        lut4(merge_nibbles(wb0, wb1, lo_nib), vtab, *reinterpret_cast<u32(*)[4]>(&vb[4 * w]));
      }
#pragma unroll
      for (int ht = 0; ht < HEAD_TILES; ++ht)
#pragma unroll
        for (int mt = 0; mt < 8; ++mt)
          mma_16816(acc[ht][mt], va[2 * mt], va[2 * mt + 1], vb[2 * mt], vb[2 * mt + 1],
                    pb[ks][ht][0], pb[ks][ht][1]);
    }
#if PREFETCH
    cur = nxt;
#endif
  }

  // -- normalize, store the split's partial output (rotated coordinates) and log-sum-exp
#pragma unroll
  for (int ht = 0; ht < HEAD_TILES; ++ht)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float l = l_i[ht][e];
      l += __shfl_xor_sync(0xffffffffu, l, 4);
      l += __shfl_xor_sync(0xffffffffu, l, 8);
      l += __shfl_xor_sync(0xffffffffu, l, 16);
      const int h = 8 * ht + 2 * t + e;
      if (h >= gqa) continue;
      const int head = head0 + h;
      const float inv = 1.f / l;
      float* mo = mid_o + (long long)batch * stride_mo_b + (long long)head * stride_mo_h +
                  (long long)split * stride_mo_s;
#pragma unroll
      for (int mt = 0; mt < 8; ++mt) {
        mo[dim_v(mt, 0, g)] = acc[ht][mt][e] * inv;
        mo[dim_v(mt, 1, g)] = acc[ht][mt][2 + e] * inv;
      }
      if (g == 0)
        mid_lse[(long long)batch * stride_ml_b + (long long)head * stride_ml_h + split] =
            m_i[ht][e] / LOG2E + logf(l);
    }
}
