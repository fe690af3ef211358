"""Quantize-and-store: bf16 K and V of new tokens → packed codes + fp16 norms.

One launch handles K and V of N tokens (grid axis 2 picks K or V, each with its
own constexpr bit width). Per token and KV head (TurboQuant Alg. 1):
rotate y = Πx on tensor cores (tf32x3: three tf32 products, about fp32's precision,
instead of an fp32 FMA loop) against Πᵀ, or (``fwht``) as the fast Walsh-Hadamard
transform Π is for power-of-two D (Π = H·diag(s)/√D, ``rotation.rotation_matrix``):
H_D = H_E ⊗ H_{D/E}, one tf32x3 dot with an in-register ±1 matrix H_{D/E} and E-point
butterflies, no Πᵀ loaded, the result already in packing order; r = ‖y‖, u = y/r, index = number of Lloyd-Max
thresholds below u, its sign-magnitude code (``quantizer.code_of_index``), pack
into the split-plane layout, scatter codes and the fp16 norm to the token's
slot. Πᵀ arrives with its columns already in the kernel's packing order
(``LayerCodec.pi_t_k``/``pi_t_v``), so y comes out grouped by byte.
"""

import torch
import triton
import triton.language as tl

from sglang_tq.format.codec import LayerCodec

from ._checks import check_center, check_head_dim, check_pdl, pdl_launch, pool_strides
from ._codes import hadamard_blocks


@triton.jit
def _rotate_fwht(x, Pi, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, E: tl.constexpr):
    """y = Π x in packing order for Π = H·diag(s)/√D. Coordinate i = a·B + b (B = D/E) and
    H_D[i, j] = H_E[a, c]·H_B[b, e] for j = c·B + e; packing column m = e·E + c holds
    coordinate c·B + e (``codec.packing_order``), so [N, B, E] flattened is the tile."""
    B: tl.constexpr = HEAD_DIM // E
    # -- signs and scale: Π's first row is s/√D (H's first row is all ones)
    xs = x * tl.load(Pi + tl.arange(0, HEAD_DIM))[None, :]
    # -- Z[n, e, a] = Σ_b xs[n, a·B + b] H_B[b, e] on tensor cores
    zt = hadamard_blocks(xs, BLOCK_N, HEAD_DIM, E)  # [N, B(e), E(a)]
    # -- Y[n, e, c] = Σ_a H_E[c, a] Z[n, a, e]: one (E = 2) or two (E = 4) butterfly levels
    if E == 2:
        z0, z1 = tl.split(zt)
        y = tl.join(z0 + z1, z0 - z1)
    else:
        p, q = tl.split(tl.reshape(zt, (BLOCK_N, B, 2, 2)))  # a = 2·a_hi + a_lo, split on a_lo
        g0, g1 = tl.split(p + q)  # c_lo = 0, split on a_hi
        h0, h1 = tl.split(p - q)  # c_lo = 1
        # the inner joins index c_hi, the outer one c_lo (a new last dim): [N, B, c_hi, c_lo]
        y = tl.join(tl.join(g0 + g1, g0 - g1), tl.join(h0 + h1, h0 - h1))
    return tl.reshape(y, (BLOCK_N, HEAD_DIM))


@triton.jit
def _quantize_tile(
    X,
    PiT,
    Bounds,
    Codes,
    Norms,
    Center,
    loc,
    offs_n,
    mask_n,
    head,
    stride_x_n,
    stride_x_h,
    stride_c_s,
    stride_c_h,
    stride_nrm_s,
    stride_nrm_h,
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    FWHT: tl.constexpr,
    ROTATED: tl.constexpr = False,
):
    offs_d = tl.arange(0, HEAD_DIM)
    if ROTATED:
        # -- rows already rotated (fp32, packing order): MLA's 512-d latent, rotated by the
        #    launcher, since a [16, 512] rotation tile in the kernel spills
        y = tl.load(
            X + offs_n[:, None] * stride_x_n + head * stride_x_h + offs_d[None, :],
            mask=mask_n[:, None],
            other=0.0,
        ).to(tl.float32)
    elif FWHT:
        # -- load (minus the head's key center), rotate by the fast Walsh-Hadamard transform
        #    (PiT is then Π itself: its first row gives the signs)
        x = tl.load(
            X + offs_n[:, None] * stride_x_n + head * stride_x_h + offs_d[None, :],
            mask=mask_n[:, None],
            other=0.0,
        ).to(tl.float32)
        if HAS_CENTER:
            x -= tl.load(Center + head * HEAD_DIM + offs_d)[None, :]
        y = _rotate_fwht(x, PiT, BLOCK_N, HEAD_DIM, 2 if BITS == 4 else 4)
    else:
        # -- load (minus the head's key center), rotate: y[:, m] = Σ_c x[:, c] Π[col(m), c],
        #    over chunks of c so that the fp32 slice of Πᵀ fits in shared memory (64 KB at
        #    head_dim 256 and at MLA's 512-d latent)
        CHUNK: tl.constexpr = 64 if HEAD_DIM <= 256 else 32
        offs_c = tl.arange(0, CHUNK)
        y = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        for c0 in tl.static_range(0, HEAD_DIM, CHUNK):
            x = tl.load(
                X + offs_n[:, None] * stride_x_n + head * stride_x_h + (c0 + offs_c)[None, :],
                mask=mask_n[:, None],
                other=0.0,
            ).to(tl.float32)
            if HAS_CENTER:
                x -= tl.load(Center + head * HEAD_DIM + c0 + offs_c)[None, :]
            pit = tl.load(PiT + (c0 + offs_c)[:, None] * HEAD_DIM + offs_d[None, :])
            y += tl.dot(x, pit, input_precision="tf32x3")
    # -- norm and unit vector
    r = tl.sqrt(tl.sum(y * y, axis=1))
    u = y / tl.maximum(r, 1e-30)[:, None]
    # -- index = number of thresholds strictly below u (torch.bucketize semantics)
    idx = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.int32)
    for j in tl.static_range(2**BITS - 1):
        idx += (u > tl.load(Bounds + j)).to(tl.int32)
    # -- sign-magnitude code (quantizer.code_of_index): top bit = negative half
    HALF: tl.constexpr = 2 ** (BITS - 1)
    idx = tl.where(idx >= HALF, idx - HALF, 2 * HALF - 1 - idx)
    # -- pack and scatter
    code_base = Codes + loc.to(tl.int64)[:, None] * stride_c_s + head * stride_c_h
    if BITS == 4:
        pairs = tl.reshape(idx, (BLOCK_N, HEAD_DIM // 2, 2))
        shift = tl.arange(0, 2) * 4
        byte = tl.sum(pairs << shift[None, None, :], axis=2)
        cols = tl.arange(0, HEAD_DIM // 2)
        tl.store(code_base + cols[None, :], byte.to(tl.uint8), mask=mask_n[:, None])
    else:
        quads = tl.reshape(idx, (BLOCK_N, HEAD_DIM // 4, 4))
        shift = tl.arange(0, 4) * 2
        byte = tl.sum((quads & 3) << shift[None, None, :], axis=2)
        cols = tl.arange(0, HEAD_DIM // 4)
        tl.store(code_base + cols[None, :], byte.to(tl.uint8), mask=mask_n[:, None])
        if BITS == 3:
            # quads[n, t·D/8 + i, k] holds coordinate k·D/4 + t·D/8 + i, whose high
            # bit goes to byte i of the 1-bit plane at bit 2k + t.
            hi = tl.reshape((quads >> 2) & 1, (BLOCK_N, 2, HEAD_DIM // 8, 4))
            hshift = tl.arange(0, 2)[None, :, None, None] + 2 * tl.arange(0, 4)[None, None, None, :]
            hbyte = tl.sum(tl.sum(hi << hshift, axis=3), axis=1)
            hcols = tl.arange(0, HEAD_DIM // 8)
            tl.store(
                code_base + HEAD_DIM // 4 + hcols[None, :], hbyte.to(tl.uint8), mask=mask_n[:, None]
            )
    nrm = Norms + loc.to(tl.int64) * stride_nrm_s + head * stride_nrm_h
    tl.store(nrm, r.to(tl.float16), mask=mask_n)


# N varies with every batch: one compiled variant for all of them, not one per N % 16
@triton.jit(do_not_specialize=["N"])
def _tq_store_kernel(
    K,  # [N, Hkv, D] float (any float dtype), new keys, unit stride in D; ROTATED: fp32 rows
    #     already centered and rotated by the launcher, in K's packing order (MLA's latent)
    V,  # [N, Hkv, D] float, new values, like K; = K for keys only (no V programs: not read)
    Loc,  # [N] int32/int64, the pool slot each new token is written to
    PiTK,  # [D, D] fp32 Πᵀ, columns in K's packing order (LayerCodec.pi_t_k); FWHT: Π itself,
    #        only its first row (s/√D) read; ROTATED: not read
    PiTV,  # [D, D] fp32 Πᵀ in V's packing order (pi_t_v), as PiTK; FWHT: Π
    BoundsK,  # [2**K_BITS - 1] fp32, ascending Lloyd-Max thresholds of the key codebook
    BoundsV,  # [2**V_BITS - 1] fp32, the same for the values
    KCodes,  # [S, Hkv, D*K_BITS/8] uint8, packed key codes (S pool slots), unit stride in bytes
    KNorms,  # [S, Hkv] fp16, key norms
    VCodes,  # [S, Hkv, D*V_BITS/8] uint8, packed value codes; = KCodes for keys only (not written)
    VNorms,  # [S, Hkv] fp16, value norms; = KNorms for keys only (not written)
    KCenter,  # [Hkv, D] fp32 contiguous key center μ (K_CENTER, read unless ROTATED); else Π
    N,  # tokens: rows of K, V and Loc
    stride_k_n,
    stride_k_h,
    stride_v_n,
    stride_v_h,
    stride_kc_s,
    stride_kc_h,
    stride_kn_s,
    stride_kn_h,
    stride_vc_s,
    stride_vc_h,
    stride_vn_s,
    stride_vn_h,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CENTER: tl.constexpr,
    USE_PDL: tl.constexpr,
    FWHT: tl.constexpr,
    ROTATED: tl.constexpr = False,
):
    if USE_PDL:
        # programmatic dependent launch: wait for the kernel that wrote K and V (and, in a
        # decode layer, q), then let the next launch start: tq_decode's stage 1 reads and
        # rotates q while the codes are written (``early_q``)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    which = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    loc = tl.load(Loc + offs_n, mask=mask_n, other=0)
    if which == 0:
        _quantize_tile(
            K,
            PiTK,
            BoundsK,
            KCodes,
            KNorms,
            KCenter,
            loc,
            offs_n,
            mask_n,
            head,
            stride_k_n,
            stride_k_h,
            stride_kc_s,
            stride_kc_h,
            stride_kn_s,
            stride_kn_h,
            K_BITS,
            HEAD_DIM,
            BLOCK_N,
            K_CENTER and not ROTATED,
            FWHT,
            ROTATED,
        )
    else:
        _quantize_tile(
            V,
            PiTV,
            BoundsV,
            VCodes,
            VNorms,
            KCenter,
            loc,
            offs_n,
            mask_n,
            head,
            stride_v_n,
            stride_v_h,
            stride_vc_s,
            stride_vc_h,
            stride_vn_s,
            stride_vn_h,
            V_BITS,
            HEAD_DIM,
            BLOCK_N,
            False,
            FWHT,
            ROTATED,
        )


def _check_pool(name, codes, norms, num_heads, code_bytes):
    if codes.dtype != torch.uint8 or codes.dim() != 3 or codes.shape[1:] != (num_heads, code_bytes):
        raise ValueError(
            f"{name}_codes must be uint8 [slots, {num_heads}, {code_bytes}], "
            f"got {codes.dtype} {tuple(codes.shape)}."
        )
    if codes.stride(2) != 1:
        raise ValueError(f"{name}_codes must be contiguous in its last dimension.")
    if norms.dtype != torch.float16 or norms.shape != codes.shape[:2]:
        raise ValueError(
            f"{name}_norms must be float16 {tuple(codes.shape[:2])}, "
            f"got {norms.dtype} {tuple(norms.shape)}."
        )


def tq_store_kv(
    k,
    v,
    loc,
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    codec: LayerCodec,
    block_n: int | None = None,
    num_warps: int | None = None,
    pdl: bool = False,
    fwht: bool = True,
    row_tokens: int = 0,
):
    """Quantize K, V [N, Hkv, D] (any float dtype) and write them to slots ``loc`` [N].

    ``k``, ``v``: unit stride in D, any strides over N and Hkv; ``loc`` int32 or int64.
    ``k_codes`` uint8 [S, Hkv, D·k_bits/8] and ``k_norms`` fp16 [S, Hkv] (``v_codes``
    [S, Hkv, D·v_bits/8], ``v_norms``): the pool of S slots as ``LayerCodec.alloc_buffers``
    makes it, the codes with unit stride in their last dimension.

    ``v``, ``v_codes`` and ``v_norms`` None: keys only, e.g. MLA's compressed latent
    (D = 512), which serves as the values too (``tq_decode`` with ``v_codes=None``).

    ``block_n`` tokens per program (default 16) and ``num_warps`` per program (default 4);
    up to ``row_tokens`` tokens (a decode step of a small batch) the default is one token
    per program on one warp instead, its rotation in registers (``_codes.hadamard_rows``)
    rather than a 16-row tensor-core tile that one real row pads; that needs ``fwht``
    (a dot needs 16 rows). ``fwht`` (default) rotates by the fast
    Walsh-Hadamard transform instead of the dense Πᵀ product (same-call A/B on an H100,
    ``benchmarks/results/ab_decode/ab_fwht_h100_46f802e.json``: 8.4 against 10.5 µs for
    one token, 8.8 against 10.6 for 64). Above head_dim 256 (MLA's 512-d latent) the rows
    are rotated here by one fp32 matmul against Πᵀ in packing order and the kernel only
    quantizes and packs them: a [16, 512] rotation tile inside the kernel spills (9 KB at
    4 warps, offline sm_90a).

    ``pdl`` launches with programmatic dependent launch: the kernel still waits for its
    inputs first, but the next PDL launch (the decode's stage 1 with ``early_q``) may start
    early. Off by default: the early programs then wait on SMs the store's own programs
    need; store + decode at 8 x 4k k4v4 57.4 µs with it against 44.5 without, level at
    one token (H100, benchmarks/results/ab_decode/ab_store_rows_h100_8e620f2.json)."""
    n, hkv, d = k.shape
    keys_only = v is None
    if keys_only != (v_codes is None) or keys_only != (v_norms is None):
        raise ValueError(
            "v, v_codes and v_norms must be given together (or all None for keys only)."
        )
    check_head_dim(d, latent=keys_only)
    rotated = d > 256
    if keys_only:
        v, v_codes, v_norms = k, k_codes, k_norms  # never written: the grid has no V programs
    if v.shape != k.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}."
        )
    if d != codec.head_dim:
        raise ValueError(f"k has head_dim {d} but the codec was built for {codec.head_dim}.")
    if not (k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"k and v must be floating point, got {k.dtype} and {v.dtype}.")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v must be contiguous in head_dim.")
    if loc.shape != (n,) or loc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"loc must be int32/int64 [{n}], got {loc.dtype} {tuple(loc.shape)}.")
    _check_pool("k", k_codes, k_norms, hkv, codec.k_code_bytes)
    if not keys_only:
        _check_pool("v", v_codes, v_norms, hkv, codec.v_code_bytes)
    check_center(codec, hkv)
    check_pdl(pdl)
    fwht = bool(fwht) and not rotated
    rows = fwht and n <= row_tokens
    block_n = (1 if rows else 16) if block_n is None else block_n
    num_warps = (1 if rows else 4) if num_warps is None else num_warps
    if block_n < 16 and not (fwht or rotated):
        raise ValueError(
            f"block_n {block_n} < 16 needs the fast Walsh-Hadamard rotation "
            "(fwht=True): the dense rotation is a tensor-core dot of 16 rows."
        )
    if n == 0:
        return
    grid = (triton.cdiv(n, block_n), hkv, 1 if keys_only else 2)
    pi_k, pi_v = (codec.pi, codec.pi) if fwht else (codec.pi_t_k, codec.pi_t_v)
    if rotated:  # keys only: check_head_dim admits D > 256 for a latent alone
        x = k.float() if codec.k_center is None else k.float() - codec.k_center
        k = v = x @ codec.pi_t_k
    _tq_store_kernel[grid](
        k,
        v,
        loc,
        pi_k,
        pi_v,
        codec.k_bounds,
        codec.v_bounds,
        k_codes,
        k_norms,
        v_codes,
        v_norms,
        codec.pi if codec.k_center is None else codec.k_center,
        n,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *pool_strides(k_codes, k_norms, v_codes, v_norms),
        K_BITS=codec.k_bits,
        V_BITS=codec.v_bits,
        HEAD_DIM=d,
        BLOCK_N=block_n,
        K_CENTER=codec.k_center is not None,
        USE_PDL=int(pdl),
        FWHT=fwht,
        ROTATED=rotated,
        num_warps=num_warps,
        **pdl_launch(pdl),
    )


def tq_store_kv_ref(k, v, loc, k_codes, k_norms, v_codes, v_norms, codec: LayerCodec):
    """Pure-torch twin of :func:`tq_store_kv`, built on the reference quantizer."""
    loc = loc.long()
    if codec.k_center is not None:
        k = k.float() - codec.k_center.to(k.device)
    planes = ((k, k_codes, k_norms, codec.k_quant),)
    if v is not None:
        planes += ((v, v_codes, v_norms, codec.v_quant),)
    for x, codes, norms, quant in planes:
        c, r = quant.quantize(x.float())
        codes[loc] = c
        norms[loc] = r
