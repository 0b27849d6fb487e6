"""TensorRT (10.3 / 11.x) and TensorRT-RTX backend: the bundle's engines on an NVIDIA GPU, no torch.

- Engines are checked against this machine before use (TensorRT flavour + version, GPU compute
  capability) and refused with the command that rebuilds them.
- Weight-stripped engines are refitted from the bundle's ONNX when loaded.
- I/O buffers live on the device, allocated once per largest shape (DeviceBuffer), one
  non-default stream for everything.
- The UNet loop never leaves the device: classifier-free guidance and the scheduler step run as
  one fused kernel (cuda.Cuda.guided_step) from the scheduler's StepCoefficients; the UNet
  enqueue is captured once into a CUDA graph (TensorRT) or left to TensorRT-RTX's own
  whole-graph capture. Only the final latents come back to the host. Karlo's decoder and
  super-resolution loops likewise, with the unclip_step kernel (trt_unclip_loop.py).
- low_memory=True holds one engine at a time (8 GB Jetson boards): each stage deserializes its
  engine, runs, and frees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from eclipse_export.families.spec import ComponentSpec
from eclipse_export.runtime.backends.base import BackendError, checked_inputs
from eclipse_export.runtime.backends.cuda import Cuda, CudaError, DeviceBuffer
from eclipse_export.runtime.backends.gpu_probe import require
from eclipse_export.runtime.backends.trt_flavours import (
    FLAVOURS,
    check_engine_compatible,
    import_flavour,
)
from eclipse_export.runtime.backends.trt_unclip_loop import denoise_unclip, loop_finished, read_back, step_enqueued
from eclipse_export.runtime.bundle import Bundle
from eclipse_export.runtime.files import write_bytes_atomic


def rebuild_hint(bundle: Bundle, flavour: str) -> str:
    target = "trt-rtx-fp16" if flavour == "tensorrt-rtx" else "trt-fp16"
    return f"rebuild on this machine: eclipse-export ... --target {target} --out {bundle.root} --overwrite"


class TrtSession:
    """One engine + execution context; `run` takes and returns numpy like every Session."""

    def __init__(self, backend: "TensorRTBackend", spec: ComponentSpec, bundle: Bundle, entry: dict):
        self.backend, self.spec, self.bundle, self.entry = backend, spec, bundle, entry
        self.cuda = backend.cuda
        self.engine = self.context = self.runtime_cache = self.runtime_config = None
        self.buffers: dict[str, DeviceBuffer] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.graph = None  # captured enqueue (TensorRT flavour), valid for the current binding
        self.capture_failed = False
        self.load_seconds = 0.0
        if not backend.low_memory:
            self.load()

    # life cycle --------------------------------------------------------------------------
    def load(self) -> None:
        if self.engine is not None:
            return
        trt, t0 = self.backend.trt, time.perf_counter()
        path = self.bundle.path(self.entry["file"])
        engine = self.backend.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"{self.spec.name}: {path.name} did not deserialize (see TensorRT's message); "
                               + rebuild_hint(self.bundle, self.backend.flavour))
        if self.entry.get("strip_weights"):
            self._refit(engine)
        if self.backend.flavour == "tensorrt-rtx":
            # the runtime config lives as long as its context (NVIDIA's samples and the C++
            # backend keep it): the context refers to it and to the runtime cache it holds
            self.runtime_config = config = engine.create_runtime_config()
            self.runtime_cache = self._runtime_cache(config)
            if self.backend.cuda_graphs and hasattr(trt, "CudaGraphStrategy"):
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.context = engine.create_execution_context(config)
        else:
            self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{self.spec.name}: no execution context (out of device memory?); "
                               "try --low-memory")
        self.engine = engine
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in self.names}
        self.is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in self.names}
        missing = set(self.spec.input_names + self.spec.output_names) - set(self.names)
        if missing:
            raise BackendError(f"{self.spec.name}: engine lacks tensors {sorted(missing)}; "
                               + rebuild_hint(self.bundle, self.backend.flavour))
        self.load_seconds += time.perf_counter() - t0

    def _refit(self, engine) -> None:
        trt = self.backend.trt
        logger = self.backend.logger
        refitter = trt.Refitter(engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        graph = self.bundle.graph_path(self.spec.name)
        if not parser.refit_from_file(str(graph)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"{self.spec.name}: cannot refit the weight-stripped engine from {graph.name}: {errors}")
        if not refitter.refit_cuda_engine():
            raise BackendError(f"{self.spec.name}: TensorRT refused the refit from {graph.name}")

    def _runtime_cache(self, config):
        """TensorRT-RTX compiles kernels for this GPU on first use; its runtime cache keeps them
        across runs. A saved cache it refuses (another TensorRT-RTX version, a damaged file) is
        replaced by an empty one, with a warning; a cache the config refuses is not used."""
        cache = config.create_runtime_cache()
        cache_file = self._runtime_cache_file()
        if cache is not None and cache_file and cache_file.is_file():
            if not cache.deserialize(cache_file.read_bytes()):
                self.backend.warn(f"{self.spec.name}: TensorRT-RTX refused the runtime cache {cache_file} "
                                  "(written by another version?); compiling its kernels again")
                cache = config.create_runtime_cache()
        if cache is None or not config.set_runtime_cache(cache):
            self.backend.warn(f"{self.spec.name}: TensorRT-RTX runtime cache not usable; kernels are compiled "
                              "every run")
            return None
        return cache

    def _runtime_cache_file(self) -> Path | None:
        d = self.backend.runtime_cache_dir
        return d / f"{self.entry['key']}.rtcache" if d else None

    def save_runtime_cache(self) -> None:
        """TensorRT-RTX: keep the kernels it compiled for this GPU for the next process."""
        path = self._runtime_cache_file()
        if self.runtime_cache is not None and path is not None:
            write_bytes_atomic(path, bytes(self.runtime_cache.serialize()))

    def release(self) -> None:
        """Free the engine, its context and buffers (low-memory mode calls this after each stage,
        the backend's close() at the end); the runtime cache is saved first."""
        if self.graph is not None:
            self.cuda.destroy_graph(self.graph)
            self.graph = None
        self.save_runtime_cache()
        for b in self.buffers.values():
            b.free()
        self.buffers, self.shapes = {}, {}
        # the context first, then what it refers to (runtime config and cache), the engine last
        self.context = None
        self.runtime_config = self.runtime_cache = None
        self.engine = None

    # binding -----------------------------------------------------------------------------
    def bind(self, input_shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Set input shapes and buffer addresses; True when anything changed (a captured graph
        is then stale)."""
        self.load()
        changed = False
        for name, shape in input_shapes.items():
            if self.shapes.get(name) != tuple(shape):
                if not self.context.set_input_shape(name, tuple(shape)):
                    raise BackendError(f"{self.spec.name}.{name}: shape {tuple(shape)} is outside the engine's profile "
                                       f"{self.entry['profile'].get(name)}; rebuild with a wider profile or --static")
                self.shapes[name] = tuple(shape)
                changed = True
        if not changed and all(n in self.buffers for n in self.names):
            return False
        for name in self.names:
            if not self.is_input[name]:
                self.shapes[name] = tuple(self.context.get_tensor_shape(name))
            nbytes = int(np.prod(self.shapes[name])) * self.dtypes[name].itemsize
            buf = self.buffers.setdefault(name, DeviceBuffer(self.cuda))
            buf.ensure(nbytes)
            self.context.set_tensor_address(name, buf.ptr)
        if self.graph is not None:
            self.cuda.destroy_graph(self.graph)
            self.graph = None
        return True

    def ptr(self, name: str) -> int:
        return self.buffers[name].ptr

    def enqueue(self, use_graph: bool = False) -> None:
        stream = int(self.cuda.stream)
        if (not use_graph or self.backend.flavour == "tensorrt-rtx" or not self.backend.cuda_graphs
                or self.capture_failed):
            self._execute(stream)
            return
        if self.graph is None:
            # TensorRT: one plain enqueue first (it may allocate or re-plan), then capture. The
            # captured run is not executed by the capture: the plain enqueue did this step's work.
            self._execute(stream)
            self.cuda.synchronize()
            self.graph = self._capture(stream)
            return
        self.cuda.launch_graph(self.graph)

    def _execute(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise BackendError(f"{self.spec.name}: TensorRT enqueue failed")

    def _capture(self, stream: int):
        """The enqueue as a CUDA graph, or None (plain enqueues from then on, with a warning) when
        capture fails: some TensorRT tactics and plugins cannot be captured."""
        try:
            self.cuda.begin_capture()
        except CudaError as e:
            return self._capture_failed(str(e))
        try:
            ok = self.context.execute_async_v3(stream)
        except BaseException:
            try:  # leave capture mode, or the stream stays unusable
                self.cuda.destroy_graph(self.cuda.end_capture())
            except CudaError:
                pass
            raise
        try:
            graph = self.cuda.end_capture()
        except CudaError as e:
            return self._capture_failed(str(e))
        if not ok:
            self.cuda.destroy_graph(graph)
            return self._capture_failed("the enqueue failed while capturing")
        return graph

    def _capture_failed(self, why: str) -> None:
        self.capture_failed = True
        self.backend.warn(f"{self.spec.name}: CUDA-graph capture failed ({why}); running without CUDA graphs")
        return None

    # the generic Session API -------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = checked_inputs(self.spec, inputs)
        self.bind({name: value.shape for name, value in feed.items()})
        for name, value in feed.items():
            self.cuda.h2d(self.ptr(name), value.astype(self.dtypes[name], copy=False))
        self.enqueue()
        out = {}
        for name in self.spec.output_names:
            host = np.empty(self.shapes[name], self.dtypes[name])
            self.cuda.d2h(host, self.ptr(name))
            out[name] = host
        self.cuda.synchronize()
        return {k: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v for k, v in out.items()}


class TensorRTBackend:
    """flavour "tensorrt" (TensorRT 10.3+/11.x) or "tensorrt-rtx"."""

    def __init__(self, flavour: str = "tensorrt", device: int = 0, low_memory: bool = False,
                 cuda_graphs: bool = True, runtime_cache_dir: Path | None = None):
        if flavour not in FLAVOURS:
            raise BackendError(f"unknown TensorRT flavour {flavour!r} (choose from {', '.join(FLAVOURS)})")
        self.flavour, self.low_memory, self.cuda_graphs = flavour, low_memory, cuda_graphs
        self.runtime_cache_dir = runtime_cache_dir
        # everything the GPU loop needs (cuda-bindings of the driver's CUDA major, NVRTC, a GPU the
        # flavour can target, the flavour itself), checked before any engine: one error listing all
        require(flavour, device)
        self.trt = import_flavour(flavour)
        self.cuda = Cuda(device)
        self.device = self.cuda.info()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.name = flavour
        self._loop_buffers: dict[str, DeviceBuffer] = {}
        self.sessions: list[TrtSession] = []
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        """Collected for the pipeline, which passes them on to the user with the generation."""
        if message not in self.warnings:
            self.warnings.append(message)

    def drain_warnings(self) -> list[str]:
        out, self.warnings = self.warnings, []
        return out

    def preflight(self, bundle: Bundle) -> None:
        """Before any engine is deserialized: every engine of the bundle fits this machine, or one
        error naming all that do not and the command that rebuilds them."""
        engines = bundle.manifest.get("engines") or {}
        problems = []
        for name in sorted(engines):
            entry = engines[name]
            if entry.get("flavour") != self.flavour:
                problems.append(f"{name}: the engine is {entry.get('flavour')}, this backend runs {self.flavour}")
                continue
            problems += [f"{name}: {p}" for p in
                         check_engine_compatible(entry, self.trt.__version__, self.device.compute_capability)]
        if problems:
            raise BackendError(f"the bundle's engines cannot run here: {'; '.join(problems)}; "
                               + rebuild_hint(bundle, self.flavour))

    def close(self) -> None:
        """Free every engine and buffer; the TensorRT-RTX runtime caches are saved (every mode)."""
        for session in self.sessions:
            session.release()
        for buf in self._loop_buffers.values():
            buf.free()
        self._loop_buffers = {}
        self.cuda.close()

    def load(self, spec: ComponentSpec, bundle: Bundle) -> TrtSession:
        entry = bundle.manifest.get("engines", {}).get(spec.name)
        if not entry:
            raise BackendError(f"bundle {bundle.root} has no engine for {spec.name} (target {bundle.manifest.get('target')}); "
                               "export with --target trt-fp16 or trt-rtx-fp16")
        if entry["flavour"] != self.flavour:
            raise BackendError(f"{spec.name}: the bundle's engines are {entry['flavour']}, this backend runs {self.flavour}")
        problems = check_engine_compatible(entry, self.trt.__version__, self.device.compute_capability)
        if problems:
            raise BackendError(f"{spec.name} engine cannot run here: {'; '.join(problems)}; "
                               + rebuild_hint(bundle, self.flavour))
        session = TrtSession(self, spec, bundle, entry)
        self.sessions.append(session)
        return session

    def stage_done(self, session: TrtSession) -> None:
        if self.low_memory:
            session.release()

    def denoise(self, unet: TrtSession, latents: np.ndarray, image_embeds: np.ndarray, scheduler,
                guidance_scale: float | None, step_noise: np.ndarray | None,
                progress: Callable[[int, int], None] | None = None, record_step0: dict | None = None) -> np.ndarray:
        """The whole UNet loop on the device; returns the final latents (host).
        guidance_scale None: no CFG. step_noise: (steps, *latents.shape) or None."""
        cfg = guidance_scale is not None
        b = latents.shape[0]
        sample_shape = ((2 * b,) if cfg else (b,)) + latents.shape[1:]
        unet.load()
        # every UNet input and output, as the C++ loop checks: the loop copies float32 bytes into
        # each of them (an int64 timestep or a half embedding would be read as garbage)
        wrong = {n: str(unet.dtypes[n]) for n in unet.names if unet.dtypes[n] != np.float32}
        if wrong:
            raise BackendError(f"the device loop expects float32 UNet I/O, the engine has {wrong} "
                               "(the FP16 graphs keep float32 I/O: re-export the bundle)")
        unet.bind({"sample": sample_shape, "timestep": (1,), "image_embeds": image_embeds.shape})
        cuda, n = self.cuda, int(latents.size)
        steps = len(scheduler.timesteps)
        bufs = self._loop_buffers  # grow-only, so repeated generations reuse them
        for key, nbytes in (("latents", n * 4), ("timesteps", steps * 4),
                            ("noise", (step_noise.nbytes if step_noise is not None else 4)), ("bad_step", 4)):
            bufs.setdefault(key, DeviceBuffer(cuda)).ensure(nbytes)
        cuda.h2d(bufs["latents"].ptr, latents.astype(np.float32))
        cuda.h2d(bufs["timesteps"].ptr, scheduler.timesteps.astype(np.float32))
        cuda.h2d(bufs["bad_step"].ptr, np.zeros(1, np.uint32))
        if step_noise is not None:
            cuda.h2d(bufs["noise"].ptr, step_noise.astype(np.float32))
        cuda.h2d(unet.ptr("image_embeds"), image_embeds.astype(unet.dtypes["image_embeds"]))
        sample = unet.ptr("sample")
        cuda.d2d(sample, bufs["latents"].ptr, n * 4)
        if cfg:
            cuda.d2d(sample + n * 4, bufs["latents"].ptr, n * 4)
        # progress without draining the stream each step: see step_enqueued
        events = [cuda.event(), cuda.event()] if progress else []
        try:
            for i, t in enumerate(scheduler.timesteps):
                cuda.d2d(unet.ptr("timestep"), bufs["timesteps"].ptr + 4 * i, 4)
                unet.enqueue(use_graph=True)
                if record_step0 is not None and i == 0:
                    host = np.empty(unet.shapes["noise_pred"], np.float32)
                    cuda.d2h(host, unet.ptr("noise_pred"))
                    cuda.synchronize()
                    record_step0["unet.noise_pred_step0"] = host
                k = scheduler.step_coefficients(int(t))
                noise = bufs["noise"].ptr + i * n * 4 if (step_noise is not None and k.std != 0.0) else 0
                last = i == steps - 1
                cuda.guided_step(unet.ptr("noise_pred"), bufs["latents"].ptr, noise, 0 if last else sample, n, cfg,
                                 float(guidance_scale or 1.0), k.astuple(), bufs["bad_step"].ptr, i)
                step_enqueued(cuda, events, i, steps, progress)
            out, bad = read_back(cuda, bufs, latents.shape)
        finally:
            for event in events:
                cuda.destroy_event(event)
        loop_finished(bad, steps, "the UNet loop produced NaN/Inf latents", progress)
        return out

    # Karlo's loops (runtime/backends/trt_unclip_loop.py: the unclip_step kernel) -----------
    def unclip_device_loop(self, bundle: Bundle, cfg: bool, learned: bool) -> bool:
        return True  # the kernel serves every variance type and guidance

    def denoise_unclip(self, unets, latents: np.ndarray, constants, scheduler, guidance_scale: float | None,
                       step_noise: np.ndarray, progress=None, record_step0: dict | None = None) -> np.ndarray:
        return denoise_unclip(self, unets, latents, constants, scheduler, guidance_scale, step_noise, progress,
                              record_step0)

    def describe(self) -> dict:
        free, total = self.cuda.mem_info()
        return {"backend": self.flavour, "version": self.trt.__version__, "gpu": self.device.name,
                "compute_capability": self.device.compute_capability, "device_memory_total": total,
                "low_memory": self.low_memory, "cuda_graphs": self.cuda_graphs}
