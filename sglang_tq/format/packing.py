"""Bit packing of b-bit codebook indices into bytes.

Layout ("split planes"): a plane of width w ∈ {1, 2, 4} bits holds E = 8/w codes
per byte and is D/E bytes wide. Byte j of the plane holds the codes of
coordinates j, j + D/E, …, j + (E−1)·D/E, the k-th of them at bit offset k·w.
Unpacking byte column j with shift k·w therefore yields a *contiguous* block of
D/E coordinates, so a kernel can multiply each block with a matching slice of
the query (or write a matching slice of the output) with ``tl.dot`` without
interleaving registers.

* b = 4: one 4-bit plane (D/2 bytes).
* b = 2: one 2-bit plane (D/4 bytes).
* b = 3: a 2-bit plane of the low bits (D/4 bytes) followed by a 1-bit plane of
  the high bit (D/8 bytes); no code straddles a byte.
* b = 1: one 1-bit plane (D/8 bytes).
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 3, 4)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Plane widths, in storage order, whose sum is ``bits``."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"packing supports bits in {PACKABLE_BITS}, got {bits}.")
    return (2, 1) if bits == 3 else (bits,)


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes per packed vector of ``dim`` codes."""
    check_packable_dim(dim)
    return sum(dim * w // 8 for w in plane_widths(bits))


def check_packable_dim(dim: int) -> None:
    if dim <= 0 or dim % 8:
        raise ValueError(f"head_dim must be a positive multiple of 8 to pack codes, got {dim}.")


def _pack_plane(idx: torch.Tensor, width: int) -> torch.Tensor:
    dim = idx.shape[-1]
    per_byte = 8 // width
    cols = idx.reshape(*idx.shape[:-1], per_byte, dim // per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=idx.device, dtype=torch.int32) * width
    return (cols << shifts[:, None]).sum(-2).to(torch.uint8)


def _unpack_plane(plane: torch.Tensor, width: int) -> torch.Tensor:
    per_byte = 8 // width
    shifts = torch.arange(per_byte, device=plane.device, dtype=torch.int32) * width
    vals = (plane.to(torch.int32)[..., None, :] >> shifts[:, None]) & ((1 << width) - 1)
    return vals.reshape(*plane.shape[:-1], plane.shape[-1] * per_byte)


def pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] with values < 2**bits → packed uint8 [..., packed_bytes]."""
    check_packable_dim(idx.shape[-1])
    planes, shift = [], 0
    for width in plane_widths(bits):
        planes.append(_pack_plane((idx.to(torch.int32) >> shift) & ((1 << width) - 1), width))
        shift += width
    return torch.cat(planes, dim=-1)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: packed uint8 [..., packed_bytes] → uint8 [..., dim]."""
    if packed.shape[-1] != packed_bytes(dim, bits):
        raise ValueError(
            f"packed codes have {packed.shape[-1]} bytes per vector, expected "
            f"{packed_bytes(dim, bits)} for head_dim={dim} at {bits} bits."
        )
    out = torch.zeros(*packed.shape[:-1], dim, dtype=torch.int32, device=packed.device)
    start = shift = 0
    for width in plane_widths(bits):
        nbytes = dim * width // 8
        out |= _unpack_plane(packed[..., start : start + nbytes], width) << shift
        start += nbytes
        shift += width
    return out.to(torch.uint8)
