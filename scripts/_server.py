"""Start, poll and stop ``python -m sglang.launch_server`` from a script (standard library only).

Shared by ``scripts/server_smoke.py`` and ``scripts/fidelity.py``; import it by
putting this folder on ``sys.path`` (scripts/ is not a package).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def post(url: str, payload: dict, timeout: float = 600) -> object:
    """POST JSON, return the decoded JSON reply (or the text, for endpoints such as
    /flush_cache that answer in plain text); HTTP errors carry the server's message."""
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode(errors="replace")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:2000]
        raise RuntimeError(f"POST {url} -> HTTP {exc.code}: {body}") from exc


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port below Linux's ephemeral range (32768 and up). A port from
    bind(0) is ephemeral, and a second server starting beside ours (another GPU) can
    be handed the same number by its own bind(0) before our server binds it: on
    2026-11-28 two load tests collided that way. Ports below the range are never
    handed out by bind(0)."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high}; stop stale servers and retry.")


def log_tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


class Server:
    """``with Server(model_path, args, log) as srv: post(srv.base + "/generate", ...)``.

    The server runs in its own process group; leaving the block (or an
    exception) sends SIGTERM to the group, then SIGKILL after 30 s.
    """

    def __init__(
        self,
        model_path: str,
        server_args: list[str],
        log_path: str,
        port: int | None = None,
        startup_timeout: float = 420,
        python: str = sys.executable,
    ):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.cmd = [
            python,
            "-m",
            "sglang.launch_server",
            "--model-path",
            model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *server_args,
        ]
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> Server:
        print("launch:", " ".join(self.cmd), flush=True)
        t0 = time.time()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        last = t0
        while not healthy(self.base):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode}; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if time.time() - t0 > self.startup_timeout:
                raise RuntimeError(
                    f"server not healthy after {self.startup_timeout:.0f} s; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(2)
            if time.time() - last >= 10:
                last = time.time()
                print(f"  waiting for server ... {last - t0:.0f} s", flush=True)
        self.startup_s = round(time.time() - t0, 1)
        print(f"  server healthy after {self.startup_s} s", flush=True)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
