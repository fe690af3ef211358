"""Key-centers file: save/load round trip, and one clear error per bad file."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sglang_tq.centers import load_key_centers, save_key_centers


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


def test_mean_keys_is_the_mean_of_what_the_cache_stores():
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(__file__).resolve().parents[1] / "scripts" / "key_centers.py"
    spec = importlib.util.spec_from_file_location("key_centers_under_test", path)
    kc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kc)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    chunks = [list(range(1, 13)), list(range(20, 32))]
    got = kc.mean_keys(model, chunks)
    keys = []
    for ids in chunks:
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        keys.append(torch.stack([out.past_key_values.layers[i].keys[0] for i in range(2)]))
    want = torch.cat(keys, dim=2).mean(2)  # [L, H, T, D] -> [L, H, D]
    assert got.shape == (2, 2, 16)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
