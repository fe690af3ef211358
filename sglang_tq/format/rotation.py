"""Random orthogonal rotations Π for TurboQuant (arXiv 2504.19874, Alg. 1 line 2).

After y = Π x every coordinate of y/‖y‖ follows the Beta-type density the
codebooks are built for, whatever the input distribution (Lemma 1). Two kinds:

* power-of-two ``head_dim``: a randomized Hadamard transform,
  Π = H · diag(s) / √d with s ∈ {±1}^d random signs (the QuaRot / llama.cpp
  construction). It is orthogonal and costs O(d log d) where fused;
* otherwise: Q from the QR decomposition of a Gaussian matrix, sign-corrected
  so that Q is Haar-distributed.

Both are drawn from a CPU ``torch.Generator`` seeded with ``seed`` so that the
same seed gives bit-identical matrices on every machine and device.
"""

from __future__ import annotations

import torch

_QJL_SEED_OFFSET = 0x9E3779B97F4A7C15 & ((1 << 63) - 1)


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) & ((1 << 63) - 1))


def hadamard(dim: int) -> torch.Tensor:
    """Unnormalised Sylvester Walsh-Hadamard matrix (entries ±1), float64."""
    if not is_power_of_two(dim):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size, got {dim}.")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(dim: int, seed: int) -> torch.Tensor:
    """The float32 [dim, dim] orthogonal matrix Π; rotate with ``x @ Π.T``."""
    gen = _generator(seed)
    if is_power_of_two(dim):
        signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64) * 2 - 1
        pi = hadamard(dim) * signs.to(torch.float64)[None, :] / dim**0.5
    else:
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        pi = q * torch.sign(torch.diagonal(r))[None, :]
    return pi.to(torch.float32)


def qjl_matrix(dim: int, seed: int) -> torch.Tensor:
    """The float32 [dim, dim] i.i.d. N(0, 1) matrix S of the QJL sketch (Def. 1)."""
    gen = _generator(seed + _QJL_SEED_OFFSET)
    return torch.randn(dim, dim, generator=gen, dtype=torch.float64).to(torch.float32)
