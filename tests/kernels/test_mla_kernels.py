"""MLA's packed latent in the store and decode kernels, against their pure-torch twins.

DeepSeek-V2's absorbed attention (Sec. 2.1) scores q_latent·c + q_pe·k_pe and returns the
probability-weighted latent c: one 512-d latent per token that every query head shares,
packed once (keys only, ``tq_store_kv(k, None, ...)``) and decoded as both K and V
(``tq_decode(..., v_codes=None, q_pe=..., k_pe=...)``), the 64-d RoPE part in bf16.
Tolerances as in tests/kernels/test_kernels.py: the kernel's error against the float64 twin at
most 2x PyTorch's own bf16 error; stored codes off by one index at most, rarely.
"""

import pytest
import torch

from sglang_tq.format.codec import LayerCodec
from sglang_tq.format.packing import unpack
from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode, tq_decode_ref
from sglang_tq.kernels.tq_store import tq_store_kv, tq_store_kv_ref
from tests.conftest import HAS_CUDA, rel
from tests.kernels.conftest import BLOCKS

LATENT, ROPE = 512, 64
LENS = (1, 17, 97, 1000) if HAS_CUDA else (1, 17, 45)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_latent_store_matches_reference(bits, device):
    """Keys only: the V planes are neither required nor written."""
    codec = LayerCodec.create(LATENT, bits, bits, seed=5, device=device)
    n, slots = 19, 40
    g = torch.Generator().manual_seed(bits)
    # the latent as a non-contiguous view of a [N, 576] kv_a output (latent | rope)
    kv_a = torch.randn(n, 1, LATENT + ROPE, generator=g).bfloat16().to(device)
    latent = kv_a[..., :LATENT]
    loc = torch.randperm(slots, generator=g)[:n].to(device)
    got, want = codec.alloc_buffers(slots, 1), codec.alloc_buffers(slots, 1)
    tq_store_kv(latent, None, loc, got[0], got[1], None, None, codec)
    tq_store_kv_ref(latent, None, loc, want[0], want[1], None, None, codec)
    diff = (unpack(got[0], bits, LATENT).int() - unpack(want[0], bits, LATENT).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert torch.allclose(got[1].float(), want[1].float(), rtol=2**-10, atol=0)
    assert (got[2] == 0).all() and (got[3] == 0).all(), "a keys-only store wrote V planes"
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc.cpu()] = False
    assert (got[0][untouched.to(device)] == 0).all(), "store wrote outside its slots"


def test_latent_needs_keys_only():
    """512 is a latent dim, not a head_dim: with V planes it is refused in one sentence."""
    codec = LayerCodec.create(LATENT, 4, 4)
    bufs = codec.alloc_buffers(4, 1)
    x = torch.randn(2, 1, LATENT)
    with pytest.raises(ValueError, match="head_dim in"):
        tq_store_kv(x, x, torch.arange(2), *bufs, codec)
    with pytest.raises(ValueError, match="given together"):
        tq_store_kv(x, None, torch.arange(2), bufs[0], bufs[1], bufs[2], None, codec)


def _mla_inputs(bits, hq, device, lens=LENS, seed=0):
    codec = LayerCodec.create(LATENT, bits, bits, seed=seed, device=device)
    num_slots = sum(lens) + 5
    g = torch.Generator().manual_seed(seed + 1)
    latent = torch.randn(num_slots, 1, LATENT, generator=g).bfloat16().to(device)
    k_pe = torch.randn(num_slots, 1, ROPE, generator=g).bfloat16().to(device)
    kc, kn, _, _ = codec.alloc_buffers(num_slots, 1, device)
    tq_store_kv(latent, None, torch.arange(num_slots, device=device), kc, kn, None, None, codec)
    kv_indices = torch.randperm(num_slots, generator=g)[: sum(lens)].to(device)
    kv_indptr = torch.tensor((0,) + tuple(lens)).cumsum(0).int().to(device)
    # q_latent and q_pe as views of one [B, Hq, 576] absorbed query, as the model makes it
    q_all = torch.randn(len(lens), hq, LATENT + ROPE, generator=g).bfloat16().to(device)
    return codec, kc, kn, k_pe, kv_indptr, kv_indices, q_all[..., :LATENT], q_all[..., LATENT:]


@pytest.mark.parametrize("bits, hq", [(4, 16), (3, 16), (2, 16), (4, 8), (4, 32)])
def test_mla_decode_matches_reference(bits, hq, device):
    """Shared latent as K and V plus the bf16 RoPE scores, 8 / 16 / 32 query heads (32: two
    blocks of 16 per program row), several splits per sequence."""
    codec, kc, kn, k_pe, indptr, indices, q, q_pe = _mla_inputs(bits, hq, device)
    bsz, max_splits = q.shape[0], 4
    scale = (128 + ROPE) ** -0.5  # DeepSeek's softmax scale: qk_nope + rope dims
    ws = DecodeWorkspace.create(bsz + 1, hq, LATENT, max_splits, device)
    ws.out.fill_(float("nan"))
    splits = torch.tensor(
        [1 + (i % max_splits) for i in range(bsz)], dtype=torch.int32, device=device
    )
    out = tq_decode(
        q,
        kc,
        kn,
        None,
        None,
        indptr,
        indices,
        codec,
        scale,
        num_kv_splits=splits,
        max_kv_splits=max_splits,
        workspace=ws,
        q_pe=q_pe,
        k_pe=k_pe,
        **BLOCKS,
    )
    ref = tq_decode_ref(q, kc, kn, None, None, indptr, indices, codec, scale, q_pe=q_pe, k_pe=k_pe)
    torch_err = rel(
        tq_decode_ref(
            q,
            kc,
            kn,
            None,
            None,
            indptr,
            indices,
            codec,
            scale,
            dtype=torch.bfloat16,
            q_pe=q_pe,
            k_pe=k_pe,
        ),
        ref,
    )
    assert out.shape == (bsz, hq, LATENT) and not out.isnan().any()
    assert rel(out, ref) <= 2 * torch_err
    # the RoPE part matters: the twin without it is far from the kernel
    no_rope = tq_decode_ref(q, kc, kn, None, None, indptr, indices, codec, scale)
    assert rel(out, no_rope) > 4 * torch_err


def test_mla_decode_refuses_mismatched_rope_arguments(device):
    codec, kc, kn, k_pe, indptr, indices, q, q_pe = _mla_inputs(4, 16, device, lens=(3,))
    ws = DecodeWorkspace.create(1, 16, LATENT, 2, device)
    splits = torch.ones(1, dtype=torch.int32, device=device)
    kw = dict(num_kv_splits=splits, max_kv_splits=2, workspace=ws)
    with pytest.raises(ValueError, match="q_pe with k_pe"):
        tq_decode(q, kc, kn, None, None, indptr, indices, codec, 0.1, q_pe=q_pe, **kw)
    with pytest.raises(ValueError, match="k_pe \\[slots, R\\]"):
        tq_decode(
            q,
            kc,
            kn,
            None,
            None,
            indptr,
            indices,
            codec,
            0.1,
            q_pe=q_pe[..., :48],
            k_pe=k_pe[..., :48],
            **kw,
        )


@pytest.mark.parametrize("bits", [4, 2])
def test_latent_dequant_keys_only_matches_reference(bits, device):
    """The prefill path's prefix reader, keys only, into the head of a wider [N, 1, 576]
    scratch row (latent | RoPE): the RoPE columns stay untouched."""
    from sglang_tq.kernels.tq_dequant import tq_dequant, tq_dequant_ref

    codec = LayerCodec.create(LATENT, bits, bits, seed=2, device=device)
    g = torch.Generator().manual_seed(bits)
    latent = torch.randn(30, 1, LATENT, generator=g).bfloat16().to(device)
    kc, kn, _, _ = codec.alloc_buffers(30, 1, device)
    tq_store_kv(latent, None, torch.arange(30, device=device), kc, kn, None, None, codec)
    slots = torch.tensor([4, 17, 0, 29, 8], device=device)
    scratch = torch.full((5, 1, LATENT + ROPE), 7.0, dtype=torch.bfloat16, device=device)
    k, v = tq_dequant(kc, kn, None, None, slots, codec, out=(scratch[..., :LATENT], None))
    assert v is None and k.data_ptr() == scratch.data_ptr()
    ref, _ = tq_dequant_ref(kc, kn, None, None, slots, codec)
    # one bf16 rounding of the output (as tests/kernels/test_kernels.py: the interpreter's fp32 -> bf16
    # cast truncates, twice round-to-nearest's error)
    bound = 2 if device.type == "cuda" else 4
    assert rel(scratch[..., :LATENT], ref) <= bound * rel(ref.bfloat16(), ref)
    assert (scratch[..., LATENT:] == 7.0).all()


def test_mla_decode_merges_many_splits(device):
    """A batch of one gets many splits (the MLA backend's occupancy rule): above 16 the
    merge runs per query head over [splits, 512] tiles (VECTOR_MERGE), here at 32."""
    codec, kc, kn, k_pe, indptr, indices, q, q_pe = _mla_inputs(4, 16, device, lens=(45,))
    scale = (128 + ROPE) ** -0.5
    ws = DecodeWorkspace.create(1, 16, LATENT, 32, device)
    ws.out.fill_(float("nan"))
    splits = torch.tensor([32], dtype=torch.int32, device=device)
    out = tq_decode(
        q,
        kc,
        kn,
        None,
        None,
        indptr,
        indices,
        codec,
        scale,
        num_kv_splits=splits,
        max_kv_splits=32,
        workspace=ws,
        q_pe=q_pe,
        k_pe=k_pe,
        block_n=16,
    )
    ref = tq_decode_ref(q, kc, kn, None, None, indptr, indices, codec, scale, q_pe=q_pe, k_pe=k_pe)
    torch_err = rel(
        tq_decode_ref(
            q,
            kc,
            kn,
            None,
            None,
            indptr,
            indices,
            codec,
            scale,
            dtype=torch.bfloat16,
            q_pe=q_pe,
            k_pe=k_pe,
        ),
        ref,
    )
    assert not out.isnan().any() and rel(out, ref) <= 2 * torch_err
