"""`eclipse-export --from-bundle B --target triton --out REPO`: a Triton Inference Server model
repository serving one bundle. No torch: reading the bundle's manifest is all it takes.

Layouts:
  single  one model `eclipse` (Python backend) runs the whole chain with the backend the bundle
          calls for (ONNX Runtime CPU/CUDA, TensorRT).
  stages  the four graphs as models `eclipse_text_encoder`, `eclipse_prior`, `eclipse_unet`,
          `eclipse_movq` (Python backend: the pytriton wheel's server has no onnxruntime or
          tensorrt backend), and `eclipse` drives them with BLS requests (Triton ensembles cannot
          loop), so that UNet steps of concurrent requests can share executions.

The bundle goes inside the repository (hard links where the file system allows, else a copy, or
a symlink on request), under `eclipse/bundle`; the models open only that path, fixed at creation.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.runtime.backends.factory import backend_for_bundle
from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.serve.limits import ServeLimits, limits_for_bundle

MODEL = "eclipse"
BUNDLE_DIR = f"{MODEL}/bundle"
LAYOUTS = ("single", "stages")
KINDS = ("auto", "cpu", "gpu")
BUNDLE_MODES = ("link", "copy", "symlink")
# stage models (--triton-layout stages): Python-backend models over this package's backends (the
# only kind the nvidia-pytriton wheel's server loads; they batch across requests), or Triton's own
# onnxruntime / tensorrt backends where the server has them (NVIDIA's containers). Those run the
# graph as exported: its UNet takes one timestep per call, so they get no batching
# (max_batch_size 0) and no merging of steps across requests.
STAGE_BACKENDS = ("python", "onnxruntime", "tensorrt")
STAGE_PREFIX = f"{MODEL}_"
_TRITON_TYPES = {"float32": "TYPE_FP32", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16"}


class RepositoryError(ValueError):
    """The repository cannot be written as asked (the message says why)."""


@dataclass(frozen=True)
class TritonRepoOptions:
    layout: str = "single"
    kind: str = "auto"  # auto: GPU for engine bundles, CPU for ONNX bundles
    instances: int = 1  # per GPU (KIND_GPU) or in all (KIND_CPU)
    gpus: tuple[int, ...] = ()  # KIND_GPU: these devices (empty: every GPU the server sees)
    limits: ServeLimits = field(default_factory=ServeLimits)
    # Triton's dynamic batcher waits this long for more requests when a batch is not full. A
    # generation takes seconds, so waiting 50 ms for company costs ~1 % and fills batches.
    queue_delay_ms: float = 50.0
    bundle_mode: str = "link"
    stage_backend: str = "python"
    threads: int | None = None  # ONNX Runtime intra-op threads per instance (None: its default)
    warmup: bool = True
    overwrite: bool = False


def stage_model(component: str) -> str:
    return STAGE_PREFIX + component


def _pbtxt_string(value: str) -> str:
    return json.dumps(value)  # protobuf text format reads JSON's string escapes


def _instance_group(options: TritonRepoOptions, kind: str, count: int | None = None) -> str:
    count = count or options.instances
    gpus = f" gpus: [{', '.join(str(g) for g in options.gpus)}]" if kind == "gpu" and options.gpus else ""
    return f"instance_group [{{ count: {count} kind: KIND_{kind.upper()}{gpus} }}]"


def _eclipse_config(options: TritonRepoOptions, limits: ServeLimits, kind: str, instances: int) -> str:
    optional = " optional: true"
    lines = [
        f'name: "{MODEL}"',
        'backend: "python"',
        f"max_batch_size: {limits.max_batch}",
        "input [",
        '  { name: "PROMPT" data_type: TYPE_STRING dims: [1] },',
        f'  {{ name: "NEGATIVE_PROMPT" data_type: TYPE_STRING dims: [1]{optional} }},',
        f'  {{ name: "SEED" data_type: TYPE_UINT64 dims: [1]{optional} }},',
        f'  {{ name: "STEPS" data_type: TYPE_INT32 dims: [1]{optional} }},',
        f'  {{ name: "GUIDANCE" data_type: TYPE_FP32 dims: [1]{optional} }},',
        f'  {{ name: "HEIGHT" data_type: TYPE_INT32 dims: [1]{optional} }},',
        f'  {{ name: "WIDTH" data_type: TYPE_INT32 dims: [1]{optional} }}',
        "]",
        'output [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [-1, -1, 3] } ]',
        # stages: no batching here; each request runs in its own instance, and the stage models'
        # batchers merge the concurrent requests' graph calls (across guidance, negative prompts)
        f"dynamic_batching {{ max_queue_delay_microseconds: {int(options.queue_delay_ms * 1000)} }}"
        if options.layout == "single" else "",
        _instance_group(options, kind, instances),
        f'parameters [ {{ key: "bundle" value: {{ string_value: {_pbtxt_string(BUNDLE_DIR)} }} }} ]',
    ]
    return "\n".join(lines) + "\n"


def _stage_config(component: str, dims: dict, limits: ServeLimits, options: TritonRepoOptions, kind: str) -> str:
    spec = COMPONENTS[component]
    rows = limits.max_batch * spec.rows_per_prompt

    def tensor(t) -> str:
        if t.dtype not in _TRITON_TYPES:
            raise RepositoryError(f"{component}.{t.name}: dtype {t.dtype} has no Triton type here")
        if t.shape[0] == "B":
            shape = [d if isinstance(d, int) else dims.get(d, -1) for d in t.shape[1:]]
        else:  # a per-call input (the UNet's timestep): one value per batch row on the wire
            shape = list(t.shape)
        shape = [int(s) if isinstance(s, int) and s >= 0 else -1 for s in shape]
        return f'  {{ name: "{t.name}" data_type: {_TRITON_TYPES[t.dtype]} dims: [{", ".join(str(s) for s in shape)}] }}'

    lines = [
        f'name: "{stage_model(component)}"',
        'backend: "python"',
        f"max_batch_size: {rows}",
        "input [", ",\n".join(tensor(t) for t in spec.inputs), "]",
        "output [", ",\n".join(tensor(t) for t in spec.outputs), "]",
        # no queue delay: a stage call is short, and requests pile up while the instance is busy
        "dynamic_batching { }",
        _instance_group(options, kind, 1),
        f'parameters [ {{ key: "bundle" value: {{ string_value: {_pbtxt_string(BUNDLE_DIR)} }} }} ]',
    ]
    return "\n".join(lines) + "\n"


def _native_stage_config(component: str, options: TritonRepoOptions, kind: str) -> str:
    spec = COMPONENTS[component]

    def tensor(t) -> str:
        shape = [s if isinstance(s, int) else -1 for s in t.shape]  # full shapes: no batching here
        return f'  {{ name: "{t.name}" data_type: {_TRITON_TYPES[t.dtype]} dims: [{", ".join(str(s) for s in shape)}] }}'

    backend = options.stage_backend
    lines = [
        f'name: "{stage_model(component)}"',
        f'backend: "{backend}"',
        f'default_model_filename: "{"model.onnx" if backend == "onnxruntime" else "model.plan"}"',
        "max_batch_size: 0",
        "input [", ",\n".join(tensor(t) for t in spec.inputs), "]",
        "output [", ",\n".join(tensor(t) for t in spec.outputs), "]",
        _instance_group(options, kind, 1),
    ]
    return "\n".join(lines) + "\n"


def _place_native(bundle: Path, manifest: dict, component: str, version_dir: Path, backend: str) -> None:
    """The graph (and its external data, under the names the graph refers to) or the engine."""
    if backend == "tensorrt":
        _link_or_copy(bundle / manifest["engines"][component]["file"], version_dir / "model.plan")
        return
    entry = manifest["components"][component]
    for rel in entry["files"]:
        name = "model.onnx" if rel == entry["graph"] else Path(rel).name
        _link_or_copy(bundle / rel, version_dir / name)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)


def _model_py(module: str) -> str:
    return (f'"""Written by eclipse-export --target triton: the model is eclipse_export.serve.triton_models.{module}\n'
            'of the eclipse-export installed next to the server."""\n\n'
            f"from eclipse_export.serve.triton_models.{module} import TritonPythonModel  # noqa: F401\n")


def _place_bundle(src: Path, dst: Path, mode: str) -> None:
    if mode == "symlink":
        dst.symlink_to(src.resolve(), target_is_directory=True)
        return

    def place(s, d):  # hard links: no extra space for a bundle of many GiB
        return _link_or_copy(Path(s), Path(d)) if mode == "link" else shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=place, ignore=shutil.ignore_patterns(".ort-cache"))


def write_repository(bundle: Path, out: Path, options: TritonRepoOptions = TritonRepoOptions(), log=print) -> Path:
    """Write the repository to `out` (whole or not at all). Returns `out`."""
    if options.layout not in LAYOUTS:
        raise RepositoryError(f"unknown Triton layout {options.layout!r} (choose from {', '.join(LAYOUTS)})")
    if options.kind not in KINDS:
        raise RepositoryError(f"unknown instance kind {options.kind!r} (choose from {', '.join(KINDS)})")
    if options.bundle_mode not in BUNDLE_MODES:
        raise RepositoryError(f"unknown bundle mode {options.bundle_mode!r} (choose from {', '.join(BUNDLE_MODES)})")
    if options.stage_backend not in STAGE_BACKENDS:
        raise RepositoryError(f"unknown stage backend {options.stage_backend!r} (choose from {', '.join(STAGE_BACKENDS)})")
    if options.stage_backend != "python" and options.layout != "stages":
        raise RepositoryError("a stage backend applies to --triton-layout stages only")
    if options.instances < 1:
        raise RepositoryError("instances must be >= 1")
    if options.queue_delay_ms < 0:
        raise RepositoryError("the queue delay must be >= 0")
    try:
        options.limits.checked()
    except ValueError as e:
        raise RepositoryError(f"serving limits: {e}") from None
    opened = open_bundle(bundle)  # a damaged bundle is refused now, not when the server loads it
    backend = backend_for_bundle(opened.manifest)
    kind = options.kind if options.kind != "auto" else ("gpu" if backend != "onnxruntime" else "cpu")
    if backend != "onnxruntime" and kind == "cpu":
        raise RepositoryError(f"{bundle} holds {backend} engines: they run on a GPU (KIND_GPU), not KIND_CPU")
    if options.stage_backend == "tensorrt" and backend != "tensorrt":
        raise RepositoryError(f"Triton's tensorrt backend loads TensorRT engines (--target trt-fp16 / trt-int8); {bundle} "
                              f"runs on {backend}: use --triton-stage-backend python or onnxruntime")
    if options.stage_backend == "onnxruntime" and backend != "onnxruntime":
        raise RepositoryError(f"{bundle} holds {backend} engines; the onnxruntime stage backend would run its ONNX "
                              "graphs instead: use an ONNX bundle, or --triton-stage-backend tensorrt")
    limits = limits_for_bundle(opened.manifest, options.limits)
    out = Path(out)
    if out.exists() and not options.overwrite:
        raise RepositoryError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(opened.root, opened.manifest, work, options, limits, kind, backend)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            work.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"Triton repository {out}: layout {options.layout}, {options.instances} x KIND_{kind.upper()} "
        f"({backend}), max batch {limits.max_batch}, sizes {limits.min_size}..{limits.max_size}, steps <= {limits.max_steps}")
    return out


def _write(bundle: Path, manifest: dict, work: Path, options: TritonRepoOptions, limits: ServeLimits,
           kind: str, backend: str) -> None:
    model = work / MODEL
    (model / "1").mkdir(parents=True)
    _place_bundle(bundle, work / BUNDLE_DIR, options.bundle_mode)
    # warm-up: one one-step generation per instance while it loads (Triton's own model_warmup
    # garbled BYTES warm-up inputs for the Python backend of 2.51). Not in the stages layout:
    # models load in parallel, and its pipeline model would call stage models not loaded yet.
    serve = {"layout": options.layout, "limits": limits.to_json(), "threads": options.threads,
             "warmup": options.warmup and options.layout == "single",
             "backend": backend, "source_bundle": str(bundle.resolve())}
    # the stages layout: the pipeline model only sends requests, so run as many as a batch holds
    instances = options.instances
    if options.layout == "stages":
        serve["stage_models"] = {c: stage_model(c) for c in COMPONENTS}
        serve["stage_batching"] = options.stage_backend == "python"
        instances = max(options.instances, limits.max_batch)
        for component in COMPONENTS:
            stage = work / stage_model(component)
            (stage / "1").mkdir(parents=True)
            if options.stage_backend != "python":
                (stage / "config.pbtxt").write_text(_native_stage_config(component, options, kind))
                _place_native(work / BUNDLE_DIR, manifest, component, stage / "1", options.stage_backend)
                continue
            (stage / "config.pbtxt").write_text(_stage_config(component, manifest["dims"], limits, options, kind))
            (stage / "1" / "model.py").write_text(_model_py("stage"))
            (stage / "serve.json").write_text(json.dumps({"component": component, "threads": options.threads}, indent=1))
    (model / "config.pbtxt").write_text(_eclipse_config(options, limits, "cpu" if options.layout == "stages" else kind,
                                                        instances))
    (model / "1" / "model.py").write_text(_model_py("eclipse"))
    (model / "serve.json").write_text(json.dumps(serve, indent=1))
