"""benchmarks/results/: one folder per tool, JSON only (logs/ and key_centers/ excepted), and
every results path the README, benchmarks/README.md, notes/*.md and the package (docstrings,
comments, the launch table) name exists.

A path is ``benchmarks/results/...`` (from the repository root) or ``results/...`` /
``../benchmarks/results/...`` (from the document's folder, as a Markdown link resolves it);
``{a,b}`` alternatives and ``*`` / ``?`` patterns must each match at least one file.
"""

import glob
import re
from pathlib import Path

from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "results"
DOCS = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted(ROOT.glob("notes/*.md")),
    # the package cites results in docstrings, comments and the launch table's sources
    *sorted(ROOT.glob("sglang_tq/**/*.py")),
    ROOT / "sglang_tq" / "kernels" / "decode_launch.json",
]
NON_JSON_FOLDERS = ("logs", "key_centers")  # cited historical logs; key-center .safetensors

PATH = re.compile(r"(?<![\w/.$-])((?:\.\./)*(?:benchmarks/)?results/[\w.*?{},/-]*)")


def _alternatives(path: str) -> list[str]:
    """``a_{x,y}.json`` -> ``[a_x.json, a_y.json]`` (nested and repeated braces too)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [
        alt
        for part in m.group(1).split(",")
        for alt in _alternatives(path[: m.start()] + part + path[m.end() :])
    ]


def _exists(base: Path, path: str) -> bool:
    full = str(base / path)
    if path.endswith("/"):
        return Path(full).is_dir()
    return bool(glob.glob(full)) if any(c in path for c in "*?") else Path(full).is_file()


def results_paths(text: str, doc: Path):
    """(line number, path, base folder) of every results path in ``text``, the text of ``doc``."""
    for n, line in enumerate(text.splitlines(), 1):
        for m in PATH.finditer(line):
            path = m.group(1).rstrip(".,")
            yield n, path, ROOT if path.startswith("benchmarks/") else doc.parent


def dangling(text: str, doc: Path) -> list[str]:
    """``doc:line: path`` of every path alternative in ``text`` that matches no file."""
    return [
        f"{doc.relative_to(ROOT)}:{n}: {alt}"
        for n, path, base in results_paths(text, doc)
        for alt in _alternatives(path)
        if not _exists(base, alt)
    ]


def _read(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def test_documents_name_only_existing_results():
    assert all(d.is_file() for d in DOCS)
    assert sum(1 for d in DOCS for _ in results_paths(_read(d), d)) > 50  # it sees the paths
    assert [x for d in DOCS for x in dangling(_read(d), d)] == []


def test_results_live_in_tool_folders():
    files = [p.relative_to(RESULTS) for p in RESULTS.rglob("*") if p.is_file()]
    assert files
    assert [str(f) for f in files if len(f.parts) != 2] == []  # results/<tool>/<file>


def test_results_are_json_except_cited_logs_and_key_centers():
    other = [
        str(p.relative_to(RESULTS))
        for p in RESULTS.rglob("*")
        if p.is_file() and p.suffix != ".json"
        if p.relative_to(RESULTS).parts[0] not in NON_JSON_FOLDERS
    ]
    assert other == []


def test_the_check_flags_missing_files_folders_and_alternatives():
    text = "\n".join(
        [
            "`benchmarks/results/loadtest/` and `benchmarks/results/no_such_tool/x.json`.",
            "`results/loadtest/loadtest_fa3_h200_b7ef921.json` (relative to notes/: dangling)",
            "`benchmarks/results/server_smoke/smoke_deepseek-v2-lite_{k4v4,fp4}_h100_8e620f2.json`",
            "`benchmarks/results/tune_decode/tune_decode_v9_*_h200.json`, $OUT/results/x.json",
            "[link](../benchmarks/results/no_such_folder/)",
        ]
    )
    probe = ROOT / "notes" / "probe.md"  # resolved like notes/*.md; never written
    assert len(list(results_paths(text, probe))) == 6
    assert dangling(text, probe) == [
        "notes/probe.md:1: benchmarks/results/no_such_tool/x.json",
        "notes/probe.md:2: results/loadtest/loadtest_fa3_h200_b7ef921.json",
        "notes/probe.md:3: benchmarks/results/server_smoke/smoke_deepseek-v2-lite_fp4_h100_8e620f2.json",
        "notes/probe.md:5: ../benchmarks/results/no_such_folder/",
    ]
