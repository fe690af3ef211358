#!/usr/bin/env bash
# Reassemble a model that dev/gpu_host/fetch_models.py split into pieces, on the GPU host.
#
#   bash dev/gpu_host/unpack_model.sh stage NAME [SRC] # after each piece call
#   bash dev/gpu_host/unpack_model.sh NAME [IN_DIR]    # once all pieces are in
#
# The GPU tool carries at most 64 MiB per call (working tree included), so each
# <= 60 MiB piece arrives in its own call, carried together with its manifest:
#
#   call k:  carry [".models/transfer/NAME.tar.partKK", ".models/transfer/NAME.manifest.json"]
#            command: bash dev/gpu_host/unpack_model.sh stage NAME
#   last:    carry [".gpu_bundle/sglang-runtime.tar.xz", ".gpu_bundle/manifest.json"]
#            command: source dev/gpu_host/gpu_host_setup.sh && M=$(bash dev/gpu_host/unpack_model.sh NAME) && ...
#
# /tmp survives between calls only while they follow each other (about 30 s of
# idle and the host is given back), so issue the calls back to back.
#
# stage: copies the manifest and whatever pieces of NAME were carried (in
#   SRC, default <repo>/.models/transfer) to $MODELS_IN (default
#   /tmp/models_in), checks the sha256 of every piece present there and lists
#   the missing ones. Exit 1 only if a piece is corrupt.
# unpack (default): checks every piece (size, sha256) and the whole tar's
#   sha256 against NAME.manifest.json, extracts into $MODELS_OUT (default
#   /tmp/models); a GGUF shipment is then converted to $MODELS_OUT/NAME-bf16
#   with `dev/gpu_host/fetch_models.py convert` (transformers + gguf from the SGLang
#   bundle in /tmp/site, so run it after `source dev/gpu_host/gpu_host_setup.sh`).
#   Progress goes to stderr; the only stdout line is the bf16 folder's path.
#   A second run with the same pieces prints the path at once.
#
# Environment: MODELS_IN, MODELS_OUT, PYTHON (default python3), GPU_SITE
# (default /tmp/site, added to PYTHONPATH for the conversion if it exists).
set -euo pipefail

say() { echo "unpack_model: $*" >&2; }
die() { echo "unpack_model: ERROR: $*" >&2; exit 1; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-python3}"
in_dir="${MODELS_IN:-/tmp/models_in}"
out_root="${MODELS_OUT:-/tmp/models}"
site="${GPU_SITE:-/tmp/site}"

mode="unpack"
if [ "${1:-}" = "stage" ]; then mode="stage"; shift; fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || [ $# -lt 1 ]; then
    sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [ $# -lt 1 ] && exit 2 || exit 0
fi
name="$1"
case "$name" in */*|.*|"") die "bad model name '$name'" ;; esac

# manifest fields, one per line: "piece FILE BYTES SHA", "tar BYTES SHA", "ship X",
# "gguf FILE", "bf16dir DIR", "key WEIGHTS_KEY"
read_manifest() {
    "$py" - "$1" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for p in m["pieces"]:
    print("piece", p["file"], p["bytes"], p["sha256"])
print("tar", m["tar"]["bytes"], m["tar"]["sha256"])
print("ship", m.get("ship", "gguf"))
print("gguf", m.get("gguf", {}).get("file", "-"))
print("bf16dir", m.get("bf16_dir", m["name"] + "-bf16"))
print("key", m.get("bf16", {}).get("weights_key", "-"))
PY
}

# check_piece DIR FILE BYTES SHA -> "ok", "missing", "bad-size", "bad-sha"
check_piece() {
    local f="$1/$2"
    [ -f "$f" ] || { echo missing; return; }
    [ "$(stat -c %s "$f")" = "$3" ] || { echo bad-size; return; }
    [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$4" ] || { echo bad-sha; return; }
    echo ok
}

if [ "$mode" = "stage" ]; then
    src="${2:-$repo/.models/transfer}"
    mkdir -p "$in_dir"
    if [ "$(cd "$src" 2>/dev/null && pwd)" = "$(cd "$in_dir" && pwd)" ]; then
        die "SRC and MODELS_IN are the same folder ($in_dir)"
    fi
    [ -f "$src/$name.manifest.json" ] && cp -f "$src/$name.manifest.json" "$in_dir/"
    [ -f "$in_dir/$name.manifest.json" ] || die "no $name.manifest.json in $src or $in_dir (carry it with every piece)"
    shopt -s nullglob
    for f in "$src/$name".tar.part*; do
        cp -f "$f" "$in_dir/" && say "staged $(basename "$f") ($(du -h "$f" | cut -f1))"
    done
    bad=0; missing=()
    while read -r kind file bytes sha; do
        [ "$kind" = "piece" ] || continue
        st="$(check_piece "$in_dir" "$file" "$bytes" "$sha")"
        case "$st" in
            ok) say "  $file ok" ;;
            missing) missing+=("$file") ;;
            *) say "  $file $st"; rm -f "$in_dir/$file"; bad=1 ;;
        esac
    done < <(read_manifest "$in_dir/$name.manifest.json")
    if [ ${#missing[@]} -eq 0 ]; then
        say "all pieces of $name are in $in_dir: run 'bash dev/gpu_host/unpack_model.sh $name'"
    else
        say "still missing: ${missing[*]}"
    fi
    df -h /tmp | tail -1 >&2
    exit "$bad"
fi

# ---- unpack ---------------------------------------------------------------
in_dir="${2:-$in_dir}"
manifest="$in_dir/$name.manifest.json"
[ -f "$manifest" ] || die "$manifest not found (stage the pieces first)"
pieces=(); tar_bytes=""; tar_sha=""; ship=""; gguf_rel=""; bf16dir=""; key=""
while read -r kind a b c; do
    case "$kind" in
        piece) st="$(check_piece "$in_dir" "$a" "$b" "$c")"
               [ "$st" = ok ] || die "piece $a: $st (re-carry it: bash dev/gpu_host/unpack_model.sh stage $name)"
               pieces+=("$in_dir/$a") ;;
        tar) tar_bytes="$a"; tar_sha="$b" ;;
        ship) ship="$a" ;;
        gguf) gguf_rel="$a" ;;
        bf16dir) bf16dir="$a" ;;
        key) key="$a" ;;
    esac
done < <(read_manifest "$manifest")
[ ${#pieces[@]} -gt 0 ] || die "manifest lists no pieces"
out="$out_root/$bf16dir"

if [ -f "$out/.complete" ] && [ "$(cat "$out/.complete")" = "$tar_sha" ]; then
    say "$out already unpacked from this shipment"
    echo "$out"
    exit 0
fi

say "${#pieces[@]} pieces ok; checking the whole tar ($tar_bytes bytes)"
got="$(cat "${pieces[@]}" | sha256sum | cut -d' ' -f1)"
[ "$got" = "$tar_sha" ] || die "reassembled tar sha256 $got != manifest $tar_sha (pieces out of order?)"
mkdir -p "$out_root"
cat "${pieces[@]}" | tar -xf - -C "$out_root" || die "extracting into $out_root failed (disk full?)"
say "extracted into $out_root"

if [ "$ship" = "gguf" ]; then
    gguf="$out_root/$gguf_rel"
    [ -f "$gguf" ] || die "$gguf not in the shipment"
    if [ -d "$site" ]; then
        case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
    fi
    say "converting $(basename "$gguf") to bf16 (PYTHONPATH=${PYTHONPATH:-})"
    args=(convert --gguf "$gguf" --out "$out")
    [ "$key" != "-" ] && args+=(--expect-sha256 "$key")
    "$py" "$repo/dev/gpu_host/fetch_models.py" "${args[@]}" >&2 || die "conversion failed"
else
    [ -f "$out/config.json" ] || die "$out/config.json missing after extraction"
fi
echo "$tar_sha" > "$out/.complete"
say "ready: $out ($(du -sh "$out" | cut -f1))"
echo "$out"
