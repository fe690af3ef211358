"""tests/bench: the ``python -m sglang_tq.bench`` subcommands (load test, soak, radix check,
fidelity, decode benches, server smoke, eval) and ``sglang_tq.tools`` on CPU, against fake
SGLang servers.

Shared here: the base of the fake HTTP servers' handlers, a server on a daemon thread, and the
fake ``sglang.launch_server`` module that a script starts with ``--server-module``.
"""

import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.conftest import ROOT


class QuietHandler(BaseHTTPRequestHandler):
    """Base of the tests' fake HTTP servers: no request log, and one ``_send`` per reply."""

    def log_message(self, *a):
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ThreadedServer:
    """with ThreadedServer(httpd) as base_url: ``httpd`` (bound to 127.0.0.1) serves on a daemon
    thread until the block ends, then shuts down and closes its socket."""

    def __init__(self, httpd):
        self.httpd = httpd

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_fake_launcher(path: Path, test_module: str) -> Path:
    """Write the module file ``path`` that runs ``tests.bench.<test_module>.fake_server_cli()``:
    the fake ``sglang.launch_server`` a script starts when ``path``'s folder is on PYTHONPATH."""
    path.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        f"from tests.bench.{test_module} import fake_server_cli\nfake_server_cli()\n"
    )
    return path
