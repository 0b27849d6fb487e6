"""ONNX export of the four components into a verified bundle, written atomically.

One component at a time: load it, compute PyTorch outputs on the spec's sample inputs, export,
free the torch module, finalise the ONNX (shape inference, checker, external data when large),
then run the graph on ONNX Runtime and compare with the PyTorch outputs. A failure anywhere
removes the partial bundle; the output directory only ever holds a complete bundle.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export.export.derive import build_engines, quantize_bundle
from eclipse_export.export.onnx_io import ort_session, save_external
from eclipse_export.export.options import (
    ENGINE_TARGETS,
    EXPORTERS,
    EXTERNAL_DATA_BYTES,
    TARGETS,
    ExportError,
    ExportOptions,
    Log,
)
from eclipse_export.export.publish import publish, tool_versions
from eclipse_export.families.spec import ComponentSpec
from eclipse_export.metrics.parity import ParityError, ParityReport, compare_outputs
from eclipse_export.runtime.bundle import FORMAT, FORMAT_VERSION, file_entry
from eclipse_export.util.memory import fmt_bytes, peak_rss_bytes, reset_peak_rss
from eclipse_export.util.progress import heartbeat

if TYPE_CHECKING:
    from eclipse_export.export.sources import StackSource

# No torch at import time: --from-bundle (engines, INT8 graphs from a shipped bundle) runs on a
# device that has the edge runtime, onnx and TensorRT but no torch (tests/test_torch_free_build.py).
# Only export_component, which really exports from PyTorch, imports the torch side.



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
    if TARGETS[options.target] == "int8" and source.family.calibration is None:
        # calibration (export/calibrate.py) follows the family's data (Family.calibration)
        raise ExportError(f"{options.target}: the {source.family.title} family has no INT8 calibration "
                          "(use onnx or onnx-fp16)")
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
                quantize_bundle(work, source.family, components, dims, source, options, log)
            files = [f for c in components.values() for f in c["files"]]
            engines = {}
            if build is not None:
                engines = build_engines(work, source.family, components, dims, build, options.engine_cache, log)
                files += [e["file"] for e in engines.values()]
            from eclipse_export.export.step_graph import write_step_graphs  # onnx: not at import time

            step_graphs = write_step_graphs(work, source.family.name)
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
                "tools": tool_versions(),
                "export_seconds": round(time.perf_counter() - started, 1),
            }
            publish(work, manifest, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"bundle written to {out} in {time.perf_counter() - started:.1f} s")
    return out
