"""Send an evaluation's prompts to a running SGLang server concurrently and score the replies.

Each item is one non-streaming ``POST /generate`` with the prompt as ``text`` (the
server's own tokenizer encodes it, so no ``--skip-tokenizer-init``) and
``sampling_params`` ``temperature`` 0, ``max_new_tokens`` and ``stop``. SGLang trims a
matched stop string from the reply; the client cuts the text at the first stop string
as well, so a server that reports the stop but keeps it, or a stop that falls inside a
detokenized chunk, is scored the same way. A request that fails (HTTP error, connection
error) is retried ``retries`` times, then recorded with its error and left unscored.

Scoring runs in a thread pool as replies arrive (HumanEval's sandboxed programs are
subprocesses), so the progress line every ``progress_s`` seconds shows the running
accuracy. SIGTERM/SIGINT or the deadline stop the run like a time-out: requests still
in flight are cancelled and everything finished so far is returned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import time
from collections.abc import Callable

from ..server import check_loopback


def truncate_at_stop(text: str, stops) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def _finish_reason(meta: dict):
    fr = meta.get("finish_reason")
    if isinstance(fr, dict):
        return {k: fr.get(k) for k in ("type", "matched", "length") if k in fr}
    return fr


async def generate_one(
    session, base_url: str, prompt: str, settings: dict, retries: int = 2
) -> dict:
    """One /generate request: {text, raw_text, finish_reason, completion_tokens,
    prompt_tokens, cached_tokens, latency_s, attempts, error}; never raises but for cancellation."""
    payload = {
        "text": prompt,
        "sampling_params": {
            "temperature": settings["temperature"],
            "max_new_tokens": settings["max_new_tokens"],
            "stop": list(settings["stop"]),
        },
    }
    error = None
    for attempt in range(1, retries + 2):
        t0 = time.perf_counter()
        try:
            async with session.post(base_url + "/generate", json=payload) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:300]}")
            obj = json.loads(body)
            if isinstance(obj, list):
                obj = obj[0]
            if not isinstance(obj, dict) or "text" not in obj:
                raise RuntimeError(f"reply without text: {body[:300]}")
            meta = obj.get("meta_info") or {}
            fr = _finish_reason(meta)
            if isinstance(fr, dict) and fr.get("type") == "abort":
                raise RuntimeError(f"aborted: {meta.get('finish_reason')}")
            raw = obj["text"]
            return {
                "text": truncate_at_stop(raw, settings["stop"]),
                "raw_text": raw,
                "finish_reason": fr,
                "completion_tokens": meta.get("completion_tokens"),
                "prompt_tokens": meta.get("prompt_tokens"),
                "cached_tokens": meta.get("cached_tokens"),
                "latency_s": round(time.perf_counter() - t0, 3),
                "attempts": attempt,
                "error": None,
            }
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:400]
            if attempt <= retries:
                await asyncio.sleep(min(2.0 * attempt, 5.0))
    return {"text": None, "error": error, "attempts": retries + 1}


async def run_items(
    base_url: str,
    items: list[dict],
    settings: dict,
    score: Callable[[dict, str], dict],
    *,
    concurrency: int = 128,
    progress_s: float = 10.0,
    label: str = "",
    headline: str = "",
    deadline: float | None = None,
    request_timeout_s: float = 600.0,
    score_workers: int = 4,
    retries: int = 2,
    log: Callable[[str], None] = print,
) -> dict:
    """Generate and score every item; returns {records: id -> record, interrupted,
    timed_out, wall_s}. ``deadline`` is a time.monotonic() value."""
    import aiohttp

    base_url = check_loopback(base_url)
    records: dict[str, dict] = {}
    n = len(items)
    t0 = time.monotonic()
    sem = asyncio.Semaphore(max(1, concurrency))
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, score_workers), thread_name_prefix="score"
    )
    loop = asyncio.get_running_loop()

    async def one(session, item: dict):
        async with sem:
            rec = await generate_one(session, base_url, item["prompt"], settings, retries)
        if rec["error"] is None:
            try:
                rec.update(await loop.run_in_executor(pool, score, item, rec["text"]))
            except Exception as exc:
                rec["error"] = f"scoring failed: {type(exc).__name__}: {exc}"[:400]
        records[item["id"]] = rec

    def progress_line() -> str:
        done = list(records.values())
        scored = [r for r in done if r.get("scores")]
        ok = sum(r["scores"].get(headline, 0) for r in scored)
        acc = f"{ok / len(scored):.3f}" if scored else "-"
        return (
            f"  [{label}] {len(done)}/{n} done, {headline} {acc} ({ok}/{len(scored)}), "
            f"{sum(r['error'] is not None for r in done)} failed, {time.monotonic() - t0:.0f} s"
        )

    async def progress():
        while True:
            await asyncio.sleep(progress_s)
            log(progress_line())

    stop = asyncio.Event()
    caught: list[str] = []
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, lambda sig=sig: (caught.append(sig.name), stop.set()))
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=request_timeout_s)
    conn = aiohttp.TCPConnector(limit=max(1, concurrency) + 4)
    timed_out = False
    try:
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            tasks = [asyncio.create_task(one(session, it)) for it in items]
            prog = asyncio.create_task(progress())
            all_done = asyncio.ensure_future(asyncio.wait(tasks)) if tasks else None
            stopper = asyncio.ensure_future(stop.wait())
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                waiters = [stopper] + ([all_done] if all_done else [])
                if all_done is not None:
                    await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                pending = [t for t in tasks if not t.done()]
                timed_out = bool(pending) and not caught
                for t in (prog, stopper, *tasks, *([all_done] if all_done else [])):
                    t.cancel()
                await asyncio.gather(
                    prog, stopper, *tasks, *([all_done] if all_done else []), return_exceptions=True
                )
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        pool.shutdown(wait=True, cancel_futures=True)
    log(
        progress_line()
        + (
            " (stopped: " + (caught[0] if caught else "deadline") + ")"
            if caught or timed_out
            else ""
        )
    )
    return {
        "records": records,
        "interrupted": caught[0] if caught else None,
        "timed_out": timed_out,
        "wall_s": round(time.monotonic() - t0, 1),
    }
