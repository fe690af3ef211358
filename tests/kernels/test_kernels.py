"""Fused Triton kernels against their pure-torch twins, on the same packed codes.

Tolerance rule (fast-hadamard-transform style): the kernel's error against a
float64 reference is at most 2× the error of PyTorch computing the same attention
in the inputs' dtype (bf16). The kernels take bf16 inputs, use fp16 tensor-core
operands with fp32 accumulation, and return bf16, so bf16 rounding dominates.
On CPU the kernels run under TRITON_INTERPRET=1 at tiny shapes; on CUDA the same
tests also run at larger lengths.
"""

import dataclasses
import itertools

import pytest
import torch

from sglang_tq.format.codec import LayerCodec
from sglang_tq.format.packing import unpack
from sglang_tq.kernels.tq_decode import (
    DecodeLaunch,
    DecodeWorkspace,
    default_num_kv_splits,
    pdl_supported,
    rotate_query,
    rotate_query_ref,
    split_ceiling,
    tq_decode,
    tq_decode_ref,
)
from sglang_tq.kernels.tq_dequant import tq_dequant, tq_dequant_ref
from sglang_tq.kernels.tq_extend import (
    dedup_prefix,
    default_extend_impl,
    exact_rows,
    extend_kv_table,
    tq_extend,
    tq_extend_ref,
    with_kv_table,
)
from sglang_tq.kernels.tq_store import tq_store_kv, tq_store_kv_ref
from tests.conftest import HAS_CUDA, rel
from tests.kernels.conftest import BLOCKS, assert_decode_matches_ref, run_decode

BIT_PAIRS = list(itertools.product((4, 3, 2), repeat=2))
LENS = (1, 17, 97, 1000) if HAS_CUDA else (1, 17, 97)


def _filled_pool(codec, num_slots, hkv, device, seed):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(num_slots, hkv, codec.head_dim, generator=g) * 2).bfloat16().to(device)
    v = torch.randn(num_slots, hkv, codec.head_dim, generator=g).bfloat16().to(device)
    bufs = codec.alloc_buffers(num_slots, hkv, device)
    tq_store_kv(k, v, torch.arange(num_slots, device=device), *bufs, codec)
    return bufs


# --------------------------------------------------------------------------- store
@pytest.mark.parametrize(
    "fwht, row_tokens", [(False, 0), (True, 0), (True, 64)], ids=["dense", "fwht", "fwht-rows"]
)
@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits",
    [(64, kb, vb) for kb, vb in BIT_PAIRS] + [(d, b, b) for d in (128, 256) for b in (4, 3, 2)],
)
def test_store_matches_reference(head_dim, k_bits, v_bits, fwht, row_tokens, device):
    """Both rotations (dense Πᵀ product, fast Walsh-Hadamard: as 16-token tensor-core tiles
    and, ``row_tokens``, one token per program in registers) against the reference."""
    codec = LayerCodec.create(head_dim, k_bits, v_bits, seed=3, device=device)
    n, hkv, slots = 37, 3, 50
    g = torch.Generator().manual_seed(head_dim + 10 * k_bits + v_bits)
    # K and V are non-contiguous views into a fused qkv-like buffer.
    qkv = torch.randn(n, 3 * hkv, head_dim, generator=g).bfloat16().to(device)
    k, v = qkv[:, hkv : 2 * hkv], qkv[:, 2 * hkv :]
    loc = torch.randperm(slots, generator=g)[:n].to(device)
    got, want = codec.alloc_buffers(slots, hkv), codec.alloc_buffers(slots, hkv)
    tq_store_kv(k, v, loc, *got, codec, fwht=fwht, row_tokens=row_tokens)
    tq_store_kv_ref(k, v, loc, *want, codec)
    for bits, gc, wc in ((k_bits, got[0], want[0]), (v_bits, got[2], want[2])):
        gi = unpack(gc, bits, head_dim).int()
        wi = unpack(wc, bits, head_dim).int()
        # fp32 rotations rounded differently can move a coordinate across a threshold
        # it lies within ~1e-7 of: allow rare off-by-one indices, nothing else.
        diff = (gi - wi).abs()
        assert diff.max() <= 1
        assert (diff > 0).float().mean() < 1e-3
    for gn, wn in ((got[1], want[1]), (got[3], want[3])):
        # both round the same fp32 norm to fp16: at most one ulp apart (2**-10 relative)
        assert torch.allclose(gn.float(), wn.float(), rtol=2**-10, atol=0)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc.cpu()] = False
    assert (got[0][untouched.to(device)] == 0).all(), "store wrote outside its slots"


# -------------------------------------------------------------------------- decode
DECODE_CASES = [
    (64, kb, vb, gqa) for (kb, vb), gqa in zip(BIT_PAIRS, itertools.cycle((1, 4, 8)))
] + [(128, 4, 4, 4), (128, 3, 3, 8), (128, 4, 2, 1), (256, 4, 4, 4), (256, 2, 2, 8)]


def _decode_inputs(head_dim, k_bits, v_bits, gqa, device, lens=LENS, seed=0, hkv=2):
    codec = LayerCodec.create(head_dim, k_bits, v_bits, seed=seed, device=device)
    num_slots = sum(lens) + 7
    bufs = _filled_pool(codec, num_slots, hkv, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    kv_indices = torch.randperm(num_slots, generator=g)[: sum(lens)].to(device)
    kv_indptr = torch.tensor((0,) + tuple(lens)).cumsum(0).int().to(device)
    q = torch.randn(len(lens), hkv * gqa, head_dim, generator=g).bfloat16().to(device)
    return codec, bufs, kv_indptr, kv_indices, q


@pytest.mark.parametrize("head_dim, k_bits, v_bits, gqa", DECODE_CASES)
def test_decode_matches_reference(head_dim, k_bits, v_bits, gqa, device):
    codec, bufs, indptr, indices, q = _decode_inputs(head_dim, k_bits, v_bits, gqa, device)
    out = run_decode(q, bufs, indptr, indices, codec)
    ref = tq_decode_ref(q, *bufs, indptr, indices, codec, head_dim**-0.5)
    torch_err = rel(
        tq_decode_ref(q, *bufs, indptr, indices, codec, head_dim**-0.5, dtype=torch.bfloat16), ref
    )
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert rel(out, ref) <= 2 * torch_err


@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits, gqa", [(64, 4, 4, 4), (128, 3, 3, 8), (256, 2, 4, 1)]
)
def test_decode_without_prefetch_matches_reference(head_dim, k_bits, v_bits, gqa, device):
    """The launch table may choose loads at the top of each tile instead of a register
    prefetch of the next one (PREFETCH = 0): same result."""
    codec, bufs, indptr, indices, q = _decode_inputs(head_dim, k_bits, v_bits, gqa, device, seed=4)
    out = run_decode(q, bufs, indptr, indices, codec, prefetch=False)
    assert_decode_matches_ref(out, q, bufs, indptr, indices, codec)


@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits, gqa, prefetch",
    [
        (64, 4, 3, 1, True),
        (128, 3, 3, 8, False),
        (128, 4, 4, 4, True),
        (256, 2, 4, 4, False),
        (128, 4, 2, 16, True),
    ],
)
def test_decode_heads_as_n_matches_reference(head_dim, k_bits, v_bits, gqa, prefetch, device):
    """The transposed problem (GQA group as the dots' N side, value codes loaded as
    [D/4, N] tiles, every V bit width) computes the same attention."""
    codec, bufs, indptr, indices, q = _decode_inputs(head_dim, k_bits, v_bits, gqa, device, seed=7)
    out = run_decode(q, bufs, indptr, indices, codec, heads_n=True, prefetch=prefetch)
    assert_decode_matches_ref(out, q, bufs, indptr, indices, codec)


@pytest.mark.parametrize(
    "launch",
    [
        dict(block_n=32, num_warps=1, prefetch=True),
        dict(block_n=32, num_warps=1, prefetch=False, num_stages=3),
        dict(block_n=64, num_warps=4, prefetch=False, num_stages=2),
        dict(block_n=16, num_warps=1, prefetch=False, num_stages=3),
        dict(block_n=32, num_warps=2, prefetch=False, num_stages=2),
        dict(block_n=32, num_warps=2, prefetch=False, heads_n=True),
        dict(block_n=64, num_warps=2, prefetch=True, heads_n=True),
        dict(block_n=32, num_warps=1, prefetch=False, num_stages=3, heads_n=True, maxnreg=168),
    ],
)
def test_decode_launch_variants_match_reference(launch, device):
    """Every launch shape the tuner may write into the table computes the same attention."""
    codec, bufs, indptr, indices, q = _decode_inputs(128, 4, 2, 4, device, seed=6)
    out = run_decode(q, bufs, indptr, indices, codec, **launch)
    assert_decode_matches_ref(out, q, bufs, indptr, indices, codec)


@pytest.mark.parametrize("heads_n", [False, True])
@pytest.mark.parametrize("logit_cap, window", [(30.0, 0), (0.0, 13), (5.0, 40)])
def test_decode_softcap_and_sliding_window(logit_cap, window, heads_n, device):
    codec, bufs, indptr, indices, q = _decode_inputs(64, 4, 3, 4, device, seed=5)
    q = q * 4  # make the cap bite
    out = run_decode(
        q, bufs, indptr, indices, codec, logit_cap=logit_cap, sliding_window=window, heads_n=heads_n
    )
    kw = dict(logit_cap=logit_cap, sliding_window=window)
    ref = tq_decode_ref(q, *bufs, indptr, indices, codec, 64**-0.5, **kw)
    torch_err = rel(
        tq_decode_ref(q, *bufs, indptr, indices, codec, 64**-0.5, dtype=torch.bfloat16, **kw), ref
    )
    assert rel(out, ref) <= 2 * torch_err
    plain = tq_decode_ref(q, *bufs, indptr, indices, codec, 64**-0.5)
    assert rel(plain, ref) > 4 * torch_err, "the option must change the result"


def test_decode_is_split_invariant(device):
    codec, bufs, indptr, indices, q = _decode_inputs(128, 4, 4, 4, device, lens=(300, 5), seed=9)
    one = run_decode(q, bufs, indptr, indices, codec, max_splits=1)
    many = run_decode(q, bufs, indptr, indices, codec, max_splits=8)
    ref = tq_decode_ref(q, *bufs, indptr, indices, codec, 128**-0.5)
    torch_err = rel(
        tq_decode_ref(q, *bufs, indptr, indices, codec, 128**-0.5, dtype=torch.bfloat16), ref
    )
    assert rel(one, many) <= 2 * torch_err


@pytest.mark.parametrize(
    "head_dim, max_splits", [(128, 48), (256, 64), (64, 17), (128, 128), (64, 5)]
)
def test_decode_merges_many_splits(head_dim, max_splits, device):
    """Above VECTOR_MERGE_SPLITS stage 2 runs per query head, reads the split partials in
    chunks of 4096 / head_dim splits and un-rotates by a reduction instead of a dot: more
    splits than one chunk, a ceiling that is not a power of two, splits left empty; 5
    splits take the sequential merge per KV head's group."""
    codec, bufs, indptr, indices, q = _decode_inputs(
        head_dim, 4, 4, 4, device, lens=(1000, 3, 130), seed=5
    )
    bsz, hq, d = q.shape
    ws = DecodeWorkspace.create(bsz, hq, d, max_splits, device)
    ws.out.fill_(float("nan"))
    splits = torch.tensor(
        [max_splits, max_splits, max(1, max_splits // 3)], dtype=torch.int32, device=device
    )
    out = tq_decode(
        q,
        *bufs,
        indptr,
        indices,
        codec,
        d**-0.5,
        num_kv_splits=splits,
        max_kv_splits=max_splits,
        workspace=ws,
        **BLOCKS,
    )
    assert not out.isnan().any()
    assert_decode_matches_ref(out, q, bufs, indptr, indices, codec)


@pytest.mark.parametrize("rotate_kernel_elems", [0, 1 << 30])
def test_decode_rotation_paths_match_reference(rotate_kernel_elems, device, monkeypatch):
    """Unfused, the query rotation runs as one Triton kernel for small batches and as
    cast + torch matmul above ROTATE_KERNEL_ELEMS query elements; both feed the same
    stage 1."""
    import sglang_tq.kernels.tq_decode as dec

    monkeypatch.setattr(dec, "ROTATE_KERNEL_ELEMS", rotate_kernel_elems)
    codec, bufs, indptr, indices, q = _decode_inputs(128, 4, 3, 4, device, lens=(40, 7), seed=11)
    out = run_decode(q, bufs, indptr, indices, codec, fuse_rotation=False)
    assert_decode_matches_ref(out, q, bufs, indptr, indices, codec)


@pytest.mark.parametrize("fwht", [False, True], ids=["dense", "fwht"])
@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits, gqa, heads_n",
    [
        (64, 4, 4, 4, False),
        (64, 3, 2, 1, True),
        (128, 4, 4, 4, True),
        (128, 2, 3, 8, False),
        (256, 3, 4, 2, True),
        (128, 3, 3, 4, True),
        (64, 2, 2, 8, False),
    ],
)
def test_decode_fused_rotation_matches_reference(
    head_dim, k_bits, v_bits, gqa, heads_n, fwht, device
):
    """Stage 1 rotating a strided bf16 q itself (fp16 Π product or the fast Walsh-Hadamard
    transform; every tile layout: four 4-bit tiles, eight word tiles, four byte tiles; both
    problem orientations) computes the same attention as the separate fp32 rotation."""
    codec, bufs, indptr, indices, q = _decode_inputs(
        head_dim, k_bits, v_bits, gqa, device, lens=(40, 7, 129), seed=13
    )
    wide = torch.zeros(q.shape[0], q.shape[1], 2 * head_dim, dtype=q.dtype, device=device)
    wide[..., :head_dim] = q
    q = wide[..., :head_dim]  # strided along heads, contiguous in head_dim
    fused = run_decode(
        q, bufs, indptr, indices, codec, fuse_rotation=True, heads_n=heads_n, fwht=fwht
    )
    assert_decode_matches_ref(fused, q, bufs, indptr, indices, codec)
    apart = run_decode(q, bufs, indptr, indices, codec, fuse_rotation=False, heads_n=heads_n)
    assert rel(fused, apart) <= 2 * rel(
        tq_decode_ref(q, *bufs, indptr, indices, codec, head_dim**-0.5, dtype=torch.bfloat16),
        tq_decode_ref(q, *bufs, indptr, indices, codec, head_dim**-0.5),
    )


@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits, gqa", [(64, 4, 3, 4), (128, 2, 4, 2), (256, 4, 4, 8)]
)
def test_decode_fwht_unrotation_at_many_splits_matches_reference(
    head_dim, k_bits, v_bits, gqa, device
):
    """Above VECTOR_MERGE_SPLITS splits the merge runs per query head; with ``fwht`` its
    un-rotation (and the fused query rotation) is the fast Walsh-Hadamard transform."""
    from sglang_tq.kernels.tq_decode import VECTOR_MERGE_SPLITS

    codec, bufs, indptr, indices, q = _decode_inputs(
        head_dim, k_bits, v_bits, gqa, device, lens=(300, 37), seed=21
    )
    splits = 2 * VECTOR_MERGE_SPLITS
    fast = run_decode(q, bufs, indptr, indices, codec, max_splits=splits, fwht=True)
    assert_decode_matches_ref(fast, q, bufs, indptr, indices, codec)
    dense = run_decode(q, bufs, indptr, indices, codec, max_splits=splits)
    assert rel(fast, dense) <= 2 * rel(
        tq_decode_ref(q, *bufs, indptr, indices, codec, head_dim**-0.5, dtype=torch.bfloat16),
        tq_decode_ref(q, *bufs, indptr, indices, codec, head_dim**-0.5),
    )


def test_store_refuses_rows_below_a_tile_without_fwht(device):
    """One-token programs rotate in registers only as the fast Walsh-Hadamard transform."""
    codec = LayerCodec.create(64, 4, 4, device=device)
    bufs = codec.alloc_buffers(4, 2, device)
    k = torch.zeros(1, 2, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="needs the fast Walsh-Hadamard rotation"):
        tq_store_kv(
            k,
            k,
            torch.zeros(1, dtype=torch.long, device=device),
            *bufs,
            codec,
            block_n=1,
            fwht=False,
        )


@pytest.mark.skipif(pdl_supported(), reason="this GPU supports programmatic dependent launch")
def test_decode_and_store_refuse_pdl_where_unsupported():
    codec, bufs, indptr, indices, q = _decode_inputs(64, 4, 4, 4, "cpu", lens=(5,), seed=2)
    with pytest.raises(ValueError, match="programmatic dependent launch"):
        run_decode(q, bufs, indptr, indices, codec, pdl=True)
    k = torch.zeros(1, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="programmatic dependent launch"):
        tq_store_kv(k, k, torch.zeros(1, dtype=torch.long), *bufs, codec, pdl=True)


@pytest.mark.gpu
@pytest.mark.skipif(not pdl_supported(), reason="needs programmatic dependent launch (sm_90+)")
@pytest.mark.parametrize("graph", [False, True])
def test_pdl_store_then_early_q_decode_matches_serial(graph):
    """A decode layer's chain with programmatic dependent launch: a producer kernel writes
    q, k and v; the PDL store waits for it and releases stage 1, which rotates q before
    its own wait (early_q) and reads the new token's codes after it. The outputs, and the
    codes written, must equal the serial chain bit for bit (same arithmetic, only the
    launch order differs), eagerly and replayed in a CUDA graph; a race on q or on the
    new codes would show up as a mismatch."""
    dev = torch.device("cuda")
    codec, bufs, indptr, indices, q0 = _decode_inputs(
        128, 4, 4, 4, dev, lens=(4000, 1, 300), seed=21
    )
    bsz, hq, d = q0.shape
    hkv = bufs[0].shape[1]
    new_slot = indices[indptr[1:] - 1]  # each sequence's last slot is the token of this step
    g = torch.Generator().manual_seed(22)
    src = torch.randn(bsz, hq + 2 * hkv, d, generator=g).bfloat16().to(dev)
    qkv = torch.empty_like(src)
    ws = DecodeWorkspace.create(bsz, hq, d, 64, dev)
    splits = torch.tensor([64, 1, 8], dtype=torch.int32, device=dev)

    def layer(pdl, pools, step):
        torch.mul(src, step, out=qkv)  # the producer of q, k, v (a rope kernel in a model)
        q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
        tq_store_kv(k, v, new_slot, *pools, codec, pdl=pdl)
        return tq_decode(
            q,
            *pools,
            indptr,
            indices,
            codec,
            d**-0.5,
            num_kv_splits=splits,
            max_kv_splits=64,
            workspace=ws,
            fuse_rotation=True,
            pdl=pdl,
            early_q=pdl,
            out=torch.empty(bsz, hq, d, dtype=q.dtype, device=dev),
        )

    serial_pools, pdl_pools = [b.clone() for b in bufs], [b.clone() for b in bufs]
    want = [layer(False, serial_pools, 1.0 + i / 8).clone() for i in range(6)]
    if graph:
        layer(True, pdl_pools, 1.0)  # compile outside the capture
        step = torch.ones((), device=dev)
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            out = layer(True, pdl_pools, step)
        got = []
        for i in range(6):
            step.fill_(1.0 + i / 8)
            cg.replay()
            got.append(out.clone())
    else:
        got = [layer(True, pdl_pools, 1.0 + i / 8).clone() for i in range(6)]
    torch.cuda.synchronize()
    for w, o in zip(want, got):
        assert torch.equal(w, o)
    for a, b in zip(serial_pools, pdl_pools):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bsz, hq, head_dim", [(1, 4, 64), (3, 32, 128), (17, 8, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotate_query_matches_reference(bsz, hq, head_dim, dtype, device):
    """q · Πᵀ in fp32 from a strided q (a slice of a fused projection): within 2x of
    PyTorch's own fp32 product, or the fp32 rounding of a head_dim-term sum."""
    codec = LayerCodec.create(head_dim, 4, 4, seed=3, device=device)
    g = torch.Generator().manual_seed(bsz)
    fused = torch.randn(bsz, 2 * hq, head_dim, generator=g).to(dtype).to(device)
    q = fused[:, 1::2]
    out = torch.full((bsz, hq, head_dim), float("nan"), device=device)
    rotate_query(q, codec.pi, out)
    ref = rotate_query_ref(q, codec.pi)
    torch_err = rel(q.float() @ codec.pi.T, ref)
    assert rel(out, ref) <= max(2 * torch_err, 2**-24 * head_dim**0.5)


def test_rotate_query_refuses_bad_arguments(device):
    codec = LayerCodec.create(64, 4, 4, seed=0, device=device)
    q = torch.randn(2, 4, 64, device=device)
    with pytest.raises(ValueError, match="float32"):
        rotate_query(q, codec.pi, torch.empty(2, 4, 64, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="rotation"):
        rotate_query(q, codec.pi.double(), torch.empty(2, 4, 64, device=device))


# -------------------------------------------------------------------------- extend
def _extend_inputs(
    head_dim, k_bits, v_bits, gqa, device, prefix, chunk, packed_chunk, seed=0, hkv=2
):
    """A pool, a batch of chunks with prefixes in random slots; with ``packed_chunk`` the
    chunks are stored too and their slots returned (else None)."""
    codec = LayerCodec.create(head_dim, k_bits, v_bits, seed=seed, device=device)
    num_slots = sum(prefix) + sum(chunk) + 3
    bufs = _filled_pool(codec, num_slots, hkv, device, seed)
    g = torch.Generator().manual_seed(seed + 2)
    t = sum(chunk)
    q = torch.randn(t, hkv * gqa, head_dim, generator=g).bfloat16().to(device)
    k = (torch.randn(t, hkv, head_dim, generator=g) * 2).bfloat16().to(device)
    v = torch.randn(t, hkv, head_dim, generator=g).bfloat16().to(device)
    perm = torch.randperm(num_slots, generator=g).to(device)
    prefix_slots = perm[: sum(prefix)]
    chunk_slots = perm[sum(prefix) : sum(prefix) + t]
    if packed_chunk:
        tq_store_kv(k, v, chunk_slots, *bufs, codec)
    qo = torch.tensor((0,) + tuple(chunk)).cumsum(0).int().to(device)
    kv_indptr = torch.tensor((0,) + tuple(prefix)).cumsum(0).int().to(device)
    return codec, bufs, q, k, v, qo, kv_indptr, prefix_slots, chunk_slots if packed_chunk else None


IS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(params=["triton", pytest.param("fa3", marks=pytest.mark.gpu)])
def impl(request):
    """The extend path's attention kernel: SGLang's Triton kernel, or FA3 on Hopper."""
    if request.param == "fa3" and not IS_HOPPER:
        pytest.skip("sgl-kernel's FA3 runs on Hopper (sm90) only")
    return request.param


EXTEND_CASES = [
    (64, kb, vb, gqa) for (kb, vb), gqa in zip(BIT_PAIRS, itertools.cycle((4, 1, 8)))
] + [(128, 4, 4, 4), (256, 3, 3, 2)]


@pytest.mark.parametrize("packed_chunk", [False, True])
@pytest.mark.parametrize("head_dim, k_bits, v_bits, gqa", EXTEND_CASES)
def test_extend_matches_reference(head_dim, k_bits, v_bits, gqa, packed_chunk, device, impl):
    prefix = (0, 17, 97) + ((1000,) if HAS_CUDA else ())
    chunk = (5, 1, 40) + ((300,) if HAS_CUDA else ())
    codec, bufs, q, k, v, qo, kv_indptr, kv_indices, chunk_slots = _extend_inputs(
        head_dim, k_bits, v_bits, gqa, device, prefix, chunk, packed_chunk
    )
    out = tq_extend(
        q,
        k,
        v,
        *bufs,
        qo,
        kv_indptr,
        kv_indices,
        codec,
        head_dim**-0.5,
        max_extend_len=max(chunk),
        num_prefix_tokens=sum(prefix),
        chunk_slots=chunk_slots,
        impl=impl,
    )
    args = (q, k, v, *bufs, qo, kv_indptr, kv_indices, codec, head_dim**-0.5)
    ref = tq_extend_ref(*args, chunk_slots=chunk_slots)
    torch_err = rel(tq_extend_ref(*args, chunk_slots=chunk_slots, dtype=torch.bfloat16), ref)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    assert rel(out, ref) <= 2 * torch_err


def test_dedup_prefix_maps_every_position_to_its_slot(device):
    prefix = torch.tensor([7, 3, 7, 9, 3, 3, 0, 9], device=device)
    dd = dedup_prefix(prefix)
    count = int(dd.count)
    assert count == 4 and dd.count.dtype == torch.int32
    assert dd.slots[:count].tolist() == [0, 3, 7, 9]
    assert torch.equal(dd.slots[dd.index], prefix)
    assert int(dd.index.max()) == count - 1


def test_extend_kv_table_lists_prefix_rows_then_chunk_rows():
    qo = torch.tensor([0, 2, 5, 6], dtype=torch.int32)  # chunks of 2, 3, 1
    kv_indptr = torch.tensor([0, 3, 3, 5], dtype=torch.int32)  # prefixes of 3, 0, 2
    prefix_index = torch.tensor([4, 0, 2, 1, 3])  # prefix position -> distinct row
    table, lens = extend_kv_table(qo, kv_indptr, prefix_index, max_kv_len=6)
    assert lens.tolist() == [5, 3, 3] and table.dtype == lens.dtype == torch.int32
    want = [[4, 0, 2, 5, 6], [7, 8, 9], [1, 3, 10]]
    for b, rows in enumerate(want):
        assert table[b, : len(rows)].tolist() == rows
    assert 0 <= int(table.min()) and int(table.max()) <= 10
    # the batch's dedup carries the same table, its width from the device when not given
    dd = with_kv_table(dedup_prefix(torch.tensor([9, 3, 7, 5, 8])), qo, kv_indptr, None)
    assert dd.kv_table[0].shape == (3, 5) and dd.kv_table[1].tolist() == [5, 3, 3]
    assert torch.equal(dd.kv_table[0], extend_kv_table(qo, kv_indptr, dd.index, 5)[0])


def test_extend_impl_choice_and_refusals(monkeypatch, device):
    cpu = torch.device("cpu")
    assert default_extend_impl(cpu, torch.bfloat16) == "triton"
    assert default_extend_impl(device, torch.float32) == "triton"
    monkeypatch.setenv("SGLANG_TQ_EXTEND_IMPL", "fa2")
    with pytest.raises(ValueError, match="SGLANG_TQ_EXTEND_IMPL must be one of fa3, triton"):
        default_extend_impl(cpu, torch.bfloat16)
    monkeypatch.setenv("SGLANG_TQ_EXTEND_IMPL", "fa3")
    with pytest.raises(
        ValueError, match="SGLANG_TQ_EXTEND_IMPL=fa3 needs bf16 or fp16 on a Hopper"
    ):
        default_extend_impl(cpu, torch.bfloat16)
    monkeypatch.setenv("SGLANG_TQ_EXTEND_IMPL", "triton")
    assert default_extend_impl(device, torch.bfloat16) == "triton"
    codec, bufs, q, k, v, qo, kv_indptr, kv_indices, _ = _extend_inputs(
        64, 4, 4, 2, device, (3,), (2,), False
    )
    call = (q, k, v, *bufs, qo, kv_indptr, kv_indices, codec, 0.125)
    with pytest.raises(ValueError, match="impl must be one of"):
        tq_extend(*call, max_extend_len=2, impl="flash")
    with pytest.raises(ValueError, match="impl=fa3 needs bf16 or fp16 on a Hopper GPU"):
        tq_extend(q.float(), *call[1:], max_extend_len=2, impl="fa3")


@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits, gqa, packed_chunk", [(64, 4, 3, 4, False), (128, 3, 4, 8, True)]
)
def test_extend_with_shared_prefix_matches_reference(
    head_dim, k_bits, v_bits, gqa, packed_chunk, device, impl
):
    """Requests over one radix prefix list the same slots: each slot is decoded once and
    every request reads it through the dedup index, with the same result."""
    shared = 23 if HAS_CUDA else 11
    prefix = (shared, shared + 5, shared, 0)
    chunk = (4, 9, 1, 6)
    codec, bufs, q, k, v, qo, kv_indptr, kv_indices, chunk_slots = _extend_inputs(
        head_dim, k_bits, v_bits, gqa, device, prefix, chunk, packed_chunk, seed=9
    )
    # sequences 0 and 2 share sequence 1's first `shared` slots (a radix hit); 1 adds 5 own
    p = kv_indices
    kv_indices = torch.cat([p[:shared], p[: shared + 5], p[:shared]])
    kv_indptr = torch.tensor((0,) + tuple(prefix), device=device).cumsum(0).int()
    assert int(dedup_prefix(kv_indices).count) == shared + 5
    args = (q, k, v, *bufs, qo, kv_indptr, kv_indices, codec, head_dim**-0.5)
    out = tq_extend(
        *args,
        max_extend_len=max(chunk),
        num_prefix_tokens=sum(prefix),
        chunk_slots=chunk_slots,
        prefix_dedup=dedup_prefix(kv_indices),
        impl=impl,
    )
    ref = tq_extend_ref(*args, chunk_slots=chunk_slots)
    torch_err = rel(tq_extend_ref(*args, chunk_slots=chunk_slots, dtype=torch.bfloat16), ref)
    assert rel(out, ref) <= 2 * torch_err
    # the scratch sized to the distinct slots only (exact_rows) gives the same result
    exact = exact_rows(dedup_prefix(kv_indices))
    assert exact.rows == shared + 5 and exact.slots.numel() == shared + 5
    out_exact = tq_extend(
        *args,
        max_extend_len=max(chunk),
        num_prefix_tokens=sum(prefix),
        chunk_slots=chunk_slots,
        prefix_dedup=exact,
        impl=impl,
    )
    assert rel(out_exact, ref) <= 2 * torch_err
    with pytest.raises(ValueError, match="prefix_dedup.rows must lie in"):
        tq_extend(
            *args,
            max_extend_len=max(chunk),
            num_prefix_tokens=sum(prefix),
            prefix_dedup=dataclasses.replace(exact, rows=sum(prefix) + 1),
            impl=impl,
        )
    with pytest.raises(ValueError, match="prefix_dedup covers"):
        tq_extend(
            *args,
            max_extend_len=max(chunk),
            num_prefix_tokens=sum(prefix),
            prefix_dedup=dedup_prefix(kv_indices[:-1]),
            impl=impl,
        )


@pytest.mark.parametrize("logit_cap, window", [(20.0, 0), (0.0, 11)])
def test_extend_softcap_and_sliding_window(logit_cap, window, device, impl):
    codec, bufs, q, k, v, qo, kv_indptr, kv_indices, _ = _extend_inputs(
        64, 4, 2, 2, device, (0, 30), (9, 33), False, seed=4
    )
    q = q * 4
    out = tq_extend(
        q,
        k,
        v,
        *bufs,
        qo,
        kv_indptr,
        kv_indices,
        codec,
        64**-0.5,
        max_extend_len=33,
        logit_cap=logit_cap,
        sliding_window=window,
        impl=impl,
    )
    args = (q, k, v, *bufs, qo, kv_indptr, kv_indices, codec, 64**-0.5)
    kw = dict(logit_cap=logit_cap, sliding_window=window)
    ref = tq_extend_ref(*args, **kw)
    torch_err = rel(tq_extend_ref(*args, dtype=torch.bfloat16, **kw), ref)
    assert rel(out, ref) <= 2 * torch_err
    assert rel(tq_extend_ref(*args), ref) > 4 * torch_err, "the option must change the result"


def _sinks(hq, device, seed):
    """Sink logits of the size learned ones take (gpt-oss: about -2..6), one per query head."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(hq, generator=g) * 8 - 2).to(device)


@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits, gqa, max_splits",
    [(64, 4, 3, 4, 4), (128, 2, 4, 2, 32), (128, 4, 4, 8, 4)],
)
def test_decode_with_attention_sinks_matches_reference(
    head_dim, k_bits, v_bits, gqa, max_splits, device
):
    """Attention sinks (a logit per query head in every softmax, no value) join where the
    splits merge, in the loop merge (<= 16 splits) and the vector merge (> 16)."""
    codec, bufs, indptr, indices, q = _decode_inputs(head_dim, k_bits, v_bits, gqa, device, seed=8)
    sinks = _sinks(q.shape[1], device, seed=1)
    out = run_decode(q, bufs, indptr, indices, codec, max_splits=max_splits, sinks=sinks)
    scale = head_dim**-0.5
    ref = tq_decode_ref(q, *bufs, indptr, indices, codec, scale, sinks=sinks)
    torch_err = rel(
        tq_decode_ref(q, *bufs, indptr, indices, codec, scale, dtype=torch.bfloat16, sinks=sinks),
        ref,
    )
    assert rel(out, ref) <= 2 * torch_err
    assert rel(tq_decode_ref(q, *bufs, indptr, indices, codec, scale), ref) > 4 * torch_err, (
        "the sinks must change the result"
    )
    with pytest.raises(ValueError, match="sinks must be a float tensor"):
        run_decode(q, bufs, indptr, indices, codec, sinks=sinks[:-1])


def test_extend_with_attention_sinks_matches_reference(device, impl):
    codec, bufs, q, k, v, qo, kv_indptr, kv_indices, _ = _extend_inputs(
        64, 4, 3, 2, device, (0, 21, 5), (9, 6, 1), False, seed=6
    )
    sinks = _sinks(q.shape[1], device, seed=2)
    args = (q, k, v, *bufs, qo, kv_indptr, kv_indices, codec, 64**-0.5)
    out = tq_extend(*args, max_extend_len=9, sinks=sinks, impl=impl)
    ref = tq_extend_ref(*args, sinks=sinks)
    torch_err = rel(tq_extend_ref(*args, dtype=torch.bfloat16, sinks=sinks), ref)
    assert rel(out, ref) <= 2 * torch_err
    assert rel(tq_extend_ref(*args), ref) > 4 * torch_err, "the sinks must change the result"
    with pytest.raises(ValueError, match="sinks must be a float tensor"):
        tq_extend(*args, max_extend_len=9, sinks=sinks[None], impl=impl)


def test_extend_writes_into_given_out(device, impl):
    codec, bufs, q, k, v, qo, kv_indptr, kv_indices, _ = _extend_inputs(
        64, 3, 4, 2, device, (6, 0), (4, 9), False, seed=5
    )
    wide = torch.full(
        (q.shape[0], q.shape[1] * 64 + 8), float("nan"), dtype=q.dtype, device=q.device
    )
    out = wide[:, : q.shape[1] * 64].view(q.shape)
    got = tq_extend(
        q,
        k,
        v,
        *bufs,
        qo,
        kv_indptr,
        kv_indices,
        codec,
        64**-0.5,
        max_extend_len=9,
        out=out,
        impl=impl,
    )
    args = (q, k, v, *bufs, qo, kv_indptr, kv_indices, codec, 64**-0.5)
    ref = tq_extend_ref(*args)
    assert got is out and not out.isnan().any() and wide[:, -8:].isnan().all()
    assert rel(out, ref) <= 2 * rel(tq_extend_ref(*args, dtype=torch.bfloat16), ref)


def test_extend_decode_consistency(device, impl):
    """The last token of a packed-chunk extend equals a decode step over the same slots."""
    codec, bufs, q, k, v, qo, kv_indptr, kv_indices, chunk_slots = _extend_inputs(
        128, 4, 4, 4, device, (20,), (12,), True, seed=8
    )
    ext = tq_extend(
        q,
        k,
        v,
        *bufs,
        qo,
        kv_indptr,
        kv_indices,
        codec,
        128**-0.5,
        max_extend_len=12,
        chunk_slots=chunk_slots,
        impl=impl,
    )
    all_slots = torch.cat([kv_indices, chunk_slots])
    all_indptr = torch.tensor([0, 32], dtype=torch.int32, device=q.device)
    dec = run_decode(q[-1:], bufs, all_indptr, all_slots, codec, max_splits=2)
    ref = tq_decode_ref(q[-1:], *bufs, all_indptr, all_slots, codec, 128**-0.5)
    torch_err = rel(
        tq_decode_ref(q[-1:], *bufs, all_indptr, all_slots, codec, 128**-0.5, dtype=torch.bfloat16),
        ref,
    )
    assert rel(ext[-1:], dec) <= 2 * torch_err


# -------------------------------------------------------------------------- dequant
@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits", [(64, kb, vb) for kb, vb in BIT_PAIRS] + [(128, 4, 3), (256, 2, 4)]
)
def test_dequant_matches_reference(head_dim, k_bits, v_bits, device):
    codec = LayerCodec.create(head_dim, k_bits, v_bits, seed=3, device=device)
    k_codes, k_norms, v_codes, v_norms = bufs = _filled_pool(codec, 150, 3, device, seed=3)
    slots = torch.randperm(150, generator=torch.Generator().manual_seed(1))[:97].to(device)
    refs = tq_dequant_ref(*bufs, slots, codec)
    # fp32 output: the kernel's only roundings are its fp16 operands (codebook values and
    # Π); PyTorch with the same fp16 operands and fp32 accumulation sets the bound
    k32, v32 = tq_dequant(*bufs, slots, codec, dtype=torch.float32)
    for got, quant, codes, norms, want in (
        (k32, codec.k_quant, k_codes, k_norms, refs[0]),
        (v32, codec.v_quant, v_codes, v_norms, refs[1]),
    ):
        n = norms[slots].float()[..., None]
        unit = (quant.dequantize_rotated(codes[slots], norms[slots]) / n).half().float()
        torch_fp16 = (unit @ codec.pi.half().float()) * n
        assert rel(got, want) <= 2 * max(rel(torch_fp16, want), 1e-7)
    # bf16 output: one rounding on top; the interpreter casts fp32 -> bf16 by truncation,
    # which has twice round-to-nearest's error
    k, v = tq_dequant(*bufs, slots, codec)
    assert k.shape == v.shape == (97, 3, head_dim) and k.dtype == torch.bfloat16
    bound = 2 if device.type == "cuda" else 4
    for got, want in ((k, refs[0]), (v, refs[1])):
        assert rel(got, want) <= bound * rel(want.bfloat16(), want)


def test_dequant_count_on_device_decodes_only_the_leading_slots(device):
    codec = LayerCodec.create(64, 4, 2, seed=2, device=device)
    bufs = _filled_pool(codec, 80, 2, device, seed=2)
    slots = torch.randperm(80, generator=torch.Generator().manual_seed(3))[:70].to(device)
    count = torch.tensor([37], dtype=torch.int32, device=device)
    k, v = tq_dequant(*bufs, slots, codec, dtype=torch.float32, count=count)
    k_all, v_all = tq_dequant(*bufs, slots, codec, dtype=torch.float32)
    assert torch.equal(k[:37], k_all[:37]) and torch.equal(v[:37], v_all[:37])
    with pytest.raises(ValueError, match="count must be"):
        tq_dequant(*bufs, slots, codec, count=count.long())


def test_dequant_writes_into_given_rows(device):
    """``out`` rows at the head of a larger buffer (the fa3 extend scratch) get exactly the
    values of a fresh dequant, and the rows after them stay untouched."""
    codec = LayerCodec.create(128, 3, 4, seed=6, device=device)
    bufs = _filled_pool(codec, 40, 2, device, seed=6)
    slots = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:23].to(device)
    k_all = torch.full((30, 2, 128), float("nan"), device=device)
    v_all = torch.full_like(k_all, float("nan"))
    tq_dequant(*bufs, slots, codec, dtype=torch.float32, out=(k_all[:23], v_all[:23]))
    k, v = tq_dequant(*bufs, slots, codec, dtype=torch.float32)
    assert torch.equal(k_all[:23], k) and torch.equal(v_all[:23], v)
    assert k_all[23:].isnan().all() and v_all[23:].isnan().all()
    with pytest.raises(ValueError, match="out must be two"):
        tq_dequant(*bufs, slots, codec, dtype=torch.bfloat16, out=(k_all[:23], v_all[:23]))


def test_dequant_refuses_bad_slots():
    codec = LayerCodec.create(64, 4, 4)
    bufs = codec.alloc_buffers(4, 1, "cpu")
    with pytest.raises(ValueError, match="1-D"):
        tq_dequant(*bufs, torch.zeros(2, 2, dtype=torch.int64), codec)


# ----------------------------------------------------------------------- bad input
def test_kernels_refuse_unsupported_head_dim():
    codec = LayerCodec.create(96, 4, 4)
    bufs = codec.alloc_buffers(4, 1)
    x = torch.randn(2, 1, 96).bfloat16()
    with pytest.raises(ValueError, match="head_dim in \\(64, 128, 256\\).*--kv-quant none"):
        tq_store_kv(x, x, torch.arange(2), *bufs, codec)


def test_kernels_refuse_mismatched_pool():
    codec = LayerCodec.create(64, 4, 4)
    other = LayerCodec.create(64, 2, 2)
    bufs = other.alloc_buffers(8, 2)
    x = torch.randn(2, 2, 64).bfloat16()
    with pytest.raises(ValueError, match="k_codes must be uint8"):
        tq_store_kv(x, x, torch.arange(2), *bufs, codec)
    ws = DecodeWorkspace.create(1, 2, 64, 1, "cpu")
    with pytest.raises(ValueError, match="does not match the codec"):
        tq_decode(
            x[:1],
            *bufs,
            torch.tensor([0, 2], dtype=torch.int32),
            torch.arange(2),
            codec,
            0.1,
            num_kv_splits=torch.ones(1, dtype=torch.int32),
            max_kv_splits=1,
            workspace=ws,
        )


def test_extend_refuses_mismatched_chunk_slots_and_out():
    codec = LayerCodec.create(64, 4, 4)
    bufs = codec.alloc_buffers(8, 1)
    q, kv = torch.randn(3, 2, 64).bfloat16(), torch.randn(3, 1, 64).bfloat16()
    qo, kv_indptr = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    args = (q, kv, kv, *bufs, qo, kv_indptr, torch.arange(2), codec, 0.1)
    with pytest.raises(ValueError, match="one slot per new token"):
        tq_extend(*args, max_extend_len=3, chunk_slots=torch.arange(2))
    with pytest.raises(ValueError, match="out must be"):
        tq_extend(*args, max_extend_len=3, out=torch.empty(3, 2, 32, dtype=q.dtype))


def test_decode_writes_into_given_out(device):
    """``out=`` is written in place, also as a strided view of a wider [B, Hq·D] buffer."""
    codec, bufs, indptr, indices, q = _decode_inputs(64, 4, 2, 4, device, lens=(33, 5), seed=12)
    bsz, hq, d = q.shape
    ws = DecodeWorkspace.create(bsz, hq, d, 2, q.device)
    wide = torch.full((bsz, hq * d + 8), float("nan"), dtype=torch.bfloat16, device=q.device)
    out = wide[:, : hq * d].view(bsz, hq, d)
    splits = torch.tensor([2, 1], dtype=torch.int32, device=q.device)
    got = tq_decode(
        q,
        *bufs,
        indptr,
        indices,
        codec,
        d**-0.5,
        num_kv_splits=splits,
        max_kv_splits=2,
        workspace=ws,
        **BLOCKS,
        out=out,
    )
    assert got.data_ptr() == out.data_ptr() and not out.isnan().any()
    assert wide[:, hq * d :].isnan().all(), "wrote past the given output"
    ref = tq_decode_ref(q, *bufs, indptr, indices, codec, d**-0.5)
    torch_err = rel(
        tq_decode_ref(q, *bufs, indptr, indices, codec, d**-0.5, dtype=torch.bfloat16), ref
    )
    assert rel(out, ref) <= 2 * torch_err


# ---------------------------------------------------------------------- split policy
def test_split_ceiling_shares_one_workspace_across_batch_sizes():
    assert [split_ceiling(b) for b in (1, 8, 9, 16, 32, 63, 64, 500)] == [
        128,
        64,
        32,
        32,
        16,
        8,
        8,
        8,
    ]
    assert split_ceiling(1, base=128) == 128 and split_ceiling(1, base=8, cap=8) == 8
    for b in range(1, 300):
        assert b * split_ceiling(b) <= max(b, 64) * 8
    ws = DecodeWorkspace.create(64, 4, 32, 8, "cpu")
    mid_o, mid_lse = ws.partials(1, 64)
    assert mid_o.shape == (1, 4, 64, 32) and mid_lse.shape == (1, 4, 64)
    assert ws.fits(1, 64) and ws.fits(64, 8) and not ws.fits(2, 512)


def test_default_splits_fill_whole_waves():
    """Splits minimise waves × tiles: never a partial extra wave when a full one does."""
    launch = DecodeLaunch(block_n=128, num_warps=4, programs_per_sm=2)  # 264 resident programs

    def splits(b, length, **kw):
        return default_num_kv_splits(
            torch.full((b,), length), 8, 32, num_sms=132, launch=kw.pop("launch", launch), **kw
        )

    # 16 × 8k: 3 splits = 384 programs on 264 slots (1.45 waves); 2 splits fill one wave
    assert splits(16, 8192).tolist() == [2] * 16
    # enough sequences to fill the GPU: no split at all
    assert splits(64, 16384).tolist() == [1] * 64
    # one long sequence spreads over max_kv_splits; a short one keeps >= 64 tokens a split
    assert splits(1, 32768).item() == 32
    small = DecodeLaunch(block_n=32, num_warps=1, programs_per_sm=8)
    assert splits(1, 1024, launch=small).item() == 16  # the 64-token floor binds
    assert splits(1, 1024, launch=small, min_tokens_per_split=256).item() == 4
    assert splits(1, 17).item() == 1 and splits(3, 0).tolist() == [1, 1, 1]
    got = default_num_kv_splits(torch.tensor([17, 4000, 100000]), 8, 32)
    assert got.dtype == torch.int32 and got.min() >= 1 and got.max() <= 32


def test_small_batch_plan_rules():
    """Fused rotation up to 8 sequences for 4-bit keys, 4 for keys in eight tiles (2/3-bit
    from head_dim 128); PDL wherever the GPU has it."""
    from sglang_tq.kernels.tq_decode import small_batch_plan

    assert (
        small_batch_plan(8, 4, 128).fuse_rotation and not small_batch_plan(9, 4, 128).fuse_rotation
    )
    assert (
        small_batch_plan(4, 3, 128).fuse_rotation and not small_batch_plan(5, 3, 128).fuse_rotation
    )
    assert small_batch_plan(8, 3, 64).fuse_rotation  # four tiles at head_dim 64
    assert small_batch_plan(1).pdl == pdl_supported()
