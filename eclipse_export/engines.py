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
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from .specs import ComponentSpec

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
# Compute capabilities TensorRT-RTX 1.7 can target ahead of time.
RTX_COMPUTE_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")


class EngineBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class BuildOptions:
    flavour: str = "tensorrt-rtx"
    # None: dynamic profile from the spec; else {"B": b, "h": h, "w": w} latent-space fixed shape
    static: Mapping[str, int] | None = None
    max_batch: int | None = None  # caps the spec's batch range (prompts; the UNet gets 2x for CFG)
    workspace_mib: int = 2048
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
    if flavour not in FLAVOURS:
        raise EngineBuildError(f"unknown TensorRT flavour {flavour!r} (choose from {', '.join(FLAVOURS)})")
    try:
        return importlib.import_module(FLAVOURS[flavour])
    except ImportError:
        hint = ("pip install tensorrt-rtx" if flavour == "tensorrt-rtx"
                else "install TensorRT 10.3+ (JetPack 6 ships it; x86-64: pip install tensorrt from NVIDIA's index)")
        raise EngineBuildError(f"{FLAVOURS[flavour]} is not installed: {hint}") from None


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
    """input name -> (min, opt, max) shapes."""
    ranges = dict(spec.shape_ranges)
    if options.max_batch:
        lo, opt, hi = ranges["B"]
        # CFG doubles the UNet batch; a negative prompt shares the text encoder's and prior's batch
        factor = 2 if spec.name in ("unet", "text_encoder", "prior") else 1
        hi = max(lo, options.max_batch * factor)
        ranges["B"] = (lo, min(opt, hi), hi)
    out = {}
    for t in spec.inputs:
        if options.static:
            d = dict(dims, **{k: v * (2 if (k == "B" and spec.name == "unet") else 1) for k, v in options.static.items()})
            shape = t.resolve(d)
            out[t.name] = (shape, shape, shape)
            continue
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
    weights, which is what weight stripping would save."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.weights_bytes = None

        def log(self, severity, msg):
            found = _WEIGHTS_LINE.search(msg)
            if found:
                self.weights_bytes = int(found.group(1))
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[{trt.__name__}] {severity.name}: {msg}", file=sys.stderr)

    return Logger()


class _Progress:
    """Wraps TensorRT's IProgressMonitor where the flavour has it: long builds print phases."""

    @staticmethod
    def attach(trt, config, log: Callable[[str], None]) -> None:
        if not hasattr(trt, "IProgressMonitor") or not hasattr(config, "progress_monitor"):
            return

        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.last = 0.0

            def phase_start(self, parent_phase, phase_name, num_steps):
                if parent_phase is None:
                    log(f"    {phase_name}")

            def step_complete(self, phase_name, step):
                return True  # never cancel

            def phase_finish(self, phase_name):
                pass

        config.progress_monitor = Monitor()


def build_engine(onnx_path: Path, spec: ComponentSpec, dims: Mapping[str, int], precision: str,
                 onnx_sha256: str, options: BuildOptions, out_dir: Path, cache_dir: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
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
    _Progress.attach(trt, config, log)

    log(f"  {spec.name}: building {options.flavour} {version} engine "
        f"({'static' if options.static else 'dynamic'} profile{', weights stripped' if options.strip_weights else ''})")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{spec.name}: TensorRT could not build an engine (see the messages above)")
    seconds = time.perf_counter() - t0
    _atomic_write(target, memoryview(serialized))
    if cached is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(cached, memoryview(serialized))
    if timing_cache is not None:
        _atomic_write(options.timing_cache, memoryview(timing_cache.serialize()))
    entry.update(cached=False, build_seconds=round(seconds, 2), bytes=target.stat().st_size,
                 weights_bytes=logger.weights_bytes)
    weights = f" (weights {logger.weights_bytes / 2**20:.1f} MiB)" if logger.weights_bytes is not None else ""
    log(f"  {spec.name}: engine {target.stat().st_size / 2**20:.1f} MiB{weights} in {seconds:.1f} s")
    return entry


def build_gpu_compute_capability() -> str:
    """TensorRT (not RTX) builds for the GPU it runs on: record which, so the runtime can refuse
    the engine elsewhere. "unknown" when cuda-python cannot tell."""
    try:
        from .runtime.cuda import Cuda

        return Cuda().info().compute_capability
    except Exception:  # no cuda-python or no GPU: the build itself will say what is wrong
        return "unknown"


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_engine_compatible(entry: dict, installed_version: str | None, gpu_cc: str | None) -> list[str]:
    """Refusal reasons for running `entry` with the installed TensorRT on this GPU."""
    problems = []
    flavour = entry["flavour"]
    if installed_version is None:
        problems.append(f"{FLAVOURS[flavour]} is not installed")
    elif installed_version != entry["version"]:
        problems.append(f"built with {flavour} {entry['version']}, this machine has {installed_version}")
    built_for = [c for c in entry["compute_capabilities"] if c != "unknown"]
    if gpu_cc and built_for and gpu_cc not in built_for:
        problems.append(f"built for {', '.join(built_for)}, this GPU is {gpu_cc}")
    return problems
