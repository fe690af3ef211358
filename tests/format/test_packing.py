"""Bit packing: exact round trips and the split-plane byte layout."""

import pytest
import torch

from sglang_tq.format import packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [8, 24, 64, 96, 128, 256])
def test_round_trip(bits, dim, device):
    g = torch.Generator().manual_seed(bits * 1000 + dim)
    idx = torch.randint(0, 2**bits, (3, 5, dim), generator=g).to(torch.uint8).to(device)
    packed = packing.pack(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packing.packed_bytes(dim, bits))
    assert packed.shape[-1] * 8 == dim * bits
    assert torch.equal(packing.unpack(packed, bits, dim), idx)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_each_code_touches_one_byte_per_plane(bits):
    """A code never straddles a byte: one-hot inputs light up one byte per plane."""
    dim = 64
    offsets = [0]
    for w in packing.plane_widths(bits):
        offsets.append(offsets[-1] + dim * w // 8)
    for c in range(dim):
        idx = torch.zeros(dim, dtype=torch.uint8)
        idx[c] = 2**bits - 1
        packed = packing.pack(idx, bits)
        nonzero = packed.nonzero().flatten().tolist()
        expected = []
        for p, w in enumerate(packing.plane_widths(bits)):
            width_bytes = dim * w // 8
            expected.append(offsets[p] + c % width_bytes)
            # the code sits at bit offset (c // width_bytes) * w within that byte
            byte = int(packed[offsets[p] + c % width_bytes])
            assert byte == ((1 << w) - 1) << ((c // width_bytes) * w)
        assert nonzero == expected


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        packing.pack(torch.zeros(12, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits in"):
        packing.pack(torch.zeros(16, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="bytes per vector"):
        packing.unpack(torch.zeros(7, dtype=torch.uint8), 4, 16)
