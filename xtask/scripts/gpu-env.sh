# Sourced by the GPU-machine scripts (gpu-check.sh, gpu-profile.sh) after OUT and PY are
# set: unpacks the .gpu/ bundle, puts the CUDA libraries of PyTorch's wheels (cuBLAS,
# cuDNN, ...) on the library path for the nofuss binaries, and defines `limited`, which
# runs a command under a deadline shared by the whole script.
LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
NV="$($PY -c 'import os, nvidia; print(os.path.dirname(list(nvidia.__path__)[0] + "/x"))' 2>/dev/null)"
CUDNN_DIR="$(find "${NV:-/nonexistent}" -name 'libcudnn.so.9' -printf '%h\n' 2>/dev/null | head -1)"
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 "$CUDNN_DIR" "$NV"/cudnn/lib "$NV"/cu13/lib; do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH RUST_BACKTRACE=1
# Everything below shares one deadline (GPU_CHECK_SECONDS, default 420) so that a hang
# in one step leaves the rest of the machine time to the others and the results come back.
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-420}))
# limited SECONDS CMD...: CMD under `timeout`, cut to what is left before the deadline.
limited() {
  local t=$1 left=$((DEADLINE - SECONDS)); shift
  if [ "$left" -lt 10 ]; then echo "skipped at the deadline: $*" >&2; return 124; fi
  [ "$t" -gt "$left" ] && t=$left
  timeout "$t" "$@"
}
for x in .gpu/*.xz; do
  [ -f "$x" ] || continue
  f="$(basename "$x" .xz)"
  [ ".gpu/$f" -nt ".gpu/$f.xz" ] && continue  # unpacked already
  if command -v xz >/dev/null; then xz -d -k -f ".gpu/$f.xz"
  else $PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' ".gpu/$f.xz" ".gpu/$f"
  fi
  chmod +x ".gpu/$f"
done
# Any library still missing (curand, say, where no wheel holds it): the first copy
# found under /usr or /opt.
for lib in $(ldd .gpu/nofuss 2>/dev/null | awk '/not found/ {print $1}'); do
  d="$(find /usr /opt -name "$lib" -printf '%h\n' 2>/dev/null | head -1)"
  [ -n "$d" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
done
