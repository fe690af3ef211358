"""The prmt codebook lookup (sglang_tq/kernels/_lut.py), executed by a PTX-subset emulator.

The GPU kernels run this PTX; the Triton interpreter cannot, so the CPU tests
check its bit logic here against the codebook, for every code of every width.
"""

import itertools

import pytest
import torch

from sglang_tq.format.quantizer import TurboQuantizer
from sglang_tq.kernels._lut import constraints, emulate_lookup, fields_of, lut_asm


def codebook(dim, bits):
    """Centroids in code (sign-magnitude) order, as the kernels receive them."""
    return TurboQuantizer(dim, bits).codebook


def _fp16_bits(x: torch.Tensor) -> int:
    return int(x.to(torch.float16).view(torch.int16)) & 0xFFFF


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_lut4_word_matches_codebook_for_every_code(dim):
    """4-bit: a word of 4 bytes → fp16 pairs (lo nibbles of bytes 0,2), (1,3), hi (0,2), (1,3)."""
    cb = codebook(dim, 4)
    for byte0, lane in itertools.product(range(256), range(4)):
        b = [(byte0 * (7 + 2 * e) + 31 * e) % 256 for e in range(4)]
        b[lane] = byte0
        out = emulate_lookup(cb, 4, [sum(x << (8 * e) for e, x in enumerate(b))])
        lo, hi = [x & 15 for x in b], [x >> 4 for x in b]
        want = [(lo[0], lo[2]), (lo[1], lo[3]), (hi[0], hi[2]), (hi[1], hi[3])]
        for reg, (first, second) in zip(out, want):
            assert reg & 0xFFFF == _fp16_bits(cb[first])
            assert reg >> 16 == _fp16_bits(cb[second])


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_lut4_byte_pairing_matches_codebook_for_every_code(dim):
    """4-bit, "bytes" pairing (the CUDA decode's value fragments): a word of 4 bytes → the
    fp16 pair (low nibble, high nibble) of byte 0, 1, 2, 3."""
    cb = codebook(dim, 4)
    for byte0, lane in itertools.product(range(256), range(4)):
        b = [(byte0 * (5 + 2 * e) + 17 * e) % 256 for e in range(4)]
        b[lane] = byte0
        out = emulate_lookup(cb, 4, [sum(x << (8 * e) for e, x in enumerate(b))], pairing="bytes")
        for reg, x in zip(out, b):
            assert reg & 0xFFFF == _fp16_bits(cb[x & 15])
            assert reg >> 16 == _fp16_bits(cb[x >> 4])


def test_lut4_refuses_unknown_pairing():
    with pytest.raises(ValueError, match="pairing must be one of"):
        emulate_lookup(codebook(128, 4), 4, [0], pairing="tokens")


def _pairs(out, f, words):
    """Field f's four fp16 values in byte order from output registers 2f, 2f+1: pairs of
    bytes (0, 1), (2, 3) when read as bytes, (0, 2), (1, 3) when read as words."""
    a, b = out[2 * f], out[2 * f + 1]
    if words:
        return [a & 0xFFFF, b & 0xFFFF, a >> 16, b >> 16]
    return [a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16]


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("words", [False, True])
def test_lut_matches_codebook_for_every_code(bits, dim, words):
    """2/3-bit: a register of four packed bytes → each field's four fp16 values."""
    cb = codebook(dim, bits)
    nfields, width = fields_of(bits)
    levels = range(1 << bits)
    # every code at every field position and byte lane, in groups of 4 lanes
    for f, lane in itertools.product(range(nfields), range(4)):
        for c in levels:
            codes = [
                [(c + 3 * ff + 5 * e) % (1 << bits) for e in range(4)] for ff in range(nfields)
            ]
            codes[f][lane] = c
            low = [
                sum((codes[ff][e] & ((1 << width) - 1)) << (ff * width) for ff in range(nfields))
                for e in range(4)
            ]
            inputs = [sum(b << (8 * e) for e, b in enumerate(low))]
            shift = (f + lane + c) % 2  # columns in the second half of a tile read bit 2t + 1
            if bits == 3:
                # the other bit of each pair belongs to the other half-tile: noise here
                high = [
                    sum(
                        ((codes[ff][e] >> 2) & 1) << (2 * ff + shift)
                        | (((e + ff + c) % 3 == 0) << (2 * ff + 1 - shift))
                        for ff in range(nfields)
                    )
                    for e in range(4)
                ]
                inputs.append(sum(b << (8 * e) for e, b in enumerate(high)))
            out = emulate_lookup(cb, bits, inputs, shift=shift, words=words)
            for ff in range(nfields):
                assert _pairs(out, ff, words) == [_fp16_bits(cb[x]) for x in codes[ff]]


def test_lut4_refuses_asymmetric_codebook():
    cb = codebook(128, 4).clone()
    cb[0] -= 0.01
    with pytest.raises(ValueError, match="symmetric"):
        lut_asm(cb, 4, True)
    cb = torch.sort(codebook(128, 4)).values  # symmetric but in index order, not code order
    with pytest.raises(ValueError, match="symmetric"):
        lut_asm(cb, 4, True)


def test_2bit_lut_reads_any_codebook():
    """The 2-bit table holds the four values themselves: an asymmetric codebook comes out
    exactly, and a codebook of the wrong size is refused."""
    cb = torch.linspace(-0.3, 0.2, 4) ** 3
    codes = [3, 0, 2, 1]
    for words in (False, True):
        out = emulate_lookup(cb, 2, [sum(c << (8 * e) for e, c in enumerate(codes))], words=words)
        assert _pairs(out, 0, words) == [_fp16_bits(cb[c]) for c in codes]
    with pytest.raises(ValueError, match="entries"):
        lut_asm(torch.zeros(3), 2, True)


def test_3bit_lut_reads_any_codebook():
    """The 3-bit table holds the eight values themselves (no sign step): a codebook in
    index order, or an asymmetric one, comes out exactly for every code."""
    for cb in (torch.sort(codebook(128, 3)).values, torch.linspace(-0.3, 0.2, 8) ** 3):
        for shift in (0, 1):
            codes = [[(3 * f + 5 * e + shift) % 8 for e in range(4)] for f in range(4)]
            low = sum(
                sum((codes[f][e] & 3) << (2 * f) for f in range(4)) << (8 * e) for e in range(4)
            )
            high = sum(
                sum((codes[f][e] >> 2) << (2 * f + shift) for f in range(4)) << (8 * e)
                for e in range(4)
            )
            for words in (False, True):
                out = emulate_lookup(cb, 3, [low, high], shift=shift, words=words)
                for f in range(4):
                    assert _pairs(out, f, words) == [_fp16_bits(cb[c]) for c in codes[f]]
    with pytest.raises(ValueError, match="entries"):
        lut_asm(torch.zeros(4), 3, True)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("words", [False, True])
def test_asm_operands_match_the_constraint_string(bits, words):
    """Every $i the PTX names exists in the constraint list Triton is given, and the
    table is read from operands, not re-materialised as immediates in every block."""
    import re

    asm = lut_asm(codebook(128, bits), bits, words)
    n_operands = len(constraints(bits, words).split(","))
    used = {int(m) for m in re.findall(r"\$(\d+)", asm)}
    assert max(used) < n_operands
    assert not re.search(r"mov\.b32 \w+, 0x", asm)
