"""What the kernel benchmarks (``decode``, ``ab-decode``, ``profile-decode``, ``extend``) and the
kernel tools (``sglang_tq.tools.tune``, ``sglang_tq.tools.kernel_resources``) share around their
measurements: the parser built from the module docstring, the progress log, the CUDA check, the
argv they record, the default results path and the one JSON document each run writes.

Their documents keep the schema they had as scripts: provenance (gpu, commit, versions, date;
:func:`sglang_tq.bench.results.get_provenance`) at the top level, then ``tool``, ``argv`` and
the tool's own fields. A run writes one file and replaces it atomically
(:func:`~sglang_tq.bench.results.write_json_atomic`), so a run cut short leaves the last
complete document. Values JSON cannot hold (the NaN error of a kernel that wrote garbage, a
dtype) are written as null / their ``str()``, so one broken row never stops the write.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import default_out
from .results import write_doc


def log(*parts) -> None:
    """One progress line, flushed at once (a run's log is read while it runs)."""
    print(*parts, flush=True)


def argv_of(argv: list[str] | None) -> list[str]:
    """The arguments a run records: ``argv`` as the dispatcher passes it, else the command line."""
    return list(sys.argv[1:] if argv is None else argv)


def require_cuda(what: str) -> bool:
    """True where a CUDA device is visible; else one line on stderr saying where to run ``what``."""
    import torch

    if torch.cuda.is_available():
        return True
    print(
        f"error: {what} times CUDA kernels and no CUDA device is visible; run it on the GPU host.",
        file=sys.stderr,
    )
    return False


def out_path(out: str | Path | None, folder: str, provenance: dict, stem: str | None = None):
    """``--out``, or ``benchmarks/results/<folder>/<stem>_<gpu>_<commit>.json`` without one."""
    return Path(out) if out else default_out(folder, provenance, stem)


def write_results(
    args, tool: str, folder: str, provenance: dict, stem: str | None = None, **fields
):
    """The run's document to ``args.out`` (or the default path of :func:`out_path`), with
    ``args.argv``; prints where it went and returns the path."""
    path = out_path(args.out, folder, provenance, stem)
    write_doc(path, tool, args.argv, provenance, **fields)
    print(f"wrote {path}", flush=True)
    return path
