#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything a GPU check needs and packs it into .gpu/
# (git-ignored): the `nofuss` binary, the CUDA parity-test binaries and the kNN bench,
# built with `--features cuda`, stripped and xz-compressed. xtask/scripts/gpu-check.sh runs
# them on the GPU machine, which needs no Rust toolchain.
# Needs a CUDA toolkit (nvcc) in CUDA_ROOT; where it has no cuDNN, a link stub is added.
# Usage: CUDA_ROOT=... CUDA_COMPUTE_CAP=90 xtask/scripts/gpu-bundle.sh
# Everything comes from one cargo call: separate calls resolve the packages' features
# separately, and each resolution compiled candle and its CUDA kernels again (about 20
# minutes each on two cores).
set -euo pipefail
: "${CUDA_ROOT:?set CUDA_ROOT to a CUDA toolkit (nvcc, headers, libraries)}"
cd "$(dirname "$0")/../.."
ls "$CUDA_ROOT"/lib*/libcudnn.so* >/dev/null 2>&1 || xtask/scripts/cudnn-stub.sh "$CUDA_ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
# What goes into .gpu: package, target, kind and the name there. The tests' target names
# are not unique in the workspace (nofuss-eval has a CPU-only `reference_parity` too), so
# each executable is picked by its package. The binary is the one built for nofuss's own
# integration test `cli`, which runs it.
bins=(
  "nofuss-tensor ops_parity test ops_parity"
  "nofuss-tensor optim_parity test optim_parity"
  "nofuss-tensor graph_replay test graph_replay"
  "nofuss-backbone bn_inception_parity test bn_inception_parity"
  "nofuss-losses reference_parity test losses_parity"
  "nofuss-eval knn bench knn_bench"
  "nofuss nofuss bin nofuss"
)
args=()
for b in "${bins[@]}"; do
  set -- $b
  [ "$3" = test ] && args+=(--test "$2")
done
json="$(mktemp)"
cargo test --release --no-run --features cuda \
  -p nofuss -p nofuss-tensor -p nofuss-backbone -p nofuss-losses -p nofuss-eval \
  "${args[@]}" --test cli --bench knn --message-format=json-render-diagnostics > "$json"
mkdir -p .gpu
# The executable of package `$1`'s target `$2` of kind `$3` (test, bench, bin) from
# cargo's messages.
exe_of() {
  python3 - "$json" "$1" "$2" "$3" <<'PYEOF'
import json, sys
path, package, name, kind = sys.argv[1:]
# The binary itself, not its unit tests: built without the test harness.
found = [m["executable"] for m in map(json.loads, open(path))
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["manifest_path"].replace("\\", "/").endswith(f"/{package}/Cargo.toml")
         and m["target"]["name"] == name and kind in m["target"]["kind"]
         and not (kind == "bin" and m["profile"]["test"])]
print(found[-1] if found else "")
PYEOF
}
for b in "${bins[@]}"; do
  set -- $b
  exe="$(exe_of "$1" "$2" "$3")"
  [ -n "$exe" ] || { echo "no $3 executable $2 of $1 in cargo's output" >&2; exit 1; }
  cp "$exe" ".gpu/$4"
  strip ".gpu/$4" && xz -9 -T0 -f ".gpu/$4"
done
rm -f "$json"
# Which source the binaries are of: the commit, and the tracked files changed from it.
{ git rev-parse HEAD; git status --porcelain --untracked-files=no; } > .gpu/COMMIT
ls -l .gpu
