"""Key centering in the kernels (``LayerCodec.k_center``, ``sglang_tq/format/centers.py``).

The store quantizes k − μ, prefix dequantization adds μ back, and decode reads the
centered codes as they are, relying on the softmax ignoring the per-query shift q·μ.
Each kernel is compared with its reference twin, which centers in float64 and
computes attention on the *uncentered* keys (dequantized + μ), so the decode tests
check that invariance as well as the kernels. Keys get a common component several
times their spread, as Qwen2.5's k_proj bias gives them.
"""

import pytest
import torch

from sglang_tq.format.codec import LayerCodec
from sglang_tq.format.packing import unpack
from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode
from sglang_tq.kernels.tq_dequant import tq_dequant, tq_dequant_ref
from sglang_tq.kernels.tq_extend import tq_extend, tq_extend_ref
from sglang_tq.kernels.tq_store import tq_store_kv, tq_store_kv_ref
from tests.conftest import HAS_CUDA, rel
from tests.kernels.conftest import assert_decode_matches_ref, run_decode


def _centered(head_dim, k_bits, v_bits, hkv, device, seed=0, mean_scale=4.0):
    """A codec whose key center is the keys' common mean, and keys = μ + N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(hkv, head_dim, generator=g) * mean_scale
    codec = LayerCodec.create(head_dim, k_bits, v_bits, seed=seed, device=device, k_center=mu)
    return codec, mu, g


def _keys(mu, n, g, device):
    return (mu[None] + torch.randn(n, *mu.shape, generator=g)).bfloat16().to(device)


@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits", [(64, 4, 4), (64, 3, 2), (128, 4, 3), (256, 2, 4)]
)
def test_store_subtracts_the_center(head_dim, k_bits, v_bits, device):
    hkv, n, slots = 3, 41, 60
    codec, mu, g = _centered(head_dim, k_bits, v_bits, hkv, device, seed=head_dim + k_bits)
    k = _keys(mu, n, g, device)
    v = torch.randn(n, hkv, head_dim, generator=g).bfloat16().to(device)
    loc = torch.randperm(slots, generator=g)[:n].to(device)
    got, want = codec.alloc_buffers(slots, hkv), codec.alloc_buffers(slots, hkv)
    tq_store_kv(k, v, loc, *got, codec)
    tq_store_kv_ref(k, v, loc, *want, codec)
    for bits, gc, wc in ((k_bits, got[0], want[0]), (v_bits, got[2], want[2])):
        diff = (unpack(gc, bits, head_dim).int() - unpack(wc, bits, head_dim).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # fp32 ties, as in test_kernels
    for gn, wn in ((got[1], want[1]), (got[3], want[3])):
        assert torch.allclose(gn.float(), wn.float(), rtol=2**-10, atol=0)
    # the stored key norms are those of k − μ, far below those of k
    assert got[1][loc].float().mean() < 0.5 * k.float().norm(dim=-1).mean()
    # values are untouched by the key center
    plain = LayerCodec.create(head_dim, k_bits, v_bits, seed=head_dim + k_bits, device=device)
    ref_v = plain.alloc_buffers(slots, hkv)
    tq_store_kv_ref(k, v, loc, *ref_v, plain)
    assert torch.equal(got[2].cpu()[loc.cpu()], ref_v[2].cpu()[loc.cpu()])


def test_centering_cuts_the_key_error(device):
    """The point of it: with a common component, k − μ quantizes with far less error."""
    hkv, n = 2, 200
    codec, mu, g = _centered(128, 4, 4, hkv, device, seed=7)
    plain = LayerCodec.create(128, 4, 4, seed=7, device=device)
    k = _keys(mu, n, g, device)
    slots = torch.arange(n, device=device)
    errs = []
    for c in (codec, plain):
        bufs = c.alloc_buffers(n, hkv)
        tq_store_kv(k, k, slots, *bufs, c)
        errs.append(rel(tq_dequant(*bufs, slots, c, dtype=torch.float32)[0], k.float()))
    assert errs[0] < 0.5 * errs[1], errs


@pytest.mark.parametrize("head_dim, k_bits", [(64, 4), (128, 3), (256, 2)])
def test_dequant_adds_the_center_back(head_dim, k_bits, device):
    hkv, n = 3, 150
    codec, mu, g = _centered(head_dim, k_bits, 4, hkv, device, seed=3)
    k = _keys(mu, n, g, device)
    v = torch.randn(n, hkv, head_dim, generator=g).bfloat16().to(device)
    bufs = codec.alloc_buffers(n, hkv)
    tq_store_kv(k, v, torch.arange(n, device=device), *bufs, codec)
    slots = torch.randperm(n, generator=g)[:97].to(device)
    want_k, want_v = tq_dequant_ref(*bufs, slots, codec)
    got_k, got_v = tq_dequant(*bufs, slots, codec, dtype=torch.float32)
    # the fp16 operands (codebook values, Π) bound the kernel's error, as in test_kernels;
    # the center is added in fp32, so the bound is on the centered part
    codes, norms = bufs[0][slots], bufs[1][slots]
    nrm = norms.float()[..., None]
    unit = (codec.k_quant.dequantize_rotated(codes, norms) / nrm).half().float()
    torch_fp16 = (unit @ codec.pi.half().float()) * nrm + codec.k_center
    assert rel(got_k - codec.k_center, want_k - codec.k_center.double()) <= 2 * max(
        rel(torch_fp16 - codec.k_center, want_k - codec.k_center.double()), 1e-7
    )
    assert rel(got_v, want_v) < 1e-2  # values: no center; test_kernels checks them closely


def _decode_case(head_dim, k_bits, v_bits, gqa, device, lens, seed):
    hkv = 2
    codec, mu, g = _centered(head_dim, k_bits, v_bits, hkv, device, seed=seed)
    num = sum(lens) + 5
    k = _keys(mu, num, g, device)
    v = torch.randn(num, hkv, head_dim, generator=g).bfloat16().to(device)
    bufs = codec.alloc_buffers(num, hkv)
    tq_store_kv(k, v, torch.arange(num, device=device), *bufs, codec)
    indices = torch.randperm(num, generator=g)[: sum(lens)].to(device)
    indptr = torch.tensor((0,) + tuple(lens)).cumsum(0).int().to(device)
    q = torch.randn(len(lens), hkv * gqa, head_dim, generator=g).bfloat16().to(device)
    return codec, bufs, indptr, indices, q


@pytest.mark.parametrize(
    "head_dim, k_bits, v_bits, gqa", [(64, 4, 4, 4), (64, 3, 2, 1), (128, 4, 4, 8), (256, 2, 3, 4)]
)
def test_decode_over_centered_keys_matches_uncentered_attention(
    head_dim, k_bits, v_bits, gqa, device
):
    lens = (1, 17, 97) + ((1000,) if HAS_CUDA else ())
    codec, bufs, indptr, indices, q = _decode_case(
        head_dim, k_bits, v_bits, gqa, device, lens, seed=11
    )
    out = run_decode(q, bufs, indptr, indices, codec)
    # the reference attends to the dequantized keys + μ (what the model's keys were)
    assert_decode_matches_ref(out, q, bufs, indptr, indices, codec)


@pytest.mark.parametrize("packed_chunk", [False, True])
def test_extend_over_a_centered_prefix(packed_chunk, device):
    hkv, gqa, d = 2, 4, 64
    codec, mu, g = _centered(d, 4, 3, hkv, device, seed=5)
    prefix, chunk = (0, 17, 97), (5, 1, 40)
    num = sum(prefix) + sum(chunk) + 3
    k_all = _keys(mu, num, g, device)
    v_all = torch.randn(num, hkv, d, generator=g).bfloat16().to(device)
    bufs = codec.alloc_buffers(num, hkv)
    tq_store_kv(k_all, v_all, torch.arange(num, device=device), *bufs, codec)
    t = sum(chunk)
    q = torch.randn(t, hkv * gqa, d, generator=g).bfloat16().to(device)
    k, v = _keys(mu, t, g, device), torch.randn(t, hkv, d, generator=g).bfloat16().to(device)
    perm = torch.randperm(num, generator=g).to(device)
    kv_indices, chunk_slots = perm[: sum(prefix)], perm[sum(prefix) : sum(prefix) + t]
    if packed_chunk:
        tq_store_kv(k, v, chunk_slots, *bufs, codec)
    qo = torch.tensor((0,) + chunk).cumsum(0).int().to(device)
    kv_indptr = torch.tensor((0,) + prefix).cumsum(0).int().to(device)
    cs = chunk_slots if packed_chunk else None
    out = tq_extend(
        q,
        k,
        v,
        *bufs,
        qo,
        kv_indptr,
        kv_indices,
        codec,
        d**-0.5,
        max_extend_len=max(chunk),
        num_prefix_tokens=sum(prefix),
        chunk_slots=cs,
    )
    args = (q, k, v, *bufs, qo, kv_indptr, kv_indices, codec, d**-0.5)
    ref = tq_extend_ref(*args, chunk_slots=cs)
    torch_err = rel(tq_extend_ref(*args, chunk_slots=cs, dtype=torch.bfloat16), ref)
    assert rel(out, ref) <= 2 * torch_err
    # reading the cache without the center: with a bf16 chunk, the prefix would hold k − μ
    # next to a chunk holding k, a different attention (so this test can fail); with a
    # packed chunk every key lacks μ alike, which the softmax ignores
    uncentered = LayerCodec.create(d, 4, 3, seed=5, device=device)
    shifted = tq_extend_ref(
        q, k, v, *bufs, qo, kv_indptr, kv_indices, uncentered, d**-0.5, chunk_slots=cs
    )
    if packed_chunk:
        assert rel(shifted, ref) <= 2 * torch_err
    else:
        assert rel(shifted, ref) > 10 * torch_err


def test_center_with_logit_cap_is_refused():
    codec, _, _ = _centered(64, 4, 4, 1, "cpu")
    bufs = codec.alloc_buffers(4, 1)
    q = torch.randn(1, 2, 64).bfloat16()
    ws = DecodeWorkspace.create(1, 2, 64, 1, "cpu")
    with pytest.raises(ValueError, match="soft-cap.*without key centers"):
        tq_decode(
            q,
            *bufs,
            torch.tensor([0, 2], dtype=torch.int32),
            torch.arange(2),
            codec,
            0.1,
            num_kv_splits=torch.ones(1, dtype=torch.int32),
            max_kv_splits=1,
            workspace=ws,
            logit_cap=30.0,
        )


def test_center_shape_must_match_the_pool():
    with pytest.raises(ValueError, match="kv_heads, 64"):
        LayerCodec.create(64, 4, 4, k_center=torch.zeros(2, 32))
    codec = LayerCodec.create(64, 4, 4, k_center=torch.zeros(3, 64))
    bufs = codec.alloc_buffers(4, 2)
    x = torch.randn(2, 2, 64).bfloat16()
    with pytest.raises(ValueError, match="key centers file must match"):
        tq_store_kv(x, x, torch.arange(2), *bufs, codec)
