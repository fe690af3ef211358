"""Test setup: Triton runs in interpreter mode on machines without CUDA.

``TRITON_INTERPRET`` must be set before triton is first imported, which is why
it is decided here from the driver-free ``torch.cuda.is_available()``.
"""

import os
from http.server import BaseHTTPRequestHandler

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on the CPU and, where present, on CUDA."""
    return torch.device(request.param)


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
