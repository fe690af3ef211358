"""CPU tests of ``python -m sglang_tq.bench attn-error`` on a tiny random Llama (no weights, no
network)."""

import torch

import sglang_tq.bench.attn_error as ae
from sglang_tq.bench.hf_reference import make_cache
from tests.conftest import tiny_llama


def _qk(t=40, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, hq, t, d, generator=g), torch.randn(1, hkv, t, d, generator=g) * 3


def test_attention_kl_is_zero_for_exact_keys_and_for_a_shared_shift():
    q, k = _qk()
    assert torch.allclose(ae.attention_kl(q, k, k), torch.zeros(2), atol=1e-6)
    # one vector per head subtracted from every key shifts each row: softmax unchanged
    mu = torch.randn(1, 2, 1, 16) * 5
    assert torch.allclose(ae.attention_kl(q, k, k - mu), torch.zeros(2), atol=1e-5)


def test_attention_kl_grows_with_key_noise_and_is_per_kv_head():
    q, k = _qk()
    noise = torch.randn_like(k)
    small = ae.attention_kl(q, k, k + 0.05 * noise)
    large = ae.attention_kl(q, k, k + 0.5 * noise)
    assert (small > 0).all() and (large > 4 * small).all()
    only_head1 = k.clone()
    only_head1[:, 1] += 0.5 * noise[:, 1]
    kl = ae.attention_kl(q, k, only_head1)
    assert kl[0] < 1e-6 < kl[1]


def test_capture_qk_returns_post_rope_queries_and_keys_per_layer():
    model = tiny_llama(3)
    ids = list(range(1, 21))
    layers = ae.capture_qk(model, ids)
    assert len(layers) == 3
    q, k = layers[0]
    assert q.shape == (1, 4, 20, 16) and k.shape == (1, 2, 20, 16)
    # the keys are what the KV cache stores (post-RoPE)
    cache = make_cache("bf16", 3, 16)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    assert torch.allclose(cache.layers[2].keys, layers[2][1], atol=1e-6)
