"""Key-centers file: save/load round trip, and one clear error per bad file."""

import subprocess
import sys

import pytest
import torch

from sglang_tq.format.centers import load_key_centers, save_key_centers
from tests.conftest import tiny_llama


def test_round_trip(tmp_path):
    c = torch.randn(3, 2, 16)
    save_key_centers(tmp_path / "c.safetensors", c, {"model_path": "m"})
    assert torch.equal(load_key_centers(tmp_path / "c.safetensors", 3, 2, 16), c)


def test_bad_files_get_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="does not exist; create it with"):
        load_key_centers(tmp_path / "missing.safetensors", 3, 2, 16)
    save_key_centers(tmp_path / "c.safetensors", torch.randn(3, 2, 16), {})
    with pytest.raises(ValueError, match=r"needs \[layers, kv_heads, head_dim\] = \[4, 2, 16\]"):
        load_key_centers(tmp_path / "c.safetensors", 4, 2, 16)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_key_centers(tmp_path / "junk.safetensors", 3, 2, 16)
    bad = torch.randn(3, 2, 16)
    bad[1, 0, 3] = float("nan")
    save_key_centers(tmp_path / "nan.safetensors", bad, {})
    with pytest.raises(ValueError, match="non-finite"):
        load_key_centers(tmp_path / "nan.safetensors", 3, 2, 16)
    huge = torch.randn(3, 2, 16)
    huge[2, 1] = 1e5  # finite in fp32, but ‖k − μ‖ could not be stored as fp16
    save_key_centers(tmp_path / "huge.safetensors", huge, {})
    with pytest.raises(ValueError, match="beyond what the fp16 key norms can hold"):
        load_key_centers(tmp_path / "huge.safetensors", 3, 2, 16)


def test_mean_keys_is_the_mean_of_what_the_cache_stores():
    from sglang_tq.tools import key_centers as kc

    model = tiny_llama(2)
    chunks = [list(range(1, 13)), list(range(20, 32))]
    got = kc.mean_keys(model, chunks)
    keys = []
    for ids in chunks:
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        keys.append(torch.stack([out.past_key_values.layers[i].keys[0] for i in range(2)]))
    want = torch.cat(keys, dim=2).mean(2)  # [L, H, T, D] -> [L, H, D]
    assert got.shape == (2, 2, 16)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------- centers from a k_proj bias
def _neox_rope(head_dim: int, base: float, dtype=torch.float64):
    """Independent twin of RoPE (rotate-half layout): rotate(positions [n], k [n, H, D])."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)

    def rotate(pos, k):
        ang = pos.to(dtype)[:, None] * inv[None]  # [n, D/2]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        a, b = k[..., : head_dim // 2].to(dtype), k[..., head_dim // 2 :].to(dtype)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    return rotate


@pytest.mark.parametrize("horizon,chunk", [(1, 4096), (37, 8), (300, 4096), (1000, 97)])
def test_rope_mean_of_bias_is_the_mean_over_positions(horizon, chunk):
    from sglang_tq.format.centers import rope_mean_of_bias

    torch.manual_seed(horizon)
    bias = torch.randn(3, 16) * 10
    rotate = _neox_rope(16, 1e4)
    got = rope_mean_of_bias(bias, rotate, horizon, chunk=chunk)
    pos = torch.arange(horizon)
    want = rotate(pos, bias.double().expand(horizon, 3, 16)).mean(0)
    assert got.dtype == torch.float32 and got.shape == (3, 16)
    # float32 sums of horizon terms of size ~|b|: a few ulps of |b| per term
    torch.testing.assert_close(got.double(), want, atol=1e-4 * bias.abs().max().item(), rtol=0)


def test_rope_mean_of_bias_keeps_slow_pairs_and_cancels_fast_ones():
    from sglang_tq.format.centers import rope_mean_of_bias

    d, horizon = 16, 2048
    bias = torch.ones(1, d)
    got = rope_mean_of_bias(bias, _neox_rope(d, 1e6), horizon)[0]
    inv = 1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    # closed form of mean_p cos(p θ) for the first half of a pair (b = (1, 1)):
    # (cos - sin) averaged; the slowest pair barely turns, the fastest (θ = 1) cancels
    p = torch.arange(horizon, dtype=torch.float64)
    want = (torch.cos(p[:, None] * inv) - torch.sin(p[:, None] * inv)).mean(0)
    torch.testing.assert_close(got[: d // 2].double(), want, atol=1e-5, rtol=0)
    assert got[d // 2 - 1] > 0.95 and abs(got[0]) < 0.01
    with pytest.raises(ValueError, match="kv_heads, head_dim"):
        rope_mean_of_bias(torch.ones(16), _neox_rope(16, 1e4), 8)


def test_key_centers_tool_is_installed_and_runnable():
    """The tool the error messages name runs as an installed module, from any folder."""
    out = subprocess.run(
        [sys.executable, "-m", "sglang_tq.tools.key_centers", "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--model-path" in out.stdout and "--kv-quant-key-centers FILE" in out.stdout
