"""One generic backend interface; the pipeline never knows which backend runs a graph.

A backend turns (component spec, bundle) into a `Session` whose `run` maps numpy inputs by
name to numpy outputs by name. ONNX Runtime is the first backend (CPU here; the CUDA and
TensorRT execution providers are selectable where onnxruntime-gpu is installed).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from ..specs import ComponentSpec, TensorSpec
from .bundle import Bundle, BundleError


class BackendError(RuntimeError):
    """A backend cannot run here (missing package, unavailable provider)."""


class Session(Protocol):
    spec: ComponentSpec

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def load(self, spec: ComponentSpec, bundle: Bundle) -> Session: ...

    def describe(self) -> dict: ...


# Short names users type -> ONNX Runtime execution providers.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


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


def io_problems(spec: ComponentSpec, dims: Mapping[str, int], found: Mapping[str, tuple[str, Sequence]]) -> list[str]:
    """How a loaded graph's I/O (name -> (dtype, shape with ints for fixed axes)) departs from
    the spec resolved with the bundle's dims. A bundle whose manifest names the wrong graph, or
    whose dims do not match its graphs, is refused at load instead of failing mid-generation."""
    problems = []
    for t in spec.inputs + spec.outputs:
        if t.name not in found:
            problems.append(f"has no tensor {t.name!r}")
            continue
        dtype, shape = found[t.name]
        if dtype != t.dtype:
            problems.append(f"{t.name} is {dtype}, expected {t.dtype}")
        if len(shape) != len(t.shape):
            problems.append(f"{t.name} has rank {len(shape)}, expected {len(t.shape)}")
            continue
        dynamic = t.dynamic_axes()
        for axis, (got, want) in enumerate(zip(shape, t.shape)):
            if axis in dynamic or not isinstance(got, int) or got < 0:
                continue
            expected = _resolved(want, dims)
            if got != expected:
                problems.append(f"{t.name} axis {axis} is {got}, the manifest's dims give {expected}")
    extra = set(found) - set(spec.input_names + spec.output_names)
    if extra:
        problems.append(f"has unexpected tensors {sorted(extra)}")
    return problems


def _resolved(d, dims: Mapping[str, int]) -> int:
    return TensorSpec("", "", (d,)).resolve(dims)[0]


def check_io(spec: ComponentSpec, bundle: Bundle, found: Mapping[str, tuple[str, Sequence]]) -> None:
    problems = io_problems(spec, bundle.dims, found)
    if problems:
        raise BundleError(f"{bundle.root}: the {spec.name} graph does not fit the manifest ({'; '.join(problems)}); "
                          f"re-export it (eclipse-export ... --out {bundle.root})")


_ORT_GRAPH_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "Fail", "InvalidArgument", "NotImplemented")


class OrtSession:
    def __init__(self, spec: ComponentSpec, session):
        self.spec = spec
        self._session = session
        self._outputs = spec.output_names
        self.load_seconds = 0.0

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = checked_inputs(self.spec, inputs)
        return dict(zip(self._outputs, self._session.run(self._outputs, feed)))


def checked_inputs(spec: ComponentSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The spec's inputs as contiguous arrays of the spec's dtypes (every backend takes these)."""
    feed = {}
    for t in spec.inputs:
        value = np.asarray(inputs[t.name])
        if value.dtype != np.dtype(t.dtype):
            raise TypeError(f"{spec.name}.{t.name}: expected {t.dtype}, got {value.dtype}")
        feed[t.name] = np.ascontiguousarray(value)
    return feed


class OnnxRuntimeBackend:
    """ONNX Runtime with an ordered provider list (falls back along the list, like ORT does)."""

    def __init__(self, providers: Sequence[str] = ("cpu",), threads: int | None = None, cpu_profile: str = "tuned"):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from e
        self._ort = ort
        unknown = [p for p in providers if p not in ORT_PROVIDERS]
        if unknown:
            raise BackendError(f"unknown provider(s) {', '.join(unknown)} (choose from {', '.join(ORT_PROVIDERS)})")
        available = set(ort.get_available_providers())
        missing = [p for p in providers if ORT_PROVIDERS[p] not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime here has no {', '.join(missing)} provider (available: {', '.join(sorted(available))}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
        if cpu_profile not in CPU_SESSION_PROFILES:
            raise BackendError(f"unknown CPU session profile {cpu_profile!r} (choose from {', '.join(CPU_SESSION_PROFILES)})")
        self.providers = [ORT_PROVIDERS[p] for p in providers]
        self.threads = threads
        self.cpu_profile = cpu_profile
        self.name = "onnxruntime-" + "+".join(providers)

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

    def load(self, spec: ComponentSpec, bundle: Bundle) -> OrtSession:
        opts = self.session_options()
        t0 = time.perf_counter()
        path = bundle.graph_path(spec.name)
        try:
            session = self._ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types, one per status code
            # a graph ORT cannot parse (or whose external data points outside the bundle, which ORT
            # refuses: "External data path escapes model directory") is the bundle's fault; anything
            # else (a provider that fails to start) is this machine's
            error = BundleError if type(e).__name__ in _ORT_GRAPH_ERRORS else BackendError
            raise error(f"ONNX Runtime cannot load {path} ({str(e).strip()[:300]})") from None
        found = {a.name: (_ORT_TYPES.get(a.type, a.type), a.shape) for a in session.get_inputs() + session.get_outputs()}
        check_io(spec, bundle, found)
        out = OrtSession(spec, session)
        out.load_seconds = time.perf_counter() - t0
        return out

    def describe(self) -> dict:
        return {"backend": "onnxruntime", "version": self._ort.__version__, "providers": self.providers,
                "threads": self.threads, "cpu_profile": self.cpu_profile}


BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


def make_backend(name: str = "onnxruntime", providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 low_memory: bool = False, cuda_graphs: bool = True, runtime_cache_dir=None,
                 cpu_profile: str = "tuned") -> Backend:
    if name == "onnxruntime":
        return OnnxRuntimeBackend(providers, threads, cpu_profile)
    if name in ("tensorrt", "tensorrt-rtx"):
        from .tensorrt_backend import TensorRTBackend  # imports cuda-python only when asked for

        return TensorRTBackend(name, low_memory=low_memory, cuda_graphs=cuda_graphs,
                               runtime_cache_dir=runtime_cache_dir)
    raise BackendError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")


def backend_for_bundle(manifest: dict) -> str:
    """The backend a bundle's target runs on by default."""
    engines = manifest.get("engines") or {}
    flavours = {e["flavour"] for e in engines.values()}
    return flavours.pop() if len(flavours) == 1 else "onnxruntime"
