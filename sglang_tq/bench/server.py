"""Start, poll and stop one ``python -m sglang.launch_server`` for a benchmark (standard library only).

Every benchmark of the package launches its servers through :class:`SGLangServer`:

* the server listens on 127.0.0.1 only, on a port from :func:`free_port` (below Linux's
  ephemeral range, see there);
* it runs in its own process group (``start_new_session``) with ``PR_SET_PDEATHSIG`` =
  SIGKILL, so it dies with the benchmark even when the benchmark is SIGKILLed;
* stdout and stderr go to a log file; a start-up failure or time-out raises
  RuntimeError carrying the log's last lines;
* start-up polls ``/health`` and prints a progress line every 15 s;
* :meth:`SGLangServer.stop` sends SIGTERM to the whole group, SIGKILL after a grace
  period, and returns once no live process is left in the group (the scheduler and
  detokenizer children hold GPU memory, so the next server must not start before
  they are gone).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
# ServerArgs fields a result records from /server_info (SGLang's resolved settings)
SERVER_INFO_KEYS = (
    "max_total_num_tokens",
    "max_running_requests",
    "max_req_input_len",
    "chunked_prefill_size",
    "max_prefill_tokens",
    "attention_backend",
    "prefill_attention_backend",
    "decode_attention_backend",
    "kv_cache_dtype",
    "kv_quant",
    "kv_quant_bits",
    "page_size",
    "disable_radix_cache",
    "mem_fraction_static",
    "cuda_graph_max_bs_decode",
    "disable_prefill_cuda_graph",
    "disable_cuda_graph",
    "cuda_graph_config",
    "schedule_policy",
    "stream_interval",
    "incremental_streaming_output",
    "context_length",
    "model_path",
    "tokenizer_path",
    "served_model_name",
    "dtype",
    "version",
)
# the scheduler's start-up line ("KV Cache is allocated. max_total_num_tokens=..., ...")
_POOL_KEYS = (
    "max_total_num_tokens",
    "chunked_prefill_size",
    "max_prefill_tokens",
    "max_running_requests",
    "context_len",
)
# logged by ServerArgs when no --attention-backend is given
_DEFAULT_BACKEND_RE = re.compile(r"Attention backend not specified\. Use (\w+) backend by default")


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port below Linux's ephemeral range (32768 and up).

    A port handed out by bind(0) is ephemeral: another server starting beside ours can be
    given the same number by its own bind(0) before our server binds it (two load tests
    collided that way on 2026-11-28). bind(0) never hands out ports below the range."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high}; stop stale servers and retry")


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash; ValueError unless its host is a loopback address."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"only loopback servers are allowed, got {url!r}")
    return url.rstrip("/")


def http(
    url: str, method: str = "GET", payload: dict | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    """(status, body) of one request; status 0 when the server cannot be reached."""
    data = None if payload is None else json.dumps(payload).encode()
    if data is None and method == "POST":
        data = b""
    req = urllib.request.Request(
        url,
        method=method,
        data=data,
        headers={"Content-Type": "application/json"} if payload is not None else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def post_json(url: str, payload: dict, timeout: float = 600) -> object:
    """POST ``payload`` as JSON; the decoded JSON reply, or the text for endpoints that
    answer in plain text (``/flush_cache``). RuntimeError carrying the server's message
    on an HTTP error or when the server cannot be reached."""
    code, body = http(url, method="POST", payload=payload, timeout=timeout)
    if code == 0:
        raise RuntimeError(f"POST {url} -> no answer (server down or timed out after {timeout} s)")
    if code >= 400:
        raise RuntimeError(f"POST {url} -> HTTP {code}: {body.decode(errors='replace')[:2000]}")
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def flush(base_url: str, attempts: int = 3, wait_s: float = 30) -> None:
    """POST /flush_cache?timeout=wait_s: the scheduler defers the flush until it is idle (a
    request that just answered may still sit in its running batch for one step); an HTTP 400
    (not idle in time) is retried. RuntimeError when the cache was not flushed."""
    for attempt in range(attempts):
        try:
            reply = post_json(f"{base_url}/flush_cache?timeout={wait_s:g}", {}, wait_s + 30)
        except RuntimeError as exc:
            if "HTTP 400" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.5)
            continue
        if isinstance(reply, str) and reply.startswith("Cache flushed"):
            return
        raise RuntimeError(f"/flush_cache answered {str(reply)[:200]!r}")


def server_info(base_url: str) -> dict:
    """The SERVER_INFO_KEYS of ``/server_info`` (``/get_server_info`` on older SGLang), or {}."""
    for path in ("/server_info", "/get_server_info"):
        code, body = http(base_url + path, timeout=30)
        if code == 200:
            with contextlib.suppress(ValueError):
                data = json.loads(body)
                if isinstance(data, dict):
                    return {k: data[k] for k in SERVER_INFO_KEYS if k in data}
    return {}


def _set_pdeathsig() -> None:
    """In the child before exec: SIGKILL it when its parent dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except Exception:
        pass


def group_alive(pgid: int) -> bool:
    """Is any non-zombie process left in process group ``pgid``? (Zombies hold no GPU
    memory, and in a container without a reaping init, orphaned ones may linger.)"""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def kill_group(
    pgid: int,
    term_wait_s: float = 30.0,
    kill_wait_s: float = 15.0,
    reap: Callable[[], object] | None = None,
) -> bool:
    """SIGTERM the group, SIGKILL after ``term_wait_s``; True once nothing live is left."""
    for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, kill_wait_s)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if reap is not None:
                reap()
            if not group_alive(pgid):
                return True
            time.sleep(0.1)
    return False


class SGLangServer:
    """One SGLang server: ``with SGLangServer(model, flags, log_path) as srv: ...``.

    ``flags`` are the server arguments after ``--model-path/--host/--port``; ``module``
    replaces ``sglang.launch_server`` (tests run a fake server module through the same path).
    """

    def __init__(
        self,
        model_path: str,
        flags: list[str],
        log_path: str | Path,
        *,
        module: str = "sglang.launch_server",
        python: str = sys.executable,
        port: int | None = None,
        env: dict | None = None,
        log: Callable[[str], None] = print,
        stop_grace_s: float = 30.0,
    ):
        self.port = port or free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.cmd = [
            python,
            "-m",
            module,
            "--model-path",
            str(model_path),
            "--host",
            HOST,
            "--port",
            str(self.port),
            *flags,
        ]
        self.log_path = Path(log_path)
        self.env, self.log, self.stop_grace_s = env, log, stop_grace_s
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def command_line(self) -> str:
        return shlex.join(self.cmd)

    def start(self, timeout_s: float = 600.0) -> float:
        """Launch and wait for ``/health``; returns the start-up seconds. RuntimeError
        (with the log tail) if the server exits or is not healthy in time; the caller
        still calls stop() (or uses the context manager, which does)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"launch: {self.command_line}\n  log: {self.log_path}")
        t0 = time.time()
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                preexec_fn=_set_pdeathsig if sys.platform == "linux" else None,
            )
        last = 0.0
        while True:
            if http(self.base_url + "/health", timeout=5)[0] == 200:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            el = time.time() - t0
            if el > timeout_s:
                raise RuntimeError(
                    f"server not healthy after {timeout_s:.0f} s; log tail:\n{self.log_tail()}"
                )
            if el - last >= 15:
                self.log(f"  waiting for server ... {el:.0f} s")
                last = el
            time.sleep(0.2 if el < 10 else 1.0)
        self.startup_s = round(time.time() - t0, 1)
        self.log(f"  server up in {self.startup_s} s")
        return self.startup_s

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def pool_from_log(self) -> dict:
        """Pool sizes from the scheduler's start-up line (the last one wins)."""
        text = self.log_text()
        out: dict = {}
        for key in _POOL_KEYS:
            m = re.findall(rf"\b{key}=(\d+)", text)
            out[key] = int(m[-1]) if m else None
        m = re.findall(r"available_gpu_mem=([\d.]+) GB", text)
        out["available_gpu_mem_gb"] = float(m[-1]) if m else None
        return out

    def default_backend_from_log(self) -> str | None:
        m = _DEFAULT_BACKEND_RE.findall(self.log_text())
        return m[-1] if m else None

    def info(self) -> dict:
        return server_info(self.base_url)

    def flush_cache(self, tries: int = 10) -> bool:
        """POST /flush_cache until it succeeds (SGLang refuses while requests run)."""
        for _ in range(tries):
            if http(self.base_url + "/flush_cache", method="POST", timeout=60)[0] == 200:
                return True
            time.sleep(1.0)
        self.log("  WARNING: /flush_cache did not succeed")
        return False

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period; returns when
        no live process of the group is left."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if not kill_group(proc.pid, self.stop_grace_s, 15.0, reap=proc.poll):
            self.log(f"  WARNING: process group {proc.pid} still alive after SIGKILL")

    def __enter__(self) -> SGLangServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
