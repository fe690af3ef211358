"""CPU tests of the pure metrics (sglang_tq.bench.fidelity_metrics) and the reply parsing and
config names (sglang_tq.bench.generation) of ``python -m sglang_tq.bench fidelity``.

No server, no model: synthetic top-K lists shaped like SGLang 0.5.17's JSON replies.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import sglang_tq.bench.fidelity as fid
import sglang_tq.bench.fidelity_metrics as fm
import sglang_tq.bench.generation as generation
from tests.conftest import ROOT


def _rows(dists, k):
    """Full distributions [n, V] -> SGLang-style top-k rows [[logprob, id, None], ...]."""
    rows = []
    for p in dists:
        lp = np.log(p)
        idx = np.argsort(-lp, kind="stable")[:k]
        rows.append([[float(lp[i]), int(i), None] for i in idx])
    return rows


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# what importing each module adds to what ``import sglang_tq`` (torch, via the quantizer)
# already brought: SGLang, transformers and torch are imported only inside functions
_IMPORTS = """
import json, sys
import sglang_tq
before = set(sys.modules)
import {module}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.parametrize(
    "module",
    ["sglang_tq.bench.fidelity_metrics", "sglang_tq.bench.fidelity", "sglang_tq.bench.radix"],
)
def test_module_imports_nothing_heavy(module):
    r = subprocess.run(
        [sys.executable, "-c", _IMPORTS.format(module=module)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    new = json.loads(r.stdout.strip().splitlines()[-1])
    heavy = [m for m in new if m.split(".")[0] in ("sglang", "torch", "transformers")]
    assert heavy == []
    assert [
        m for m in new if m.startswith("sglang_tq.") and not m.startswith("sglang_tq.bench")
    ] == []
    if module.endswith("fidelity_metrics"):
        assert [m for m in new if m.startswith("sglang_tq")] == ["sglang_tq.bench", module]


def test_topk_arrays_pads_and_skips_none():
    rows = [[[-0.1, 5, None], [-2.5, 7, None]], None, [[-0.3, 1, "a"]]]
    ids, lps = fm.topk_arrays(rows, pad_id=-1)
    assert ids.shape == (3, 2)
    assert ids.tolist() == [[5, 7], [-1, -1], [1, -1]]
    assert lps[0].tolist() == [-0.1, -2.5]
    assert np.isneginf(lps[1]).all() and np.isneginf(lps[2, 1])


def test_top1_agreement():
    ref_ids = np.array([[3, 1], [2, 3], [9, 0]])
    assert fm.top1_agreement([3, 3, 9], ref_ids).tolist() == [True, False, True]
    with pytest.raises(ValueError):
        fm.top1_agreement([3, 3], ref_ids)


def test_kl_identical_is_zero():
    rng = np.random.default_rng(0)
    p = _softmax(rng.normal(size=(6, 50)) * 3)
    ids, lps = fm.topk_arrays(_rows(p, 10))
    kl, imp = fm.kl_topk(ids, lps, ids, lps)
    assert np.allclose(kl, 0.0, atol=1e-12)
    assert (imp == 0).all()


def test_kl_full_vocab_is_exact():
    """K = vocabulary: the bucketed KL is the exact KL."""
    rng = np.random.default_rng(1)
    p = _softmax(rng.normal(size=(5, 12)) * 2)
    q = _softmax(np.log(p) + rng.normal(size=(5, 12)) * 0.3)
    pi, pl = fm.topk_arrays(_rows(p, 12))
    qi, ql = fm.topk_arrays(_rows(q, 12), pad_id=-2)
    kl, imp = fm.kl_topk(pi, pl, qi, ql)
    exact = (p * (np.log(p) - np.log(q))).sum(-1)
    assert np.allclose(kl, exact, rtol=1e-9, atol=1e-12)
    assert (imp == 0).all()


def test_kl_topk_is_close_to_and_below_exact_for_peaked_distributions():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(200, 1000)) * 4
    p = _softmax(logits)
    q = _softmax(logits + rng.normal(size=logits.shape) * 0.2)
    pi, pl = fm.topk_arrays(_rows(p, 20))
    qi, ql = fm.topk_arrays(_rows(q, 20), pad_id=-2)
    kl, _ = fm.kl_topk(pi, pl, qi, ql)
    exact = (p * (np.log(p) - np.log(q))).sum(-1)
    assert kl.mean() <= exact.mean() * 1.02
    assert kl.mean() >= exact.mean() * 0.5
    assert (kl > -1e-9).all()


def test_kl_imputation_when_token_missing_from_q():
    # P: token 0 (0.6), token 1 (0.3), rest 0.1.  Q lists tokens 0 (0.5), 2 (0.3); token 1 missing.
    p_ids = np.array([[0, 1]])
    p_lps = np.log(np.array([[0.6, 0.3]]))
    q_ids = np.array([[0, 2]])
    q_lps = np.log(np.array([[0.5, 0.3]]))
    kl, imp = fm.kl_topk(p_ids, p_lps, q_ids, q_lps)
    # token 1 imputed with min(Q's K-th prob 0.3, unlisted mass 0.2 / 1 missing) = 0.2
    q1 = 0.2
    q_rest = 1 - 0.5 - q1
    want = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / q1) + 0.1 * math.log(0.1 / q_rest)
    assert imp.tolist() == [1]
    assert kl[0] == pytest.approx(want, rel=1e-9)


def test_kl_disjoint_top1_is_large():
    p_ids, p_lps = np.array([[1, 2]]), np.log(np.array([[0.98, 0.01]]))
    q_ids, q_lps = np.array([[3, 4]]), np.log(np.array([[0.98, 0.01]]))
    kl, imp = fm.kl_topk(p_ids, p_lps, q_ids, q_lps)
    assert imp.tolist() == [2]
    assert kl[0] > 3.0


def test_bin_positions():
    a = np.arange(10, dtype=float)  # 0..9
    b = np.full(7, 100.0)
    b[3] = np.nan  # skipped
    bins = fm.bin_positions([a, b], 4)
    assert [(x["start"], x["end"], x["count"]) for x in bins] == [(0, 4, 7), (4, 8, 7), (8, 10, 2)]
    assert bins[0]["mean"] == pytest.approx((0 + 1 + 2 + 3 + 300) / 7)
    assert bins[1]["mean"] == pytest.approx((4 + 5 + 6 + 7 + 300) / 7)
    assert bins[2]["mean"] == pytest.approx(8.5)
    with pytest.raises(ValueError):
        fm.bin_positions([a], 0)


def test_first_divergence():
    assert fm.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert fm.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert fm.first_divergence([7], [8]) == 0
    assert fm.first_divergence([1, 2], [1, 2, 3]) is None
    s = fm.summarize_divergence([None, 4, 10, None, 7], 16)
    assert (s["identical"], s["diverged"], s["min"], s["max"], s["median"]) == (2, 3, 4, 10, 7.0)


def _sglang_gen_reply(tokens, lps, top):
    return {
        "output_ids": list(tokens),
        "meta_info": {
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, tokens)],
            "output_top_logprobs": top,
            "finish_reason": {"type": "length"},
        },
    }


def _sglang_score_reply(seq, start, dists, k):
    """What SGLang returns for input logprobs from `start`: entry j is seq[start + j],
    predicted from position start + j - 1; entry 0 has no logprob."""
    itl = [[None, seq[start], None]]
    itop = [None]
    for j in range(start + 1, len(seq)):
        p = dists[j - 1]
        itl.append([float(np.log(p[seq[j]])), seq[j], None])
        itop.append(_rows([p], k)[0])
    return {"meta_info": {"input_token_logprobs": itl, "input_top_logprobs": itop}}


def test_parse_generation_and_scoring_roundtrip():
    rng = np.random.default_rng(3)
    vocab, k, prompt_len, n = 30, 5, 6, 8
    dists = _softmax(rng.normal(size=(prompt_len + n, vocab)) * 3)
    prompt = list(rng.integers(0, vocab, prompt_len))
    gen = [int(np.argmax(dists[prompt_len - 1 + i])) for i in range(n)]  # greedy under P
    seq = prompt + gen
    g_top = _rows(dists[prompt_len - 1 : prompt_len - 1 + n], k)
    g_lps = [float(np.log(dists[prompt_len - 1 + i][t])) for i, t in enumerate(gen)]
    g = generation.parse_generation(_sglang_gen_reply(gen, g_lps, g_top), n)
    assert g["tokens"] == gen
    s = generation.parse_scoring(
        _sglang_score_reply(seq, prompt_len - 1, dists, k), prompt_len, gen
    )
    assert np.allclose(s["token_lps"], g_lps)
    m = fm.score_config(
        {"tokens": [gen], "token_lps": [g_lps], "top": [g_top]},
        {"token_lps": [s["token_lps"]], "top": [s["top"]]},
        [gen],
        bin_size=4,
    )
    assert m["summary"]["top1_agreement"] == 1.0
    assert m["summary"]["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["summary"]["first_divergence"]["identical"] == 1
    assert [b["count"] for b in m["curve"]["kl"]] == [4, 4]


def test_parse_scoring_rejects_off_by_one():
    rng = np.random.default_rng(4)
    vocab, k, prompt_len, n = 30, 5, 6, 8
    dists = _softmax(rng.normal(size=(prompt_len + n, vocab)) * 3)
    prompt = list(rng.integers(0, vocab, prompt_len))
    gen = list(rng.integers(0, vocab, n))
    seq = prompt + gen
    with pytest.raises(RuntimeError):  # scored from prompt_len instead of prompt_len - 1
        generation.parse_scoring(_sglang_score_reply(seq, prompt_len, dists, k), prompt_len, gen)
    reply = _sglang_score_reply(seq, prompt_len - 1, dists, vocab)  # top-K = whole vocabulary
    generation.parse_scoring(reply, prompt_len, gen)  # aligned: accepted
    top = reply["meta_info"]["input_top_logprobs"]
    reply["meta_info"]["input_top_logprobs"] = [None] + top[2:] + [top[-1]]  # rows shifted by one
    with pytest.raises(RuntimeError, match="misaligned"):
        generation.parse_scoring(reply, prompt_len, gen)


def test_parse_generation_length_check():
    with pytest.raises(RuntimeError):
        generation.parse_generation(
            _sglang_gen_reply([1, 2], [-0.1, -0.2], [[[-0.1, 1, None]], [[-0.2, 2, None]]]), 3
        )


def test_score_config_counts_disagreement():
    # two positions; the config's token is P's argmax at position 0, not at position 1
    p_top = [[[-0.1, 4, None], [-2.5, 9, None]], [[-0.2, 6, None], [-1.8, 8, None]]]
    q_top = [[[-0.1, 4, None], [-2.5, 9, None]], [[-0.3, 8, None], [-1.5, 6, None]]]
    gen = {"tokens": [[4, 8]], "token_lps": [[-0.1, -0.3]], "top": [q_top]}
    sc = {"token_lps": [[-0.1, -1.8]], "top": [p_top]}
    m = fm.score_config(gen, sc, [[4, 6]], bin_size=1)
    assert m["summary"]["top1_agreement"] == 0.5
    assert m["per_prompt"][0]["top1_miss"] == [1]
    assert m["summary"]["first_divergence"]["min"] == 1
    assert m["summary"]["abs_dlogp_mean"] == pytest.approx(0.75)
    assert m["per_prompt"][0]["kl"][0] == pytest.approx(0.0, abs=1e-12)
    assert m["per_prompt"][0]["kl"][1] > 0.1


def test_compare_logprobs_against_full_reference():
    rng = np.random.default_rng(5)
    n, vocab, k = 9, 40, 8
    ref = np.log(_softmax(rng.normal(size=(n, vocab)) * 3))
    seq = [int(x) for x in rng.integers(0, vocab, n)]
    sg_lps = [None] + [float(ref[j - 1][seq[j]]) for j in range(1, n)]
    sg_top = [None] + _rows(np.exp(ref[: n - 1]), k)
    r = fm.compare_logprobs(seq, sg_lps, sg_top, ref)
    assert r["positions"] == n - 1
    assert r["max_abs_dlogp"] < 1e-9
    assert r["top1_agreement"] == 1.0
    assert r["kl_mean"] == pytest.approx(0.0, abs=1e-9)


def test_config_flags():
    # the labels of sglang_tq.bench.configs: bf16 / fp8 name no backend (SGLang's default)
    assert generation.config_flags("bf16") == []
    assert generation.config_flags("fp8") == ["--kv-cache-dtype", "fp8_e4m3"]
    assert generation.config_flags("bf16-triton") == ["--attention-backend", "triton"]
    assert generation.config_flags(fid.DEFAULT_TEACHER) == ["--attention-backend", "triton"]
    assert generation.config_flags("k3v3") == [
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "k3v3",
    ]
    assert generation.config_flags("k4v4-pp")[-1] == "--kv-quant-packed-prefill"
    assert generation.config_flags("x", {"x": ["--a"]}) == ["--a"]
    with pytest.raises(ValueError):
        generation.config_flags("int4")


def test_centered_configs_add_the_centers_flag():
    custom = {}
    generation.add_centered_configs(
        ["fp8", "k4v4-c", "k4v4-pp-c"], custom, "/m/centers.safetensors", error=pytest.fail
    )
    assert custom["k4v4-c"] == [
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "k4v4",
        "--kv-quant-key-centers",
        "/m/centers.safetensors",
    ]
    assert custom["k4v4-pp-c"][-3:] == [
        "--kv-quant-packed-prefill",
        "--kv-quant-key-centers",
        "/m/centers.safetensors",
    ]
    assert "fp8" not in custom

    def error(msg):
        raise SystemExit(msg)

    with pytest.raises(SystemExit, match="needs --key-centers"):
        generation.add_centered_configs(["k4v4-c"], {}, None, error)
