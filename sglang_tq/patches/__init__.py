"""Numbered patches against SGLang 0.5.17 for what no plugin hook reaches.

SGLang loads ``sglang.srt.plugins`` entry points before it parses server flags, so the
plugin's flags work everywhere, but ``sglang serve --help`` prints its help *before*
loading plugins (sglang/cli/serve.py), so the ``--kv-quant*`` flags are missing from
that one listing. Patch 0001 loads plugins first. Everything else goes through the
hooks in :mod:`sglang_tq.serving.integration`.

The patches are unified diffs listed in ``series``. This module applies them to the
installed SGLang with exact context matching (no fuzz) and no external ``patch``
program, and can report and revert them:

    python -m sglang_tq.patches status | apply | revert [--root DIR]

``DIR`` defaults to the folder that holds the imported ``sglang`` package. Applying
is idempotent; a file that matches neither the original nor the patched text is
refused with one sentence, never half-patched.
"""

from __future__ import annotations

import dataclasses
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED_SGLANG = "0.5.17"


@dataclasses.dataclass(frozen=True)
class Hunk:
    old: tuple[str, ...]  # context and removed lines
    new: tuple[str, ...]  # context and added lines


@dataclasses.dataclass(frozen=True)
class FilePatch:
    name: str  # the patch file
    path: str  # target, relative to the root
    hunks: tuple[Hunk, ...]


def parse(text: str, name: str = "<patch>") -> FilePatch:
    """One-file unified diff → :class:`FilePatch`."""
    lines = text.splitlines(keepends=True)
    path, hunks, i = None, [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("+++ "):
            path = line[4:].strip().split("\t")[0]
            path = path[2:] if path.startswith("b/") else path
        elif line.startswith("@@"):
            m = re.match(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", line)
            if not m:
                raise ValueError(f"{name}: malformed hunk header {line.strip()!r}.")
            n_old, n_new = int(m.group(1) or 1), int(m.group(2) or 1)
            old, new = [], []
            i += 1
            while len(old) < n_old or len(new) < n_new:
                body = lines[i]
                tag, rest = body[0], body[1:]
                if tag in " -":
                    old.append(rest)
                if tag in " +":
                    new.append(rest)
                if tag not in " -+":
                    raise ValueError(f"{name}: unexpected line in a hunk: {body!r}.")
                i += 1
            hunks.append(Hunk(tuple(old), tuple(new)))
            continue
        i += 1
    if path is None or not hunks:
        raise ValueError(f"{name} is not a one-file unified diff.")
    return FilePatch(name, path, tuple(hunks))


def series() -> list[FilePatch]:
    """The patches in ``series`` order."""
    out = []
    with open(os.path.join(HERE, "series"), encoding="utf-8") as f:
        for entry in f:
            entry = entry.strip()
            if entry and not entry.startswith("#"):
                with open(os.path.join(HERE, entry), encoding="utf-8") as p:
                    out.append(parse(p.read(), entry))
    return out


def _find(text: str, block: tuple[str, ...]) -> int:
    return text.find("".join(block))


def state(patch: FilePatch, text: str) -> str:
    """'applied', 'original' or 'conflict' for a file's text."""
    if all(_find(text, h.new) >= 0 for h in patch.hunks):
        return "applied"
    if all(_find(text, h.old) >= 0 for h in patch.hunks):
        return "original"
    return "conflict"


def transform(patch: FilePatch, text: str, reverse: bool = False) -> str:
    for h in patch.hunks:
        src, dst = (h.new, h.old) if reverse else (h.old, h.new)
        at = _find(text, src)
        if at < 0:
            raise ValueError(f"{patch.name}: context not found in {patch.path}.")
        text = text[:at] + "".join(dst) + text[at + len("".join(src)) :]
    return text


def default_root() -> str:
    import sglang

    return os.path.dirname(os.path.dirname(os.path.abspath(sglang.__file__)))


def _installed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        return None


def run(action: str, root: str | None = None, check_version: bool = True) -> list[tuple[str, str]]:
    """Apply, revert or report every patch; returns (patch, resulting state) pairs."""
    if action not in ("status", "apply", "revert"):
        raise ValueError(f"unknown action {action!r}: use status, apply or revert.")
    if check_version and root is None:
        found = _installed_version()
        if found is not None and found != PINNED_SGLANG:
            raise RuntimeError(
                f"these patches are for SGLang {PINNED_SGLANG} but {found} is "
                f"installed; install sglang=={PINNED_SGLANG}."
            )
    root = root or default_root()
    report, planned = [], []
    for patch in series():
        target = os.path.join(root, patch.path)
        with open(target, encoding="utf-8") as f:
            text = f.read()
        st = state(patch, text)
        if st == "conflict":
            raise RuntimeError(
                f"{target} matches neither the original nor the patched text of "
                f"{patch.name}; reinstall sglang=={PINNED_SGLANG} first."
            )
        if action == "apply" and st == "original":
            planned.append((target, transform(patch, text)))
            st = "applied"
        elif action == "revert" and st == "applied":
            planned.append((target, transform(patch, text, reverse=True)))
            st = "original"
        report.append((patch.name, st))
    # -- write only after every patch was checked
    for target, text in planned:
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    return report
