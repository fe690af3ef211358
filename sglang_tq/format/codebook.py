"""Lloyd-Max codebooks for the coordinates of a random unit vector.

TurboQuant (Zandieh et al., arXiv 2504.19874, Sec. 3.1) rotates each vector by a
random orthogonal matrix, after which every coordinate of the unit-normalised
vector follows the density (Lemma 1)

    f_d(x) = Γ(d/2) / (√π Γ((d−1)/2)) · (1 − x²)^((d−3)/2),   x ∈ [−1, 1].

The MSE-optimal scalar quantizer for that density (Eq. 4) is found with the
Lloyd-Max iteration: boundaries at the midpoints of neighbouring centroids,
centroids at the conditional means of their cells. We solve it numerically on a
fine grid in float64 once per (d, bits) and cache the result in memory.

The optimum normalised MSE E‖u − û‖² at d = 128 is 0.361, 0.116, 0.0340 and
0.0093 for b = 1..4 (the paper's Theorem 1 table rounds these to 0.36, 0.117,
0.03, 0.009); ``tests/format/test_codebook.py`` checks them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

SUPPORTED_CODEBOOK_BITS = (1, 2, 3, 4)

_GRID_POINTS = 1 << 20
_MAX_ITERS = 2000
_TOL = 1e-12


def _grid(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid points and normalised probability weights of f_d on [−1, 1]."""
    # The density is negligible beyond ~12 standard deviations (σ = 1/√d).
    half_width = min(1.0, 12.0 / math.sqrt(dim))
    x = np.linspace(-half_width, half_width, _GRID_POINTS, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logw = 0.5 * (dim - 3) * np.log1p(-x * x)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    return x, w


@functools.cache
def _lloyd_max(dim: int, bits: int) -> tuple[tuple[float, ...], float]:
    x, w = _grid(dim)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cwx = np.concatenate([[0.0], np.cumsum(w * x)])
    levels = 1 << bits
    # Start from the Gaussian approximation: equal-probability cells.
    cdf = cw[1:]
    qs = (np.arange(levels) + 0.5) / levels
    c = x[np.searchsorted(cdf, qs).clip(0, len(x) - 1)]
    for _ in range(_MAX_ITERS):
        b = 0.5 * (c[1:] + c[:-1])
        edges = np.concatenate([[0], np.searchsorted(x, b), [len(x)]])
        mass = cw[edges[1:]] - cw[edges[:-1]]
        new_c = (cwx[edges[1:]] - cwx[edges[:-1]]) / np.maximum(mass, 1e-300)
        # Symmetrise: f_d is even, so is the optimal codebook.
        new_c = 0.5 * (new_c - new_c[::-1])
        done = np.max(np.abs(new_c - c)) < _TOL
        c = new_c
        if done:
            break
    idx = np.searchsorted(0.5 * (c[1:] + c[:-1]), x)
    mse = float(dim * np.sum(w * (x - c[idx]) ** 2))
    return tuple(float(v) for v in c), mse


def _check(dim: int, bits: int) -> None:
    if bits not in SUPPORTED_CODEBOOK_BITS:
        raise ValueError(f"codebook bits must be one of {SUPPORTED_CODEBOOK_BITS}, got {bits}.")
    if dim < 3:
        raise ValueError(f"head_dim must be at least 3 for a Lloyd-Max codebook, got {dim}.")


def codebook(dim: int, bits: int) -> torch.Tensor:
    """Sorted float32 centroids (2**bits of them) for unit vectors in R^dim."""
    _check(dim, bits)
    return torch.tensor(_lloyd_max(dim, bits)[0], dtype=torch.float32)


def boundaries(dim: int, bits: int) -> torch.Tensor:
    """Decision thresholds between neighbouring centroids (2**bits − 1 of them)."""
    c = codebook(dim, bits)
    return 0.5 * (c[1:] + c[:-1])


def optimal_mse(dim: int, bits: int) -> float:
    """E‖u − Q(u)‖² for a uniformly random unit vector u in R^dim (Theorem 1)."""
    _check(dim, bits)
    return _lloyd_max(dim, bits)[1]
