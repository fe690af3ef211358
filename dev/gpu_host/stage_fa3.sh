#!/usr/bin/env bash
# sgl-kernel's FlashAttention-3 library on the GPU host, in pieces.
#
# The runtime bundle (dev/gpu_host/gpu_host_bundle.py) trims sgl_kernel/flash_ops.abi3.so
# (1.1 GB) to fit a call. The turboquant backend's prefill runs FA3 on Hopper when that
# library imports (sglang_tq/kernels/tq_extend.py), so it crosses separately, xz-compressed, in
# three <= 50 MB pieces, one call each, back to back with the call that uses it:
#
#   here, once:  bash dev/gpu_host/stage_fa3.sh make # .gpu_bundle/fa3/{flash_ops.so.xz.partN,SHA256}
#   call k:      carry [".gpu_bundle/fa3/flash_ops.so.xz.partK", ".gpu_bundle/fa3/SHA256"]
#                command: bash dev/gpu_host/stage_fa3.sh stage
#   last call:   bash dev/gpu_host/gpu_evidence.sh ... (runs `stage_fa3.sh install` after the setup)
#
# install: checks the pieces' sha256 and unpacks the library into $GPU_SITE/sgl_kernel
# (default /tmp/site); without pieces it does nothing and the backend prefill runs
# SGLang's Triton extend kernel. Exit 1 only for an incomplete or corrupt set.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
src="$repo/.gpu_bundle/fa3"
dst="${FA3_STAGE:-/tmp/fa3}"
site="${GPU_SITE:-/tmp/site}"
case "${1:-}" in
make)
  # locate the package without importing it: sgl_kernel's import needs libcuda
  lib="$(python -c 'import importlib.util as u; print(u.find_spec("sgl_kernel").submodule_search_locations[0])')/flash_ops.abi3.so"
  mkdir -p "$src" && rm -f "$src"/flash_ops.so.xz.part*
  xz -T0 -6 -c "$lib" | tee >(sha256sum | cut -d' ' -f1 > "$src/SHA256") \
    | split -b 50000000 -d -a 1 - "$src/flash_ops.so.xz.part"
  ls -la "$src"
  ;;
stage)
  mkdir -p "$dst" && cp "$src"/flash_ops.so.xz.part* "$src/SHA256" "$dst"/ && ls -la "$dst"
  ;;
install)
  so="$site/sgl_kernel/flash_ops.abi3.so"
  if [ -f "$so" ]; then echo "stage_fa3: $so present"; exit 0; fi
  if ! ls "$dst"/flash_ops.so.xz.part* > /dev/null 2>&1; then
    echo "stage_fa3: no pieces in $dst; the turboquant prefill will run SGLang's Triton kernel"; exit 0
  fi
  got="$(cat "$dst"/flash_ops.so.xz.part* | sha256sum | cut -d' ' -f1)"
  if [ "$got" != "$(cat "$dst/SHA256")" ]; then
    echo "stage_fa3: ERROR: the pieces in $dst are incomplete or corrupt (sha256 $got); stage all three again" >&2
    exit 1
  fi
  cat "$dst"/flash_ops.so.xz.part* | xz -d > "$so.tmp" && mv "$so.tmp" "$so"
  echo "stage_fa3: installed $so"
  ;;
*)
  sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2
  ;;
esac
