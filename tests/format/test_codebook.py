"""Lloyd-Max codebooks against the paper's optimum (arXiv 2504.19874, Theorem 1)."""

import math

import pytest
import torch

from sglang_tq.format import codebook as cb

# Optimum E‖u − Q(u)‖² at d = 128 for b = 1..4 (DESIGN.md; paper rounds to .36/.117/.03/.009).
OPTIMUM_D128 = {1: 0.361, 2: 0.116, 3: 0.0340, 4: 0.0093}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_numeric_optimum_matches_published(bits):
    # The published values carry 3 significant digits: agree to half a unit in the last.
    assert cb.optimal_mse(128, bits) == pytest.approx(OPTIMUM_D128[bits], rel=0.015)


@pytest.mark.parametrize("dim", [16, 64, 96, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_conditions(dim, bits):
    c = cb.codebook(dim, bits).double()
    assert c.shape == (2**bits,)
    assert torch.all(c[1:] > c[:-1]), "centroids must be strictly increasing"
    assert torch.allclose(c, -c.flip(0), atol=1e-12), "density is even, so is the codebook"
    # Centroid condition, checked independently of the solver by Monte Carlo on
    # coordinates of random unit vectors: each centroid is its cell's mean.
    g = torch.Generator().manual_seed(dim * 10 + bits)
    u = torch.randn(20000, dim, generator=g, dtype=torch.float64)
    u = (u / u.norm(dim=-1, keepdim=True)).flatten()
    idx = torch.bucketize(u, cb.boundaries(dim, bits).double())
    for level in range(2**bits):
        cell = u[idx == level]
        se = cell.std() / math.sqrt(len(cell))
        assert abs(cell.mean() - c[level]) < 5 * se + 1e-6


def test_mse_is_nearly_dimension_free():
    # Theorem 1: the normalised MSE is (nearly) dimension-free for large d.
    assert cb.optimal_mse(256, 2) == pytest.approx(cb.optimal_mse(128, 2), rel=0.02)


@pytest.mark.parametrize("bad", [0, 5, 8])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="codebook bits"):
        cb.codebook(128, bad)
