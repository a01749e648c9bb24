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
# Test binaries (target names), the bench and the binary the check runs (built for
# nofuss's own integration test `cli`, which runs it).
tests=(ops_parity optim_parity graph_replay bn_inception_parity reference_parity)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
json="$(mktemp)"
cargo test --release --no-run --features cuda \
  -p nofuss -p nofuss-tensor -p nofuss-backbone -p nofuss-losses -p nofuss-eval \
  "${args[@]}" --test cli --bench knn --message-format=json-render-diagnostics > "$json"
mkdir -p .gpu
# The executable of target `$1` of kind `$2` (test, bench, bin) from cargo's messages.
exe_of() {
  python3 - "$json" "$1" "$2" <<'PYEOF'
import json, sys
path, name, kind = sys.argv[1:]
# The binary itself, not its unit tests: built without the test harness.
found = [m["executable"] for m in map(json.loads, open(path))
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["target"]["name"] == name and kind in m["target"]["kind"]
         and not (kind == "bin" and m["profile"]["test"])]
print(found[-1] if found else "")
PYEOF
}
for t in "${tests[@]}" knn:bench nofuss:bin; do
  case "$t" in *:*) name="${t%%:*}"; kind="${t##*:}" ;; *) name="$t"; kind=test ;; esac
  exe="$(exe_of "$name" "$kind")"
  [ -n "$exe" ] || { echo "no $kind executable $name in cargo's output" >&2; exit 1; }
  out="$name"; [ "$name" = knn ] && out=knn_bench
  cp "$exe" ".gpu/$out"
  strip ".gpu/$out" && xz -9 -T0 -f ".gpu/$out"
done
rm -f "$json"
# Which source the binaries are of: the commit, and the tracked files changed from it.
{ git rev-parse HEAD; git status --porcelain --untracked-files=no; } > .gpu/COMMIT
ls -l .gpu
