"""Targets derived from exported graphs, without PyTorch: INT8 graphs (calibrated on the FP32
chain run by ONNX Runtime) and TensorRT / TensorRT-RTX engines, in a fresh export or from a shipped
bundle (`eclipse-export --from-bundle`, the device workflow: no torch on the device)."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from eclipse_export.export.onnx_io import external_data_mismatch, link_or_copy, ort_session
from eclipse_export.export.options import (
    ENGINE_TARGETS,
    INT8_RULES,
    TARGETS,
    ExportError,
    ExportOptions,
    Int8Options,
    Log,
    require_onnx,
)
from eclipse_export.export.publish import publish
from eclipse_export.families import Family
from eclipse_export.metrics.parity import ParityError, ParityReport, compare_outputs
from eclipse_export.runtime.bundle import FORMAT_VERSION, family_name, file_entry
from eclipse_export.util.memory import peak_rss_bytes, reset_peak_rss
from eclipse_export.util.progress import heartbeat


def quantize_bundle(work: Path, family: Family, components: dict, dims: dict, source, options: ExportOptions,
                     log: Log) -> None:
    """Calibrate on the FP32 chain, quantize the chosen components in place, check each against
    its FP32 graph on held-out validation prompts (the INT8 tolerance), and record it all."""
    from eclipse_export.export.calibrate import CaptureOptions, ForeignShard, capture, iter_feeds
    from eclipse_export.export.calibration_prompts import load_prompts, take_balanced
    from eclipse_export.export.quantize import (
        check_rules,
        quantize_components,
        quantize_graph,
    )
    from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from eclipse_export.runtime.bundle import trusted_bundle
    from eclipse_export.runtime.pipeline import Pipeline
    from eclipse_export.runtime.request import GenerationError

    int8 = options.int8 or Int8Options()
    rules = int8.rules or INT8_RULES[options.target]
    if options.target in ENGINE_TARGETS and rules != "tensorrt":
        raise ExportError(f"{options.target} builds TensorRT engines: its INT8 graphs follow TensorRT's rules, not {rules!r}")
    plan = family.calibration
    if plan is None:
        raise ExportError(f"{options.target}: the {family.title} family has no INT8 calibration")
    try:
        # none named: the family's choice (its looped UNets; the one-pass graphs stay as exported)
        chosen = quantize_components(int8.components or plan.components, family.name)
        calib = take_balanced(load_prompts(int8.prompts, split="calibration"), int8.calibration_prompts)
        valid = take_balanced(load_prompts(int8.prompts, split="validation"), int8.validation_prompts)
    except ValueError as e:
        raise ExportError(str(e)) from None
    reset_peak_rss()
    t0 = time.perf_counter()
    written = [str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()]
    provisional = trusted_bundle(work, {"format_version": FORMAT_VERSION, "family": family.name, "dims": dims,
                                          "components": components, "precision": "fp32"}, written)
    pipeline = Pipeline(provisional, OnnxRuntimeBackend())
    # sizes and guidance the family's driver fixes (Karlo: its super-resolution size) filled in
    # before the key, so that the key says what was recorded
    capture_opts = (int8.capture or CaptureOptions()).resolved(pipeline.chain)
    # the family and what its calibration records are part of the key: a cache recorded on one
    # family's chain is never read for another's (the shards also name their family: capture
    # refuses a foreign one)
    key = hashlib.sha256(json.dumps({
        "family": family.name, "recorded": {"sampled": list(plan.sampled), "subjects": plan.subjects},
        "weights": {n: c["weights_sha256"] for n, c in components.items()},
        "capture": capture_opts.__dict__, "calibration": [p.prompt for p in calib],
        "validation": [p.prompt for p in valid]}, sort_keys=True).encode()).hexdigest()[:16]
    cache = (int8.cache_dir / family.name / key) if int8.cache_dir else work / ".calibration"
    sampled = ", ".join(plan.sampled) or "none"
    log(f"  calibration: {len(calib)} prompts on the {family.name} chain, {capture_opts.height}x{capture_opts.width}, "
        f"{capture_opts.steps} steps, {capture_opts.loop_calls_per_prompt} calls per prompt of {sampled} -> {cache}")
    try:
        calib_info = capture(pipeline, calib, cache / "calibration", capture_opts, log)
        log(f"  validation: {len(valid)} held-out prompts")
        capture(pipeline, valid, cache / "validation", capture_opts, log)
    except (ForeignShard, GenerationError) as e:  # e.g. a calibration size the family's bundle cannot make
        raise ExportError(f"calibration: {e}") from None
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
    if quantize and bundle.family.calibration is None:
        raise ExportError(f"{target}: the {bundle.family.title} family has no INT8 calibration")
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
                quantize_bundle(work, bundle.family, manifest["components"], manifest["dims"], None, options, log)
                graph_files = [f for c in manifest["components"].values() for f in c["files"]]
                others = [k for k in manifest["files"] if k not in fp32_files]
                manifest["files"] = {rel: file_entry(work, rel) for rel in graph_files + others}
            from eclipse_export.export.step_graph import step_graph_files, write_step_graphs

            missing = set(step_graph_files(bundle.family.name)) - set(manifest.get("step_graphs") or {})
            if missing:  # a bundle of format 1, or a Karlo bundle exported before its unCLIP step graphs
                added = write_step_graphs(work, bundle.family.name, missing)
                manifest["step_graphs"] = {**(manifest.get("step_graphs") or {}), **added}
                manifest["files"].update({rel: file_entry(work, rel) for rel in added.values()})
            manifest.update(format_version=FORMAT_VERSION, family=family_name(bundle.manifest))
            engines = {}
            if target in ENGINE_TARGETS:
                engines = build_engines(work, bundle.family, manifest["components"], manifest["dims"], build, engine_cache,
                                         log)
                manifest["files"].update({e["file"]: file_entry(work, e["file"]) for e in engines.values()})
            manifest.update(target=target, precision=want, engines=engines, derived_from=str(src),
                            derive_seconds=round(time.perf_counter() - started, 1))
            publish(work, manifest, out)
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


def build_engines(work: Path, family: Family, components: dict, dims: dict, build, cache: Path | None,
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
