"""The streaming ``/generate`` client of the server benchmarks (``load`` and ``soak``).

One parser of SGLang's server-sent events, so that the load test and the soak count tokens,
time to first token, errors and aborts the same way. Requests send token ids
(``input_ids``), greedy, ``ignore_eos``; a reply is a stream of ``data: {...}`` events
(``output_ids`` cumulative, or only the new ones with ``--incremental-streaming-output``;
``meta_info.completion_tokens`` is cumulative in both modes) ending with ``data: [DONE]``.

Inter-token latency (ITL) is per token: a network read that brings n new tokens after a gap
g counts as n gaps of g/n (:meth:`ReqResult.note_arrival`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

try:  # orjson ships with SGLang; the stdlib parser is the fallback
    import orjson as _orjson

    def _loads(b: bytes):
        return _orjson.loads(b)
except ImportError:  # pragma: no cover

    def _loads(b: bytes):
        return json.loads(b)


def generate_payload(
    input_ids: list[int], max_new_tokens: int, stream: bool, ignore_eos: bool = True
) -> dict:
    """The greedy /generate body every server benchmark sends."""
    return {
        "input_ids": input_ids,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": ignore_eos,
        },
        "stream": stream,
    }


@dataclass
class ReqResult:
    ok: bool = False
    input_len: int = 0
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    chunks: int = 0
    retractions: int = 0
    finish_reason: object = None
    error: str | None = None
    incremental: bool = False  # chunks carry only their new output_ids
    closed: bool = False  # the client closed the stream early (stream_generate's close_after)
    itl: list = field(default_factory=list)  # seconds between successive output tokens
    arrivals: int = 0  # network reads that brought new tokens
    multi_token_chunks: int = 0  # of those, reads that brought more than one token
    max_chunk_tokens: int = 0
    first_chunk_tokens: int = 0
    _seen: int = 0
    _last_t: float | None = None

    def note_arrival(self, now: float) -> None:
        """Tokens that arrived since the last call came in at ``now``; n new tokens after
        a gap g are n inter-token gaps of g/n (the first arrival has no gap: TTFT)."""
        n = self.completion_tokens - self._seen
        if n <= 0:
            return
        self.arrivals += 1
        self.max_chunk_tokens = max(self.max_chunk_tokens, n)
        if self._last_t is None:
            self.first_chunk_tokens = n
        else:
            if n > 1:
                self.multi_token_chunks += 1
            self.itl.extend([(now - self._last_t) / n] * n)
        self._seen, self._last_t = self.completion_tokens, now


def itl_from_arrivals(arrivals: list[tuple[float, int]]) -> ReqResult:
    """Per-token ITL of one stream from (arrival time, cumulative output tokens) pairs."""
    r = ReqResult()
    for t, ntok in arrivals:
        r.completion_tokens = max(r.completion_tokens, ntok)
        r.note_arrival(t)
    return r


def handle_event(event: bytes, res: ReqResult, t0: float, now: float) -> bool:
    """Apply one SSE event (``data: {...}``); return True at ``data: [DONE]``."""
    done = False
    for line in event.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # comments / other SSE fields
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            obj = _loads(data)
        except ValueError:
            res.error = res.error or f"bad chunk: {data[:120]!r}"
            continue
        res.chunks += 1
        if "error" in obj:
            err = obj["error"]
            res.error = res.error or (err.get("message") if isinstance(err, dict) else str(err))
            continue
        _apply_chunk(obj, res, t0, now)
    return done


def _apply_chunk(obj: dict, res: ReqResult, t0: float, now: float) -> None:
    meta = obj.get("meta_info") or {}
    ntok = meta.get("completion_tokens")  # cumulative in both streaming modes
    if ntok is None:
        ids = obj.get("output_ids") or []
        ntok = res.completion_tokens + len(ids) if res.incremental else len(ids)
    if res.ttft is None and ntok > 0:
        res.ttft = now - t0
    res.completion_tokens = max(res.completion_tokens, int(ntok))
    if "prompt_tokens" in meta:
        res.prompt_tokens = int(meta["prompt_tokens"])
    if "cached_tokens" in meta:
        res.cached_tokens = int(meta["cached_tokens"])
    if meta.get("num_retractions") is not None:
        res.retractions = int(meta["num_retractions"])
    fr = meta.get("finish_reason")
    if fr is not None and res.finish_reason is None:
        res.finish_reason = fr
        res.latency = now - t0
        if isinstance(fr, dict) and fr.get("type") == "abort":
            res.error = res.error or f"aborted: {fr.get('message')}"


def _close_now(res: ReqResult, done: bool, close_after: int | None) -> bool:
    """Should the client close a stream that is still running after ``close_after`` chunks?"""
    return (
        close_after is not None
        and res.error is None
        and not done
        and res.finish_reason is None
        and res.chunks >= close_after
    )


async def stream_generate(
    session,
    base_url: str,
    input_ids: list[int],
    max_new_tokens: int,
    ignore_eos: bool = True,
    incremental: bool = False,
    res: ReqResult | None = None,
    close_after: int | None = None,
) -> ReqResult:
    """One streaming /generate request; never raises (errors land in ReqResult.error).
    ``res`` lets the caller watch the stream's progress while it runs. ``close_after``:
    close the connection once that many SSE chunks arrived while the stream still runs
    (a client abort); the result then has ``closed`` set and is not ``ok``."""
    if res is None:
        res = ReqResult()
    res.input_len, res.incremental = len(input_ids), incremental
    payload = generate_payload(input_ids, max_new_tokens, True, ignore_eos)
    t0 = time.perf_counter()
    try:
        async with session.post(base_url + "/generate", json=payload) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                res.error = f"HTTP {resp.status}: {body}"
                return res
            buf = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                buf += data.replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if _close_now(res, handle_event(event, res, t0, now), close_after):
                        resp.close()
                        res.closed = True
                        return res
                res.note_arrival(now)  # everything parsed from this read arrived at `now`
            if buf.strip():
                now = time.perf_counter()
                handle_event(buf, res, t0, now)
                res.note_arrival(now)
    except asyncio.CancelledError:
        res.error = res.error or "cancelled (timeout)"
        raise
    except Exception as exc:
        res.error = res.error or f"{type(exc).__name__}: {exc}"
        return res
    if res.finish_reason is None and res.error is None:
        res.error = "stream ended without finish_reason"
    if res.latency is None and res.ttft is not None:
        res.latency = time.perf_counter() - t0
    if res.prompt_tokens == 0:
        res.prompt_tokens = len(input_ids)
    res.ok = res.error is None
    return res
