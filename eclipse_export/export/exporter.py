"""ONNX export of the four components into a verified bundle, written atomically.

One component at a time: load it, compute PyTorch outputs on the spec's sample inputs, export,
free the torch module, finalise the ONNX (shape inference, checker, external data when large),
then run the graph on ONNX Runtime and compare with the PyTorch outputs. A failure anywhere
removes the partial bundle; the output directory only ever holds a complete bundle.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export import __version__
from eclipse_export.export.onnx_io import external_data_mismatch, link_or_copy, save_external
from eclipse_export.families import Family
from eclipse_export.families.spec import ComponentSpec
from eclipse_export.metrics.parity import ParityError, ParityReport, compare_outputs
from eclipse_export.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, family_name, file_entry
from eclipse_export.util.memory import fmt_bytes, peak_rss_bytes, reset_peak_rss
from eclipse_export.util.progress import heartbeat

if TYPE_CHECKING:
    from eclipse_export.export.engines import BuildOptions
    from eclipse_export.export.sources import StackSource

# No torch at import time: --from-bundle (engines, INT8 graphs from a shipped bundle) runs on a
# device that has the edge runtime, onnx and TensorRT but no torch (tests/test_torch_free_build.py).
# Only export_component, which really exports from PyTorch, imports the torch side.

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17
# 14: torch's exporter has no scaled_dot_product_attention before it (measured: 12 and 13 fail,
# 14..22 export the tiny stack); 21: the newest opset of ONNX 1.16, which ONNX Runtime 1.20 (the
# runtime's oldest supported version, pyproject) implements
MIN_OPSET, MAX_OPSET = 14, 21
# protobuf cannot serialise a model over 2 GiB; stay well under it before switching to external data
EXTERNAL_DATA_BYTES = 1 << 30
# target -> precision of its graphs
TARGETS = {"onnx": "fp32", "onnx-fp16": "fp16", "trt-fp16": "fp16", "trt-rtx-fp16": "fp16",
           "onnx-int8": "int8", "trt-int8": "int8"}
# int8 targets -> whose kernels their Q/DQ graphs are shaped for (quantize.RULES): the ONNX
# Runtime target gets what ORT's x86 integer kernels fuse, the TensorRT target TensorRT's rules
INT8_RULES = {"onnx-int8": "ort-cpu", "trt-int8": "tensorrt"}
# engine targets -> TensorRT flavour (their bundles hold the ONNX too: refit, re-builds).
# INT8 convolutions are a TensorRT feature (TensorRT-RTX has weight-only INT8 GEMM only).
ENGINE_TARGETS = {"trt-fp16": "tensorrt", "trt-rtx-fp16": "tensorrt-rtx", "trt-int8": "tensorrt"}


class ExportError(RuntimeError):
    """Export failed for a reason the user can act on."""


# What building from a shipped bundle adds to the edge runtime (pyproject's `edge-build` extra):
# onnx reads the graphs (ops TensorRT cannot parse, Q/DQ rewriting); torch is never needed there.
EDGE_BUILD_EXTRA = "pip install 'eclipse-export[edge-build]' (the onnx package; no torch)"


def require_onnx(what: str) -> None:
    """One actionable line, before any work, where the onnx package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError(f"{what} needs the onnx package: {EDGE_BUILD_EXTRA}") from None


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnx"
    exporter: str = "torchscript"
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    check_parity: bool = True
    build: "BuildOptions | None" = None  # engine options for trt-* targets (flavour set from the target)
    engine_cache: Path | None = None
    int8: "Int8Options | None" = None  # *-int8 targets (default Int8Options())


@dataclass(frozen=True)
class Int8Options:
    components: tuple[str, ...] = ("unet",)
    prompts: Path | None = None  # None: the project's calibration/prompts.jsonl
    calibration_prompts: int = 64  # first N of the calibration split
    validation_prompts: int = 8  # first N of the validation split: the export-time INT8 parity check
    capture: "object | None" = None  # calibrate.CaptureOptions (None: defaults)
    method: str = "minmax"
    # captured inputs persist here (resumable); None: inside the partial bundle, removed afterwards
    cache_dir: Path | None = None
    # quantize.RULES; None: the target's (INT8_RULES). onnx-int8 with "tensorrt" rebuilds the
    # TensorRT-shaped graph on ONNX Runtime (the before side of issue 13's comparison)
    rules: str | None = None


Log = Callable[[str], None]


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _check_dims(spec: ComponentSpec, dims: dict, batch: int, h: int, w: int) -> dict:
    return dict(dims, B=batch, h=h, w=w)


def _export_torch(component: str, graph, spec: ComponentSpec, example: dict, path: Path, options: ExportOptions) -> None:
    """Write the raw graph (weights possibly as many external files) to `path`."""
    import torch

    from eclipse_export.export.graphs import torch_inputs

    args = torch_inputs(component, example, spec)
    if options.exporter == "torchscript":
        dynamic_axes = {t.name: t.dynamic_axes() for t in spec.inputs + spec.outputs if t.dynamic_axes()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about python ints in shapes: covered by the parity check
            torch.onnx.export(
                graph, args, str(path), dynamo=False, opset_version=options.opset,
                input_names=spec.input_names, output_names=spec.output_names, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        return
    dims = {s: torch.export.Dim(s, min=1, max=4096) for s in ("B", "h", "w")}
    dims["h"] = torch.export.Dim("h", min=2, max=512)
    dims["w"] = torch.export.Dim("w", min=2, max=512)
    shapes = tuple({ax: dims[sym] for ax, sym in t.dynamic_axes().items()} or None for t in spec.inputs)
    program = torch.onnx.export(
        graph, args, dynamo=True, opset_version=max(options.opset, 18), input_names=spec.input_names,
        output_names=spec.output_names, dynamic_shapes=shapes, optimize=True, verbose=False,
    )
    program.save(str(path), external_data=True)


def _finalise(raw: Path, final: Path, external: bool) -> list[str]:
    """Shape inference + checker; one external data file when large. Returns written file names."""
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    if not external:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(final))
        return [final.name]
    files = save_external(model, final)
    del model
    gc.collect()
    # Path-based variants: the in-memory ones cannot hold a > 2 GiB model.
    onnx.shape_inference.infer_shapes_path(str(final), str(final), check_type=True, data_prop=True)
    onnx.checker.check_model(str(final), full_check=True)
    return files


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check_shapes(spec: ComponentSpec, dims: dict) -> list[dict]:
    """Two different shapes per component, so a wrongly static axis cannot pass."""
    if "h" in {s for t in spec.inputs for s in t.dynamic_axes().values()}:
        return [_check_dims(spec, dims, 2, 8, 8), _check_dims(spec, dims, 1, 16, 8)]
    return [_check_dims(spec, dims, 2, 8, 8), _check_dims(spec, dims, 1, 8, 8)]


def export_component(source: StackSource, component: str, workdir: Path, options: ExportOptions, log: Log) -> dict:
    """Export one component into `workdir`; returns its manifest entry."""
    from eclipse_export.export.graphs import run_torch, wrap
    from eclipse_export.export.sources import state_dict_sha256

    spec = source.family.components[component]
    dims = source.dims()
    reset_peak_rss()
    t0 = time.perf_counter()
    log(f"  loading {component} weights")
    module = source.load(component)
    n_params = sum(p.numel() for p in module.parameters())
    weights_sha = state_dict_sha256(module)
    external = _param_bytes(module) > EXTERNAL_DATA_BYTES
    graph = wrap(component, module, source.family.name)

    rng = np.random.default_rng(1234)
    checks = [spec.sample_inputs(d, rng) for d in _check_shapes(spec, dims)]
    expected = [run_torch(component, graph, inputs, spec) for inputs in checks] if options.check_parity else []

    precision = TARGETS[options.target]
    if precision == "int8":
        precision = "fp32"  # quantized after calibration, once every component's FP32 graph exists
    if precision == "fp16":
        external = _param_bytes(module) // 2 > EXTERNAL_DATA_BYTES
    log(f"  exporting {component} ({n_params / 1e6:.2f} M parameters, {options.exporter} exporter, {precision}"
        f"{', external data' if external else ''})")
    t1 = time.perf_counter()
    raw_dir = workdir / f".raw-{component}"
    raw_dir.mkdir()
    try:
        _export_torch(component, graph, spec, checks[0], raw_dir / f"{component}.onnx", options)
        del graph, module
        gc.collect()
        final = workdir / f"{component}.onnx"
        if precision == "fp16":
            from eclipse_export.export.fp16 import convert_to_fp16

            files = convert_to_fp16(raw_dir / f"{component}.onnx", final, spec.fp16_keep_fp32, external)
        else:
            files = _finalise(raw_dir / f"{component}.onnx", final, external)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    t2 = time.perf_counter()

    entry = {
        "graph": final.name,
        "precision": precision,
        "fp32_ops": list(spec.fp16_keep_fp32) if precision == "fp16" else [],
        "files": files,
        "io": spec.to_json(dims),
        "opset": _opset(final),
        "exporter": options.exporter,
        "parameters": n_params,
        "weights_sha256": weights_sha,
        "export_seconds": round(t2 - t1, 2),
    }
    if options.check_parity:
        log(f"  checking {component} on ONNX Runtime against PyTorch")
        session = ort_session(final)
        report = ParityReport(precision=precision)
        for inputs, ref in zip(checks, expected):
            got = dict(zip(spec.output_names, session.run(spec.output_names, inputs)))
            report.stages += compare_outputs(component, got, ref, spec.tolerance(precision))
        del session
        entry["export_parity"] = report.to_json()
        if not report.ok:
            raise ParityError(report)
    entry["peak_rss_bytes"] = peak_rss_bytes()
    entry["total_seconds"] = round(time.perf_counter() - t0, 2)
    sizes = sum((workdir / f).stat().st_size for f in files)
    log(f"  {component} done in {entry['total_seconds']:.1f} s, {sizes / 2**20:.1f} MiB on disk, "
        f"peak RSS {fmt_bytes(entry['peak_rss_bytes'])}")
    return entry


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _tool_versions() -> dict:
    out = {"eclipse_export": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "tokenizers", "numpy",
                 "onnxconverter-common"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _validate_scheduler(config: dict) -> None:
    from eclipse_export.runtime.schedulers import (
        SchedulerConfigError,
        scheduler_from_config,
    )

    if config.get("variance_type") in ("learned", "learned_range"):
        raise ExportError("the scheduler learns its variance, but the UNet graph drops the variance channels")
    try:
        scheduler_from_config(config)
    except SchedulerConfigError as e:
        raise ExportError(f"unsupported scheduler config: {e}") from e


def export_bundle(source: StackSource, out: Path, options: ExportOptions = ExportOptions(),
                  log: Log = print) -> Path:
    """Export the whole stack to a bundle directory `out` (atomically)."""
    if options.target not in TARGETS:
        raise ExportError(f"unknown target {options.target!r} (available: {', '.join(TARGETS)})")
    if options.exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {options.exporter!r} (choose from {', '.join(EXPORTERS)})")
    if TARGETS[options.target] == "int8" and source.family.name != "kandinsky22":
        # calibration (export/calibrate.py) drives the Kandinsky chain only so far
        raise ExportError(f"{options.target}: INT8 calibration is not implemented for the {source.family.title} "
                          "family yet (use onnx or onnx-fp16)")
    out = Path(out)
    if out.exists() and not options.overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write to {out.parent}")

    # a family with its own bundle files (Karlo: two scheduler configs) writes them itself
    own_files = getattr(source, "write_bundle_files", None)
    if own_files is None:
        scheduler_config = source.scheduler_config()
        _validate_scheduler(scheduler_config)
    dims = source.dims()
    build = None
    if options.target in ENGINE_TARGETS:
        from dataclasses import replace

        from eclipse_export.export.engines import (
            BuildOptions,
            EngineBuildError,
            preflight,
        )

        build = replace(options.build or BuildOptions(), flavour=ENGINE_TARGETS[options.target])
        try:  # before minutes of ONNX export, not after
            preflight(build)
        except EngineBuildError as e:
            raise ExportError(str(e)) from None

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    started = time.perf_counter()
    try:
        with heartbeat(log) as log:
            components = {}
            names = list(source.family.components)
            for i, name in enumerate(names, 1):
                log(f"[{i}/{len(names) + 1}] {name}")
                components[name] = export_component(source, name, work, options, log)

            log(f"[{len(names) + 1}/{len(names) + 1}] tokenizer, scheduler, negative image embedding")
            tokenizer_source = source.write_tokenizer(work / "tokenizer")
            if own_files is not None:  # a family with its own bundle files (Karlo: two scheduler configs)
                extra_files = own_files(work)
            else:
                (work / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, sort_keys=True))
                negative = source.negative_image_embeds()
                if negative.shape != (1, dims["D"]):
                    raise ExportError(f"negative image embedding has shape {negative.shape}, expected (1, {dims['D']})")
                np.save(work / "negative_image_embeds.npy", negative)
                extra_files = ["scheduler_config.json", "negative_image_embeds.npy", *source.write_extra_files(work)]

            if TARGETS[options.target] == "int8":
                _quantize_bundle(work, source.family, components, dims, source, options, log)
            files = [f for c in components.values() for f in c["files"]]
            engines = {}
            if build is not None:
                engines = _build_engines(work, source.family, components, dims, build, options.engine_cache, log)
                files += [e["file"] for e in engines.values()]
            from eclipse_export.export.step_graph import write_step_graphs  # onnx: not at import time

            step_graphs = write_step_graphs(work)
            files += [*extra_files, *step_graphs.values()]
            files += sorted(str(p.relative_to(work)) for p in (work / "tokenizer").rglob("*") if p.is_file())
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "family": source.family.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "target": options.target,
                "precision": TARGETS[options.target],
                "dims": dims,
                "source": source.describe(),
                "tokenizer": tokenizer_source,
                "components": components,
                "engines": engines,
                "step_graphs": step_graphs,
                "files": {rel: file_entry(work, rel) for rel in files},
                "tools": _tool_versions(),
                "export_seconds": round(time.perf_counter() - started, 1),
            }
            _publish(work, manifest, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"bundle written to {out} in {time.perf_counter() - started:.1f} s")
    return out


def _quantize_bundle(work: Path, family: Family, components: dict, dims: dict, source, options: ExportOptions,
                     log: Log) -> None:
    """Calibrate on the FP32 chain, quantize the chosen components in place, check each against
    its FP32 graph on held-out validation prompts (the INT8 tolerance), and record it all."""
    from eclipse_export.export.calibrate import CaptureOptions, capture, iter_feeds
    from eclipse_export.export.calibration_prompts import load_prompts, take_balanced
    from eclipse_export.export.quantize import (
        check_rules,
        quantize_components,
        quantize_graph,
    )
    from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from eclipse_export.runtime.bundle import trusted_bundle
    from eclipse_export.runtime.pipeline import Pipeline

    int8 = options.int8 or Int8Options()
    rules = int8.rules or INT8_RULES[options.target]
    if options.target in ENGINE_TARGETS and rules != "tensorrt":
        raise ExportError(f"{options.target} builds TensorRT engines: its INT8 graphs follow TensorRT's rules, not {rules!r}")
    try:
        chosen = quantize_components(int8.components, family.name)
        calib = take_balanced(load_prompts(int8.prompts, split="calibration"), int8.calibration_prompts)
        valid = take_balanced(load_prompts(int8.prompts, split="validation"), int8.validation_prompts)
    except ValueError as e:
        raise ExportError(str(e)) from None
    capture_opts = int8.capture or CaptureOptions()
    key = hashlib.sha256(json.dumps({
        "weights": {n: c["weights_sha256"] for n, c in components.items()},
        "capture": capture_opts.__dict__, "calibration": [p.prompt for p in calib],
        "validation": [p.prompt for p in valid]}, sort_keys=True).encode()).hexdigest()[:16]
    cache = (int8.cache_dir / key) if int8.cache_dir else work / ".calibration"
    reset_peak_rss()
    t0 = time.perf_counter()
    written = [str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()]
    provisional = trusted_bundle(work, {"format_version": FORMAT_VERSION, "family": family.name, "dims": dims,
                                          "components": components, "precision": "fp32"}, written)
    pipeline = Pipeline(provisional, OnnxRuntimeBackend())
    log(f"  calibration: {len(calib)} prompts, {capture_opts.height}x{capture_opts.width}, "
        f"{capture_opts.unet_steps_per_prompt} of {capture_opts.steps} UNet steps each -> {cache}")
    calib_info = capture(pipeline, calib, cache / "calibration", capture_opts, log)
    log(f"  validation: {len(valid)} held-out prompts")
    capture(pipeline, valid, cache / "validation", capture_opts, log)
    del pipeline
    gc.collect()
    calib_info["peak_rss_bytes"] = peak_rss_bytes()
    calib_info["seconds"] = round(time.perf_counter() - t0, 1)

    from eclipse_export.export.quantize import QuantizeOptions

    for name in chosen:
        entry = components[name]
        spec = family.components[name]
        external = len(entry["files"]) > 1
        fp32_path = work / entry["graph"]
        int8_path = work / f"{name}.int8.onnx"
        reset_peak_rss()
        log(f"  quantizing {name} (Q/DQ int8 for {rules}, {int8.method} calibration)")
        report = quantize_graph(fp32_path, int8_path, name, cache / "calibration",
                                QuantizeOptions(method=int8.method, rules=rules), external=external)
        report["peak_rss_bytes"] = peak_rss_bytes()
        problems = check_rules(int8_path, rules)
        if problems:
            raise ExportError(f"{name}: the quantized graph breaks the {rules} Q/DQ rules: {'; '.join(problems[:3])}")
        # INT8 vs FP32 graph on the validation prompts' real inputs
        log(f"  checking {name} int8 against fp32 on the validation inputs")
        ref_session, q_session = ort_session(fp32_path), ort_session(int8_path)
        parity = ParityReport(precision="int8")
        for feed in iter_feeds(cache / "validation", name):
            want = dict(zip(spec.output_names, ref_session.run(spec.output_names, feed)))
            got = dict(zip(spec.output_names, q_session.run(spec.output_names, feed)))
            parity.stages += compare_outputs(name, got, want, spec.tolerance("int8"))
        del ref_session, q_session
        for rel in entry["files"]:
            (work / rel).unlink()
        int8_files = [int8_path.name] + sorted(p.name for p in work.glob(f"{name}.int8.onnx*") if p != int8_path)
        final = work / f"{name}.onnx"
        renamed = []
        for rel in int8_files:
            src = work / rel
            dst = work / rel.replace(f"{name}.int8.onnx", f"{name}.onnx", 1)
            src.rename(dst)
            renamed.append(dst.name)
        if len(renamed) > 1:  # the external data file was renamed: point the graph at its new name
            _relocate_external(final, renamed[1:])
        entry.update(graph=final.name, files=renamed, precision="int8", quantization_rules=rules, int8=report,
                     int8_parity=parity.to_json())
        log(f"  {name}: {sum(report['quantized'].values())} of {sum(report['total'].values())} "
            f"Conv/MatMul/Gemm quantized; validation cosine >= {min(s.cosine for s in parity.stages):.5f}")
        if not parity.ok:
            raise ParityError(parity)
    for name, entry in components.items():
        entry["calibration"] = calib_info if name in chosen else None
    if int8.cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)


def build_engines_for_bundle(src: Path, out: Path, target: str, build, engine_cache: Path | None = None,
                             overwrite: bool = False, log: Log = print, int8: "Int8Options | None" = None) -> Path:
    """A new bundle `out` derived from an existing one, without re-exporting (graphs hard-linked
    where possible): engines from an onnx-fp16 (trt-*-fp16) or onnx-int8 (trt-int8) bundle, which
    is the device workflow (export once, build on each device from the shipped ONNX), or an INT8
    bundle (onnx-int8, trt-int8) quantized from an fp32 one."""
    from dataclasses import replace

    from eclipse_export.export.engines import BuildOptions, EngineBuildError, preflight
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(src)
    # the bundle's own ONNX target again: the same graphs re-packaged in the current format (adds
    # what older exports lack, e.g. the step graphs of format 2)
    repackage = target == bundle.manifest.get("target") and target not in ENGINE_TARGETS
    derivable = set(ENGINE_TARGETS) | {t for t, p in TARGETS.items() if p == "int8"}
    if target not in derivable and not repackage:
        raise ExportError(f"--from-bundle makes engines or INT8 graphs (target one of {', '.join(sorted(derivable))}), "
                          f"or re-packages a bundle in the current format (its own target, here "
                          f"{bundle.manifest.get('target')})")
    require_onnx(f"--from-bundle --target {target}")
    want = TARGETS[target]
    quantize = want == "int8" and bundle.precision == "fp32"
    if quantize and bundle.family.name != "kandinsky22":
        raise ExportError(f"{target}: INT8 calibration is not implemented for the {bundle.family.title} family yet")
    if target in ENGINE_TARGETS and want == "int8" and not quantize:
        shaped = {n: c.get("quantization_rules", "tensorrt") for n, c in bundle.manifest["components"].items()
                  if c.get("precision") == "int8"}
        other = {n: r for n, r in shaped.items() if r != "tensorrt"}
        if other:
            raise ExportError(f"{src}'s INT8 graphs ({', '.join(other)}) are shaped for {', '.join(sorted(set(other.values())))}, "
                              f"not TensorRT: build {target} from the fp32 bundle instead (--from-bundle <fp32 bundle> "
                              f"--target {target}), which quantizes with TensorRT's rules")
    if bundle.precision != want and not quantize:
        need = "fp32 or int8" if want == "int8" else want
        raise ExportError(f"{src} holds {bundle.precision} graphs; {target} needs {need} graphs "
                          f"(export with --target onnx{'' if want == 'int8' else '-' + want} first)")
    out = Path(out)
    if out.resolve() == Path(src).resolve():
        raise ExportError("--out must differ from --from-bundle (bundles are replaced whole, never edited)")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    if target in ENGINE_TARGETS:
        build = replace(build or BuildOptions(), flavour=ENGINE_TARGETS[target])
        try:
            preflight(build)
        except EngineBuildError as e:
            raise ExportError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    started = time.perf_counter()
    try:
        with heartbeat(log) as log:
            manifest = json.loads(json.dumps(bundle.manifest))
            for rel in manifest["files"]:
                if rel.startswith("engines/"):
                    continue  # engines of another target are not carried over
                dst = work / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if quantize:  # onnx refuses external data with several hard links ("hardlink attack")
                    shutil.copy2(Path(src) / rel, dst)
                    continue
                link_or_copy(Path(src) / rel, dst)  # engines only read the graphs
            manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("engines/")}
            if quantize:
                options = ExportOptions(target=target, int8=int8)
                fp32_files = {f for c in manifest["components"].values() for f in c["files"]}
                _quantize_bundle(work, bundle.family, manifest["components"], manifest["dims"], None, options, log)
                graph_files = [f for c in manifest["components"].values() for f in c["files"]]
                others = [k for k in manifest["files"] if k not in fp32_files]
                manifest["files"] = {rel: file_entry(work, rel) for rel in graph_files + others}
            if not manifest.get("step_graphs"):  # a bundle of format 1
                from eclipse_export.export.step_graph import write_step_graphs

                manifest["step_graphs"] = write_step_graphs(work)
                manifest["files"].update({rel: file_entry(work, rel) for rel in manifest["step_graphs"].values()})
            manifest.update(format_version=FORMAT_VERSION, family=family_name(bundle.manifest))
            engines = {}
            if target in ENGINE_TARGETS:
                engines = _build_engines(work, bundle.family, manifest["components"], manifest["dims"], build, engine_cache,
                                         log)
                manifest["files"].update({e["file"]: file_entry(work, e["file"]) for e in engines.values()})
            manifest.update(target=target, precision=want, engines=engines, derived_from=str(src),
                            derive_seconds=round(time.perf_counter() - started, 1))
            _publish(work, manifest, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"bundle written to {out} in {time.perf_counter() - started:.1f} s")
    return out


def _relocate_external(graph: Path, data_files: list[str]) -> None:
    """Rewrite external-data locations after renaming the data file (only the graph is rewritten)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    new = data_files[0]
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = new
    onnx.save_model(model, str(graph))


def non_standard_ops(graph: Path) -> list[str]:
    """Ops outside the ONNX standard domain (e.g. com.microsoft fusions that only ONNX Runtime
    runs). Exported graphs have none: ORT fuses at session creation, so bundles stay valid
    TensorRT inputs; this keeps it that way."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def _build_engines(work: Path, family: Family, components: dict, dims: dict, build, cache: Path | None,
                   log: Log) -> dict:
    """One engine per component, one at a time (peak memory matters on Jetson)."""
    from eclipse_export.export.engines import EngineBuildError, build_engine

    mismatch = external_data_mismatch(work, components, [f for c in components.values() for f in c["files"]])
    if mismatch:  # before the parser follows any reference
        raise ExportError("graphs whose external data is not their files: " + "; ".join(mismatch))
    engines = {}
    for name, entry in components.items():
        graph = work / entry["graph"]
        foreign = non_standard_ops(graph)
        if foreign:
            raise ExportError(f"{name}: the graph holds ops TensorRT cannot parse ({', '.join(foreign[:5])}); "
                              "build engines from graphs exported for TensorRT (onnx-fp16, or trt-int8 from an fp32 bundle)")
        onnx_sha = file_entry(work, entry["graph"])["sha256"]
        for extra in entry["files"][1:]:  # the weights file is part of what the engine depends on
            onnx_sha = hashlib.sha256((onnx_sha + file_entry(work, extra)["sha256"]).encode()).hexdigest()
        try:
            reset_peak_rss()
            engines[name] = build_engine(graph, family.components[name], dims, entry["precision"], onnx_sha, build,
                                         work, cache, log)
            engines[name]["peak_rss_bytes"] = peak_rss_bytes()
        except EngineBuildError as e:
            raise ExportError(str(e)) from None
    return engines


def _publish(work: Path, manifest: dict, out: Path) -> None:
    mismatch = external_data_mismatch(work, manifest["components"], manifest["files"])
    if mismatch:  # a bundle the runtime would refuse is never published
        raise ExportError("graphs whose external data is not their files: " + "; ".join(mismatch))
    # The manifest is written last: a directory without one is never a bundle.
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _publish_modes(work)
    _replace_dir(work, out)


def _publish_modes(root: Path) -> None:
    """mkdtemp makes the directory 0700 and onnx writes external data 0600: give the bundle the
    ordinary permissions (umask) so that a service user can read what a build user exported."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)
