#!/usr/bin/env python3
"""Build the self-contained SGLang runtime bundle for the air-gapped GPU host.

The GPU host has Python 3.12, torch 2.11.0+cu130 and triton 3.6.0 but no
SGLang, sgl-kernel or FlashInfer, and no network.  This script downloads the
cp312 / manylinux wheels listed in WHEELS below (no dependency resolution: the
list *is* the closure that the host lacks), unpacks them into one site folder,
trims what an ``sglang.launch_server --attention-backend triton`` run on a
Llama model does not need, strips the shared objects and packs the result as
one ``.tar.xz`` small enough to travel with a checkout (< 60 MiB).

Layout (all under --out-dir, default ``<repo>/.gpu_bundle``, git-ignored):

    wheels/                  download cache, reused on re-runs
    site/                    unpacked + trimmed tree (removed unless --keep-site)
    sglang-runtime.tar.xz    the bundle
    manifest.json            wheel names and versions, size, sha256

On the host, ``source dev/gpu_host/gpu_host_setup.sh`` unpacks it into /tmp/site.

Only the standard library is used, plus the pip that performs the downloads
(its vendored ``packaging`` checks that the unpinned wheels satisfy the
version ranges the pinned ones declare; the check is skipped if unavailable).
Runs on Python >= 3.9 (the build machine has 3.11).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

# --------------------------------------------------------------------------
# The wheel list.  Pinned entries are downloaded at exactly that version;
# unpinned ones at whatever resolves for cp312 / manylinux x86-64, then
# corrected if a bundled wheel requires a different version range.  An
# unpinned entry may carry an upper cap ("name<N") with a reason.
# Everything else SGLang imports (numpy, aiohttp, uvloop, requests, psutil,
# pillow, huggingface-hub, ...) is already installed on the GPU host.
# --------------------------------------------------------------------------
WHEELS = {
    "pinned": [
        "sglang==0.5.17",  # sgl-kernel for newer torch fails on c10 symbols
        "sglang-kernel==0.4.5",  # provides sgl_kernel (sm90/common_ops)
        "flashinfer-python==0.6.15.post1",
        "transformers==5.12.1",  # shadows the host's 5.17 (sglang pins it)
        "tokenizers==0.22.2",
        "apache-tvm-ffi==0.1.11",  # flashinfer JIT FFI
        "xgrammar==0.2.1",
        "openai==2.6.1",
        "openai-harmony==0.0.4",
        "blobfile==3.0.0",
        "soundfile==0.13.1",
    ],
    "unpinned": [
        # HTTP server / API
        "fastapi",
        "starlette",
        "pydantic",
        "pydantic-core",
        "annotated-types",
        "typing-inspection",
        "uvicorn",
        "orjson",
        "pyzmq",
        "setproctitle",
        "pybase64",
        "python-multipart",
        "partial-json-parser",
        "msgspec",
        "interegular",
        "gguf",
        "distro",
        "easydict",
        "jiter",
        "sniffio",
        "llguidance",
        "compressed-tensors",
        "watchfiles",
        "zstandard",
        "loguru",
        "dill",
        "multiprocess",
        "datasets",
        "jsonschema",
        "jsonschema-specifications",
        "referencing",
        "rpds-py",
        "cffi",
        "pycparser",
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-semantic-conventions",
        "importlib-metadata<10",  # 10.x needs lazy-importer, absent on the host
        # ipython (imported by sglang at start-up) and its pure-Python deps
        "ipython",
        "traitlets",
        "decorator",
        "parso",
        "prompt-toolkit",
        "wcwidth",
        "pexpect",
        "ptyprocess",
        "stack-data",
        "asttokens",
        "executing",
        "pure-eval",
        "matplotlib-inline",
        "ipython-pygments-lexers",
        "pycryptodomex",
    ],
}

PYTHON_VERSION = "3.12"
# pip matches platform tags exactly, so every manylinux level must be listed.
PLATFORMS = [
    f"manylinux_2_{n}_x86_64"
    for n in (39, 38, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 17)
] + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# The target environment, for evaluating requirement markers.
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "extra": "",
}

# --------------------------------------------------------------------------
# Trimming: (fnmatch pattern on the path relative to site/, reason).  The
# first block is the tested recipe; the second holds extra trims, each safe
# for launch_server --attention-backend triton on a Llama model.
# --------------------------------------------------------------------------
TRIM_RECIPE = [
    (
        "sgl_kernel/flash_ops*.so",
        "FlashAttention-3 (1.1 GB), loaded lazily, unused with triton backend",
    ),
    ("sgl_kernel/infllm_ops*.so", "InfLLM ops, loaded lazily"),
    ("sgl_kernel/flashmla_ops*.so", "FlashMLA (DeepSeek MLA), loaded lazily"),
    ("sgl_kernel/sm100/*", "Blackwell build; the host is Hopper (sm90/common_ops.abi3.so)"),
    ("xgrammar/lib/*", "static archive for C++ consumers"),
    ("xgrammar/include/*", "C++ headers"),
    ("sglang/multimodal_gen/*", "diffusion / multimodal generation runtime"),
    ("sglang/test/*", "SGLang's own test utilities"),
    ("jedi/*", "ipython completion engine, not used by the server"),
    ("__pycache__/*", "bytecode caches"),
    ("*/__pycache__/*", "bytecode caches"),
]
TRIM_EXTRA: list[tuple[str, str]] = [
    # Added only if the recipe alone gives a bundle over the limit.
]

DEFAULT_LIMIT_MIB = 60.0
BUNDLE_NAME = "sglang-runtime.tar.xz"
TAR_MTIME = "@1704067200"  # fixed (2024-01-01) so equal inputs give equal bytes


def log(msg: str) -> None:
    print(msg, flush=True)


def step(n: int, total: int, msg: str) -> None:
    log(f"\n[{n}/{total}] {msg}")


def die(msg: str, code: int = 1) -> None:
    print(f"\nERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def parse_req(req: str) -> tuple[str, str]:
    """'name==1.0' -> ('name', '==1.0'); 'name<10' -> ('name', '<10')."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", req)
    if m is None:
        die(f"bad requirement {req!r}")
    return m.group(1), m.group(2).replace(" ", "")


def version_ok(version: str, spec: str) -> bool:
    if not spec:
        return True
    if spec.startswith("==") and "," not in spec and "*" not in spec:
        return version == spec[2:]
    try:
        from pip._vendor.packaging.specifiers import SpecifierSet
    except Exception:
        return True
    return SpecifierSet(spec).contains(version, prereleases=True)


def wheel_name_version(path: Path) -> tuple[str, str]:
    parts = path.name[:-4].split("-")
    return parts[0], parts[1]


def cached_wheels(wheel_dir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for p in sorted(wheel_dir.glob("*.whl")):
        found.setdefault(norm(wheel_name_version(p)[0]), []).append(p)
    return found


def find_cached(wheel_dir: Path, name: str, spec: str) -> Path | None:
    for p in cached_wheels(wheel_dir).get(norm(name), []):
        if version_ok(wheel_name_version(p)[1], spec):
            return p
    return None


def pip_download(wheel_dir: Path, reqs: list[str]) -> bool:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(wheel_dir),
    ]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    cmd += reqs
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in res.stdout.splitlines():
        if line.startswith(("Saved", "Successfully", "ERROR")) or "No matching" in line:
            log(f"    {line}")
    return res.returncode == 0


def download(wheel_dir: Path, reqs: list[str]) -> None:
    if not reqs:
        return
    log(f"  downloading {len(reqs)}: {' '.join(reqs)}")
    if pip_download(wheel_dir, reqs):
        return
    failed = [r for r in reqs if not pip_download(wheel_dir, [r])]
    if failed:
        die(
            "pip download failed for: "
            + ", ".join(failed)
            + "\n  (check the pins and the platform tags in PLATFORMS)"
        )


def remove_versions(wheel_dir: Path, name: str) -> None:
    for p in cached_wheels(wheel_dir).get(norm(name), []):
        p.unlink()


def selected_wheels(wheel_dir: Path, reqs: list[str]) -> dict[str, Path]:
    """Map normalized name -> the one wheel used for each requirement."""
    chosen: dict[str, Path] = {}
    for req in reqs:
        name, spec = parse_req(req)
        cands = [
            p
            for p in cached_wheels(wheel_dir).get(norm(name), [])
            if version_ok(wheel_name_version(p)[1], spec)
        ]
        if not cands:
            die(f"no wheel for {req} in {wheel_dir}")
        if len(cands) > 1:  # several cached versions of an unpinned one: newest
            cands.sort(key=lambda p: version_key(wheel_name_version(p)[1]))
        chosen[norm(name)] = cands[-1]
    return chosen


def version_key(v: str):
    try:
        from pip._vendor.packaging.version import Version

        return Version(v)
    except Exception:
        return [int(x) if x.isdigit() else 0 for x in re.split(r"[.+-]", v)]


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        meta = next(
            n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
        )
        text = zf.read(meta).decode("utf-8", "replace")
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def reconcile(wheel_dir: Path, unpinned: dict[str, str], reqs: list[str]) -> list[str]:
    """Re-download unpinned wheels that violate a bundled wheel's requirement.

    Returns the warnings that could not be fixed (pinned wheels in conflict).
    """
    try:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.specifiers import SpecifierSet
        from pip._vendor.packaging.version import Version
    except Exception:
        return ["pip's vendored 'packaging' unavailable: version ranges not checked"]
    warnings: list[str] = []
    for _round in range(4):
        chosen = selected_wheels(wheel_dir, reqs)
        specs: dict[str, list[tuple[str, str]]] = {}
        for who, path in chosen.items():
            for line in wheel_requires(path):
                try:
                    r = Requirement(line)
                except Exception:
                    continue
                if r.marker is not None and not r.marker.evaluate(TARGET_ENV):
                    continue
                if norm(r.name) in chosen and str(r.specifier):
                    specs.setdefault(norm(r.name), []).append((who, str(r.specifier)))
        fixes: list[str] = []
        warnings = []
        for target, lst in sorted(specs.items()):
            have = Version(wheel_name_version(chosen[target])[1])
            bad = [
                (who, s) for who, s in lst if not SpecifierSet(s).contains(have, prereleases=True)
            ]
            if not bad:
                continue
            desc = ", ".join(f"{who} wants {s}" for who, s in bad)
            if target in unpinned:
                combined = ",".join([s for _, s in lst] + [unpinned[target]]).strip(",")
                log(f"  {target} {have} does not fit ({desc}); re-resolving")
                remove_versions(wheel_dir, target)
                fixes.append(f"{target}{combined}")
            else:
                warnings.append(f"pinned {target} {have}: {desc}")
        if not fixes:
            return warnings
        download(wheel_dir, fixes)
    warnings.append("version reconciliation did not settle after 4 rounds")
    return warnings


def trim_rule(rel: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, _reason in rules:
        if fnmatch.fnmatchcase(rel, pattern):
            return pattern
    return None


def site_path(member: str) -> str | None:
    """Map a wheel member to its path in site/ (None: not installed)."""
    first, _, rest = member.partition("/")
    if first.endswith(".data"):
        kind, _, sub = rest.partition("/")
        return sub if kind in ("purelib", "platlib") and sub else None
    return member


def unpack(wheels: list[Path], site: Path, rules: list[tuple[str, str]]) -> dict[str, int]:
    trimmed: dict[str, int] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                rel = site_path(info.filename)
                if rel is None:
                    continue
                pat = trim_rule(rel, rules)
                if pat is not None:
                    trimmed[pat] = trimmed.get(pat, 0) + info.file_size
                    continue
                dest = site / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(dest, mode | stat.S_IRUSR | stat.S_IWUSR)
    return trimmed


def prune(site: Path, rules: list[tuple[str, str]]) -> dict[str, int]:
    """Delete anything left in site/ that a rule matches (e.g. __pycache__)."""
    trimmed: dict[str, int] = {}
    for p in sorted(site.rglob("*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
            continue
        pat = trim_rule(p.relative_to(site).as_posix(), rules)
        if pat is not None:
            trimmed[pat] = trimmed.get(pat, 0) + p.lstat().st_size
            p.unlink()
    return trimmed


def strip_all(site: Path) -> tuple[int, int, list[str]]:
    strip = shutil.which("strip")
    if strip is None:
        die("'strip' not found (install binutils)")
    sos = sorted(p for p in site.rglob("*.so*") if p.is_file() and not p.is_symlink())
    before = sum(p.stat().st_size for p in sos)
    failed: list[str] = []
    for p in sos:
        res = subprocess.run(
            [strip, "--strip-unneeded", str(p)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if res.returncode != 0:
            failed.append(p.relative_to(site).as_posix())
    after = sum(p.stat().st_size for p in sos)
    return before, after, failed


def dir_size(p: Path) -> int:
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file())


def biggest(site: Path, n: int = 15) -> list[tuple[int, str]]:
    sizes: dict[str, int] = {}
    for f in site.rglob("*"):
        if f.is_file():
            parts = f.relative_to(site).parts
            key = "/".join(parts[:2]) if len(parts) > 2 else parts[0]
            sizes[key] = sizes.get(key, 0) + f.lstat().st_size
    return sorted(((s, k) for k, s in sizes.items()), reverse=True)[:n]


def pack(site: Path, out: Path, threads: int) -> None:
    for tool in ("tar", "xz"):
        if shutil.which(tool) is None:
            die(f"'{tool}' not found")
    tmp = out.with_name(out.name + ".part")
    tar = subprocess.Popen(
        [
            "tar",
            "-cf",
            "-",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            f"--mtime={TAR_MTIME}",
            "-C",
            str(site),
            ".",
        ],
        stdout=subprocess.PIPE,
    )
    with open(tmp, "wb") as fh:
        xz = subprocess.Popen(["xz", "-9e", f"-T{threads}", "-c"], stdin=tar.stdout, stdout=fh)
        assert tar.stdout is not None
        tar.stdout.close()
        rc_xz = xz.wait()
    rc_tar = tar.wait()
    if rc_tar != 0 or rc_xz != 0:
        tmp.unlink(missing_ok=True)
        die(f"packing failed (tar rc={rc_tar}, xz rc={rc_xz})")
    tmp.replace(out)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(
        description="Build the SGLang 0.5.17 runtime bundle (.tar.xz) for the "
        "air-gapped GPU host; see dev/gpu_host/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=repo / ".gpu_bundle",
        help="output folder (wheels/ cache, site/, bundle, manifest)",
    )
    ap.add_argument(
        "--keep-site", action="store_true", help="keep the unpacked site/ folder after packing"
    )
    ap.add_argument(
        "--refresh",
        action="store_true",
        help="re-resolve unpinned wheels instead of reusing cached ones",
    )
    ap.add_argument(
        "--no-extra-trim",
        action="store_true",
        help="apply only the recipe's trimming, not TRIM_EXTRA",
    )
    ap.add_argument(
        "--limit-mib",
        type=float,
        default=DEFAULT_LIMIT_MIB,
        help="fail if the bundle is larger than this",
    )
    ap.add_argument("--threads", type=int, default=2, help="xz threads")
    ap.add_argument(
        "--list", action="store_true", help="print the wheel list and trim rules, then exit"
    )
    args = ap.parse_args(argv)

    rules = TRIM_RECIPE + ([] if args.no_extra_trim else TRIM_EXTRA)
    reqs = WHEELS["pinned"] + WHEELS["unpinned"]
    if args.list:
        for kind in ("pinned", "unpinned"):
            log(f"{kind}: " + " ".join(WHEELS[kind]))
        for pat, why in rules:
            log(f"trim {pat:32s} {why}")
        return 0

    out = args.out_dir.resolve()
    wheel_dir, site = out / "wheels", out / "site"
    bundle, manifest_path = out / BUNDLE_NAME, out / "manifest.json"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    total, t0 = 6, time.time()

    step(1, total, f"download wheels into {wheel_dir}")
    if args.refresh:
        for r in WHEELS["unpinned"]:
            remove_versions(wheel_dir, parse_req(r)[0])
    missing = [r for r in reqs if find_cached(wheel_dir, *parse_req(r)) is None]
    log(f"  {len(reqs) - len(missing)} of {len(reqs)} cached")
    download(wheel_dir, missing)
    unpinned = {norm(n): s for n, s in map(parse_req, WHEELS["unpinned"])}
    warnings = reconcile(wheel_dir, unpinned, reqs)
    for w in warnings:
        log(f"  WARNING: {w}")
    chosen = selected_wheels(wheel_dir, reqs)
    wheels = [chosen[norm(parse_req(r)[0])] for r in reqs]
    log(f"  {len(wheels)} wheels, {mib(sum(p.stat().st_size for p in wheels))} compressed")

    step(2, total, f"unpack into {site} (skipping trimmed files)")
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    trimmed = unpack(wheels, site, rules)
    log(f"  site: {mib(dir_size(site))}")

    step(3, total, "trim")
    for pat, n in prune(site, rules).items():
        trimmed[pat] = trimmed.get(pat, 0) + n
    reasons = dict(rules)
    for pat, n in sorted(trimmed.items(), key=lambda kv: -kv[1]):
        log(f"  - {mib(n):>11s}  {pat:30s} {reasons[pat]}")
    log(f"  trimmed {mib(sum(trimmed.values()))}; site now {mib(dir_size(site))}")

    step(4, total, "strip --strip-unneeded every .so")
    before, after, failed = strip_all(site)
    log(f"  shared objects: {mib(before)} -> {mib(after)}")
    for f in failed:
        log(f"  WARNING: strip failed on {f} (kept as is)")
    site_bytes = dir_size(site)
    log(f"  site now {mib(site_bytes)}; largest parts:")
    for n, key in biggest(site):
        log(f"    {mib(n):>11s}  {key}")

    step(5, total, f"tar | xz -9e -T{args.threads} -> {bundle}")
    if bundle.exists():
        bundle.unlink()
    pack(site, bundle, args.threads)
    size, digest = bundle.stat().st_size, sha256(bundle)

    step(6, total, f"manifest -> {manifest_path}")
    manifest = {
        "bundle": BUNDLE_NAME,
        "size_bytes": size,
        "size_mib": round(size / 2**20, 2),
        "sha256": digest,
        "unpacked_bytes": site_bytes,
        "python": PYTHON_VERSION,
        "wheels": [
            {
                "name": wheel_name_version(p)[0],
                "version": wheel_name_version(p)[1],
                "file": p.name,
                "pinned": norm(parse_req(r)[0]) not in unpinned,
            }
            for r, p in zip(reqs, wheels)
        ],
        "trimmed": [
            {"pattern": pat, "reason": reasons[pat], "bytes": trimmed.get(pat, 0)}
            for pat, _ in rules
        ],
        "warnings": warnings,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if not args.keep_site:
        shutil.rmtree(site)

    log(f"\nbundle: {bundle}")
    log(f"size:   {size / 2**20:.2f} MiB ({size} bytes)")
    log(f"sha256: {digest}")
    log(f"took {time.time() - t0:.0f} s")
    if size > args.limit_mib * 2**20:
        over = bundle.with_name(bundle.name + ".oversize")
        bundle.replace(over)
        die(
            f"bundle is {size / 2**20:.2f} MiB, over the {args.limit_mib:g} MiB limit "
            f"(device transfers carry at most 64 MiB, checkout included).\n"
            f"  Moved to {over}. Trim more (TRIM_EXTRA) after checking the "
            f"largest parts above (rerun with --keep-site and use du).",
            2,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
