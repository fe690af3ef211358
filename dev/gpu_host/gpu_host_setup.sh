# shellcheck shell=bash
# Set up the SGLang runtime on the air-gapped GPU host.  Source it from the
# repo root of the transferred checkout:
#
#     source dev/gpu_host/gpu_host_setup.sh && python3 -m sglang.launch_server ...
#
# It needs .gpu_bundle/sglang-runtime.tar.xz (built here by
# dev/gpu_host/gpu_host_bundle.py; carry it, and .gpu_bundle/manifest.json, with
# the checkout).  It
#   1. unpacks the bundle into /tmp/site, unless /tmp/site/.complete already
#      holds the bundle's sha256 (/tmp survives only while the host is busy);
#   2. exports PYTHONPATH=/tmp/site:<repo root> and SGLANG_TQ_SRC=<repo root>;
#   3. installs sglang_tq editable (pip -e, offline, no deps) unless the
#      plugin's entry point (sglang.srt.plugins: turboquant) is already
#      installed and loads, so that SGLang loads the plugin; if pip cannot,
#      sglang_tq (one tree under sglang_tq/, no remap) still imports from
#      <repo root> on PYTHONPATH, but SGLang does not load the plugin;
#   4. checks that torch, triton, sglang, sgl_kernel, flashinfer and
#      sglang.srt.server_args import, and prints versions and the GPU name.
# On failure it prints an ERROR line and returns non-zero, without ending the
# calling shell.
#
# Knobs (environment): GPU_BUNDLE (bundle path), GPU_SITE (default /tmp/site),
# PYTHON (default python3), GPU_SETUP_SKIP_PIP=1 (skip step 3),
# GPU_SETUP_DEEP=1 (also import sglang's HTTP server and engine modules).

_tq_setup() {
    local repo bundle site py manifest sum want tqsrc rc
    local -a st
    _tq_err() { echo "gpu_host_setup: ERROR: $*" >&2; }
    _tq_log() { echo "gpu_host_setup: $*"; }

    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." 2>/dev/null && pwd)" ||
        { _tq_err "cannot locate the repo root from ${BASH_SOURCE[0]}"; return 1; }
    bundle="${GPU_BUNDLE:-$repo/.gpu_bundle/sglang-runtime.tar.xz}"
    manifest="$(dirname "$bundle")/manifest.json"
    site="${GPU_SITE:-/tmp/site}"
    py="${PYTHON:-python3}"
    tqsrc="/tmp/tqsrc"  # path shims of earlier versions (kernels/ remap): dropped from PYTHONPATH

    command -v "$py" >/dev/null 2>&1 || { _tq_err "'$py' not found"; return 1; }
    case "$site" in
        ""|"/"|"/tmp"|"/tmp/") _tq_err "refusing GPU_SITE='$site'"; return 1 ;;
    esac

    # ---- 1. unpack ------------------------------------------------------
    if [ ! -f "$bundle" ]; then
        _tq_err "bundle not found: $bundle"
        _tq_err "build it with 'python3 dev/gpu_host/gpu_host_bundle.py' and carry" \
                ".gpu_bundle/sglang-runtime.tar.xz (+ manifest.json) with the checkout"
        return 1
    fi
    sum="$(sha256sum "$bundle" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$sum" ] || { _tq_err "sha256sum failed on $bundle"; return 1; }
    if [ -f "$manifest" ]; then
        want="$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' \
                "$manifest" 2>/dev/null)"
        if [ -n "$want" ] && [ "$want" != "$sum" ]; then
            _tq_err "bundle sha256 $sum does not match manifest.json ($want):" \
                    "truncated or stale transfer; rebuild/re-carry both files"
            return 1
        fi
    fi
    if [ -f "$site/.complete" ] && [ "$(cat "$site/.complete" 2>/dev/null)" = "$sum" ]; then
        _tq_log "runtime already unpacked in $site (sha256 ${sum:0:12}...)"
    else
        _tq_log "unpacking $(du -h "$bundle" | cut -f1) bundle into $site ..."
        rm -rf "$site" && mkdir -p "$site" || { _tq_err "cannot create $site"; return 1; }
        if command -v xz >/dev/null 2>&1; then
            xz -dc -T0 "$bundle" | tar -xf - -C "$site"
            st=("${PIPESTATUS[@]}")
            rc=$(( st[0] != 0 || st[1] != 0 ))
        else
            tar -xJf "$bundle" -C "$site"; rc=$?
        fi
        if [ "$rc" -ne 0 ]; then
            rm -rf "$site"
            _tq_err "unpacking $bundle failed (disk full? corrupt bundle?)"
            return 1
        fi
        echo "$sum" > "$site/.complete" || { _tq_err "cannot write $site/.complete"; return 1; }
        _tq_log "unpacked $(du -sh "$site" 2>/dev/null | cut -f1) into $site"
    fi

    # ---- 2. environment -------------------------------------------------
    local p newpp=""
    local -a old=()
    IFS=: read -r -a old <<< "${PYTHONPATH:-}"
    for p in "${old[@]}"; do   # drop earlier entries of ours, keep the rest
        case "$p" in ""|"$site"|"$repo"|"$tqsrc") ;; *) newpp="$newpp:$p" ;; esac
    done
    export PYTHONPATH="$site:$repo$newpp"
    export SGLANG_TQ_SRC="$repo"

    # ---- 3. sglang_tq from source ----------------------------------------
    if [ -n "${GPU_SETUP_SKIP_PIP:-}" ]; then
        _tq_log "GPU_SETUP_SKIP_PIP set: not installing sglang_tq"
    elif [ ! -f "$repo/pyproject.toml" ]; then
        _tq_log "no pyproject.toml in $repo: sglang_tq only via PYTHONPATH"
    elif (cd / && "$py" -c "from importlib.metadata import entry_points
(ep,) = [e for e in entry_points(group='sglang.srt.plugins') if e.name == 'turboquant']
ep.load()" >/dev/null 2>&1); then
        _tq_log "sglang_tq plugin entry point already installed (sglang.srt.plugins: turboquant)"
    else
        _tq_log "pip install --no-deps --no-index --no-build-isolation -e $repo"
        if (cd "$repo" && PYTHONPATH="" PIP_BREAK_SYSTEM_PACKAGES=1 \
                PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
                "$py" -m pip install --no-deps --no-index --no-build-isolation -q -e . \
                > /tmp/gpu_host_setup_pip.log 2>&1); then
            _tq_log "editable install of sglang_tq done"
        else
            _tq_err "editable install failed (host lacks pip/setuptools or the build" \
                    "backend?); last lines of /tmp/gpu_host_setup_pip.log:"
            tail -n 5 /tmp/gpu_host_setup_pip.log >&2
            # Without pip: sglang_tq/ (kernels included) still imports from $repo on
            # PYTHONPATH, but without the entry point SGLang does not load the plugin.
            _tq_log "FALLBACK: sglang_tq imports from $repo via PYTHONPATH;" \
                    "its plugin entry point is not installed, so SGLang does not load it"
        fi
    fi

    # ---- 4. verify ---------------------------------------------------------
    _tq_log "PYTHONPATH=$PYTHONPATH"
    (cd / && GPU_SITE="$site" GPU_SETUP_DEEP="${GPU_SETUP_DEEP:-}" "$py" - <<'PY'
import importlib, os, re, sys, time

site = os.environ["GPU_SITE"]
t0 = time.time()
if sys.version_info[:2] != (3, 12):
    print(f"gpu_host_setup: WARNING: the bundle is built for Python 3.12, this is "
          f"{sys.version.split()[0]}")
failed = []

def check(mod, want_site=None):
    try:
        m = importlib.import_module(mod)
    except BaseException as e:  # noqa: BLE001 - report everything
        failed.append(mod)
        print(f"gpu_host_setup: ERROR: import {mod} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return None
    where = os.path.dirname(getattr(m, "__file__", "") or "?")
    ver = getattr(m, "__version__", "")
    if want_site and not where.startswith(site):
        print(f"gpu_host_setup: WARNING: {mod} comes from {where}, not {site}")
    print(f"  {mod:14s} {str(ver):24s} {where}")
    return m

torch = check("torch")
check("triton")
for mod in ("sglang", "sgl_kernel", "flashinfer", "transformers", "xgrammar"):
    check(mod, want_site=True)
try:
    from sglang.srt.server_args import ServerArgs  # noqa: F401
    print("  sglang.srt.server_args.ServerArgs imports")
except BaseException as e:  # noqa: BLE001
    failed.append("sglang.srt.server_args")
    print(f"gpu_host_setup: ERROR: from sglang.srt.server_args import ServerArgs: "
          f"{type(e).__name__}: {e}", file=sys.stderr)
if os.environ.get("GPU_SETUP_DEEP"):
    for mod in ("sglang.srt.entrypoints.http_server", "sglang.srt.entrypoints.engine"):
        check(mod)

if torch is not None:
    if torch.cuda.is_available():
        print(f"  GPU: {torch.cuda.get_device_name(0)} "
              f"(torch CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s))")
    else:
        failed.append("cuda")
        print("gpu_host_setup: ERROR: torch.cuda.is_available() is False", file=sys.stderr)

try:  # sglang_tq is being written concurrently: a failure here is a warning
    import sglang_tq
    print(f"  sglang_tq      {os.path.dirname(sglang_tq.__file__)}")
    try:
        import sglang_tq.kernels as k
        print(f"  sglang_tq.kernels {os.path.dirname(k.__file__)}")
    except ImportError as e:
        print(f"gpu_host_setup: WARNING: import sglang_tq.kernels: {e}")
except BaseException as e:  # noqa: BLE001
    print(f"gpu_host_setup: WARNING: import sglang_tq failed: {type(e).__name__}: {e}")

# Requirements of bundled wheels (sglang's long list aside) that the host lacks.
try:
    from importlib import metadata
    from packaging.requirements import Requirement
    missing = set()
    for dist in metadata.distributions(path=[site]):
        if (dist.metadata["Name"] or "").lower() == "sglang":
            continue
        for line in dist.requires or []:
            try:
                r = Requirement(line)
                r.name = re.sub(r"[-_.]+", "-", r.name).lower()
                if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                    continue
                if not r.specifier.contains(metadata.version(r.name), prereleases=True):
                    missing.add(f"{r.name}{r.specifier}(have {metadata.version(r.name)})")
            except metadata.PackageNotFoundError:
                missing.add(r.name)
            except Exception:  # noqa: BLE001
                pass
    if missing:
        print("gpu_host_setup: note: requirements of bundled wheels not met on this host "
              "(often harmless): " + ", ".join(sorted(missing)))
except Exception as e:  # noqa: BLE001
    print(f"gpu_host_setup: note: dependency check skipped ({e})")

print(f"  checks took {time.time() - t0:.1f} s")
sys.exit(1 if failed else 0)
PY
    ) || { _tq_err "runtime verification failed (see above)"; return 1; }
    _tq_log "ready"
    return 0
}

_tq_rc=0
_tq_setup "$@" || _tq_rc=$?
unset -f _tq_setup _tq_err _tq_log
if (return 0 2>/dev/null); then
    return "$_tq_rc"
else
    echo "gpu_host_setup: note: executed, not sourced; the exports did not reach your shell" >&2
    exit "$_tq_rc"
fi
