"""Pure-torch reference TurboQuant quantizer (arXiv 2504.19874).

This is the ground truth the Triton kernels are tested against. For each vector
x ∈ R^d (one token of one KV head):

1. rotate: y = Π x (``rotation.py``; Alg. 1 line 2);
2. norm:   r = ‖y‖ = ‖x‖, stored as fp16; u = y / r;
3. quantize every coordinate of u to the nearest Lloyd-Max centroid of its
   Beta-type density (``codebook.py``; Alg. 1 line 5, Eq. 4);
4. pack the b-bit codes (``packing.py``).

Codes are sign-magnitude: the top bit is set for the negative half of the
(symmetric) codebook and the low b−1 bits rank the magnitude, so code m and code
2^(b−1) + m hold +c and −c of the same magnitude. The packed-KV kernels then read
a magnitude index and a sign straight from the bits (``sglang_tq/kernels/_lut.py``);
:meth:`TurboQuantizer.codebook` lists the centroids in code order.

Dequantization is x̂ = r · Πᵀ c[idx] (Alg. 1 lines 9-10). Attention kernels stay
in the rotated space: q·k = (Πq)·(Πk), so they use :meth:`dequantize_rotated`.

``variant="prod"`` is TurboQuant_prod (Alg. 2): a (b−1)-bit MSE code of u plus
the QJL sketch sign(S·ρ) of the residual ρ = u − c[idx] (Def. 1), with S an
i.i.d. N(0, 1) matrix, and γ = ‖ρ‖. It reconstructs
u ≈ c[idx] + √(π/2)/d · γ · Sᵀ sign(S ρ), which makes ⟨q, x̂⟩ an unbiased
estimate of ⟨q, x⟩ over the draw of S (Theorem 2). Everything is done in the
rotated space, which is equivalent because S·Π is again i.i.d. Gaussian.

Layouts (D = head_dim):

* ``mse``:  codes = packed b-bit indices, D·b/8 bytes; norms = fp16 [...].
* ``prod``: codes = packed (b−1)-bit indices, D·(b−1)/8 bytes, followed by the
  QJL sign plane, D/8 bytes in the 1-bit plane layout (bit set ⇔ +1);
  norms = fp16 [..., 2] holding (r, γ), γ being the residual norm of the unit
  vector u (so the residual of x itself is r·γ).
"""

from __future__ import annotations

import math

import torch

from . import codebook as _cb
from . import packing, rotation

VARIANTS = ("mse", "prod")
_FP16_MAX = torch.finfo(torch.float16).max


def code_of_index(bits: int) -> torch.Tensor:
    """uint8 [2^bits]: the sign-magnitude code of the i-th smallest centroid."""
    half = 1 << (bits - 1)
    i = torch.arange(1 << bits)
    return torch.where(i >= half, i - half, 2 * half - 1 - i).to(torch.uint8)


class TurboQuantizer:
    """Quantizer for vectors of one ``head_dim`` at one bit width and seed."""

    def __init__(self, head_dim: int, bits: int, seed: int = 0, variant: str = "mse"):
        if not isinstance(head_dim, int) or head_dim < 8:
            raise ValueError(f"head_dim must be an integer of at least 8, got {head_dim!r}.")
        packing.check_packable_dim(head_dim)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        allowed = _cb.SUPPORTED_CODEBOOK_BITS if variant == "mse" else (2, 3, 4)
        if bits not in allowed:
            raise ValueError(
                f"bits must be one of {allowed} for the {variant!r} variant, got {bits!r}."
            )
        self.head_dim = head_dim
        self.bits = bits
        self.seed = seed
        self.variant = variant
        self.mse_bits = bits if variant == "mse" else bits - 1
        self._pi = rotation.rotation_matrix(head_dim, seed)
        self._sorted = _cb.codebook(head_dim, self.mse_bits)
        self._bounds = _cb.boundaries(head_dim, self.mse_bits)
        self._code_of = code_of_index(self.mse_bits)
        self._codebook = torch.empty_like(self._sorted)
        self._codebook[self._code_of.long()] = self._sorted
        self._s = rotation.qjl_matrix(head_dim, seed) if variant == "prod" else None
        self._device_cache: dict[torch.device, tuple] = {}

    @property
    def boundaries(self) -> torch.Tensor:
        """Decision thresholds of the MSE code (float32, 2**mse_bits − 1)."""
        return self._bounds

    # -- state ---------------------------------------------------------------
    @property
    def rotation(self) -> torch.Tensor:
        """Π as float32 [D, D]."""
        return self._pi

    @property
    def codebook(self) -> torch.Tensor:
        """float32 centroids of the MSE code in code (sign-magnitude) order."""
        return self._codebook

    @property
    def qjl_matrix(self) -> torch.Tensor | None:
        return self._s

    @property
    def mse_bytes(self) -> int:
        return packing.packed_bytes(self.head_dim, self.mse_bits)

    @property
    def code_bytes(self) -> int:
        """Bytes of ``codes`` per vector."""
        return self.mse_bytes + (self.head_dim // 8 if self.variant == "prod" else 0)

    @property
    def norms_per_vector(self) -> int:
        return 2 if self.variant == "prod" else 1

    @property
    def bytes_per_vector(self) -> int:
        """Storage per vector: packed codes plus fp16 norm(s)."""
        return self.code_bytes + 2 * self.norms_per_vector

    def _on(self, device: torch.device):
        if device not in self._device_cache:
            s = self._s.to(device) if self._s is not None else None
            self._device_cache[device] = (
                self._pi.to(device),
                self._codebook.to(device),
                self._bounds.to(device),
                s,
                self._code_of.to(device),
            )
        return self._device_cache[device]

    # -- validation ----------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise ValueError(
                f"quantize needs a floating-point tensor, got {x.dtype}; cast it with .float() first."
            )
        if x.dim() == 0 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"last dimension must be head_dim={self.head_dim}, got shape {tuple(x.shape)}."
            )
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or Inf; TurboQuant codes only finite vectors.")

    def _check_codes(self, codes: torch.Tensor, norms: torch.Tensor) -> None:
        if codes.dtype != torch.uint8 or codes.shape[-1] != self.code_bytes:
            raise ValueError(
                f"codes must be uint8 [..., {self.code_bytes}] for head_dim={self.head_dim} "
                f"at {self.bits} bits ({self.variant}), got {codes.dtype} {tuple(codes.shape)}."
            )
        want = codes.shape[:-1] + ((2,) if self.variant == "prod" else ())
        if norms.shape != want:
            raise ValueError(f"norms must have shape {tuple(want)}, got {tuple(norms.shape)}.")

    # -- transforms ----------------------------------------------------------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """y = Π x over the last dimension, in float32."""
        return x.float() @ self._on(x.device)[0].T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """x = Πᵀ y over the last dimension, in float32."""
        return y.float() @ self._on(y.device)[0]

    # -- quantize / dequantize ----------------------------------------------
    def quantize_indices(self, u: torch.Tensor) -> torch.Tensor:
        """Codes (uint8, sign-magnitude) of the nearest centroids of rotated unit vectors ``u``."""
        state = self._on(u.device)
        return state[4][torch.bucketize(u.float().contiguous(), state[2])]

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float [..., D] → (codes uint8 [..., code_bytes], norms fp16 [...] or [..., 2])."""
        self._check_input(x)
        _, cb, _, s, _ = self._on(x.device)
        y = self.rotate(x)
        r = y.norm(dim=-1)
        if (r > _FP16_MAX).any():
            raise ValueError("a vector norm exceeds the fp16 range used to store norms.")
        u = y / r.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        idx = self.quantize_indices(u)
        codes = packing.pack(idx, self.mse_bits)
        if self.variant == "mse":
            return codes, r.to(torch.float16)
        rho = u - cb[idx.long()]
        signs = (rho @ s.T >= 0).to(torch.uint8)
        codes = torch.cat([codes, packing.pack(signs, 1)], dim=-1)
        norms = torch.stack([r, rho.norm(dim=-1)], dim=-1).to(torch.float16)
        return codes, norms

    def dequantize_rotated(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the rotated space, float32 [..., D] (what kernels compute)."""
        self._check_codes(codes, norms)
        _, cb, _, s, _ = self._on(codes.device)
        idx = packing.unpack(codes[..., : self.mse_bytes], self.mse_bits, self.head_dim)
        u_hat = cb[idx.long()]
        if self.variant == "prod":
            signs = packing.unpack(codes[..., self.mse_bytes :], 1, self.head_dim).float() * 2 - 1
            gamma = norms[..., 1].float()
            scale = math.sqrt(math.pi / 2) / self.head_dim
            u_hat = u_hat + scale * gamma[..., None] * (signs @ s)
            norms = norms[..., 0]
        return u_hat * norms.float()[..., None]

    def dequantize(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the original space, float32 [..., D]."""
        return self.unrotate(self.dequantize_rotated(codes, norms))

    def __repr__(self) -> str:
        return (
            f"TurboQuantizer(head_dim={self.head_dim}, bits={self.bits}, seed={self.seed}, "
            f"variant={self.variant!r})"
        )
