"""The ONNX Runtime backend (CPU; the CUDA and TensorRT execution providers where
onnxruntime-gpu is installed, TensorRT-RTX's where its plugin package is)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from eclipse_export.families.spec import ComponentSpec
from eclipse_export.runtime.backends.base import BackendError, check_io, checked_inputs
from eclipse_export.runtime.backends.ort_device_loop import OrtDeviceLoop
from eclipse_export.runtime.backends.ort_errors import ORT_GRAPH_ERRORS, ort_error_line
from eclipse_export.runtime.backends.ort_unclip_loop import OrtUnclipLoop, unclip_kind
from eclipse_export.runtime.bundle import Bundle, BundleError

# Short names users type -> ONNX Runtime execution providers. tensorrt-rtx is a plugin EP
# (pip package onnxruntime-ep-nv-tensorrt-rtx), registered with ONNX Runtime when first asked for.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "tensorrt-rtx": "NvTensorRTRTXExecutionProvider",
}
GPU_PROVIDERS = ("cuda", "tensorrt", "tensorrt-rtx")
ORT_CACHE_DIR = ".ort-cache"  # inside the bundle: engine/runtime caches of the TensorRT providers


# ONNX Runtime CPU session settings (issue 13; measurements in docs/decisions.md). "tuned" is the
# default; "ort-defaults" is ONNX Runtime's own defaults, kept selectable so that a benchmark can
# measure before and after in one run (eclipse-bench --baseline-session).
CPU_SESSION_PROFILES = ("tuned", "ort-defaults")
_TUNED_CPU_CONFIG = {
    # worker threads sleep between parallel sections instead of spinning: a spinning pool burns
    # the cores other processes (and the other session's threads) need; the wake-up costs
    # microseconds per parallel section against milliseconds of work in these graphs
    "session.intra_op.allow_spinning": "0",
    "session.inter_op.allow_spinning": "0",
}

# ONNX Runtime's type strings for the dtypes the specs use
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64"}




class OrtSession:
    """One graph on ONNX Runtime. The ORT session is made by `factory(static)` on first use:
    `static` None gives the graph as exported (dynamic shapes); a dict of concrete shapes gives a
    session specialised to them (free dimensions fixed, CUDA graphs on where asked), which the
    device loop uses. One of the two is held at a time, so the weights are on the device once."""

    def __init__(self, spec: ComponentSpec, factory, eager: bool = True):
        self.spec = spec
        self._factory = factory
        self._outputs = spec.output_names
        self._session = None
        self._key = None  # None: the dynamic session; else the static shapes it was made for
        self.load_seconds = 0.0
        if eager:
            self.session()

    def session(self, static: Mapping[str, tuple[int, ...]] | None = None):
        key = None if static is None else tuple(sorted((k, tuple(v)) for k, v in static.items()))
        if self._session is None or self._key != key:
            self._session = None  # drop the other one first: one copy of the weights
            t0 = time.perf_counter()
            self._session = self._factory(static)
            self._key = key
            self.load_seconds += time.perf_counter() - t0
        return self._session

    @property
    def static_shapes(self) -> dict | None:
        return None if self._key is None else dict(self._key)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = checked_inputs(self.spec, inputs)
        return dict(zip(self._outputs, self.session().run(self._outputs, feed)))


def ort_cache_dir(bundle: Bundle, provider: str, ort_version: str) -> Path:
    """Where a TensorRT provider keeps its engines / runtime cache for this bundle: inside the
    bundle (so they follow it and go with it, never into the working directory), or, where the
    bundle is read-only, under the user's cache keyed by the bundle's manifest hash."""
    sub = f"{provider}-ort{ort_version}"
    inside = bundle.root / ORT_CACHE_DIR / sub
    try:
        inside.mkdir(parents=True, exist_ok=True)
        if os.access(inside, os.W_OK):
            return inside
    except OSError:
        pass
    key = hashlib.sha256((bundle.root / "manifest.json").read_bytes()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eclipse-export" / "ort-cache"
    out = base / key / sub
    out.mkdir(parents=True, exist_ok=True)
    return out


class OnnxRuntimeBackend:
    """ONNX Runtime with an ordered provider list (nodes a provider cannot run go to the next).

    GPU providers: the UNet loop runs on the device (runtime/backends/ort_device_loop.py: IO binding, the
    guidance + scheduler step as a small ONNX graph on the same device) and, with cuda_graphs,
    the UNet session is specialised to the request's shapes and replayed as a CUDA graph.
    device_loop None: on for GPU providers, off on CPU (where it changes nothing but is tested)."""

    def __init__(self, providers: Sequence[str] = ("cpu",), threads: int | None = None, cuda_graphs: bool = True,
                 device_loop: bool | None = None, device_id: int = 0, cpu_profile: str = "tuned"):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from e
        self._ort = ort
        if cpu_profile not in CPU_SESSION_PROFILES:
            raise BackendError(f"unknown CPU session profile {cpu_profile!r} (choose from {', '.join(CPU_SESSION_PROFILES)})")
        providers = list(providers)
        unknown = [p for p in providers if p not in ORT_PROVIDERS]
        if unknown:
            raise BackendError(f"unknown provider(s) {', '.join(unknown)} (choose from {', '.join(ORT_PROVIDERS)})")
        if "tensorrt-rtx" in providers:
            if set(providers) - {"tensorrt-rtx", "cpu"}:
                raise BackendError("the tensorrt-rtx provider combines only with cpu (ONNX Runtime allows no other mix)")
            self._rtx_devices = _register_tensorrt_rtx(ort, device_id)
        available = set(ort.get_available_providers()) | ({ORT_PROVIDERS["tensorrt-rtx"]} if "tensorrt-rtx" in providers else set())
        missing = [p for p in providers if ORT_PROVIDERS[p] not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime here has no {', '.join(missing)} provider (available: {', '.join(sorted(available))}); "
                "install onnxruntime-gpu for cuda/tensorrt, onnxruntime-ep-nv-tensorrt-rtx for tensorrt-rtx"
            )
        if set(providers) & {"cuda", "tensorrt"} and hasattr(ort, "preload_dlls"):
            # torch-free installs get CUDA/cuDNN from NVIDIA's pip packages (onnxruntime-gpu[cuda,cudnn]),
            # which are not on the loader's path: ONNX Runtime (>= 1.21) loads them from there
            try:
                ort.preload_dlls()
            except Exception:  # nothing to preload: the provider's own error says what is missing
                pass
        self.cpu_profile = cpu_profile
        self.short_providers = providers
        self.providers = [ORT_PROVIDERS[p] for p in providers]
        self.threads = threads
        self.device_id = device_id
        self.on_gpu = providers[0] in GPU_PROVIDERS
        self.device_loop = self.on_gpu if device_loop is None else device_loop
        self.cuda_graphs = cuda_graphs
        self.cache_dirs: dict[str, str] = {}
        self.notes: list[str] = []
        self._loop = None
        self._unclip_loop = None
        self.name = "onnxruntime-" + "+".join(providers)

    # sessions ----------------------------------------------------------------------------
    def _provider_options(self, bundle: Bundle, graph_capture: bool) -> list[tuple[str, dict]]:
        out = []
        for short, name in zip(self.short_providers, self.providers):
            if short == "tensorrt-rtx":
                continue  # added per device below (plugin EP)
            opts: dict[str, str] = {}
            if short == "cuda":
                opts = {"device_id": str(self.device_id)}
                if graph_capture:
                    opts["enable_cuda_graph"] = "1"
            elif short == "tensorrt":
                cache = str(ort_cache_dir(bundle, short, self._ort.__version__))
                self.cache_dirs[short] = cache
                # engines and timing cache beside the bundle; precision comes from the graph itself
                # (FP16 bundles carry FP16 weights), as for the project's own TensorRT engines
                opts = {"device_id": str(self.device_id), "trt_engine_cache_enable": "True",
                        "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True",
                        "trt_timing_cache_path": cache}
                if graph_capture:
                    opts["trt_cuda_graph_enable"] = "True"
            out.append((name, opts))
        return out

    def session_options(self):
        """The options every graph of this backend is loaded with (the profiler reuses them)."""
        opts = self._ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self.cpu_profile == "tuned":
            for key, value in _TUNED_CPU_CONFIG.items():
                opts.add_session_config_entry(key, value)
        return opts

    def _make_session(self, spec: ComponentSpec, path: Path, bundle: Bundle,
                      static: Mapping[str, tuple[int, ...]] | None):
        ort = self._ort
        opts = self.session_options()
        graph_capture = static is not None and self.cuda_graphs and self.on_gpu
        if static is not None:
            for name, value in free_dimensions(declared_input_shapes(spec), static).items():
                opts.add_free_dimension_override_by_name(name, value)
        providers = self._provider_options(bundle, graph_capture)
        if "tensorrt-rtx" in self.short_providers:
            cache = str(ort_cache_dir(bundle, "tensorrt-rtx", ort.__version__))
            self.cache_dirs["tensorrt-rtx"] = cache
            rtx = {"nv_runtime_cache_path": cache}
            if graph_capture:
                rtx["enable_cuda_graph"] = "1"
            opts.add_provider_for_devices(self._rtx_devices, rtx)
        # the plugin EP comes with the session options; ORT then wants no provider list
        listed = {} if "tensorrt-rtx" in self.short_providers else {
            "providers": [n for n, _ in providers], "provider_options": [o for _, o in providers]}
        try:
            # enable_fallback=0: a provider that fails must say so, not silently become the CPU
            session = ort.InferenceSession(str(path), opts, enable_fallback=0, **listed)
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeError types
            # On the CPU provider a failure can only be the graph's (unparsable, or an op it
            # lacks): a bundle error. With a GPU provider it may be this machine's. (External data
            # never gets here unchecked: bundle.graph_path refused any reference that is not one
            # of the component's verified files, whatever this ONNX Runtime would follow.)
            cpu_only = self.short_providers == ["cpu"]
            error = BundleError if cpu_only and type(e).__name__ in ORT_GRAPH_ERRORS else BackendError
            raise error(f"ONNX Runtime could not create a {'+'.join(self.short_providers)} session for "
                        f"{path}: {ort_error_line(e)}") from None
        got = session.get_providers()
        if self.providers[0] not in got:
            raise BackendError(f"ONNX Runtime did not use {self.providers[0]} for {path.name} (it uses {', '.join(got)}); "
                               "check the CUDA / TensorRT installation (onnxruntime logs why at log level 0-2)")
        found = {a.name: (_ORT_TYPES.get(a.type, a.type), a.shape) for a in session.get_inputs() + session.get_outputs()}
        check_io(spec, bundle, found)
        return session

    def load(self, spec: ComponentSpec, bundle: Bundle) -> OrtSession:
        path = bundle.graph_path(spec.name)
        if spec.denoiser and self.device_loop and bundle.step_graph_path("cfg") is None:
            # bundles of format 1 carry no step graphs: the loop runs on the host, correct but with
            # the latents crossing to the host every step
            self.device_loop = False
            self.notes.append(f"{bundle.root} has no step graphs (exported before format 2): the UNet loop runs on "
                              f"the host; add them with eclipse-export --from-bundle {bundle.root} --target "
                              f"{bundle.manifest.get('target', 'onnx')} --out NEW")
        # the denoiser of a CUDA-graph device loop is made for its first request's shapes, not here
        # (its load time then adds to OrtSession.load_seconds at the first generation)
        lazy = spec.denoiser and self.device_loop and self.cuda_graphs
        session = OrtSession(spec, lambda static: self._make_session(spec, path, bundle, static), eager=not lazy)
        session.bundle = bundle  # the device loop reads the bundle's step graphs
        return session

    # the device loop ---------------------------------------------------------------------
    def denoise(self, unet: OrtSession, latents: np.ndarray, image_embeds: np.ndarray, scheduler,
                guidance_scale: float | None, step_noise: np.ndarray | None, progress=None,
                record_step0: dict | None = None) -> np.ndarray:
        if self._loop is None:
            self._loop = OrtDeviceLoop(self)
        return self._loop.denoise(unet, latents, image_embeds, scheduler, guidance_scale, step_noise, progress,
                                  record_step0)

    # Karlo's loops (runtime/backends/ort_unclip_loop.py) -----------------------------------
    def unclip_device_loop(self, bundle: Bundle, cfg: bool, learned: bool) -> bool:
        """Whether a Karlo loop of this kind runs on the device: the device loop is on and the
        bundle carries its step graph (Karlo bundles exported before them: host loop, a note)."""
        if not self.device_loop:
            return False
        kind = unclip_kind(cfg, learned)
        if kind is not None and bundle.step_graph_path(kind) is not None:
            return True
        note = (f"{bundle.root} has no unCLIP step graph {kind}: this Karlo loop runs on the host; add the graphs "
                f"with eclipse-export --from-bundle {bundle.root} --target {bundle.manifest.get('target', 'onnx')} "
                "--out NEW")
        if note not in self.notes:
            self.notes.append(note)
        return False

    def denoise_unclip(self, unets, latents: np.ndarray, constants, scheduler, guidance_scale: float | None,
                       step_noise: np.ndarray, progress=None, record_step0: dict | None = None) -> np.ndarray:
        if self._unclip_loop is None:
            self._unclip_loop = OrtUnclipLoop(self)
        return self._unclip_loop.denoise(unets, latents, constants, scheduler, guidance_scale, step_noise, progress,
                                         record_step0)

    def describe(self) -> dict:
        out = {"backend": "onnxruntime", "version": self._ort.__version__, "providers": self.providers,
               "threads": self.threads, "cpu_profile": self.cpu_profile, "device_loop": self.device_loop,
               "cuda_graphs": self.cuda_graphs and self.on_gpu and self.device_loop}
        if self.cache_dirs:
            out["cache_dirs"] = dict(self.cache_dirs)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def declared_input_shapes(spec: ComponentSpec) -> dict[str, list]:
    """Input name -> shape as the exported graph declares it: the spec's symbol on each dynamic
    axis (export/exporter.py names the graph's free dimensions after them), -1 on fixed axes. Read from
    the spec, not from a throwaway CPU session of the graph (full-size UNet: 4.2 s and 1.2 GiB
    more host memory, measured, before every static session)."""
    return {t.name: [t.dynamic_axes().get(axis, -1) for axis in range(len(t.shape))] for t in spec.inputs}


def free_dimensions(declared: Mapping[str, list], static: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbolic dimension name -> value, from the concrete shapes of a request."""
    out: dict[str, int] = {}
    for name, dims in declared.items():
        shape = static.get(name)
        if shape is None:
            continue
        if len(shape) != len(dims):
            raise BackendError(f"input {name}: shape {tuple(shape)} does not match the graph's {dims}")
        for d, v in zip(dims, shape):
            if isinstance(d, str):
                if out.setdefault(d, int(v)) != int(v):
                    raise BackendError(f"dimension {d} would be both {out[d]} and {v}: cannot fix the shapes")
    return out


def _register_tensorrt_rtx(ort, device_id: int):
    """Register the TensorRT-RTX plugin EP with ONNX Runtime; return its device(s) to use."""
    try:
        import onnxruntime_ep_nv_tensorrt_rtx as rtx
    except ImportError:
        raise BackendError("the tensorrt-rtx provider needs pip install onnxruntime-ep-nv-tensorrt-rtx "
                           "(next to onnxruntime >= 1.24)") from None
    if not hasattr(ort, "register_execution_provider_library"):
        raise BackendError(f"onnxruntime {ort.__version__} cannot load plugin providers; the tensorrt-rtx provider "
                           "needs onnxruntime >= 1.24")
    try:
        ort.register_execution_provider_library(rtx.get_ep_name(), rtx.get_library_path())
    except Exception as e:
        if "already registered" not in str(e).lower():
            raise BackendError(f"could not load the TensorRT-RTX provider library: {str(e).strip().splitlines()[0]}") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == rtx.get_ep_name()]
    if not devices:
        raise BackendError("the TensorRT-RTX provider found no GPU it supports here (it runs on RTX GPUs: compute "
                           "capability 8.6, 8.9, 12.x; not on SM 9.0 data-centre cards)")
    return devices[min(device_id, len(devices) - 1):][:1]


