"""The little of CUDA the TensorRT backend needs, through cuda-python (`cuda.bindings`), not torch.

Device buffers, one non-default stream, async copies, CUDA-graph capture, device facts, and one
NVRTC-compiled source of elementwise kernels (classifier-free guidance + scheduler step fused:
guided_step for Kandinsky's schedulers, unclip_step for Karlo's) so the latents stay on the
device between UNet steps. cuda-bindings 12.x serves JetPack 6 (CUDA 12.6),
13.x serves CUDA 13; the calls used here exist in both.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from importlib.resources import files

import numpy as np

from eclipse_export.runtime.backends.base import BackendError


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

    @property
    def sm(self) -> int:
        """89 for SM89: NVRTC's spelling."""
        return int(self.compute_capability[2:])


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
        self.select_device(device)
        self.stream = self.create_stream()
        self._kernels: dict[str, object] = {}
        self._modules: list = []

    def create_stream(self):
        return _ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def select_device(self, device: int) -> None:
        _ok(self.rt.cudaSetDevice(device), "cudaSetDevice")
        self.device = device

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
        return self.instantiate(_ok(self.rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture"))

    def instantiate(self, graph):
        """An executable graph from a captured one (which is freed)."""
        try:
            return _ok(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)

    def launch_graph(self, graph_exec) -> None:
        _ok(self.rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec) -> None:
        self.rt.cudaGraphExecDestroy(graph_exec)

    # events: how far the device has got, without draining the stream -----------------------
    def event(self):
        return _ok(self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming), "cudaEventCreate")

    def record(self, event) -> None:
        _ok(self.rt.cudaEventRecord(event, self.stream), "cudaEventRecord")

    def wait_event(self, event) -> None:
        _ok(self.rt.cudaEventSynchronize(event), "cudaEventSynchronize")

    def destroy_event(self, event) -> None:
        self.rt.cudaEventDestroy(event)

    # the fused guidance + scheduler step -------------------------------------------------
    def _kernel(self, name: str):
        if name in self._kernels:
            return self._kernels[name]
        # every entry point of a source file comes from one compiled module (KERNEL_FILES)
        file = KERNEL_FILES.get(name, name)
        module = self._kernels.get(f"module:{file}")
        if module is None:
            kind, image = compile_kernel(self.nvrtc, kernel_source(file), file, self.info().sm)
            module = _ok(self.driver.cuModuleLoadData(image), f"cuModuleLoadData ({kind} of {file})")
            self._modules.append(module)
            self._kernels[f"module:{file}"] = module
        self._kernels[name] = self._function(module, name)
        return self._kernels[name]

    def _function(self, module, name: str):
        return _ok(self.driver.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")

    def guided_step(self, pred: int, latents: int, noise: int, sample_out: int, n: int, cfg: bool,
                    scale: float, coefficients: tuple[float, ...], bad_step: int = 0, step: int = 0) -> None:
        """latents <- scheduler step of (CFG-combined pred, latents, noise), and the next UNet input
        (latents, twice under CFG) written to sample_out; all on the stream, nothing on the host.
        bad_step: device address of a uint32 that the kernel sets to step + 1 on a NaN/Inf (0: none)."""
        self.launch_guided_step(self._kernel("guided_step"), pred, latents, noise, sample_out, n, cfg, scale,
                                coefficients, bad_step, step)

    def launch_guided_step(self, fn, pred: int, latents: int, noise: int, sample_out: int, n: int, cfg: bool,
                           scale: float, coefficients: tuple[float, ...], bad_step: int, step: int) -> None:
        a, b, clip, c_x0, c_x, c_eps, std = coefficients
        f, p = ctypes.c_float, ctypes.c_void_p
        # the order and types of kernels/guided_step.cu's parameters
        args = ((pred, latents, noise, sample_out, n, int(cfg), scale, a, b, clip, c_x0, c_x, c_eps, std, bad_step, step),
                (p, p, p, p, ctypes.c_longlong, ctypes.c_int, f, f, f, f, f, f, f, f, p, ctypes.c_uint))
        threads = 256
        blocks = (n + threads - 1) // threads
        _ok(self.driver.cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, self.stream, args, 0), "cuLaunchKernel")

    def unclip_step(self, pred: int, latents: int, noise: int, sample_out: int, latent_shape: tuple[int, ...],
                    pred_channels: int, cfg: bool, scale: float, terms, bad_step: int = 0, step: int = 0) -> None:
        """One unCLIP step (kernels/guided_step.cu unclip_step) from UnCLIPStepTerms `terms`:
        latents (latent_shape, float32) <- the step of the guided pred; noise 0 adds none."""
        self.launch_unclip_step(self._kernel("unclip_step"), pred, latents, noise, sample_out, latent_shape,
                                pred_channels, cfg, scale, terms, bad_step, step)

    def launch_unclip_step(self, fn, pred: int, latents: int, noise: int, sample_out: int,
                           latent_shape: tuple[int, ...], pred_channels: int, cfg: bool, scale: float, terms,
                           bad_step: int, step: int) -> None:
        b, c, h, w = latent_shape
        n, k = b * c * h * w, terms
        f, p, i32, i64 = ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        # the order and types of kernels/guided_step.cu unclip_step's parameters
        args = ((pred, latents, noise, sample_out, n, h * w, c, pred_channels, int(cfg), scale, k.a, k.b, k.clip,
                 k.c_x0, k.c_x, int(k.learned), k.std, k.min_log, k.max_log, bad_step, step),
                (p, p, p, p, i64, i64, i32, i32, i32, f, f, f, f, f, f, i32, f, ctypes.c_double, ctypes.c_double,
                 p, ctypes.c_uint))
        threads = 256
        blocks = (n + threads - 1) // threads
        _ok(self.driver.cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, self.stream, args, 0), "cuLaunchKernel")

    def close(self) -> None:
        for module in self._modules:
            self.driver.cuModuleUnload(module)
        self._modules, self._kernels = [], {}
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


# entry point -> the kernels/ source file that defines it (default: its own name)
KERNEL_FILES = {"unclip_step": "guided_step"}


def kernel_source(name: str) -> str:
    """CUDA source of one of the package's kernels (runtime/backends/kernels/<name>.cu, package data)."""
    return files(__package__).joinpath("kernels", f"{name}.cu").read_text()


# float32 throughout and no fused multiply-adds: the same arithmetic as schedulers.apply_step
# and guidance.combine, which CI checks against diffusers.
NVRTC_OPTIONS = (b"--fmad=false",)


def nvrtc_architecture(supported: list[int], sm: int) -> tuple[str, str]:
    """(kind, --gpu-architecture value) for a GPU of compute capability `sm` (e.g. 87).

    A cubin for the GPU's own sm_XX whenever this NVRTC knows it: PTX carries the NVRTC's PTX
    version and a driver older than the NVRTC refuses it (pip's NVRTC 13.5 writes PTX 9.5; the
    CUDA 12.6 driver of JetPack 6 reads up to 8.5), while a cubin only needs the same CUDA major.
    A GPU newer than this NVRTC gets PTX for the newest architecture it knows below the GPU: the
    driver, which then is the newer of the two, JIT-compiles it."""
    if sm in supported:
        return "cubin", f"sm_{sm}"
    lower = [a for a in supported if a <= sm]
    if not lower:
        raise CudaError(f"this NVRTC cannot compile for SM{sm} (it knows {', '.join(map(str, supported))}); "
                        "install the NVRTC of your CUDA major (pip install 'eclipse-export[trt-cu12]' or [trt-cu13])")
    return "ptx", f"compute_{max(lower)}"


def compile_kernel(nvrtc, source: str, name: str, sm: int) -> tuple[str, bytes]:
    """Compile `source` with cuda.bindings' NVRTC for compute capability `sm`; returns (kind, image)
    with kind "cubin" or "ptx" (see nvrtc_architecture). The program is always destroyed."""
    kind, arch = nvrtc_architecture(list(_ok(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")), sm)
    prog = _ok(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *NVRTC_OPTIONS]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = bytearray(size)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaError(f"NVRTC could not compile {name} for {arch}: {log.decode(errors='replace').strip()}")
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if kind == "cubin"
                         else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        image = bytearray(_ok(get_size(prog), get_size.__name__))
        _ok(get(prog, image), get.__name__)
        return kind, bytes(image)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


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
