"""Plot fidelity results: KL and top-1 agreement against bf16 by generated position.

    python -m sglang_tq.bench plot-fidelity \\
        benchmarks/results/fidelity/fidelity_qwen_a_h200_a0d9ac7.json --out fidelity_qwen_a.png
    python -m sglang_tq.bench plot-fidelity a.json b.json --configs fp8,k4v4,k4v4-nc --bin-size 128

Issue 14 asks whether the KV cache's error accumulates over a long generation; a mean
over all positions cannot show that, a curve over position can. One PNG, two panels: the
mean teacher-forced KL(bf16 || config) per bucket of generated positions (log scale
unless --linear) and the top-1 agreement with bf16 per bucket, one line per config, with
a band of ± one standard error of the bucket mean over prompts (each prompt's mean in
the bucket is one sample: the prompts are the independent units, as in fidelity's
bootstrap). The legend gives each config's KL slope per 1000 tokens with its 95%
interval (the JSON's ``trend``, or ``fidelity_metrics.trend`` on the per-prompt KL for
files that predate it). The title names model, commit, GPU and the number of prompts x tokens.

The buckets are recomputed from each config's ``per_prompt`` lists (``kl`` per position,
``top1_miss`` indices), so any --bin-size works on any fidelity JSON. Several files may
be given (e.g. runs split over two GPUs); a config name that occurs in more than one gets
its file name appended, unless its per-position KL is the same (the teacher row of runs
that share it), which is drawn once.

matplotlib is an optional dependency (``pip install -e ".[plots]"``), imported only by
`plot`; the GPU host, which has none, writes the JSON and the plot is drawn here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sglang_tq.bench.cli import doc_parser
from sglang_tq.bench.fidelity_metrics import trend

MISSING_MATPLOTLIB = (
    'matplotlib is not installed: run pip install -e ".[plots]" in the '
    "repository root to draw the plot."
)


def per_position(entry: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A fidelity config entry -> (KL per position, top-1 agreement per position), per prompt."""
    kl, top1 = [], []
    for p in entry["per_prompt"]:
        k = np.asarray(p["kl"], dtype=np.float64)
        t = np.ones(k.size)
        t[np.asarray(p.get("top1_miss", []), dtype=np.int64)] = 0.0
        kl.append(k)
        top1.append(t)
    return kl, top1


def bucket_stats(per_prompt: list, bin_size: int) -> dict:
    """Per bucket of positions [start, end): mean over prompts of each prompt's bucket mean,
    and its standard error (std over prompts / sqrt(prompts); 0 with one prompt)."""
    if bin_size <= 0:
        raise ValueError("bin_size must be positive")
    n = max((len(a) for a in per_prompt), default=0)
    centers, means, sems = [], [], []
    for start in range(0, n, bin_size):
        m = [
            np.nanmean(a[start : start + bin_size])
            for a in per_prompt
            if np.any(~np.isnan(a[start : start + bin_size]))
        ]
        if not m:
            continue
        m = np.asarray(m)
        centers.append((start + min(start + bin_size, n) - 1) / 2)
        means.append(float(m.mean()))
        sems.append(float(m.std(ddof=1) / np.sqrt(m.size)) if m.size > 1 else 0.0)
    return {"center": np.asarray(centers), "mean": np.asarray(means), "sem": np.asarray(sems)}


def load_series(
    paths: list[str], configs: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Read fidelity JSON files -> (series, one per config with per-prompt data; documents)."""
    docs, series = [], []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        if "configs" not in doc:
            raise SystemExit(
                f"{path} has no 'configs': give a JSON file written by python -m sglang_tq.bench "
                "fidelity"
            )
        docs.append({**doc, "_path": str(path)})
    distinct: dict[str, list] = {}
    for doc in docs:
        for name, entry in doc["configs"].items():
            kl = [p["kl"] for p in entry.get("per_prompt") or []]
            if kl and kl not in distinct.setdefault(name, []):
                distinct[name].append(kl)
    drawn: dict[str, list] = {}
    for doc in docs:
        for name, entry in doc["configs"].items():
            if configs is not None and name not in configs:
                continue
            if not entry.get("per_prompt"):
                continue
            raw = [p["kl"] for p in entry["per_prompt"]]
            if raw in drawn.setdefault(name, []):
                continue
            drawn[name].append(raw)
            kl, top1 = per_position(entry)
            tr = (entry.get("trend") or {}).get("kl")
            if not tr or "slope_per_1k" not in tr:
                try:
                    tr = trend(kl)
                except ValueError:
                    tr = None
            label = name if len(distinct[name]) == 1 else f"{name} ({Path(doc['_path']).stem})"
            series.append({"name": name, "label": label, "kl": kl, "top1": top1, "trend": tr})
    if configs is not None:
        order = {c: i for i, c in enumerate(configs)}
        series.sort(key=lambda s: order[s["name"]])
    if not series:
        raise SystemExit(
            "no config with per-position data in the given files: check --configs "
            "against the names in the JSON"
        )
    return series, docs


def title_of(docs: list[dict], series: list[dict]) -> str:
    def uniq(key):
        vals = []
        for d in docs:
            v = d.get(key)
            if v is not None and str(v) not in vals:
                vals.append(str(v))
        return ", ".join(vals) or "?"

    models = ", ".join(dict.fromkeys(Path(d.get("model_path", "?")).name for d in docs))
    prompts = max(len(s["kl"]) for s in series)
    tokens = max(len(a) for s in series for a in s["kl"])
    teacher = uniq("teacher")
    return (
        f"{models}: KV cache vs bf16 teacher ({teacher if teacher != '?' else 'bf16'}), "
        f"teacher forced\ncommit {uniq('commit')}, {uniq('gpu')}, {prompts} prompts x "
        f"{tokens} generated tokens"
    )


def legend_label(s: dict) -> str:
    t = s["trend"]
    if not t:
        return s["label"]
    ci = t.get("ci95")
    ci_txt = f" [{ci[0]:+.1e}, {ci[1]:+.1e}]" if ci else ""
    return f"{s['label']}: KL slope {t['slope_per_1k']:+.1e}{ci_txt} /1k tok"


def plot(series: list[dict], title: str, out: str, bin_size: int, linear: bool = False) -> str:
    """Write the two-panel PNG to ``out``; SystemExit naming the install command without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(MISSING_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_t1) = plt.subplots(2, 1, figsize=(11, 9.5), sharex=True, layout="constrained")
    for s in series:
        kl = bucket_stats(s["kl"], bin_size)
        t1 = bucket_stats(s["top1"], bin_size)
        (line,) = ax_kl.plot(kl["center"], kl["mean"], marker="o", ms=3, label=legend_label(s))
        lo = kl["mean"] - kl["sem"]
        if not linear:
            lo = np.maximum(lo, kl["mean"] * 0.05)
        ax_kl.fill_between(
            kl["center"], lo, kl["mean"] + kl["sem"], color=line.get_color(), alpha=0.2
        )
        ax_t1.plot(t1["center"], 100 * t1["mean"], marker="o", ms=3, color=line.get_color())
        ax_t1.fill_between(
            t1["center"],
            100 * (t1["mean"] - t1["sem"]),
            100 * np.minimum(t1["mean"] + t1["sem"], 1.0),
            color=line.get_color(),
            alpha=0.2,
        )
    if not linear:
        ax_kl.set_yscale("log")
    ax_kl.set_ylabel("mean KL(bf16 || config) per bucket")
    ax_kl.grid(True, which="both", alpha=0.3)
    ax_t1.set_ylabel("top-1 agreement with bf16 (%)")
    ax_t1.set_xlabel(
        f"generated position (buckets of {bin_size} tokens; band: ± 1 s.e. over prompts)"
    )
    ax_t1.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.legend(*ax_kl.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.bench plot-fidelity", __doc__)
    ap.add_argument(
        "json", nargs="+", help="fidelity JSON files (python -m sglang_tq.bench fidelity --out)"
    )
    ap.add_argument("--out", default="fidelity.png", help="PNG to write (default fidelity.png)")
    ap.add_argument(
        "--configs",
        default=None,
        help="comma list of config names to draw, in this order (default: all)",
    )
    ap.add_argument("--bin-size", type=int, default=64, help="positions per bucket (default 64)")
    ap.add_argument("--linear", action="store_true", help="linear KL axis (default: log)")
    args = ap.parse_args(argv)
    if args.bin_size <= 0:
        ap.error("--bin-size must be positive")
    args.config_list = (
        [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    )
    return args


def run(args: argparse.Namespace) -> int:
    series, docs = load_series(args.json, args.config_list)
    out = plot(series, title_of(docs, series), args.out, args.bin_size, args.linear)
    for s in series:
        print(f"  {legend_label(s)}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
