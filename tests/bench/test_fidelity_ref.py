"""CPU tests of ``python -m sglang_tq.bench fidelity-ref``: the round-tripping KV cache
(sglang_tq.bench.hf_reference) and the batched greedy decode, on a tiny random Llama (no
weights, no network)."""

import pytest
import torch

import sglang_tq.bench.fidelity_ref as fr
import sglang_tq.bench.hf_reference as hf
from sglang_tq.config import TQConfig
from sglang_tq.format.quantizer import TurboQuantizer
from tests.conftest import tiny_llama


def test_parse_configs_puts_bf16_first_and_refuses_unknown_names():
    assert hf.parse_configs("k4v4, fp8,k4v4,bf16,k8v4") == ["bf16", "k4v4", "fp8", "k8v4"]
    assert hf.parse_config("k4v4-prod") == (4, 4, "prod", False)
    assert hf.parse_config("fp8") == (8, 8, "mse", False)
    assert hf.parse_config("k16v2") == (16, 2, "mse", False)
    assert hf.parse_config("k3v2-c") == (3, 2, "mse", True)
    for bad in ("int8", "k5v4", "k4", "k8v4-prod", "k4v32", "k16v4-c", "k4v4-c-prod"):
        with pytest.raises(ValueError, match="use fp8 or kKvV"):
            hf.parse_configs(bad)


@pytest.mark.parametrize("bits", ["k4v4", "k3v2", "k2v4"])
def test_round_trip_is_the_pool_quantizer_of_the_layer(bits):
    d, layer = 64, 5
    k_bits, v_bits = TQConfig.parse_bits(bits)
    seed = TQConfig(head_dim=d, k_bits=k_bits, v_bits=v_bits, seed=3).layer_seed(layer)
    k_fn, v_fn = hf.round_trip_fns(bits, layer, d, seed=3)
    x = torch.randn(2, 3, 7, d, dtype=torch.bfloat16)
    for fn, b in ((k_fn, k_bits), (v_fn, v_bits)):
        q = TurboQuantizer(d, b, seed=seed)
        want = q.dequantize(*q.quantize(x.float())).to(torch.bfloat16)
        got = fn(x)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert torch.equal(got, want)
    # a different layer draws a different rotation, so a different reconstruction
    assert not torch.equal(hf.round_trip_fns(bits, layer + 1, d, seed=3)[0](x), k_fn(x))


def test_round_trip_mixed_sides_and_prod_keys():
    d, layer = 64, 2
    x = torch.randn(1, 2, 5, d, dtype=torch.bfloat16)
    seed = TQConfig(head_dim=d).layer_seed(layer)
    k_fn, v_fn = hf.round_trip_fns("k8v4", layer, d)
    assert torch.equal(k_fn(x), x.to(torch.float8_e4m3fn).to(torch.bfloat16))
    q = TurboQuantizer(d, 4, seed=seed)
    assert torch.equal(v_fn(x), q.dequantize(*q.quantize(x.float())).to(torch.bfloat16))
    k_fn, v_fn = hf.round_trip_fns("k16v3", layer, d)
    assert torch.equal(k_fn(x), x) and not torch.equal(v_fn(x), x)
    k_fn, _ = hf.round_trip_fns("k4v4-prod", layer, d)
    qp = TurboQuantizer(d, 4, seed=seed, variant="prod")
    assert torch.equal(k_fn(x), qp.dequantize(*qp.quantize(x.float())).to(torch.bfloat16))


def test_centered_keys_round_trip_k_minus_mu_and_add_it_back():
    d, layer = 64, 3
    x = torch.randn(2, 2, 5, d) * 4 + 10  # a large common component
    mu = x.mean(dim=(0, 2))  # [H, D]
    k_c, v_c = hf.round_trip_fns("k4v4-c", layer, d, center=mu)
    k_p, v_p = hf.round_trip_fns("k4v4", layer, d)
    assert torch.allclose(k_c(x) - mu[None, :, None, :], k_p(x - mu[None, :, None, :]), atol=1e-5)
    assert torch.equal(v_c(x), v_p(x))  # values are never centered
    # removing the common component is the point: the key error shrinks
    assert (k_c(x) - x).norm() < 0.5 * (k_p(x) - x).norm()
    with pytest.raises(ValueError, match="give --key-centers"):
        hf.round_trip_fns("k4v4-c", layer, d)


def test_round_trip_fp8_and_bf16():
    x = torch.randn(1, 2, 5, 64, dtype=torch.bfloat16) * 3
    k_fn, v_fn = hf.round_trip_fns("fp8", 0, 64)
    assert torch.equal(k_fn(x), x.to(torch.float8_e4m3fn).to(torch.bfloat16))
    assert not torch.equal(k_fn(x), x)
    k_fn, v_fn = hf.round_trip_fns("bf16", 0, 64)
    assert torch.equal(k_fn(x), x) and torch.equal(v_fn(x), x)


def test_cache_extend_sees_own_tokens_unquantized_decode_reads_the_stored_ones():
    d = 64
    cache = hf.make_cache("k3v3", 2, d)
    k_fn, v_fn = hf.round_trip_fns("k3v3", 1, d)
    k1, v1 = torch.randn(1, 2, 6, d), torch.randn(1, 2, 6, d)
    k_att, v_att = cache.layers[1].update(k1, v1)
    assert torch.equal(k_att, k1) and torch.equal(v_att, v1)
    k2, v2 = torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d)
    k_att, v_att = cache.layers[1].update(k2, v2)
    assert torch.equal(k_att, torch.cat([k_fn(k1), k_fn(k2)], dim=-2))
    assert torch.equal(v_att, torch.cat([v_fn(v1), v_fn(v2)], dim=-2))
    # a second extend (chunked prefill): stored prefix + own tokens unquantized
    k3, v3 = torch.randn(1, 2, 3, d), torch.randn(1, 2, 3, d)
    k_att, _ = cache.layers[1].update(k3, v3)
    assert torch.equal(k_att[..., :7, :], torch.cat([k_fn(k1), k_fn(k2)], dim=-2))
    assert torch.equal(k_att[..., 7:, :], k3)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(2, vocab_size=96, intermediate_size=128, max_position_embeddings=128)


def test_batched_left_padded_decode_matches_one_prompt_at_a_time(tiny_model):
    prompts = [[5, 9, 11, 3, 7, 2, 8], [4, 1], [6, 6, 2, 9]]
    batched = fr.generate(tiny_model, "bf16", prompts, 6, 5, 16)
    for i, p in enumerate(prompts):
        alone = fr.generate(tiny_model, "bf16", [p], 6, 5, 16)
        assert batched["tokens"][i] == alone["tokens"][0]
        # fp32 model: padding changes only the summation order
        torch.testing.assert_close(
            torch.tensor(batched["token_lps"][i]),
            torch.tensor(alone["token_lps"][0]),
            atol=1e-4,
            rtol=0,
        )
        assert len(batched["top"][i]) == 6 and len(batched["top"][i][0]) == 5


def test_teacher_forced_score_reproduces_the_plain_decode(tiny_model):
    prompts = [[5, 9, 11, 3], [7, 2]]
    gen = fr.generate(tiny_model, "bf16", prompts, 5, 4, 16)
    for p, toks, lps in zip(prompts, gen["tokens"], gen["token_lps"]):
        s = fr.score(tiny_model, p, toks, 4)
        torch.testing.assert_close(
            torch.tensor(s["token_lps"]), torch.tensor(lps), atol=1e-4, rtol=0
        )
        assert [row[0][1] for row in s["top"]] == toks  # greedy: the token is the argmax


def test_quantized_cache_changes_the_distribution(tiny_model):
    prompts = [[5, 9, 11, 3, 7, 2, 8, 1, 4]]
    plain = fr.generate(tiny_model, "bf16", prompts, 4, 4, 16)
    quant = fr.generate(tiny_model, "k2v2", prompts, 4, 4, 16)
    assert plain["token_lps"] != quant["token_lps"]


def test_verdict():
    res = {
        n: {"summary": {"top1_agreement": a}}
        for n, a in (("bf16", 1.0), ("fp8", 0.98), ("k4v4", 0.965))
    }
    v = fr.verdict(res)
    assert v["met"] and v["k4v4_over_fp8"] == pytest.approx(1.75)
    res["k4v4"]["summary"]["top1_agreement"] = 0.95
    assert not fr.verdict(res)["met"]
    assert fr.verdict({"bf16": res["bf16"]}) is None
