"""The C++ runtime's TensorRT backend, checked without a GPU (issue 10, item 4).

CI (build/cpp, no TensorRT headers): eclipse-cuda-check, built from the backend's own CUDA code
against the CUDA 13 and CUDA 12 headers of NVIDIA's wheels, makes its calls against real
libraries:
- NVRTC (both majors' wheels) compiles the kernel EMBEDDED at build time from
  runtime/backends/kernels/guided_step.cu to cubins for every architecture the project targets, byte for
  byte the cubins the Python runtime's compile path makes from the same file with the same NVRTC;
- every driver wrapper, against a stand-in libcuda that answers "no device"
  (tests/data/stub_libcuda.c), and with no driver at all, ends in the backend's error, never a crash.

Where the TensorRT-RTX build exists (make cpp-trt-rtx: needs TensorRT-RTX headers, which no
registry ships, so not in CI): the TensorRT calls against the tensorrt-rtx wheel's library, the
C API's backend creation and the example's flags. The loop logic is tested against a fake
device in cpp/tests/test_device_loop.cpp (CTest). Engines on a GPU: only where one is lent.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eclipse_export.runtime.backends.cuda import compile_kernel, kernel_source
from tests.test_cuda_api import ARCHS, CtypesNvrtc, _nvrtc_library, stub_driver  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
# ECLIPSE_CUDA_CHECK: the binary carried to a GPU machine, where no build folder travels (bench/gpu)
CHECK = Path(os.environ.get("ECLIPSE_CUDA_CHECK") or ROOT / "build" / "cpp" / "eclipse-cuda-check")
RTX_BUILD = ROOT / "build" / "cpp-trt-rtx"


@functools.cache
def rtx_libs() -> Path:
    """The tensorrt-rtx wheel's library folder; looked up only by the tests that use it, so this
    file imports where TensorRT-RTX is not installed (the GPU verification machine: issue 18 #2)."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-rtx is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _tool(path: Path) -> Path:
    if not path.is_file():  # make test builds it when the NVIDIA wheels of the test extra are installed
        pytest.fail(f"{path} is not built: run `make cpp` (make test builds it)")
    return path


def _run(args: list, env_paths: list[Path] = (), timeout: int = 120) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    if env_paths:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(map(str, env_paths))
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr  # a crash (signal) or an escaped exception fails here
    return json.loads(done.stdout.strip().splitlines()[-1])


def _python_cubin(lib: Path, sm: int) -> bytes:
    kind, image = compile_kernel(CtypesNvrtc(lib), kernel_source("guided_step"), "guided_step", sm)
    assert kind == "cubin"
    return image


@pytest.mark.parametrize("major", [12, 13])
@pytest.mark.parametrize("tool", ["eclipse-cuda-check", "eclipse-cuda-check-cu12"])
def test_the_embedded_kernel_compiles_to_the_python_runtimes_cubins(tmp_path, tool, major):
    """Same file, same options, same NVRTC: identical cubins. So the C++ runtime embeds the
    Python runtime's guided_step.cu (no copy that could drift), and compiles it the same way."""
    lib = _nvrtc_library(major)
    assert lib is not None, f"libnvrtc.so.{major} missing: the test extra installs both NVRTC majors"
    out = _run([_tool(CHECK.parent / tool), "nvrtc", lib, tmp_path, *ARCHS])
    assert out["version"].startswith(f"{major}.")
    assert [k["arch"] for k in out["kernels"]] == [f"sm_{sm}" for sm in ARCHS]
    for k in out["kernels"]:
        cubin = Path(k["file"]).read_bytes()
        assert k["kind"] == "cubin" and cubin[:4] == b"\x7fELF"
        assert cubin == _python_cubin(lib, k["sm"]), k


def test_a_gpu_newer_than_nvrtc_gets_ptx_and_compile_errors_carry_the_log(tmp_path):
    lib = _nvrtc_library(13)
    newest = max(CtypesNvrtc(lib).nvrtcGetSupportedArchs()[1])
    out = _run([_tool(CHECK), "nvrtc", lib, tmp_path, newest + 500])
    (k,) = out["kernels"]
    assert k["kind"] == "ptx" and f".target sm_{newest}" in Path(k["file"]).read_text(errors="replace")
    errors = _run([CHECK, "nvrtc-error", lib])["outcomes"]
    assert re.match(r"error: NVRTC could not compile broken for sm_87: .*undefined_thing.* is undefined", errors["compile error"], re.S)
    assert errors["unknown architecture"].startswith("error: this NVRTC cannot compile for SM10")


def test_the_kernel_source_is_generated_from_the_python_file():
    generated = (CHECK.parent / "generated" / "guided_step_source.cpp").read_text()
    assert kernel_source("guided_step") in generated
    copies = [p for p in (ROOT / "cpp").rglob("*.cu") if "third_party" not in p.parts]
    assert not copies, f"a copy of the kernel in cpp/ would drift: {copies}"


# every wrapper of the driver: which CUDA entry point its error names ("ok": cleanup, no status)
DRIVER_CALLS = {
    "device": "no usable CUDA GPU here", "retain_primary_context": "cuDeviceGet", "ContextGuard": "cuCtxPushCurrent",
    "CudaStream": "cuCtxPushCurrent", "GuidedStepKernel": "cuCtxPushCurrent", "malloc": "cuMemAlloc(16)",
    "upload": "cuMemcpyHtoDAsync", "download": "cuMemcpyDtoHAsync", "copy": "cuMemcpyDtoDAsync",
    "fill_u32": "cuMemsetD32Async", "synchronize": "cuStreamSynchronize", "begin_capture": "cuStreamBeginCapture",
    "end_capture": "cuStreamEndCapture", "launch_graph": "cuGraphLaunch", "create_event": "cuEventCreate",
    "record_event": "cuEventRecord", "wait_event": "cuEventSynchronize", "launch_guided_step": "cuLaunchKernel(guided_step)",
    "driver_version": "cuDriverGetVersion", "guided_step without a kernel": "without the kernel",
    "open": "ok", "free": "ok", "destroy_graph": "ok", "destroy_event": "ok", "release_primary_context": "ok",
}


def test_every_driver_wrapper_against_a_driver_without_a_device(stub_driver):  # noqa: F811
    """The stand-in driver resolves every entry point (through cuGetProcAddress, as the backend
    does) and answers CUDA_ERROR_NO_DEVICE: each wrapper must end in the backend's error naming
    the CUDA call, none may crash."""
    out = _run([_tool(CHECK), "driver"], [stub_driver, _nvrtc_library(13).parent])
    assert out["outcomes"].keys() == DRIVER_CALLS.keys()
    for name, expected in DRIVER_CALLS.items():
        got = out["outcomes"][name]
        assert got == "ok" if expected == "ok" else (got.startswith("error: ") and expected in got), (name, got)
    # every function pointer CudaDriver declares is resolved (an unresolved one would be a null
    # call), and every one resolved is called by the backend's CUDA code
    declared = set(re.findall(r"decltype\(&::(cu\w+)\) \w+ = nullptr;", (ROOT / "cpp/src/cuda/cuda_driver.hpp").read_text()))
    assert declared == set(out["entry_points"])
    sources = "".join((ROOT / "cpp/src/cuda" / f).read_text() for f in ("cuda_driver.hpp", "cuda_driver.cpp", "cuda_stream.cpp"))
    unused = [e for e in out["entry_points"] if not re.search(rf"\b{e[2:]}\(", sources)]
    assert not unused, unused


@pytest.fixture(scope="module")
def context_driver(tmp_path_factory) -> Path:
    """The stand-in driver whose context calls work (a per-thread context stack)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler for the stand-in driver library: apt-get install gcc (make test does)")
    out = tmp_path_factory.mktemp("ctx-driver")
    subprocess.run([cc, "-shared", "-fPIC", "-DSTUB_CONTEXTS", "-o", str(out / "libcuda.so.1"),
                    str(ROOT / "tests/data/stub_libcuda.c")], check=True)
    return out


def test_every_entry_leaves_the_callers_context_current(context_driver):
    """Issue 18 #5: the library pushed nothing and popped nothing, it set its context current
    (cuCtxSetCurrent) and left it there, so an embedding application's next CUDA call went to our
    context. Each entry now pushes its context and pops it, returning or throwing."""
    out = _run([_tool(CHECK), "context"], [context_driver, _nvrtc_library(13).parent])
    assert out["inside"] == out["ours"]  # the guard really made ours current
    assert out["after"] and all(v == out["caller"] for v in out["after"].values()), out
    o = out["outcomes"]
    assert o["ContextGuard"] == "ok" and o["~CudaStream"] == "ok"
    for name in ("CudaStream", "GuidedStepKernel"):  # failed inside, after pushing
        assert o[name].startswith("error: CUDA cu") and "CUresult 100" in o[name], (name, o[name])


@functools.cache
def _gpu_reason() -> str | None:
    """None where a real NVIDIA driver with a device is here (the GPU window), else why not."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"no NVIDIA driver here ({e})"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the NVIDIA driver sees no GPU"
    return None


def test_the_cpp_cuda_layer_on_a_gpu(tmp_path):
    """Issue 18 2c, on a GPU: eclipse-cuda-check device runs the C++ CUDA layer for real (driver
    entry points via cuGetProcAddress, NVRTC cubins, stream, events, graph capture, the backend's
    device loop with a stand-in UNet kernel) against the host statement, exactly."""
    from tests.gpu_required import need

    need("cuda", _gpu_reason())
    nvrtc = _nvrtc_library(13)
    paths = [nvrtc.parent] if nvrtc else []
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*map(str, paths), os.environ.get("LD_LIBRARY_PATH", "")])}
    done = subprocess.run([str(_tool(CHECK)), "device", str(tmp_path / "device.json")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.stdout.strip(), done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in out["checks"].items() if not v.get("ok")}
    assert not failed and out["ok"] and done.returncode == 0, json.dumps(failed, indent=1)[:4000]


def test_no_driver_is_a_clear_error():
    out = _run([_tool(CHECK), "driver"], [ROOT / "build" / "no-such-dir"])
    assert out["outcomes"] == {"open": "error: no NVIDIA driver here (cannot load libcuda.so.1: libcuda.so.1: cannot open "
                                       "shared object file: No such file or directory); the TensorRT backends need an NVIDIA "
                                       "GPU and its driver"}


# --- the TensorRT-RTX build (local: needs TensorRT-RTX headers) -----------------------------------

needs_rtx_build = pytest.mark.skipif(
    not (RTX_BUILD / "libeclipse.so").is_file(),
    reason="build/cpp-trt-rtx is not built: TensorRT-RTX's headers are not in CI (no registry ships them); "
           "`make cpp-trt-rtx` builds it where they are (README: Embedding in C/C++)")


@pytest.fixture(scope="module")
def rtx_plan(tiny_fp16_bundle, tmp_path_factory) -> Path:
    from eclipse_export.export.engines import BuildOptions
    from eclipse_export.export.derive import build_engines_for_bundle

    out = build_engines_for_bundle(tiny_fp16_bundle, tmp_path_factory.mktemp("rtx") / "b", "trt-rtx-fp16",
                                   BuildOptions(workspace_mib=8192, max_batch=1), log=lambda m: None)
    return out


@needs_rtx_build
def test_tensorrt_rtx_calls_against_the_wheels_library(stub_driver, rtx_plan):  # noqa: F811
    """The backend's TensorRT code against libtensorrt_rtx (1.7, compiled against the 1.6
    headers): the library opens, its version is read, a runtime is created (no GPU needed), the
    ONNX parser library opens, a real engine of the bundle is read past its header and refused
    for want of a device: an error, not a crash."""
    out = _run([RTX_BUILD / "eclipse-cuda-check", "tensorrt", rtx_plan / "engines" / "unet.rtx.plan"],
               [stub_driver, rtx_libs(), _nvrtc_library(13).parent])
    import tensorrt_rtx

    assert out["version"] == tensorrt_rtx.__version__ and out["version_like_3"] == ".".join(tensorrt_rtx.__version__.split(".")[:3])
    o = out["outcomes"]
    assert o["open"] == o["create_runtime"] == o["require_parser"] == "ok"
    assert o["TrtEngine"].startswith("error: unet: unet.rtx.plan did not deserialize") and "no CUDA-capable device" in o["TrtEngine"]
    assert "tensorrt-rtx cannot be loaded" in o["open missing"]


CREATE = r"""
import ctypes as C, json, sys
lib = C.CDLL(sys.argv[1])
class Options(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("device_id", C.c_int32), ("low_memory", C.c_int32),
                ("cuda_graphs", C.c_int32), ("runtime_cache_dir", C.c_char_p), ("library_path", C.c_char_p),
                ("onnx_parser_library_path", C.c_char_p), ("nvrtc_library_path", C.c_char_p)]
lib.eclipse_tensorrt_default_options.restype = Options
lib.eclipse_tensorrt_flavour.restype = C.c_char_p
lib.eclipse_last_error.restype = C.c_char_p
o = lib.eclipse_tensorrt_default_options()
assert o.struct_size == C.sizeof(Options) and o.cuda_graphs == 1 and o.low_memory == 0
for name, value in json.loads(sys.argv[2]).items():
    setattr(o, name, value.encode() if isinstance(value, str) else value)
backend = C.c_void_p()
status = lib.eclipse_backend_tensorrt_create(C.byref(o), C.byref(backend))
print(json.dumps({"status": status, "error": lib.eclipse_last_error().decode(), "flavour": lib.eclipse_tensorrt_flavour().decode(),
                  "available": [lib.eclipse_backend_available(n) for n in (b"tensorrt-rtx", b"tensorrt", b"custom")]}))
"""


def _create(paths: list, **options) -> dict:
    return _run([sys.executable, "-c", CREATE, RTX_BUILD / "libeclipse.so", json.dumps(options)], paths or [ROOT / "build" / "none"])


@needs_rtx_build
def test_backend_creation_names_every_missing_piece_in_one_error(stub_driver):  # noqa: F811
    # nothing findable: the driver, NVRTC and TensorRT-RTX, one error naming each
    out = _create([], library_path="libtensorrt_rtx.so.1", nvrtc_library_path="")
    assert out["status"] == 3 and out["flavour"] == "tensorrt-rtx" and out["available"] == [1, 0, 1]
    e = out["error"]
    assert e.startswith("the tensorrt-rtx backend cannot run here: no NVIDIA driver here")
    assert "NVRTC cannot be loaded" in e and "tensorrt-rtx cannot be loaded" in e
    # a driver without a GPU, NVRTC and TensorRT-RTX from the wheels: only the GPU is missing
    out = _create([stub_driver], library_path=str(rtx_libs() / "libtensorrt_rtx.so.1"),
                  nvrtc_library_path=str(_nvrtc_library(13)))
    assert out["status"] == 3
    assert out["error"] == ("the tensorrt-rtx backend cannot run here: no usable CUDA GPU here (CUresult 100); the TensorRT "
                            "backends need an NVIDIA GPU and driver (use the onnxruntime backend on CPU)")


@needs_rtx_build
def test_the_example_takes_the_tensorrt_flags(tiny_bundle, tmp_path):
    exe = RTX_BUILD / "eclipse-generate-cpp"
    base = [exe, "--bundle", tiny_bundle, "--prompt", "a red cube", "--out", tmp_path / "x.png"]
    env = {**os.environ, "LD_LIBRARY_PATH": str(ROOT / "build" / "none")}
    run = lambda *extra: subprocess.run([str(a) for a in base + list(extra)], capture_output=True, text=True, env=env)
    wrong = run("--backend", "tensorrt")
    assert wrong.returncode == 2 and "error: --backend tensorrt: this eclipse library was built with the tensorrt-rtx backend only" in wrong.stderr
    flags = run("--low-memory")
    assert flags.returncode == 2 and "--low-memory and --no-cuda-graphs are for --backend tensorrt" in flags.stderr
    no_gpu = run("--backend", "tensorrt-rtx", "--low-memory", "--no-cuda-graphs")
    assert no_gpu.returncode == 1 and no_gpu.stderr.startswith("error: the tensorrt-rtx backend cannot run here: no NVIDIA driver")
    assert not (tmp_path / "x.png").exists()
