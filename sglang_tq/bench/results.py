"""The results file every benchmark of the package writes: provenance plus keyed result entries.

Schema (one JSON object):

    tool         the benchmark, e.g. "sglang_tq.bench eval"
    argv         the arguments of the invocation that wrote the file last
    gpu, commit, versions, date   provenance of that invocation (sglang_tq.provenance)
    results      list of entries; each entry is identified by the values of the file's
                 key fields (e.g. task and config) and carries its own gpu/commit/date
    invocations  argv/gpu/commit/date of every invocation that wrote into the file

Provenance is computed in a child process: querying the GPU name creates a CUDA context,
and that context must not stay alive in the benchmark process while SGLang servers size
their KV pools from the GPU memory left free.

Every write goes to a temporary file in the same folder, is flushed to disk and then
renamed over the old file (``os.replace``), so a run killed mid-write leaves the previous
complete file, never a truncated one. The file is rewritten after every finished entry,
so a run cut off by a time limit keeps everything it finished.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding sglang_tq/
_PROVENANCE_CODE = (
    "import json; from sglang_tq.provenance import provenance; print(json.dumps(provenance()))"
)
PROVENANCE_KEYS = ("gpu", "commit", "versions", "date")


def get_provenance(python: str = sys.executable, timeout_s: float = 120.0) -> dict:
    """sglang_tq.provenance.provenance() of a child process; on failure the fields the
    parent knows, plus ``provenance_error``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run(
            [python, "-c", _PROVENANCE_CODE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
            env=env,
        ).stdout
        prov = json.loads(out.strip().splitlines()[-1])
        if not isinstance(prov, dict):
            raise ValueError(f"provenance is not an object: {prov!r}")
        return prov
    except Exception as exc:
        return {
            "gpu": "unknown",
            "commit": os.environ.get("SGLANG_TQ_COMMIT", "unknown"),
            "versions": {},
            "date": None,
            "provenance_error": repr(exc)[:300],
        }


def write_json_atomic(path: str | Path, obj) -> None:
    """Serialize ``obj`` to a temporary file beside ``path``, fsync, then os.replace it
    over ``path``; on any error the old file stays and the temporary file is removed."""
    _write_atomic(path, [json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False)])


def json_safe(obj):
    """``obj`` with non-finite floats as None and values JSON has no type for as their str()."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_doc(path: str | Path, tool: str, argv: list[str], provenance: dict, **fields) -> Path:
    """The one-document results file of a run: ``{**provenance, tool, argv, **fields}``,
    JSON-safe (a NaN or infinite value from a broken row is written as null instead of
    failing the write), to ``path`` atomically; returns the path."""
    write_json_atomic(path, json_safe({**provenance, "tool": tool, "argv": list(argv), **fields}))
    return Path(path)


def write_lines_atomic(path: str | Path, lines: Iterable[str]) -> None:
    """The JSONL counterpart of write_json_atomic: ``lines`` (without newlines) replace ``path``."""
    _write_atomic(path, lines)


def _write_atomic(path: str | Path, lines: Iterable[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _file_mode() -> int:
    """What open() would give a new file under the current umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def load_json(path: str | Path) -> dict:
    """The JSON object in ``path``, or {} when it is missing or not an object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


class ResultsFile:
    """A results JSON file whose entries are keyed by ``key`` fields.

    ``keep_existing=True`` (resume) starts from the entries already in the file, and from its
    invocation history; otherwise the file starts empty. Every :meth:`put` rewrites the file.
    """

    def __init__(
        self,
        path: str | Path,
        tool: str,
        argv: list[str],
        provenance: dict,
        key: tuple[str, ...],
        keep_existing: bool = False,
    ):
        self.path, self.key = Path(path), tuple(key)
        old = load_json(self.path) if keep_existing else {}
        if old and old.get("tool") not in (None, tool):
            raise ValueError(
                f"{self.path} was written by {old.get('tool')!r}, not {tool!r}; "
                f"choose another --out"
            )
        self.provenance = {k: provenance.get(k) for k in PROVENANCE_KEYS}
        extra = {k: v for k, v in provenance.items() if k not in PROVENANCE_KEYS}
        invocation = {"argv": list(argv), **self.provenance, **extra}
        self.doc = {
            "tool": tool,
            "argv": list(argv),
            **self.provenance,
            **extra,
            "results": [r for r in old.get("results", []) if isinstance(r, dict)],
            "invocations": [*old.get("invocations", []), invocation],
        }

    @property
    def results(self) -> list[dict]:
        return self.doc["results"]

    def key_of(self, entry: dict) -> tuple:
        return tuple(entry.get(k) for k in self.key)

    def get(self, **key) -> dict | None:
        want = tuple(key.get(k) for k in self.key)
        return next((r for r in self.results if self.key_of(r) == want), None)

    def put(self, entry: dict, write: bool = True) -> None:
        """Add ``entry`` (stamped with this invocation's provenance where it has none),
        replacing the entry with the same key; then rewrite the file."""
        entry = {**{k: self.provenance[k] for k in ("gpu", "commit", "date")}, **entry}
        k = self.key_of(entry)
        self.doc["results"] = [r for r in self.results if self.key_of(r) != k] + [entry]
        if write:
            self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.doc)
