"""Accuracy intervals and paired comparisons of two configs on the same items.

* :func:`wilson` -- the 95% Wilson score interval of k correct out of n. Unlike the
  normal (Wald) interval it stays inside [0, 1] and keeps its coverage near 0 and 1
  and at small n.
* :func:`paired` -- a config against the baseline on the items both answered:
  the accuracy difference (config - baseline), its 95% interval from the normal
  approximation of the per-item differences d_i in {-1, 0, 1} (mean of d; standard error
  sqrt(var(d) / n) with the population variance, i.e. sqrt(b + c - (b - c)^2 / n) / n),
  the discordant counts b (config right, baseline wrong) and c (config wrong, baseline
  right), and the exact two-sided McNemar p-value (a binomial test of b against
  b + c trials with p = 1/2). Pairing removes the item-difficulty variance that two
  independent intervals would both carry, so it resolves much smaller differences.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    if n <= 0:
        return None
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return [max(0.0, center - half), min(1.0, center + half)]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired(config: dict[str, int], baseline: dict[str, int], z: float = Z95) -> dict:
    """Paired comparison of per-item outcomes (item id -> 0/1) on the ids both have."""
    ids = [i for i in config if i in baseline]
    n = len(ids)
    b = sum(1 for i in ids if config[i] and not baseline[i])
    c = sum(1 for i in ids if baseline[i] and not config[i])
    out = {
        "n": n,
        "config_only_correct": b,
        "baseline_only_correct": c,
        "both_correct": sum(1 for i in ids if config[i] and baseline[i]),
        "config_accuracy": None,
        "baseline_accuracy": None,
        "diff": None,
        "ci95": None,
        "mcnemar_p": mcnemar_exact(b, c),
    }
    if n:
        diff = (b - c) / n
        se = math.sqrt(max(0.0, (b + c) - (b - c) ** 2 / n)) / n
        out.update(
            config_accuracy=sum(config[i] for i in ids) / n,
            baseline_accuracy=sum(baseline[i] for i in ids) / n,
            diff=diff,
            ci95=[diff - z * se, diff + z * se],
        )
    return out
