"""The GPU lines that can be checked without a GPU (issue 11).

- The fused kernel (runtime/backends/kernels/guided_step.cu) compiles with the runtime's own code
  (cuda.compile_kernel) to a cubin for every architecture the project targets, with the NVRTC of
  both CUDA majors the extras allow: cuda.bindings' (13.x here) and, through a ctypes adapter with
  the same call shapes, libnvrtc.so.12 and .so.13 from the nvidia-cuda-nvrtc wheels.
- Every cuda.bindings call of the backend (runtime/backends/cuda.py) is made once against the real module
  with a stand-in driver library (tests/data/stub_libcuda.c: every entry point answers "no
  device"); each must come back as an error status (CudaError/BackendError), never a TypeError
  from the bindings' argument conversion.
"""

from __future__ import annotations

import ast
import ctypes
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.runtime.backends.cuda import (
    CudaError,
    compile_kernel,
    kernel_source,
    nvrtc_architecture,
)
from tests.recording import Recording

ROOT = Path(__file__).resolve().parents[1]
# Jetson Orin sm_87; RTX sm_75/86/89/120; Hopper sm_90
ARCHS = (75, 86, 87, 89, 90, 120)
SOURCE = kernel_source("guided_step")


class CtypesNvrtc:
    """libnvrtc.so.<major> through ctypes, answering like cuda.bindings.nvrtc ((status, *values)),
    so the runtime's compile_kernel runs on either major."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.path = path
        self.destroyed = 0

    def nvrtcVersion(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        return self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), major.value, minor.value

    def nvrtcGetSupportedArchs(self):
        n = ctypes.c_int()
        self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(n))
        archs = (ctypes.c_int * n.value)()
        return self.lib.nvrtcGetSupportedArchs(archs), list(archs)

    def nvrtcCreateProgram(self, src, name, n, headers, names):
        prog = ctypes.c_void_p()
        return self.lib.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None), prog

    def nvrtcCompileProgram(self, prog, n, options):
        return (self.lib.nvrtcCompileProgram(prog, n, (ctypes.c_char_p * n)(*options)),)

    def _size(self, fn, prog):
        size = ctypes.c_size_t()
        return fn(prog, ctypes.byref(size)), size.value

    def _get(self, fn, prog, buf):
        out = (ctypes.c_char * len(buf)).from_buffer(buf)
        return (fn(prog, out),)

    def nvrtcGetProgramLogSize(self, prog):
        return self._size(self.lib.nvrtcGetProgramLogSize, prog)

    def nvrtcGetProgramLog(self, prog, buf):
        return self._get(self.lib.nvrtcGetProgramLog, prog, buf)

    def nvrtcGetCUBINSize(self, prog):
        return self._size(self.lib.nvrtcGetCUBINSize, prog)

    def nvrtcGetCUBIN(self, prog, buf):
        return self._get(self.lib.nvrtcGetCUBIN, prog, buf)

    def nvrtcGetPTXSize(self, prog):
        return self._size(self.lib.nvrtcGetPTXSize, prog)

    def nvrtcGetPTX(self, prog, buf):
        return self._get(self.lib.nvrtcGetPTX, prog, buf)

    def nvrtcDestroyProgram(self, prog):
        self.destroyed += 1
        return (self.lib.nvrtcDestroyProgram(ctypes.byref(prog)),)


def _nvrtc_library(major: int) -> Path | None:
    """The NVRTC wheel's library: nvidia-cuda-nvrtc-cu12 (nvidia/cuda_nvrtc/lib/libnvrtc.so.12),
    nvidia-cuda-nvrtc 13.x (nvidia/cu13/lib/libnvrtc.so.13)."""
    for entry in map(Path, sys.path):
        for found in sorted((entry / "nvidia").glob(f"*/lib/libnvrtc.so.{major}")) if (entry / "nvidia").is_dir() else []:
            return found
    return None


@pytest.fixture(scope="module", params=[12, 13], ids=["nvrtc-cu12", "nvrtc-cu13"])
def nvrtc_major(request):
    path = _nvrtc_library(request.param)
    if path is None:  # the test extra installs both: missing means a broken environment
        pytest.fail(f"libnvrtc.so.{request.param} not found: pip install -e '.[test]' installs both NVRTC majors")
    return CtypesNvrtc(path)


def _bindings_nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        pytest.fail("cuda-bindings is missing: the test extra installs it")
    return nvrtc


@pytest.mark.parametrize("sm", ARCHS)
def test_the_kernel_compiles_to_a_cubin_with_cuda_bindings_nvrtc(sm):
    nvrtc = Recording(_bindings_nvrtc())
    kind, image = compile_kernel(nvrtc, SOURCE, "guided_step", sm)
    assert kind == "cubin" and image[:4] == b"\x7fELF"  # a cubin (ELF), never PTX, for a known GPU
    assert f"--gpu-architecture=sm_{sm}" in _options_of_last_compile(sm)
    assert nvrtc.calls.count("nvrtcCreateProgram") == nvrtc.calls.count("nvrtcDestroyProgram") == 1


def _options_of_last_compile(sm: int) -> list[str]:
    return [f"--gpu-architecture={nvrtc_architecture([sm], sm)[1]}"]


@pytest.mark.parametrize("sm", ARCHS)
def test_the_kernel_compiles_with_both_nvrtc_majors(nvrtc_major, sm):
    """Both majors the extras allow (trt-cu12: NVRTC 12.x, trt-cu13: 13.x), through the runtime's
    compile_kernel; the program is destroyed every time."""
    before = nvrtc_major.destroyed
    kind, image = compile_kernel(nvrtc_major, SOURCE, "guided_step", sm)
    assert kind == "cubin" and image[:4] == b"\x7fELF", nvrtc_major.path
    assert nvrtc_major.destroyed == before + 1


def test_cuda_13_nvrtc_dropped_the_pre_turing_architectures():
    """Written down in docs/decisions.md: CUDA 13's NVRTC starts at sm_75 (Turing); CUDA 12's also
    knows Volta/Xavier (sm_70/72). Every architecture this project targets is in both."""
    archs = {}
    for major in (12, 13):
        path = _nvrtc_library(major)
        if path is None:
            pytest.fail(f"libnvrtc.so.{major} not found")
        archs[major] = CtypesNvrtc(path).nvrtcGetSupportedArchs()[1]
    assert min(archs[13]) == 75 and {70, 72} <= set(archs[12])
    assert set(ARCHS) <= set(archs[12]) & set(archs[13])


def test_a_gpu_newer_than_nvrtc_gets_ptx_for_the_newest_known_architecture():
    nvrtc = _bindings_nvrtc()
    archs = nvrtc.nvrtcGetSupportedArchs()[1]
    kind, image = compile_kernel(nvrtc, SOURCE, "guided_step", max(archs) + 500)
    assert kind == "ptx" and f".target sm_{max(archs)}" in image.decode()
    with pytest.raises(CudaError, match="cannot compile for SM10"):
        nvrtc_architecture(archs, 10)


def test_the_clamp_keeps_nan_like_np_clip():
    """Issue 11 #9: fminf/fmaxf compile to min.f32/max.f32, which return the bound for NaN
    (np.clip keeps NaN). The kernel's PTX must have no such instruction; the NaN flag is set
    with an atomic compare-and-swap, once, by the first bad step."""
    nvrtc = _bindings_nvrtc()
    kind, ptx = compile_kernel(nvrtc, SOURCE, "guided_step", max(nvrtc.nvrtcGetSupportedArchs()[1]) + 500)
    text = ptx.decode()
    assert not re.findall(r"\b(?:min|max)(?!\.NaN)[.\w]*\.f32", text)
    assert re.search(r"\batom\.[.\w]*cas\.b32", text)


def test_a_compile_error_is_a_cuda_error_and_the_program_is_destroyed():
    nvrtc = Recording(_bindings_nvrtc())
    with pytest.raises(CudaError, match="NVRTC could not compile broken for sm_87: .*error"):
        compile_kernel(nvrtc, 'extern "C" __global__ void broken() { undefined_thing(); }', "broken", 87)
    assert nvrtc.calls.count("nvrtcDestroyProgram") == 1


# --- cuda.bindings calls against the real module, with a stand-in driver ---------------------------

PROBE_SCRIPT = r"""
import json, math, sys
import numpy as np
from cuda.bindings import driver, nvrtc, runtime
from eclipse_export.runtime.backends import cuda as cu
from eclipse_export.runtime.backends.base import BackendError
sys.path.insert(0, sys.argv[1])
from tests.recording import Recording

rt, drv, nv = Recording(runtime), Recording(driver), Recording(nvrtc)
cu._import = lambda: (rt, drv, nv)
outcomes = {}

def attempt(name, fn, quiet=False):
    try:
        fn()
        outcomes[name] = "returned" if quiet else "no error"
    except (cu.CudaError, BackendError) as e:
        outcomes[name] = "error: " + str(e)
    except Exception as e:
        outcomes[name] = "BUG %s: %s" % (type(e).__name__, e)

attempt("Cuda()", lambda: cu.Cuda(0))
c = cu.Cuda.__new__(cu.Cuda)
c.rt, c.driver, c.nvrtc = rt, drv, nv
c.device, c.stream, c._kernels, c._modules = 0, runtime.cudaStream_t(), {}, []
host = np.zeros(4, np.float32)
attempt("info", c.info)
attempt("mem_info", c.mem_info)
attempt("malloc", lambda: c.malloc(16))
attempt("free", lambda: c.free(4096))
attempt("h2d", lambda: c.h2d(4096, host))
attempt("d2h", lambda: c.d2h(host, 4096))
attempt("d2d", lambda: c.d2d(4096, 8192, 16))
attempt("synchronize", c.synchronize)
attempt("begin_capture", c.begin_capture)
attempt("end_capture", c.end_capture)
attempt("instantiate", lambda: c.instantiate(runtime.cudaGraph_t()))
attempt("launch_graph", lambda: c.launch_graph(runtime.cudaGraphExec_t()))
attempt("destroy_graph", lambda: c.destroy_graph(runtime.cudaGraphExec_t()), quiet=True)
attempt("event", c.event)
attempt("record", lambda: c.record(runtime.cudaEvent_t()))
attempt("wait_event", lambda: c.wait_event(runtime.cudaEvent_t()))
attempt("destroy_event", lambda: c.destroy_event(runtime.cudaEvent_t()), quiet=True)
c.info = lambda: cu.DeviceInfo(0, "stub", "SM87", 0)  # past the properties call: compile, then load
attempt("_kernel", lambda: c._kernel("guided_step"))
attempt("launch_guided_step", lambda: c.launch_guided_step(
    driver.CUfunction(), 4096, 8192, 0, 12288, 1024, True, 4.0, (0.9, 0.4, math.inf, 0.3, 0.6, 0.1, 0.05), 16384, 3))
attempt("guided_step", lambda: c.guided_step(4096, 8192, 0, 12288, 1024, False, 1.0, (0.9, 0.4, 1.0, 0.3, 0.6, 0.1, 0.0)))
terms = __import__("eclipse_export.runtime.unclip_scheduler", fromlist=["x"]).UnCLIPStepTerms(
    0.9, 0.4, 1.0, 0.3, 0.6, True, True, 0.0, -7.5, -2.25)
attempt("launch_unclip_step", lambda: c.launch_unclip_step(
    driver.CUfunction(), 4096, 8192, 12288, 16384, (2, 3, 8, 8), 6, True, 8.0, terms, 20480, 1))
attempt("unclip_step", lambda: c.unclip_step(4096, 8192, 0, 0, (1, 3, 8, 8), 3, False, 1.0, terms))
attempt("select_device", lambda: c.select_device(0))
attempt("create_stream", c.create_stream)
attempt("_function", lambda: c._function(driver.CUmodule(), "guided_step"))
attempt("compile ptx", lambda: cu.compile_kernel(nv, cu.kernel_source("guided_step"), "guided_step", 10**4), quiet=True)
attempt("compile error", lambda: cu.compile_kernel(nv, "broken(", "broken", 87))
c._modules = [driver.CUmodule()]
attempt("close", c.close, quiet=True)
buf = cu.DeviceBuffer(c)
attempt("DeviceBuffer.ensure", lambda: buf.ensure(64))
print(json.dumps({"outcomes": outcomes, "calls": sorted(set(rt.calls + drv.calls + nv.calls))}))
"""


def _cuda_calls_in_source() -> set[str]:
    """Names of the cuda.bindings functions runtime/backends/cuda.py calls (self.rt.X(...), self.driver.X(...),
    self.nvrtc.X(...), nvrtc.X(...))."""
    tree = ast.parse((ROOT / "eclipse_export/runtime/backends/cuda.py").read_text())
    modules = ("self.rt", "self.driver", "self.nvrtc", "nvrtc")
    return {node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and ast.unparse(node.func.value) in modules}


@pytest.fixture(scope="module")
def stub_driver(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler for the stand-in driver library: apt-get install gcc (make test does)")
    out = tmp_path_factory.mktemp("stub-driver")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / "libcuda.so.1"), str(ROOT / "tests/data/stub_libcuda.c")],
                   check=True)
    return out


def test_every_cuda_bindings_call_returns_an_error_status_not_a_type_error(stub_driver):
    _bindings_nvrtc()
    env = {**__import__("os").environ, "LD_LIBRARY_PATH": str(stub_driver)}
    done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, str(ROOT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outcomes = report["outcomes"]
    bugs = {k: v for k, v in outcomes.items() if v.startswith("BUG")}
    assert not bugs, bugs
    quiet = {"destroy_graph", "destroy_event", "close", "compile ptx"}  # cleanup ignores statuses; NVRTC needs no GPU
    for name, outcome in outcomes.items():
        if name not in quiet:
            assert outcome.startswith("error: "), (name, outcome)
    # the stand-in driver answers "no device": the errors say so, through our own messages
    assert "no usable CUDA GPU" in outcomes["Cuda()"]
    assert "cuLaunchKernel failed: CUDA_ERROR_NO_DEVICE" in outcomes["launch_guided_step"]
    assert "cuLaunchKernel failed: CUDA_ERROR_NO_DEVICE" in outcomes["launch_unclip_step"]
    assert "cuModuleLoadData (cubin of guided_step) failed" in outcomes["_kernel"]
    # and every call in runtime/backends/cuda.py was among them
    missing = _cuda_calls_in_source() - set(report["calls"])
    assert not missing, f"cuda.bindings calls not exercised: {sorted(missing)}"


# --- on a GPU (issue 18, 2a): the fused step through the runtime's Cuda, against numpy ----------



def _step_case(rng, n: int, cfg: bool, bad: bool):
    x = (3 * rng.standard_normal(n)).astype(np.float32)
    pred = rng.standard_normal((2 if cfg else 1) * n).astype(np.float32)
    noise = rng.standard_normal(n).astype(np.float32)
    if bad:  # NaN latents stay NaN (np.clip keeps NaN); Inf predictions clamp or blow up
        x[3], pred[7], x[11] = np.nan, np.inf, -0.0
    return x, pred, noise


def _fused_step(cuda, x, pred, noise, cfg, scale, k, with_noise, step=2):
    """One guided_step launch on device copies; returns (latents, sample_out, bad_step flag)."""
    from eclipse_export.runtime.backends.cuda import DeviceBuffer

    n = x.size
    bufs = {name: DeviceBuffer(cuda) for name in ("x", "pred", "noise", "sample", "bad")}
    try:
        for name, nbytes in (("x", x.nbytes), ("pred", pred.nbytes), ("noise", noise.nbytes), ("sample", pred.nbytes),
                             ("bad", 4)):
            bufs[name].ensure(nbytes)
        cuda.h2d(bufs["x"].ptr, x)
        cuda.h2d(bufs["pred"].ptr, pred)
        cuda.h2d(bufs["noise"].ptr, noise)
        cuda.h2d(bufs["bad"].ptr, np.zeros(1, np.uint32))
        cuda.guided_step(bufs["pred"].ptr, bufs["x"].ptr, bufs["noise"].ptr if with_noise else 0, bufs["sample"].ptr, n,
                         cfg, scale, k.astuple(), bufs["bad"].ptr, step)
        got, sample, flag = np.empty_like(x), np.empty_like(pred), np.zeros(1, np.uint32)
        cuda.d2h(got, bufs["x"].ptr)
        cuda.d2h(sample, bufs["sample"].ptr)
        cuda.d2h(flag, bufs["bad"].ptr)
        cuda.synchronize()
        return got, sample, int(flag[0])
    finally:
        for b in bufs.values():
            b.free()


def _numpy_step(x, pred, noise, cfg, scale, k, with_noise):
    from eclipse_export.runtime import guidance
    from eclipse_export.runtime.schedulers import apply_step

    eps = guidance.combine(pred.reshape(2, -1), scale).reshape(-1) if cfg else pred
    with np.errstate(invalid="ignore", over="ignore"):
        return apply_step(k, eps, x, noise if with_noise else None)


@pytest.mark.parametrize("clip", [1.0, float("inf")], ids=["clip", "no-clip"])
@pytest.mark.parametrize("with_noise", [True, False], ids=["noise", "no-noise"])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("bad", [False, True], ids=["finite", "nan-inf"])
def test_the_fused_step_on_the_gpu_is_numpy_bit_for_bit(cuda, cfg, with_noise, clip, bad):
    """Issue 18 2a: the kernel the TensorRT backend runs, through the runtime's own Cuda class,
    equals schedulers.apply_step after guidance.combine exactly (float32, --fmad=false); the NaN
    flag names the step (step + 1) exactly when a result is not finite."""
    from eclipse_export.runtime.schedulers import StepCoefficients

    rng = np.random.default_rng(7)
    x, pred, noise = _step_case(rng, 1 << 16, cfg, bad)
    k = StepCoefficients(0.31, 0.95, clip, 0.52, 0.47, 0.02, 0.11)
    got, sample, flag = _fused_step(cuda, x, pred, noise, cfg, 5.5 if cfg else 1.0, k, with_noise)
    want = _numpy_step(x, pred, noise, cfg, 5.5 if cfg else 1.0, k, with_noise)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sample[: x.size], want)
    if cfg:
        np.testing.assert_array_equal(sample[x.size:], want)
    assert flag == (0 if np.isfinite(want).all() else 3)
    if bad:
        assert np.isnan(got[3])


def test_the_fused_step_on_a_latent_of_64m_elements(cuda):
    """Issue 18 2a: n >= 64 M elements (the index arithmetic is 64-bit, the grid large)."""
    from eclipse_export.runtime.schedulers import StepCoefficients

    n = 64 << 20
    rng = np.random.default_rng(3)
    x = rng.standard_normal(n, dtype=np.float32)
    pred = rng.standard_normal(n, dtype=np.float32)
    noise = rng.standard_normal(n, dtype=np.float32)
    x[-1] = np.nan  # the last element is reached
    k = StepCoefficients(0.72, 0.69, 1.0, 0.8, 0.1, 0.6, 0.05)
    got, _, flag = _fused_step(cuda, x, pred, noise, False, 1.0, k, True)
    np.testing.assert_array_equal(got, _numpy_step(x, pred, noise, False, 1.0, k, True))
    assert flag == 3 and np.isnan(got[-1])


def test_a_captured_cuda_graph_replayed_n_times_equals_n_launches(cuda):
    """Issue 18 2a: the stream capture the backend uses (thread-local mode), replayed N times,
    gives what N plain launches give, and numpy's N steps."""
    from eclipse_export.runtime.backends.cuda import DeviceBuffer
    from eclipse_export.runtime.schedulers import StepCoefficients

    n, steps = 1 << 18, 7
    rng = np.random.default_rng(5)
    x, pred, noise = _step_case(rng, n, True, False)
    k = StepCoefficients(0.9, 0.4, 1.0, 0.3, 0.6, 0.1, 0.05)
    cuda._kernel("guided_step")  # compiled and loaded before any capture
    results = {}
    for mode in ("graph", "plain"):
        bufs = [DeviceBuffer(cuda) for _ in range(4)]
        for b, nbytes in zip(bufs, (pred.nbytes, x.nbytes, noise.nbytes, pred.nbytes)):
            b.ensure(nbytes)
        p, lat, nz, smp = (b.ptr for b in bufs)
        cuda.h2d(p, pred)
        cuda.h2d(lat, x)
        cuda.h2d(nz, noise)
        def launch(p=p, lat=lat, nz=nz, smp=smp):
            cuda.guided_step(p, lat, nz, smp, n, True, 4.0, k.astuple())

        if mode == "graph":
            cuda.begin_capture()
            launch()
            graph = cuda.end_capture()
            for _ in range(steps):
                cuda.launch_graph(graph)
            cuda.destroy_graph(graph)
        else:
            for _ in range(steps):
                launch()
        out = np.empty_like(x)
        cuda.d2h(out, lat)
        cuda.synchronize()
        results[mode] = out
        for b in bufs:
            b.free()
    np.testing.assert_array_equal(results["graph"], results["plain"])
    want = x
    for _ in range(steps):
        want = _numpy_step(want, pred, noise, True, 4.0, k, True)
    np.testing.assert_array_equal(results["graph"], want)
