"""Per-layer TurboQuant state on the device: rotation, codebooks, thresholds.

A ``LayerCodec`` is what the kernels need for one attention layer: the rotation
Π (shared by K and V of the layer, drawn from ``TQConfig.layer_seed``), the K and
V Lloyd-Max codebooks and decision thresholds, the PTX of the codebook lookup
(``sglang_tq/kernels/_lut.py``), and Πᵀ with its columns permuted into the order in which the
store kernel packs codes (see :func:`packing_order`). It is built from the reference
:class:`~sglang_tq.format.quantizer.TurboQuantizer` objects, so kernels and reference
share exactly the same matrices and codebooks.
"""

from __future__ import annotations

import dataclasses

import torch

from ..kernels._lut import lut_asm, table_tensor, word_tiles
from .quantizer import TurboQuantizer


def codes_per_byte_block(bits: int) -> int:
    """E: how many coordinate blocks one byte column of the low plane spans."""
    return 2 if bits == 4 else 4


def packing_order(head_dim: int, bits: int) -> torch.Tensor:
    """Coordinate the store kernel computes in column m of its rotated tile.

    Byte j of the split-plane layout holds the E codes of coordinates k·(D/E) + j,
    k < E; with column m = j·E + k they sit next to each other, so a reshape to
    [N, D/E, E] and a shifted sum packs them.
    """
    e = codes_per_byte_block(bits)
    m = torch.arange(head_dim)
    return (m % e) * (head_dim // e) + m // e


@dataclasses.dataclass
class LayerCodec:
    head_dim: int
    k_bits: int
    v_bits: int
    seed: int
    k_quant: TurboQuantizer
    v_quant: TurboQuantizer
    pi: torch.Tensor  # [D, D] fp32, y = x @ pi.T
    pi_f16: torch.Tensor  # Π as fp16 [D, D], for the query rotation inside small-batch decode
    k_codebook: torch.Tensor  # fp32 [2**k_bits], in code (sign-magnitude) order
    v_codebook: torch.Tensor
    k_bounds: torch.Tensor  # fp32 [2**k_bits - 1], ascending (thresholds between sorted centroids)
    v_bounds: torch.Tensor
    pi_t_k: torch.Tensor  # [D, D] fp32: Πᵀ with columns in packing_order(D, k_bits)
    pi_t_v: torch.Tensor
    k_lut: str  # PTX of the prmt codebook lookup (sglang_tq/kernels/_lut.py)
    v_lut: str
    k_lut_words: torch.Tensor  # int32 [4]: its table operands (sglang_tq/kernels/_lut.py)
    v_lut_words: torch.Tensor
    # fp32 [Hkv, D] or None: key center μ per KV head (sglang_tq/format/centers.py). The store
    # quantizes k − μ, prefix dequantization adds μ back, decode needs nothing (a common
    # shift of a head's keys shifts each score row by q·μ, which the softmax ignores).
    k_center: torch.Tensor | None = None

    @classmethod
    def create(
        cls,
        head_dim: int,
        k_bits: int,
        v_bits: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        k_center: torch.Tensor | None = None,
    ) -> LayerCodec:
        if k_center is not None and (k_center.dim() != 2 or k_center.shape[1] != head_dim):
            raise ValueError(
                f"a key center must be [kv_heads, {head_dim}], got {tuple(k_center.shape)}."
            )
        kq = TurboQuantizer(head_dim, k_bits, seed=seed)
        vq = TurboQuantizer(head_dim, v_bits, seed=seed)
        pi = kq.rotation
        to = dict(device=device, dtype=torch.float32)
        return cls(
            head_dim=head_dim,
            k_bits=k_bits,
            v_bits=v_bits,
            seed=seed,
            k_quant=kq,
            v_quant=vq,
            pi=pi.to(**to).contiguous(),
            pi_f16=pi.to(device=device, dtype=torch.float16).contiguous(),
            k_codebook=kq.codebook.to(**to),
            v_codebook=vq.codebook.to(**to),
            k_bounds=kq.boundaries.to(**to),
            v_bounds=vq.boundaries.to(**to),
            pi_t_k=pi.T[:, packing_order(head_dim, k_bits)].to(**to).contiguous(),
            pi_t_v=pi.T[:, packing_order(head_dim, v_bits)].to(**to).contiguous(),
            k_lut=lut_asm(kq.codebook, k_bits, word_tiles(k_bits, head_dim)),
            v_lut=lut_asm(vq.codebook, v_bits, word_tiles(v_bits, head_dim)),
            k_lut_words=table_tensor(kq.codebook, k_bits, device),
            v_lut_words=table_tensor(vq.codebook, v_bits, device),
            k_center=None if k_center is None else k_center.to(**to).contiguous(),
        )

    @property
    def k_code_bytes(self) -> int:
        return self.k_quant.code_bytes

    @property
    def v_code_bytes(self) -> int:
        return self.v_quant.code_bytes

    def alloc_buffers(self, num_slots: int, num_kv_heads: int, device=None):
        """Zeroed (k_codes, k_norms, v_codes, v_norms) for ``num_slots`` tokens."""
        device = device or self.pi.device
        u8 = dict(dtype=torch.uint8, device=device)
        f16 = dict(dtype=torch.float16, device=device)
        return (
            torch.zeros(num_slots, num_kv_heads, self.k_code_bytes, **u8),
            torch.zeros(num_slots, num_kv_heads, **f16),
            torch.zeros(num_slots, num_kv_heads, self.v_code_bytes, **u8),
            torch.zeros(num_slots, num_kv_heads, **f16),
        )
