"""TensorRT engine builds from the FP16 graphs: one code path for TensorRT 10.3 / 11.x and
TensorRT-RTX (see shared docs: tensorrt-notes.md).

- Strongly typed networks only: precision comes from the ONNX, never from builder flags
  (TensorRT 11 removed them; TensorRT-RTX never had them).
- One optimisation profile per engine from the spec's shape ranges (batch, latent size), or one
  fixed shape with --static.
- Workspace cap, optimisation level, a persisted timing cache (TensorRT; a no-op in RTX), and
  compute-capability targets (TensorRT-RTX builds ahead of time, also on a machine without GPU).
- Every engine is keyed by what makes it valid: ONNX sha256, precision, profile, flavour +
  version, compute capability, weight stripping. A key already in the cache is not rebuilt.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from eclipse_export.families.spec import ComponentSpec
from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.trt_flavours import RTX_COMPUTE_CAPABILITIES
from eclipse_export.runtime.backends.trt_flavours import (
    import_flavour as _import_flavour,
)
from eclipse_export.runtime.files import write_bytes_atomic
from eclipse_export.util.progress import heartbeat

# a build prints a line at least this often (seconds), also while TensorRT sits in one phase
PROGRESS_INTERVAL_S = 10.0


class EngineBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class BuildOptions:
    flavour: str = "tensorrt-rtx"
    # None: dynamic profile from the spec; else {"B": b, "h": h, "w": w} latent-space fixed shape
    static: Mapping[str, int] | None = None
    # most prompts per generation (None: the spec's full range). Each component's batch range is
    # 1..max_batch * spec.rows_per_prompt: a negative prompt doubles the text encoder's and prior's
    # rows, CFG the UNet's. 1 by default, what eclipse-generate sends: the UNet's scratch memory grows
    # with its largest batch (see docs/decisions.md: the default 4 needed ~8 GiB for the tiny UNet).
    max_batch: int | None = 1
    workspace_mib: int = 4096  # the CLI default
    opt_level: int = 3
    strip_weights: bool = False
    compute_capabilities: tuple[str, ...] = ("SM89",)
    timing_cache: Path | None = None

    def key_fields(self) -> dict:
        out = asdict(self)
        out.pop("timing_cache")  # a cache changes build time, not the engine's validity
        out["static"] = dict(self.static) if self.static else None
        return out


def import_flavour(flavour: str):
    try:
        return _import_flavour(flavour)
    except BackendError as e:
        raise EngineBuildError(str(e)) from None


# NVIDIA, "CPU-Only AOT and TensorRT-RTX Engines": a weight-stripped (kSTRIP_PLAN + kREFIT) build
# needs a GPU at build time and at most one compute capability. Seen here with every
# tensorrt-rtx on PyPI (1.4 to 1.7.1) on a machine without a GPU: any refittable build fails in
# Myelin ("graph_jit.cpp: CHECK(status == CUDA_SUCCESS) failed").
RTX_STRIP_DOC = "https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/inference-library/cpu-engines.html"


def preflight(options: BuildOptions) -> None:
    """What can be known before minutes of export: the flavour imports, and the options are
    ones it can build here."""
    import_flavour(options.flavour)
    if options.strip_weights and options.flavour == "tensorrt-rtx":
        if len(options.compute_capabilities) != 1:
            raise EngineBuildError("weight-stripped TensorRT-RTX engines target exactly one compute capability: "
                                   "pass a single --compute-capability")
        if build_gpu_compute_capability() == "unknown":
            raise EngineBuildError("weight-stripped TensorRT-RTX engines need a GPU at build time (NVIDIA: "
                                   f"{RTX_STRIP_DOC}); build them on the device from the onnx-fp16 bundle "
                                   "(--from-bundle), or drop --strip-weights")


def profile_shapes(spec: ComponentSpec, dims: Mapping[str, int], options: BuildOptions) -> dict[str, tuple]:
    """input name -> (min, opt, max) shapes. The batch always spans every request of 1..max_batch
    prompts (with or without a negative prompt, guidance on or off: spec.rows_per_prompt), also
    for --static, which fixes the image size only."""
    ranges = dict(spec.shape_ranges)
    prompts = options.max_batch or (options.static or {}).get("B")
    if prompts:
        lo, opt, _ = ranges["B"]
        hi = prompts * spec.rows_per_prompt
        ranges["B"] = (min(lo, hi), min(opt, hi), hi)
    if options.static:
        ranges.update({k: (v, v, v) for k, v in options.static.items() if k != "B"})
    out = {}
    for t in spec.inputs:
        mins, opts, maxs = (dict(dims), dict(dims), dict(dims))
        for symbol in ("B", "h", "w"):
            lo, opt, hi = ranges.get(symbol, (1, 1, 1))
            mins[symbol], opts[symbol], maxs[symbol] = lo, opt, hi
        out[t.name] = (t.resolve(mins), t.resolve(opts), t.resolve(maxs))
    return out


def engine_key(onnx_sha256: str, precision: str, shapes: Mapping, options: BuildOptions, version: str) -> str:
    payload = {"onnx": onnx_sha256, "precision": precision, "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
               "flavour": options.flavour, "version": version, "options": options.key_fields()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_WEIGHTS_LINE = re.compile(r"Total Weights Memory: (\d+) bytes")


def _recording_logger(trt):
    """TensorRT's messages at WARNING and above to stderr (as trt.Logger(WARNING) prints them);
    also keeps the builder's weights total, logged at INFO: it tells how much of a plan is
    weights, which is what weight stripping would save; and its errors, to explain a failure."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.weights_bytes = None
            self.errors: list[str] = []

        def log(self, severity, msg):
            found = _WEIGHTS_LINE.search(msg)
            if found:
                self.weights_bytes = int(found.group(1))
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[{trt.__name__}] {severity.name}: {msg}", file=sys.stderr)

    return Logger()


class BuildProgress:
    """Progress of one engine build: TensorRT's top-level phases as they start (IProgressMonitor,
    where the flavour has it), and through progress.heartbeat a line whenever nothing was printed
    for `interval` seconds (a build can sit in one phase for minutes), naming the current phase.

    Ctrl-C / SIGTERM during the build: Python runs its handler inside whichever TensorRT callback
    comes next, and TensorRT swallows an exception raised there (seen: "Exception caught in
    log(): KeyboardInterrupt"). So while building, the signals only set a flag; the monitor then
    cancels the build at its next step, and the caller raises KeyboardInterrupt afterwards."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, trt, config, name: str, log: Callable[[str], None], interval: float = PROGRESS_INTERVAL_S,
                 start: str = ""):
        self.name, self._log, self.interval, self.start = name, log, interval, start or f"  {name}: building"
        self.phase = "preparing"
        self.interrupted = False
        self._previous: dict = {}
        self._beat = None
        self.log = log  # until the build starts: then the heartbeat's tracked log
        if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
            config.progress_monitor = self._monitor(trt)

    def _monitor(self, trt):
        progress = self

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            # TensorRT calls these positionally: (phase_name, parent_phase, num_steps)
            def phase_start(self, phase_name, parent_phase, num_steps):
                progress.phase = phase_name
                if parent_phase is None:
                    progress.log(f"    {progress.name}: {phase_name}")

            def step_complete(self, phase_name, step):
                return not progress.interrupted  # False cancels the build

            def phase_finish(self, phase_name):
                pass

        return Monitor()

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True

    def __enter__(self) -> "BuildProgress":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self._beat = heartbeat(self._log, self.interval, detail=lambda: f"{self.name}: {self.phase}")
        self.log = self._beat.__enter__()
        self.log(self.start)
        return self

    def __exit__(self, *exc) -> None:
        self._beat.__exit__(*exc)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_engine(onnx_path: Path, spec: ComponentSpec, dims: Mapping[str, int], precision: str,
                 onnx_sha256: str, options: BuildOptions, out_dir: Path, cache_dir: Path | None = None,
                 log: Callable[[str], None] = print, progress_interval: float = PROGRESS_INTERVAL_S) -> dict:
    """Build (or take from the cache) one engine into out_dir; returns its manifest entry."""
    trt = import_flavour(options.flavour)
    version = trt.__version__
    shapes = profile_shapes(spec, dims, options)
    built_for = (list(options.compute_capabilities) if options.flavour == "tensorrt-rtx"
                 else [build_gpu_compute_capability()])
    # TensorRT (not RTX) engines belong to the GPU that built them: that GPU is part of the key
    key = engine_key(onnx_sha256, precision, shapes, options,
                     version if options.flavour == "tensorrt-rtx" else f"{version}/{built_for[0]}")
    name = f"{spec.name}.{'rtx.' if options.flavour == 'tensorrt-rtx' else ''}plan"
    entry = {
        "file": f"engines/{name}", "key": key, "flavour": options.flavour, "version": version,
        "precision": precision, "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
        "static": bool(options.static), "strip_weights": options.strip_weights,
        "compute_capabilities": built_for,
    }
    target = out_dir / "engines" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{key}.plan" if cache_dir else None
    if cached and cached.is_file():
        shutil.copyfile(cached, target)
        entry.update(cached=True, build_seconds=0.0, bytes=target.stat().st_size)
        log(f"  {spec.name}: engine from cache ({key[:12]})")
        return entry

    logger = _recording_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data next to the graph
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{spec.name}: the ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.opt_level
    profile = builder.create_optimization_profile()
    for input_name, (lo, opt, hi) in shapes.items():
        profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if options.strip_weights:
        # weights come back on the device from the same ONNX (OnnxParserRefitter). TensorRT:
        # REFIT_IDENTICAL lets the builder optimise as if they were constants (TensorRT 11.3 notes
        # that plain REFIT can drop a GEMM bias). TensorRT-RTX documents STRIP_PLAN + REFIT.
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL if options.flavour == "tensorrt" else trt.BuilderFlag.REFIT)
    if options.flavour == "tensorrt-rtx":
        ccs = options.compute_capabilities
        unknown = [c for c in ccs if c not in RTX_COMPUTE_CAPABILITIES]
        if unknown:
            raise EngineBuildError(f"unknown compute capability {', '.join(unknown)} "
                                   f"(TensorRT-RTX targets: {', '.join(RTX_COMPUTE_CAPABILITIES)})")
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(getattr(trt.ComputeCapability, cc), i)
    timing_cache = None
    if options.flavour == "tensorrt" and options.timing_cache is not None:
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        timing_cache = config.create_timing_cache(blob)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    start = (f"  {spec.name}: building {options.flavour} {version} engine "
             f"({'static' if options.static else 'dynamic'} profile{', weights stripped' if options.strip_weights else ''})")
    t0 = time.perf_counter()
    with BuildProgress(trt, config, spec.name, log, progress_interval, start) as progress:
        serialized = builder.build_serialized_network(network, config)
    if progress.interrupted:
        raise KeyboardInterrupt
    if serialized is None:
        raise EngineBuildError(_build_failure(spec, shapes, options, logger.errors))
    seconds = time.perf_counter() - t0
    write_bytes_atomic(target, memoryview(serialized))
    if cached is not None:
        write_bytes_atomic(cached, memoryview(serialized))
    if timing_cache is not None:
        write_bytes_atomic(options.timing_cache, memoryview(timing_cache.serialize()))
    entry.update(cached=False, build_seconds=round(seconds, 2), bytes=target.stat().st_size,
                 weights_bytes=logger.weights_bytes)
    weights = f" (weights {logger.weights_bytes / 2**20:.1f} MiB)" if logger.weights_bytes is not None else ""
    log(f"  {spec.name}: engine {target.stat().st_size / 2**20:.1f} MiB{weights} in {seconds:.1f} s")
    return entry


def _build_failure(spec: ComponentSpec, shapes: Mapping, options: BuildOptions, errors: list[str]) -> str:
    if any("OutOfMemory" in e for e in errors):
        # Seen with TensorRT-RTX on a CPU-only machine: the largest profile shape needs more builder
        # scratch than the workspace cap (the tiny UNet: ~1 GiB per UNet batch row at 1024 px), and the
        # "requested size" it prints is the cap itself, not the need. Nothing is allocated on the host.
        largest = ", ".join(f"{k} {list(v[2])}" for k, v in shapes.items())
        return (f"{spec.name}: the engine's largest shape ({largest}) needs more builder memory than "
                f"--workspace-mib {options.workspace_mib} allows; lower --max-batch (now {options.max_batch}), "
                "use --static HxW, or raise --workspace-mib")
    return f"{spec.name}: TensorRT could not build an engine (see the messages above)"


def build_gpu_compute_capability() -> str:
    """TensorRT (not RTX) builds for the GPU it runs on: record which, so the runtime can refuse
    the engine elsewhere. "unknown" when cuda-python cannot tell."""
    from eclipse_export.runtime.backends.gpu_probe import cuda_probe

    gpus = cuda_probe().gpus
    return gpus[0].compute_capability if gpus else "unknown"
