"""Teacher-forced accuracy metrics of a quantized KV cache against bf16, and their report tables.

Shared by ``python -m sglang_tq.bench fidelity`` (SGLang servers), ``fidelity-ref`` (the same
quantities in transformers) and ``plot-fidelity`` (curves over position). Every function
takes top-K lists shaped like SGLang's JSON (``[[logprob, token_id, text], ...]`` per
position) and imports nothing but numpy, so a result can be recomputed or plotted on a
machine without torch, SGLang or a GPU.

Per generated position t of one config (teacher forced: bf16 and the config see the same
prefix, the config's own greedy text), `score_config` reports top-1 agreement with the bf16
argmax, KL(bf16 || config), |dlogp| of the generated token, the bf16 NLL, the first
position where the greedy text leaves bf16's own, a curve binned by position and the
`trend` over position.

KL with top-K lists (the approximation)
---------------------------------------
SGLang returns the top-K (default 20) logprobs of each distribution, not the full
vocabulary. With P = bf16 (teacher) and Q = config under test, KL is computed over K+1
buckets: the K tokens of P's top-K, plus one "rest of the vocabulary" bucket.
  P: exact on its top-K; P(rest) = 1 - sum(top-K).
  Q: exact where the token is also in Q's top-K. A token of P's top-K that is missing
     from Q's top-K has Q(x) <= Q's K-th probability, and all missing tokens together
     share at most Q's unlisted mass; it gets min(Q's K-th prob, Q's unlisted mass / number
     missing). Q(rest) = 1 - sum over the K buckets (>= 1e-10).
Merging tokens into buckets can only lower KL, so without imputation this is a lower
bound of the true KL; imputed tokens get the largest Q they can have, which also errs
low. `kl_imputed_frac` reports how often imputation was needed. On a greedy path both
top-20 lists usually hold > 99% of the mass.
"""

from __future__ import annotations

import numpy as np


def topk_arrays(rows, k: int | None = None, pad_id: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """SGLang top-logprob rows -> (ids [n, K] int64, logprobs [n, K] float64).

    rows: one entry per position, each a list of [logprob, token_id, text] (SGLang's
    JSON), or None. Missing entries are padded with id `pad_id` and logprob -inf.
    """
    n = len(rows)
    if k is None:
        k = max((len(r) for r in rows if r), default=0)
    ids = np.full((n, k), pad_id, dtype=np.int64)
    lps = np.full((n, k), -np.inf, dtype=np.float64)
    for i, row in enumerate(rows):
        if not row:
            continue
        for j, e in enumerate(row[:k]):
            if e is None or e[0] is None:
                continue
            lps[i, j] = float(e[0])
            ids[i, j] = int(e[1])
    return ids, lps


def top1_agreement(tokens, ref_ids: np.ndarray) -> np.ndarray:
    """Bool per position: is tokens[t] the reference's argmax (first column of its top-K)?"""
    tokens = np.asarray(tokens, dtype=np.int64)
    if ref_ids.shape[0] != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} tokens but {ref_ids.shape[0]} reference rows")
    return tokens == ref_ids[:, 0]


def kl_topk(
    p_ids: np.ndarray, p_lps: np.ndarray, q_ids: np.ndarray, q_lps: np.ndarray, floor: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) per position from top-K lists, over P's top-K tokens + one rest bucket.

    Returns (kl [n], imputed [n] = number of P's top-K tokens absent from Q's top-K).
    See the module docstring for the approximation. Rows may be padded with logprob -inf.
    """
    p_ids = np.asarray(p_ids, dtype=np.int64)
    q_ids = np.asarray(q_ids, dtype=np.int64)
    p = np.exp(np.asarray(p_lps, dtype=np.float64))  # [n, K]; padding -> 0
    q = np.exp(np.asarray(q_lps, dtype=np.float64))  # [n, Kq]
    p_valid = p > 0
    q_valid = q > 0
    match = (p_ids[:, :, None] == q_ids[:, None, :]) & p_valid[:, :, None] & q_valid[:, None, :]
    found = match.any(-1)  # [n, K]
    q_at_p = (match * q[:, None, :]).sum(-1)  # exact where found
    q_rest_listed = np.clip(1.0 - q.sum(-1), 0.0, 1.0)  # Q mass beyond its top-K
    q_min = np.where(q_valid, q, np.inf).min(-1)  # Q's K-th probability
    q_min = np.where(np.isfinite(q_min), q_min, 1.0)
    missing = (p_valid & ~found).sum(-1)  # [n]
    share = q_rest_listed / np.maximum(missing, 1)
    impute = np.maximum(np.minimum(q_min, share), floor)  # [n]
    q_b = np.where(found, q_at_p, impute[:, None])
    q_b = np.where(p_valid, np.maximum(q_b, floor), 0.0)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.maximum(1.0 - q_b.sum(-1), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(
            p_valid,
            p * (np.log(np.where(p_valid, p, 1.0)) - np.log(np.where(p_valid, q_b, 1.0))),
            0.0,
        )
        rest = np.where(
            p_rest > 0, p_rest * (np.log(np.where(p_rest > 0, p_rest, 1.0)) - np.log(q_rest)), 0.0
        )
    return terms.sum(-1) + rest, missing


def bin_positions(per_prompt: list, bin_size: int) -> list[dict]:
    """Mean over prompts of a per-position quantity, in position bins [start, end).

    per_prompt: one 1-D sequence per prompt (lengths may differ); NaN entries are skipped.
    """
    if bin_size <= 0:
        raise ValueError("bin_size must be positive")
    n = max((len(a) for a in per_prompt), default=0)
    out = []
    for start in range(0, n, bin_size):
        vals = [np.asarray(a, dtype=np.float64)[start : start + bin_size] for a in per_prompt]
        vals = np.concatenate(vals) if vals else np.zeros(0)
        vals = vals[~np.isnan(vals)]
        out.append(
            {
                "start": start,
                "end": min(start + bin_size, n),
                "count": int(vals.size),
                "mean": float(vals.mean()) if vals.size else None,
            }
        )
    return out


def _ols(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, denominator) of least-squares lines from summed [n, Sx, Sy, Sxx, Sxy] rows."""
    n, sx, sy, sxx, sxy = np.moveaxis(np.asarray(stats, dtype=np.float64), -1, 0)
    den = n * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        return (n * sxy - sx * sy) / den, den


def trend(per_prompt: list, n_boot: int = 2000, seed: int = 0, per: float = 1000.0) -> dict:
    """Linear trend of a per-position quantity over the generated positions.

    per_prompt: one 1-D sequence per prompt, entry t at generated position t (lengths may
    differ; NaN entries are skipped). One ordinary least-squares line y = a + b * t / per
    is fitted to all prompts x positions together; ``slope_per_1k`` is b (the change of y
    per ``per`` = 1000 generated tokens). Its 95% interval is the 2.5 / 97.5 percentile
    of the slope refitted on ``n_boot`` bootstrap resamples of whole prompts (drawn with
    replacement, ``np.random.default_rng(seed)``): the prompts are the independent units,
    positions within a prompt are not. With one prompt there is nothing to resample and
    ``ci95`` is None (with a note); constant data give slope 0 and [0, 0].
    Also: the mean of y over the first and over the last quarter of the positions, and
    last / first (None when the first-quarter mean is 0).
    Raises ValueError for no prompts or fewer than 2 positions with data.
    """
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in per_prompt]
    if not arrays:
        raise ValueError("trend needs at least one prompt")
    n_pos = max(a.size for a in arrays)
    has = np.zeros(n_pos, dtype=bool)
    stats = np.zeros((len(arrays), 5))
    for i, a in enumerate(arrays):
        ok = ~np.isnan(a)
        has[: a.size] |= ok
        x, y = np.flatnonzero(ok) / per, a[ok]
        stats[i] = (x.size, x.sum(), y.sum(), (x * x).sum(), (x * y).sum())
    if has.sum() < 2:
        raise ValueError(
            f"trend needs at least 2 positions with data, got {int(has.sum())}: "
            "generate more tokens per prompt"
        )
    n_pos = int(np.flatnonzero(has)[-1]) + 1
    vals = np.concatenate([a[~np.isnan(a)] for a in arrays])
    q = max(1, n_pos // 4)
    first = np.concatenate([a[:q] for a in arrays])
    last = np.concatenate([a[n_pos - q : n_pos] for a in arrays])
    first_m = float(np.nanmean(first)) if np.any(~np.isnan(first)) else None
    last_m = float(np.nanmean(last)) if np.any(~np.isnan(last)) else None
    out = {
        "mean": float(vals.mean()),
        "prompts": len(arrays),
        "positions": n_pos,
        "first_quarter": first_m,
        "last_quarter": last_m,
        "ratio": last_m / first_m if first_m and last_m is not None else None,
        "quarter_len": q,
        "n_boot": n_boot,
        "seed": seed,
    }
    notes = []
    if len(arrays) == 1:
        notes.append("one prompt: no bootstrap over prompts, no interval")
    if np.ptp(vals) == 0:
        slope, intercept = 0.0, float(vals[0])
        ci = [0.0, 0.0] if len(arrays) > 1 else None
        notes.append("constant data")
    else:
        tot = stats.sum(0)
        slope = float(_ols(tot)[0])
        intercept = float((tot[2] - slope * tot[1]) / tot[0])
        ci = None
        if len(arrays) > 1:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, len(arrays), size=(n_boot, len(arrays)))
            counts = np.zeros((n_boot, len(arrays)))
            np.add.at(counts, (np.repeat(np.arange(n_boot), len(arrays)), idx.ravel()), 1.0)
            boot = counts @ stats
            b, den = _ols(boot)
            good = den > 1e-12 * boot[:, 0] * boot[:, 3]  # >= 2 distinct positions
            if not good.all():
                notes.append(f"{n_boot - int(good.sum())} resamples with one position skipped")
            if good.any():
                ci = [float(v) for v in np.percentile(b[good], [2.5, 97.5])]
    out.update({"slope_per_1k": slope, "intercept": intercept, "ci95": ci})
    if notes:
        out["note"] = "; ".join(notes)
    return out


def trends(kl_per_prompt: list, top1_per_prompt: list, **kw) -> dict:
    """`trend` of KL and of top-1 disagreement (1 - top1); {"error": ...} where one fails."""
    out = {}
    disagreement = [1.0 - np.asarray(t, dtype=np.float64) for t in top1_per_prompt]
    for key, data in (("kl", kl_per_prompt), ("disagreement", disagreement)):
        try:
            out[key] = trend(data, **kw)
        except ValueError as exc:
            out[key] = {"error": str(exc)}
    return out


def first_eos(tokens, eos_ids) -> int | None:
    """Index of the first end-of-sequence token in a generated sequence, None if there is none."""
    eos = set(int(e) for e in eos_ids)
    return next((i for i, t in enumerate(tokens) if int(t) in eos), None)


def eos_summary(tokens_per_prompt: list, eos_ids) -> tuple[list, float]:
    """(first end-of-sequence index per prompt, share of all positions after it).

    With ignore_eos the servers keep generating after the model ends its turn; the
    positions after that token are text the model would not have produced in use."""
    firsts = [first_eos(t, eos_ids) for t in tokens_per_prompt]
    past = sum(len(t) - f - 1 for t, f in zip(tokens_per_prompt, firsts) if f is not None)
    return firsts, past / max(1, sum(len(t) for t in tokens_per_prompt))


def first_divergence(a, b) -> int | None:
    """Index of the first differing token of two sequences; None if one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def summarize_divergence(firsts: list, length: int) -> dict:
    div = [f for f in firsts if f is not None]
    return {
        "identical": len(firsts) - len(div),
        "diverged": len(div),
        "median": float(np.median(div)) if div else None,
        "min": int(min(div)) if div else None,
        "max": int(max(div)) if div else None,
        "of_length": length,
    }


def score_config(gen: dict, score: dict, ref_tokens: list | None, bin_size: int) -> dict:
    """Metrics of one config from its generation (own top-K) and the bf16 scoring.

    gen:   {"tokens": [[...]], "token_lps": [[...]], "top": [[rows]]} per prompt (config)
    score: {"token_lps": [[...]], "top": [[rows]]} per prompt (bf16 teacher, same positions)
    ref_tokens: bf16's own greedy tokens per prompt (for first divergence), or None.
    """
    kl_all, top1_all, dlp_all, nll_all, imp_all, firsts = [], [], [], [], [], []
    per_prompt = []
    for i, toks in enumerate(gen["tokens"]):
        q_ids, q_lps = topk_arrays(gen["top"][i], pad_id=-2)
        p_ids, p_lps = topk_arrays(score["top"][i], pad_id=-1)
        kl, imp = kl_topk(p_ids, p_lps, q_ids, q_lps)
        t1 = top1_agreement(toks, p_ids)
        own = np.asarray(gen["token_lps"][i], dtype=np.float64)
        ref = np.asarray(score["token_lps"][i], dtype=np.float64)
        dlp = np.abs(own - ref)
        kl_all.append(kl)
        top1_all.append(t1.astype(np.float64))
        dlp_all.append(dlp)
        nll_all.append(-ref)
        imp_all.append(imp > 0)
        fd = first_divergence(toks, ref_tokens[i]) if ref_tokens is not None else None
        firsts.append(fd)
        per_prompt.append(
            {
                "first_divergence": fd,
                "top1": float(t1.mean()),
                "kl_mean": float(kl.mean()),
                "kl": [round(float(x), 6) for x in kl],
                "top1_miss": [int(j) for j in np.flatnonzero(~t1)],
            }
        )
    cat = np.concatenate
    kl_c = cat(kl_all)
    summary = {
        "positions": int(kl_c.size),
        "top1_agreement": float(cat(top1_all).mean()),
        "kl_mean": float(kl_c.mean()),
        "kl_median": float(np.median(kl_c)),
        "kl_p99": float(np.quantile(kl_c, 0.99)),
        "kl_max": float(kl_c.max()),
        "kl_imputed_frac": float(cat(imp_all).mean()),
        "abs_dlogp_mean": float(cat(dlp_all).mean()),
        "bf16_nll_mean": float(cat(nll_all).mean()),
    }
    if ref_tokens is not None:
        summary["first_divergence"] = summarize_divergence(
            firsts, max(len(t) for t in gen["tokens"])
        )
    curve = {"kl": bin_positions(kl_all, bin_size), "top1": bin_positions(top1_all, bin_size)}
    return {
        "summary": summary,
        "curve": curve,
        "trend": trends(kl_all, top1_all),
        "per_prompt": per_prompt,
    }


def compare_logprobs(tokens, sg_lps, sg_top, ref_logprobs: np.ndarray) -> dict:
    """SGLang prompt logprobs against a full reference distribution (HF), same positions.

    tokens: the sequence; sg_lps[j], sg_top[j] for j >= 1 describe tokens[j] (entry 0 None);
    ref_logprobs: [len(tokens), V] reference log-softmax at each position (row j predicts
    tokens[j + 1]).
    """
    n = len(tokens)
    tok = np.asarray(tokens[1:], dtype=np.int64)
    ref = ref_logprobs[: n - 1]
    ref_tok = ref[np.arange(n - 1), tok]
    sg = np.asarray([float(x) for x in sg_lps[1:]], dtype=np.float64)
    diff = np.abs(sg - ref_tok)
    s_ids, s_lps = topk_arrays(sg_top[1:], pad_id=-2)
    k = s_ids.shape[1]
    r_ids = np.argsort(-ref, axis=1)[:, :k]
    r_lps = np.take_along_axis(ref, r_ids, axis=1)
    kl, _ = kl_topk(r_ids, r_lps, s_ids, s_lps)
    top1 = s_ids[:, 0] == r_ids[:, 0]
    # near-ties of the reference are not disagreements worth reporting
    margin = r_lps[:, 0] - r_lps[:, 1] if k > 1 else np.full(n - 1, np.inf)
    return {
        "positions": int(n - 1),
        "max_abs_dlogp": float(diff.max()),
        "mean_abs_dlogp": float(diff.mean()),
        "p99_abs_dlogp": float(np.quantile(diff, 0.99)),
        "top1_agreement": float(top1.mean()),
        "top1_disagree_margin_gt_0.1": int((~top1 & (margin > 0.1)).sum()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def pool_logprob_checks(per: list[dict]) -> dict:
    """`compare_logprobs` of several sequences pooled: maxima over them, means weighted by
    their positions, and the per-sequence dicts."""
    pos = sum(p["positions"] for p in per)

    def mean(key: str) -> float:
        return sum(p[key] * p["positions"] for p in per) / pos

    return {
        "sequences": len(per),
        "positions": pos,
        "max_abs_dlogp": max(p["max_abs_dlogp"] for p in per),
        "mean_abs_dlogp": mean("mean_abs_dlogp"),
        "top1_agreement": mean("top1_agreement"),
        "top1_disagree_margin_gt_0.1": sum(p["top1_disagree_margin_gt_0.1"] for p in per),
        "kl_mean": mean("kl_mean"),
        "per_sequence": per,
    }


def print_rows(rows: list[tuple], indent: str = "") -> None:
    """Print ``rows`` (the first is the header) as left-aligned columns two spaces apart,
    with a rule of dashes under the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print(indent + "  ".join("-" * w for w in widths))


def print_table(results: dict) -> None:
    rows = [("config", "top-1", "KL mean", "KL p99", "|dlogp|", "imputed", "greedy text vs bf16")]
    errors = []
    for name, r in results.items():
        if "summary" not in r:
            rows.append((name, "ERROR", "", "", "", "", ""))
            lines = [x for x in r.get("error", "?").splitlines() if x.strip()] or ["?"]
            errors.append(
                f"  {name}: {lines[0][:200]}"
                + (f" ... {lines[-1][:200]}" if len(lines) > 1 else "")
            )
            continue
        s = r["summary"]
        fd = s.get("first_divergence") or {}
        if not fd:
            fdt = "-"
        elif not fd["diverged"]:
            fdt = f"identical in all {fd['identical']}"
        else:
            fdt = (
                f"{fd['identical']} identical; {fd['diverged']} diverge at "
                f"{fd['min']}..{fd['max']} (median {fd['median']:.0f})"
            )
        rows.append(
            (
                name,
                f"{100 * s['top1_agreement']:.2f}%",
                f"{s['kl_mean']:.5f}",
                f"{s['kl_p99']:.4f}",
                f"{s['abs_dlogp_mean']:.4f}",
                f"{100 * s['kl_imputed_frac']:.1f}%",
                fdt,
            )
        )
    print_rows(rows)
    if errors:
        print("errors:")
        print("\n".join(errors))


def print_curves(results: dict) -> None:
    """Mean KL and top-1 agreement per position bin, then the trend table (`print_trends`)."""
    names = [n for n, r in results.items() if "curve" in r]
    if not names:
        return
    bins = max((results[n]["curve"]["kl"] for n in names), key=len)
    for key, title, fmt in (("kl", "mean KL", "{:9.5f}"), ("top1", "top-1 agreement", "{:9.2%}")):
        print(f"\n{title} by position (teacher forced):")
        print("  pos         " + "  ".join(f"{n:>9s}" for n in names))
        for b in range(len(bins)):
            vals = []
            for n in names:
                c = results[n]["curve"][key]
                vals.append(
                    fmt.format(c[b]["mean"]) if b < len(c) and c[b]["mean"] is not None else " " * 9
                )
            print(f"  {bins[b]['start']:5d}-{bins[b]['end']:<5d} " + "  ".join(vals))
    print_trends(results)


def _fmt_trend(t: dict | None) -> tuple[str, str, str, str]:
    if not t:
        return ("-", "", "", "")
    if "error" in t:
        return (f"({t['error'][:60]})", "", "", "")
    ci = t.get("ci95")
    slope = f"{t['slope_per_1k']:+.2e}" + (f" [{ci[0]:+.2e}, {ci[1]:+.2e}]" if ci else " [no CI]")
    ratio = f"{t['ratio']:.2f}" if t.get("ratio") is not None else "-"

    def num(v):
        return f"{v:.5f}" if v is not None else "-"

    return (slope, num(t.get("first_quarter")), num(t.get("last_quarter")), ratio)


def print_trends(results: dict) -> None:
    """Per config: OLS slope per 1000 generated tokens with its bootstrap 95% CI, the first-
    and last-quarter means and their ratio, for KL and for top-1 disagreement."""
    names = [n for n, r in results.items() if r.get("trend")]
    if not names:
        return
    rows = [
        (
            "config",
            "KL slope/1k tok [95% CI]",
            "KL q1",
            "KL q4",
            "q4/q1",
            "disagree slope/1k [95% CI]",
            "dis q1",
            "dis q4",
            "q4/q1",
            "past EOS",
        )
    ]
    for n in names:
        t = results[n]["trend"]
        eos = results[n].get("summary", {}).get("past_eos_frac")
        rows.append(
            (
                n,
                *_fmt_trend(t.get("kl")),
                *_fmt_trend(t.get("disagreement")),
                f"{eos:.0%}" if eos is not None else "-",
            )
        )
    any_t = next(iter(results[names[0]]["trend"].values()))
    print(
        f"\ntrend over generated positions (least squares over prompts x positions; 95% CI: "
        f"{any_t.get('n_boot', '?')} bootstrap resamples of prompts; q1 / q4: first / last "
        f"quarter of the positions):"
    )
    print_rows(rows, indent="  ")
    notes = {
        f"{n} {k}: {v['note']}"
        for n in names
        for k, v in results[n]["trend"].items()
        if isinstance(v, dict) and v.get("note")
    }
    for line in sorted(notes):
        print(f"  note: {line}")
