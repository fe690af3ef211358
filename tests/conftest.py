"""Test setup shared by every layer (tests/format, tests/kernels, tests/serving, tests/bench).

Triton runs in interpreter mode on machines without CUDA: ``TRITON_INTERPRET`` must be set
before triton is first imported, which is why it is decided here from the driver-free
``torch.cuda.is_available()``.

Helpers that test modules import (``from tests.conftest import ...``): the repository's
paths, ``rel``, the tiny
random Llama of the CPU model tests, and ``check_without_sglang_srt``, the guard that
tests/format and tests/kernels run on their packages. Per-layer helpers and fixtures live
in each layer's conftest.py.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = ROOT / "benchmarks" / "model_configs"

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
    """Run a test on the CPU and, where present, on CUDA (tests/kernels overrides it)."""
    return torch.device(request.param)


# ----------------------------------------------------------------------------- numerics
def rel(a, b):
    """Relative error ‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_llama(num_hidden_layers, vocab_size=64, intermediate_size=96, max_position_embeddings=64):
    """A random 64-wide Llama (4 heads, 2 KV heads, head_dim 16) drawn after ``manual_seed(0)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
    )
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- layer guard
_NO_SRT = '''\
import importlib.abc, pkgutil, sys

attempts = []


class NoSglangSrt(importlib.abc.MetaPathFinder):
    """sglang.srt and its submodules cannot be imported; every attempt is recorded, so an
    ImportError swallowed by a try/except still fails the check."""

    def find_spec(self, name, path=None, target=None):
        if name == "sglang.srt" or name.startswith("sglang.srt."):
            attempts.append(name)
            raise ImportError(f"{name}: sglang.srt is blocked for {LAYERS}")
        return None


def srt_modules():
    return sorted(m for m in sys.modules if m == "sglang.srt" or m.startswith("sglang.srt."))


assert not srt_modules(), f"sglang.srt imported before the check: {srt_modules()}"
sys.meta_path.insert(0, NoSglangSrt())

imported = []
for pkg_name in LAYERS:
    pkg = importlib.import_module(pkg_name)
    imported.append(pkg_name)
    for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
'''

_NO_SRT_END = """
assert not attempts, f"tried to import sglang.srt: {attempts}"
assert not srt_modules(), f"sglang.srt was imported: {srt_modules()}"
print("imported without sglang.srt:", " ".join(imported))
"""


def check_without_sglang_srt(layers, smoke: str):
    """In a fresh interpreter where ``sglang.srt`` cannot be imported, import every module of
    the packages ``layers`` (pkgutil.walk_packages), run ``smoke`` (Python source, which may
    use ``imported``), and fail if anything imported or tried to import ``sglang.srt``.

    A subprocess, because one pytest process imports all layers and tests/serving needs
    sglang.srt. The child decides CUDA vs TRITON_INTERPRET like this conftest."""
    code = f"LAYERS = {list(layers)!r}\n" + _NO_SRT + textwrap.dedent(smoke) + _NO_SRT_END
    env = dict(os.environ)
    if not HAS_CUDA:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{layers} without sglang.srt:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
