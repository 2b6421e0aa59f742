#!/usr/bin/env bash
# Builds the CUDA + NCCL `eagle` binary for Hopper (sm_90) GPUs on a machine without a GPU or a
# CUDA toolkit, from pinned NVIDIA PyPI wheels:
#   1. download the CUDA 13 compiler, runtime, cuBLAS, cuRAND and NVRTC wheels (about 650 MB);
#   2. unpack them into one CUDA root (nvidia/cu13) with the usual lib64 and .so links;
#   3. compile link-time stubs for libcuda.so.1 and libnccl.so.2 from the function names in
#      cudarc's bindings (the real libraries come from the GPU machine's driver at run time);
#   4. cargo build --release --features nccl of `eagle-worker` (the verification worker,
#      tensor-parallel over NCCL; it must stay under 64 MiB) and `eagle` (the CLI: generate,
#      bench, train, tp-check; 67 MiB at last build, so carry it gzipped, 18 MB), stripped, into
#      target/cuda/release.
# Output: target/cuda/release/eagle and target/cuda/release/eagle-worker. The GPU machine needs the CUDA 13 runtime libraries,
# cuBLAS, NVRTC, cuRAND and NCCL 2.x, and a driver for CUDA 13.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${EAGLE_CUDA_ROOT:-${EAGLE_HOME:-$HOME/.cache/eagle}/cuda}"
WHEELS="$ROOT/wheels"
UNPACKED="$ROOT/unpacked"
STUBS="$ROOT/stubs"
mkdir -p "$WHEELS" "$UNPACKED" "$STUBS"

PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
      nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
      nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35)
echo "[1/4] CUDA wheels -> $WHEELS"
python3 -m pip download -q --no-deps -d "$WHEELS" "${PINS[@]}"

echo "[2/4] unpacking into $UNPACKED"
for w in "$WHEELS"/*.whl; do
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$UNPACKED"
done
CUDA="$UNPACKED/nvidia/cu13"
[ -e "$CUDA/bin/nvcc" ] || { echo "nvcc missing under $CUDA" >&2; exit 1; }
# zipfile drops the execute bits.
chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/* 2>/dev/null || true
[ -e "$CUDA/lib64" ] || ln -s lib "$CUDA/lib64"
for lib in cublas cublasLt cudart nvrtc curand; do
  real=$(ls "$CUDA/lib/lib$lib.so."* 2>/dev/null | sort | head -n1)
  [ -n "$real" ] && ln -sf "$(basename "$real")" "$CUDA/lib/lib$lib.so"
done

echo "[3/4] link-time stubs for libcuda and libnccl"
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort | tail -n1)
if [ -z "$CUDARC" ]; then
  cargo fetch >/dev/null
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -n1)
fi
stub() { # $1: bindings file, $2: symbol prefix, $3: output, $4: soname
  grep -ohE "(fn |link_name = \")$2[A-Za-z0-9_]+" "$1" | sed -E 's/^(fn |link_name = ")//' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$STUBS/$3.c"
  gcc -shared -fPIC -Wl,-soname,"$4" -o "$STUBS/$3.so" "$STUBS/$3.c"
}
stub "$CUDARC/src/driver/sys/mod.rs" cu libcuda libcuda.so.1
stub "$CUDARC/src/nccl/sys/mod.rs" nccl libnccl libnccl.so.2

echo "[4/4] cargo build --features nccl (sm_90); this takes a while"
export CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" NVCC="$CUDA/bin/nvcc" CUDA_COMPUTE_CAP=90
export PATH="$CUDA/bin:$PATH"
export LIBRARY_PATH="$STUBS:$CUDA/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="-L $STUBS -L $CUDA/lib"
cargo build --release -p eagle-cli --features nccl --target-dir target/cuda
cargo build --release -p eagle-worker --features nccl --target-dir target/cuda
for b in eagle eagle-worker; do
  strip "target/cuda/release/$b"
  size=$(stat -c %s "target/cuda/release/$b")
  echo "target/cuda/release/$b: $((size / 1048576)) MiB ($size bytes)"
  if [ "$size" -ge $((64 * 1048576)) ]; then
    if [ "$b" = eagle-worker ]; then
      echo "$b is over the 64 MiB limit" >&2
      exit 1
    fi
    echo "note: $b is over 64 MiB; carry it gzipped ($(gzip -c "target/cuda/release/$b" | wc -c) bytes)"
  fi
done
