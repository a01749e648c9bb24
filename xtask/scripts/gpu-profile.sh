#!/usr/bin/env bash
# Where BN-Inception's training step spends its GPU time, nofuss beside PyTorch: run on
# the GPU machine after xtask/scripts/gpu-bundle.sh filled .gpu/ (as gpu-check.sh is).
# Per configuration, nofuss's step with each of its CUDA operations timed
# (`--profile-ops`) and PyTorch's step under torch.profiler, both with cuDNN's heuristic
# and with timed algorithm choice (`--cudnn-benchmark`). Writes $OUT/profile.jsonl
# (one JSON line per run), $OUT/profile.md (the largest operations of each run) and the
# commands' stderr to $OUT/errors.txt.
# Usage: OUT=dir xtask/scripts/gpu-profile.sh [BATCH:PRECISION ...]   (default 128:f32 32:f32 32:bf16)
set -u
OUT="${OUT:-$PWD/gpu-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
source "$(dirname "$0")/gpu-env.sh"
J="$OUT/profile.jsonl"; : > "$J"
configs=("$@"); [ ${#configs[@]} -gt 0 ] || configs=(128:f32 32:f32 32:bf16)
for cfg in "${configs[@]}"; do
  n="${cfg%%:*}"; p="${cfg##*:}"
  for algo in "" --cudnn-benchmark; do
    limited 120 .gpu/nofuss bench train-step --backbone bn-inception --batch-size "$n" --precision "$p" \
      --steps 10 --device cuda --profile-ops $algo >> "$J" 2>> "$OUT/errors.txt" || echo "failed: nofuss $cfg $algo" >> "$OUT/errors.txt"
    limited 120 $PY crates/nofuss/benches/torch_train_step.py "$n" 10 --backbone bn-inception --device cuda \
      --classes 100 --precision "$p" --profile-ops $algo >> "$J" 2>> "$OUT/errors.txt" || echo "failed: torch $cfg $algo" >> "$OUT/errors.txt"
  done
done
$PY - "$J" > "$OUT/profile.md" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    algo = r.get("cudnn_algorithms", "")
    print(f"## {r.get('impl')} batch {r.get('batch')} {r.get('precision')} {algo}: "
          f"{r.get('median_ms')} ms/step ({r.get('images_per_sec')} img/s); profiled step "
          f"{r.get('profiled_step_ms', '-')} ms, listed ops {r.get('profiled_ops_ms')} ms")
    for o in r.get("ops", [])[:40]:
        print(f"{o['ms']:9.3f} ms {o['calls']:7.2f}x {o['name']}")
    print()
PYEOF
cat "$OUT/profile.md"
