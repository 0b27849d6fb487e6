"""The little of CUDA the TensorRT backend needs, through cuda-python (`cuda.bindings`), not torch.

Device buffers, one non-default stream, async copies, CUDA-graph capture, device facts, and one
NVRTC-compiled elementwise kernel (classifier-free guidance + scheduler step fused) so the
latents stay on the device between UNet steps. cuda-bindings 12.x serves JetPack 6 (CUDA 12.6),
13.x serves CUDA 13; the calls used here exist in both.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np

from .backends import BackendError


class CudaError(BackendError):
    pass


def _import():
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError:
        raise BackendError("cuda-python is not installed: pip install 'cuda-bindings>=12.6' "
                           "(12.x for JetPack 6 / CUDA 12, 13.x for CUDA 13)") from None
    return runtime, driver, nvrtc


def _ok(result, what: str, rt=None):
    """cuda-python returns (error, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise CudaError(f"CUDA {what} failed: {name}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "SM89", TensorRT-RTX's spelling
    total_bytes: int


class Cuda:
    """One device, one non-default stream (TensorRT's enqueue must not use the legacy stream)."""

    def __init__(self, device: int = 0):
        self.rt, self.driver, self.nvrtc = _import()
        err, count = self.rt.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            why = getattr(err, "name", "no device") if int(err) != 0 else "no device"
            raise BackendError(f"no usable CUDA GPU here ({why}); the TensorRT backends need an NVIDIA GPU "
                               "and driver (use --backend onnxruntime on CPU)")
        if not 0 <= device < count:
            raise BackendError(f"CUDA device {device} does not exist (this machine has {count})")
        _ok(self.rt.cudaSetDevice(device), "cudaSetDevice")
        self.device = device
        self.stream = _ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self._kernels: dict[str, object] = {}

    def info(self) -> DeviceInfo:
        props = _ok(self.rt.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(self.device, name, f"SM{props.major}{props.minor}", int(props.totalGlobalMem))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes on the device."""
        free, total = _ok(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)

    # memory ------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(_ok(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        if ptr:
            _ok(self.rt.cudaFree(ptr), "cudaFree")

    def h2d(self, dst: int, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src)
        _ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                    self.stream), "cudaMemcpyAsync H2D")
        # pageable host memory: the copy is staged before return, but keep src alive until it ran
        self.synchronize()

    def d2h(self, dst: np.ndarray, src: int) -> None:
        assert dst.flags.c_contiguous
        _ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                    self.stream), "cudaMemcpyAsync D2H")

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        _ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream),
            "cudaMemcpyAsync D2D")

    def synchronize(self) -> None:
        _ok(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    # CUDA graphs -------------------------------------------------------------------------
    def begin_capture(self) -> None:
        # thread-local mode: other threads' CUDA calls (a UI, a second pipeline) do not break it
        _ok(self.rt.cudaStreamBeginCapture(self.stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture")

    def end_capture(self):
        graph = _ok(self.rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            return _ok(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)

    def launch_graph(self, graph_exec) -> None:
        _ok(self.rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec) -> None:
        self.rt.cudaGraphExecDestroy(graph_exec)

    # the fused guidance + scheduler step -------------------------------------------------
    def _kernel(self, name: str, source: str):
        if name in self._kernels:
            return self._kernels[name]
        cc = self.info().compute_capability[2:]
        prog = _ok(self.nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
        opts = [f"--gpu-architecture=compute_{cc}".encode(), b"--fmad=false"]
        err, = self.nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _ok(self.nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            self.nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaError(f"NVRTC could not compile {name}: {log.decode(errors='replace')}")
        size = _ok(self.nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = b" " * size
        _ok(self.nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        module = _ok(self.driver.cuModuleLoadData(ptx), "cuModuleLoadData")
        fn = _ok(self.driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
        self._kernels[name] = fn
        return fn

    def guided_step(self, pred: int, latents: int, noise: int, sample_out: int, n: int, cfg: bool,
                    scale: float, coefficients: tuple[float, ...]) -> None:
        """latents <- scheduler step of (CFG-combined pred, latents, noise), and the next UNet input
        (latents, twice under CFG) written to sample_out; all on the stream, nothing on the host."""
        fn = self._kernel("guided_step", GUIDED_STEP_SOURCE)
        a, b, clip, c_x0, c_x, c_eps, std = coefficients
        clip = 3.0e38 if math.isinf(clip) else clip
        c_float = ctypes.c_float
        args = ((pred, latents, noise, sample_out, n, int(cfg), scale, a, b, clip, c_x0, c_x, c_eps, std),
                (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int,
                 c_float, c_float, c_float, c_float, c_float, c_float, c_float, c_float))
        threads = 256
        blocks = (n + threads - 1) // threads
        _ok(self.driver.cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, self.stream, args, 0), "cuLaunchKernel")

    def close(self) -> None:
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


# float32 throughout and --fmad=false: the same arithmetic as runtime.schedulers.apply_step and
# guidance.combine, which CI checks against diffusers; no fused multiply-adds to diverge from it.
GUIDED_STEP_SOURCE = r"""
extern "C" __global__ void guided_step(const float* pred, float* latents, const float* noise, float* sample_out,
                                       long long n, int cfg, float scale, float a, float b, float clip,
                                       float c_x0, float c_x, float c_eps, float stdv) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float eps = pred[i];
    if (cfg) {  // pred holds [uncond; cond]: eps = u + s * (c - u)
        float c = pred[i + n];
        eps = eps + scale * (c - eps);
    }
    float x = latents[i];
    float x0 = fminf(fmaxf((x - b * eps) / a, -clip), clip);
    float prev = c_x0 * x0 + c_x * x + c_eps * eps;
    if (noise != 0 && stdv != 0.0f) prev = prev + stdv * noise[i];
    latents[i] = prev;
    if (sample_out != 0) {
        sample_out[i] = prev;
        if (cfg) sample_out[i + n] = prev;
    }
}
"""


class DeviceBuffer:
    """Device memory that grows, never shrinks: allocated once per largest shape seen, so its
    address (which TensorRT and a captured CUDA graph hold) changes only when it must."""

    def __init__(self, cuda: Cuda):
        self.cuda = cuda
        self.ptr = 0
        self.capacity = 0

    def ensure(self, nbytes: int) -> bool:
        """True when the address changed."""
        if nbytes <= self.capacity:
            return False
        self.cuda.free(self.ptr)
        self.ptr = self.cuda.malloc(nbytes)
        self.capacity = nbytes
        return True

    def free(self) -> None:
        self.cuda.free(self.ptr)
        self.ptr, self.capacity = 0, 0
