#!/usr/bin/env bash
# Run on a machine WITHOUT a GPU (this project's dev/CI machine), once per package version:
# a throwaway venv with the real onnxruntime-gpu (CUDA 13) and TensorRT-RTX EP packages, a
# stand-in libcuda/libnvidia-ml that report "no device" (so the real provider libraries load
# and parse their options), then check_ort_gpu_packages.py. Needs gcc and ~2 GB of disk.
# usage: bench/gpu/check_ort_gpu_packages.sh TINY_BUNDLE_DIR [WORK_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
bundle=$(cd "$1" && pwd); work=${2:-/tmp/eclipse-ort-gpu-check}
mkdir -p "$work/stub"
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "onnxruntime-gpu[cuda]==1.31.1" nvidia-cublas \
    onnxruntime-ep-nv-tensorrt-rtx-cu13==0.5.0 tokenizers Pillow numpy
# stand-in driver: every CUDA driver call answers CUDA_ERROR_NO_DEVICE, NVML "driver not loaded"
syms=$(nm -D --undefined-only "$work"/venv/lib/python3*/site-packages/onnxruntime_ep_nv_tensorrt_rtx/*.so* \
       "$work"/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so 2>/dev/null \
       | grep -oE ' cu[A-Z][A-Za-z0-9_]+' | tr -d ' ' | sort -u)
{ echo 'int cuDriverGetVersion(int *v) { *v = 13000; return 0; }'
  for s in $syms; do [ "$s" = cuDriverGetVersion ] || echo "int $s(void) { return 100; }"; done
  for s in cuInit cuGetProcAddress cuGetProcAddress_v2 cuDeviceGetCount; do
      echo "$syms" | grep -qx "$s" || echo "int $s(void) { return 100; }"; done; } > "$work/stub/cuda.c"
printf '%s\n' 'int nvmlInit_v2(void) { return 9; }' 'int nvmlShutdown(void) { return 0; }' \
    'const char *nvmlErrorString(int r) { return "driver not loaded (stand-in)"; }' \
    'int nvmlSystemGetDriverVersion(char *v, unsigned n) { return 9; }' > "$work/stub/nvml.c"
gcc -shared -fPIC -o "$work/stub/libcuda.so.1" "$work/stub/cuda.c" -Wl,-soname,libcuda.so.1
gcc -shared -fPIC -o "$work/stub/libnvidia-ml.so.1" "$work/stub/nvml.c" -Wl,-soname,libnvidia-ml.so.1
LD_LIBRARY_PATH="$work/stub" PYTHONPATH="$repo" "$work/venv/bin/python" "$here/check_ort_gpu_packages.py" "$bundle/prior.onnx"
