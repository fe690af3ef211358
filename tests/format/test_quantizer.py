"""Reference TurboQuant quantizer: distortion, round trips, QJL unbiasedness, bad input."""

import math

import pytest
import torch

from sglang_tq import TQConfig, TurboQuantizer
from sglang_tq.format.rotation import rotation_matrix

OPTIMUM_D128 = {1: 0.361, 2: 0.116, 3: 0.0340, 4: 0.0093}


def _unit(n, d, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float().to(device)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_on_unit_vectors_near_optimum(bits, device):
    q = TurboQuantizer(128, bits, seed=7)
    x = _unit(20000, 128, seed=bits, device=device)
    codes, norms = q.quantize(x)
    xhat = q.dequantize(codes, norms)
    mse = ((x - xhat) ** 2).sum(-1).mean().item()
    assert mse == pytest.approx(OPTIMUM_D128[bits], rel=0.03)


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
def test_rotation_is_orthogonal_and_deterministic(dim):
    pi = rotation_matrix(dim, seed=3).double()
    assert torch.allclose(pi @ pi.T, torch.eye(dim, dtype=torch.float64), atol=1e-5)
    assert torch.equal(rotation_matrix(dim, seed=3), rotation_matrix(dim, seed=3))
    assert not torch.equal(rotation_matrix(dim, seed=3), rotation_matrix(dim, seed=4))


def test_rotate_unrotate(device):
    q = TurboQuantizer(96, 3, seed=1)
    x = torch.randn(10, 96, device=device)
    y = q.rotate(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(q.unrotate(y), x, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [64, 96, 128])
def test_codebook_points_round_trip(bits, dim, device):
    """Rotated vectors made of centroids keep their indices; codes are a fixed point."""
    q = TurboQuantizer(dim, bits, seed=11)
    g = torch.Generator().manual_seed(dim + bits)
    idx = torch.randint(0, 2**bits, (50, dim), generator=g).to(torch.uint8).to(device)
    points = q.codebook.to(device)[idx.long()]
    assert torch.equal(q.quantize_indices(points), idx)
    # quantize ∘ dequantize is the identity on codes, and keeps the direction.
    codes, norms = q.quantize(torch.randn(50, dim, generator=g).to(device))
    xhat = q.dequantize(codes, norms)
    codes2, norms2 = q.quantize(xhat)
    assert torch.equal(codes2, codes)
    direction = torch.nn.functional.normalize
    assert torch.allclose(
        direction(q.dequantize(codes2, norms2), dim=-1), direction(xhat, dim=-1), atol=1e-5
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_rotated_is_codebook_times_norm(bits, device):
    q = TurboQuantizer(128, bits, seed=2)
    x = torch.randn(4, 3, 128, device=device, dtype=torch.bfloat16)
    codes, norms = q.quantize(x)
    assert codes.shape == (4, 3, 128 * bits // 8) and norms.shape == (4, 3)
    assert norms.dtype == torch.float16
    y = q.dequantize_rotated(codes, norms)
    assert torch.allclose(q.unrotate(y), q.dequantize(codes, norms))
    assert torch.allclose(norms.float(), x.float().norm(dim=-1), rtol=1e-3)
    assert q.bytes_per_vector == 128 * bits // 8 + 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_layout(bits):
    q = TurboQuantizer(64, bits, seed=0, variant="prod")
    codes, norms = q.quantize(torch.randn(5, 64))
    assert codes.shape == (5, 64 * bits // 8)
    assert norms.shape == (5, 2) and norms.dtype == torch.float16
    assert q.bytes_per_vector == 64 * bits // 8 + 4


@pytest.mark.parametrize("bits", [2, 3])
def test_prod_inner_product_is_unbiased(bits):
    """Theorem 2: E_S⟨y, x̂⟩ = ⟨y, x⟩. The estimate over M independent draws of
    (Π, S) must lie within 4 standard errors of the truth (two-sided p ≈ 6e-5;
    the seeds are fixed, so the test is deterministic). The MSE variant at the same
    total bits is biased towards zero by far more than that bound (Sec. 3.2)."""
    d, m = 64, 1500
    g = torch.Generator().manual_seed(5)
    x = torch.randn(d, generator=g)
    y = x + 0.5 * torch.randn(d, generator=g)
    truth = float(x @ y)
    est_prod, est_mse = [], []
    for seed in range(m):
        qp = TurboQuantizer(d, bits, seed=seed, variant="prod")
        est_prod.append(float(qp.dequantize(*qp.quantize(x)) @ y))
        qm = TurboQuantizer(d, bits - 1, seed=seed, variant="mse")
        est_mse.append(float(qm.dequantize(*qm.quantize(x)) @ y))
    est_prod, est_mse = torch.tensor(est_prod), torch.tensor(est_mse)
    se = est_prod.std().item() / math.sqrt(m)
    assert abs(est_prod.mean().item() - truth) < 4 * se
    assert abs(est_mse.mean().item() - truth) > 4 * se


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=128, bits=5), "bits must be one of"),
        (dict(head_dim=128, bits=1, variant="prod"), "bits must be one of"),
        (dict(head_dim=100, bits=4), "multiple of 8"),
        (dict(head_dim=128, bits=4, variant="qjl"), "variant must be one of"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TurboQuantizer(**kwargs)


def test_bad_tensors():
    q = TurboQuantizer(64, 4)
    with pytest.raises(ValueError, match="head_dim=64"):
        q.quantize(torch.randn(3, 128))
    with pytest.raises(ValueError, match="floating-point"):
        q.quantize(torch.ones(3, 64, dtype=torch.int32))
    bad = torch.randn(3, 64)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q.quantize(bad)
    codes, norms = q.quantize(torch.randn(3, 64))
    with pytest.raises(ValueError, match="codes must be uint8"):
        q.dequantize(codes[:, :-1], norms)
    with pytest.raises(ValueError, match="norms must have shape"):
        q.dequantize(codes, norms[:2])


def test_config_validation_and_bytes():
    cfg = TQConfig(head_dim=128, k_bits=4, v_bits=4, bf16_layers=[31, 0, 0])
    assert cfg.bf16_layers == (0, 31)
    assert cfg.bytes_per_token_per_head == 132  # REFERENCE.md: k4v4 + fp16 norms
    assert TQConfig(head_dim=128, k_bits=4, v_bits=3).bytes_per_token_per_head == 116
    assert TQConfig(head_dim=128, k_bits=2, v_bits=2).bytes_per_token_per_head == 68
    assert TQConfig(head_dim=128, key_variant="prod").key_bytes == 68
    # DESIGN.md: Llama-3.1-8B at k4v4 is 33,792 B per token (32 layers × 8 KV heads).
    assert 32 * 8 * cfg.bytes_per_token_per_head == 33792
    assert TQConfig.parse_bits("K4v3") == (4, 3)
    for bad in ("k5v4", "4/4", "k4"):
        with pytest.raises(ValueError, match="like k4v4"):
            TQConfig.parse_bits(bad)
    assert TQConfig.parse_bits_list(" K4v4, k3v3,,k2v4") == [
        ("k4v4", 4, 4),
        ("k3v3", 3, 3),
        ("k2v4", 2, 4),
    ]
    with pytest.raises(ValueError, match="like k4v4"):
        TQConfig.parse_bits_list("k4v4,k4")
    with pytest.raises(ValueError, match="k_bits"):
        TQConfig(head_dim=128, k_bits=5)
    with pytest.raises(ValueError, match="key_variant"):
        TQConfig(head_dim=128, key_variant="qjl")
    with pytest.raises(ValueError, match="head_dim"):
        TQConfig(head_dim=100)
    with pytest.raises(ValueError, match="bf16_layers"):
        TQConfig(head_dim=128, bf16_layers=(-1,))
