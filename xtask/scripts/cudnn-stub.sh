#!/usr/bin/env bash
# Adds a cuDNN 9 link stub (empty functions, soname libcudnn.so.9) to the `lib/stubs` folder
# of a CUDA toolkit that has no cuDNN, so `cargo build --features cuda` links on a machine
# without a GPU. At run time the real libcudnn.so.9 of the GPU machine is loaded (PyTorch's
# wheel ships one: .../site-packages/nvidia/cudnn/lib). Needs cudarc's sources (`cargo fetch`).
# Usage: xtask/scripts/cudnn-stub.sh "$CUDA_ROOT"
set -euo pipefail
ROOT="${1:?usage: cudnn-stub.sh CUDA_ROOT}"
STUBS="$ROOT/lib/stubs"
mkdir -p "$STUBS"
[ -f "$STUBS/libcudnn.so" ] && exit 0
SRC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)"
[ -n "$SRC" ] || { echo "cudarc sources not found: run 'cargo fetch' first" >&2; exit 1; }
TMP="$(mktemp -d)"
grep -hoE '^ *pub unsafe fn \w+' "$SRC"/src/cudnn/sys/*.rs | awk '{print "void "$4"(void){}"}' | sort -u > "$TMP/cudnn.c"
gcc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$STUBS/libcudnn.so" "$TMP/cudnn.c"
rm -rf "$TMP"
echo "cuDNN link stub: $STUBS/libcudnn.so" >&2
