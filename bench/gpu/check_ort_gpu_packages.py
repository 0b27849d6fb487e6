"""Check, on a machine WITHOUT a GPU, what the ONNX Runtime GPU paths pass to the real packages.

Run once per onnxruntime-gpu / plugin version (not in CI: the packages are ~1.6 GB installed).
`bench/gpu/check_ort_gpu_packages.sh` builds the throwaway venv and the stand-in driver and runs
this. Checks:
1. the CUDA EP accepts every provider option name the backend passes (real option parser: a
   misspelt name fails as "Unknown provider option" before any device is touched; ours must get
   past that to the device query, which fails: no GPU);
2. every TensorRT EP option name the backend passes is one the real provider library knows (its
   strings: loading it needs TensorRT's libnvinfer, which PyPI does not serve here);
3. every TensorRT-RTX EP option name is in the plugin package's own provider-options header;
4. creating a session for each GPU provider without a GPU ends in one BackendError line.
Exit status 0 when all hold.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
from eclipse_export.runtime.bundle import Bundle

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def options_passed(short: str, graph_capture: bool) -> dict:
    root = Path(tempfile.mkdtemp())
    (root / "manifest.json").write_text("{}")
    backend = OnnxRuntimeBackend(["cpu"])
    backend.short_providers, backend.providers = [short], ["x"]
    return dict(backend._provider_options(Bundle(root, {}), graph_capture)[0][1])


def main(graph: str) -> int:
    ort.preload_dlls(cudnn=False)
    capi = Path(ort.__file__).parent / "capi"
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")

    cuda_opts = options_passed("cuda", True)
    try:
        ort.InferenceSession(graph, providers=["CUDAExecutionProvider"], provider_options=[cuda_opts], enable_fallback=0)
        check(False, "CUDA session without a GPU was created")
    except Exception as e:
        msg = str(e)
        check("Unknown provider option" not in msg and ("device" in msg.lower() or "CUDA failure" in msg),
              f"CUDA EP accepts option names {sorted(cuda_opts)} (stopped at the device: {msg.split('FAIL : ')[-1][:120]})")
    try:
        ort.InferenceSession(graph, providers=["CUDAExecutionProvider"],
                             provider_options=[{**cuda_opts, "enable_cuda_graphs": "1"}], enable_fallback=0)
    except Exception as e:
        check("Unknown provider option" in str(e), "a misspelt CUDA EP option is refused by name (the check can fail)")

    trt_opts = options_passed("tensorrt", True)
    lib = capi / "libonnxruntime_providers_tensorrt.so"
    known = set(re.findall(r"\b(?:trt_[a-z_]+|device_id)\b",
                           subprocess.run(["strings", "-n", "6", str(lib)], capture_output=True, text=True).stdout))
    check(set(trt_opts) <= known, f"TensorRT EP knows {sorted(trt_opts)} (missing: {sorted(set(trt_opts) - known)})")

    try:
        import onnxruntime_ep_nv_tensorrt_rtx as rtx

        header = (Path(rtx.__file__).parent / "tensorrt_rtx_provider_options.h").read_text()
        names = set(re.findall(r'= "([a-zA-Z_]+)";', header))
        for used in ("nv_runtime_cache_path", "enable_cuda_graph"):
            check(used in names, f"TensorRT-RTX EP header defines {used}")
    except ImportError:
        check(False, "onnxruntime-ep-nv-tensorrt-rtx is not installed")

    from eclipse_export.families.kandinsky22.components import COMPONENTS
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(Path(graph).parent)
    for providers in (["cuda"], ["tensorrt", "cuda"], ["tensorrt-rtx"]):
        try:
            OnnxRuntimeBackend(providers).load(COMPONENTS["prior"], bundle)
            check(False, f"{providers}: a session without a GPU was created")
        except BackendError as e:
            check("\n" not in str(e), f"{providers}: BackendError: {e}")
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
