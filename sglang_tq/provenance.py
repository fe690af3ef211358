"""Where a measurement came from: GPU, library versions and git commit.

Every benchmark and evaluation script stores this next to its numbers, so a
number quoted in the README can be traced to the card, stack and commit.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path

from . import env

_PACKAGES = ("torch", "triton", "sglang", "sglang-kernel", "flashinfer-python", "transformers")


def git_commit(repo: Path | None = None) -> str:
    """HEAD of the checkout, or $SGLANG_TQ_COMMIT where the copy has no .git (GPU host)."""
    if env.commit_override():
        return env.commit_override()
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import torch

        found["torch_runtime"] = torch.__version__
        found["cuda"] = torch.version.cuda or "none"
    except ImportError:
        pass
    return found


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return "cpu"


def provenance() -> dict:
    """Top-level fields every result JSON carries."""
    return {
        "gpu": gpu_name(),
        "commit": git_commit(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
