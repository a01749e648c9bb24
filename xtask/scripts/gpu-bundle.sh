#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything a GPU check needs and packs it into .gpu/
# (git-ignored): the `nofuss` binary and the CUDA parity-test binaries, built with
# `--features cuda`, stripped and xz-compressed. xtask/scripts/gpu-check.sh runs them on
# the GPU machine, which needs no Rust toolchain.
# Needs a CUDA toolkit (nvcc) in CUDA_ROOT; where it has no cuDNN, a link stub is added.
# Usage: CUDA_ROOT=... CUDA_COMPUTE_CAP=90 xtask/scripts/gpu-bundle.sh
set -euo pipefail
: "${CUDA_ROOT:?set CUDA_ROOT to a CUDA toolkit (nvcc, headers, libraries)}"
cd "$(dirname "$0")/../.."
ls "$CUDA_ROOT"/lib*/libcudnn.so* >/dev/null 2>&1 || xtask/scripts/cudnn-stub.sh "$CUDA_ROOT"
TARGET="${CARGO_TARGET_DIR:-target}"
export CARGO_TARGET_DIR="$TARGET"
cargo build --release -p nofuss --features cuda
mkdir -p .gpu
# Test binaries: name -> package/test target.
tests=(ops_parity:nofuss-tensor optim_parity:nofuss-tensor graph_replay:nofuss-tensor bn_inception_parity:nofuss-backbone reference_parity:nofuss-losses)
for t in "${tests[@]}"; do
  name="${t%%:*}"; pkg="${t##*:}"
  exe="$(cargo test --release --features cuda -p "$pkg" --test "$name" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)"
  [ -n "$exe" ] || { echo "no test binary for $pkg/$name" >&2; exit 1; }
  cp "$exe" ".gpu/$name"
done
# The GPU kNN benchmark (SOP-scale evaluation), nofuss-eval's bench target.
exe="$(cargo bench -p nofuss-eval --features cuda --bench knn --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)"
[ -n "$exe" ] || { echo "no knn bench binary" >&2; exit 1; }
cp "$exe" .gpu/knn_bench
cp "$TARGET/release/nofuss" .gpu/nofuss
for f in nofuss ops_parity optim_parity graph_replay bn_inception_parity reference_parity knn_bench; do
  strip ".gpu/$f" && xz -9 -T0 -f ".gpu/$f"
done
ls -l .gpu
