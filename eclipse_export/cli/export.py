"""`eclipse-export`: build a bundle from a preset or the real checkpoints, or derive another
target (FP16, INT8, engines) from an existing bundle. A thin adapter over export/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eclipse_export.cli.common import ArgumentParser, _log, _run
from eclipse_export.util.errors import UserError


# target -> what it makes (the --help text): the exporter's TARGETS plus triton (serve/); a test holds them equal
TARGET_HELP = {
    "onnx": "fp32 ONNX graphs (ONNX Runtime, CPU or GPU)",
    "onnx-fp16": "mixed-FP16 ONNX graphs (GPU; the input of TensorRT FP16 engines)",
    "onnx-int8": "calibrated INT8 Q/DQ graphs for ONNX Runtime's CPU integer kernels",
    "trt-rtx-fp16": "TensorRT-RTX FP16 engines (RTX GPUs; builds without a GPU)",
    "trt-fp16": "TensorRT 10.3+/11 FP16 engines (Jetson, data-centre and RTX GPUs)",
    "trt-int8": "TensorRT INT8 engines (Q/DQ graphs shaped for TensorRT)",
    "triton": "with --from-bundle: a Triton Inference Server model repository serving the bundle",
}


def export_parser() -> argparse.ArgumentParser:
    from eclipse_export.families import all_presets

    p = ArgumentParser(prog="eclipse-export", description=(
        "Export ECLIPSE prior + CLIP bigG text encoder + Kandinsky 2.2 decoder to an ONNX bundle, or build "
        "engines / INT8 graphs from a shipped bundle (--from-bundle: no torch needed)."),
        epilog="targets:\n" + "\n".join(f"  {t:<13} {h}" for t, h in TARGET_HELP.items()))
    p.add_argument("--preset", default="tiny", choices=all_presets(),
                   help="model source: tiny and full-random are random weights (tests, measurements), "
                        "kandinsky22 and lambda the real checkpoints (tiny-lambda, full-random-lambda: λ-ECLIPSE, random)")
    p.add_argument("--target", default="onnx", choices=tuple(TARGET_HELP), help="what to build (see the list below)")
    p.add_argument("--out", type=Path, help="bundle directory (default: engines/<preset>-<target>)")
    p.add_argument("--from-bundle", type=Path, metavar="DIR",
                   help="derive from an existing bundle instead of exporting: trt-* engines from its graphs, "
                        "or onnx-int8/trt-int8 from an fp32 bundle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the random presets (default: 0)")
    p.add_argument("--exporter", default="torchscript", help="torch.onnx exporter: torchscript or dynamo")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-parity-check", action="store_true", help="skip the per-component ORT-vs-PyTorch check")
    e = p.add_argument_group("engines (trt-* targets)")
    e.add_argument("--static", metavar="HxW", help="one fixed image size instead of 256..1024 px (batch still 1..--max-batch)")
    e.add_argument("--max-batch", type=int, default=1,
                   help="most prompts per generation (default 1, what eclipse-generate sends); engines take "
                        "twice as many rows where a negative prompt or CFG doubles the batch")
    e.add_argument("--workspace-mib", type=int, default=4096, help="builder workspace cap (default 4096)")
    e.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    e.add_argument("--compute-capability", action="append",
                   help="TensorRT-RTX targets, repeatable: SM75 SM80 SM86 SM89 SM120 SM121 (default SM89)")
    e.add_argument("--strip-weights", action="store_true", help="weight-stripped engines, refitted from the ONNX on the device")
    e.add_argument("--engine-cache", type=Path, default=Path("engines/.engine-cache"),
                   help="engines by key, reused when nothing they depend on changed (default engines/.engine-cache)")
    q = p.add_argument_group("int8 (onnx-int8, trt-int8 targets)")
    q.add_argument("--int8-components",
                   help="comma-separated components to quantize (default: the family's denoisers: unet for "
                        "Kandinsky 2.2 and λ-ECLIPSE; decoder, super_res_first, super_res_last for Karlo)")
    q.add_argument("--calibration-prompts", type=Path,
                   help="prompt file (.jsonl or one prompt per line; default: the project's calibration/prompts.jsonl)")
    q.add_argument("--calibration-count", type=int, default=64, help="calibration prompts used (default 64)")
    q.add_argument("--validation-count", type=int, default=8,
                   help="held-out validation prompts for the export-time INT8 check (default 8)")
    q.add_argument("--calibration-size", metavar="HxW",
                   help="image size during calibration (default 256x256, or the size a Karlo bundle fixes)")
    q.add_argument("--calibration-steps", type=int, default=25, help="sampling steps during calibration (default 25)")
    q.add_argument("--calibration-method", default="minmax", help="minmax (default), percentile or entropy")
    q.add_argument("--int8-rules", help="whose kernels the Q/DQ graphs are shaped for: ort-cpu (onnx-int8's default) "
                                        "or tensorrt (trt-int8's; with onnx-int8: the TensorRT-shaped graph on ONNX Runtime)")
    q.add_argument("--calibration-cache", type=Path, default=Path("engines/.calibration"),
                   help="captured calibration inputs, reused and resumed across exports (default engines/.calibration)")
    t = p.add_argument_group("triton target (--from-bundle B --target triton --out REPO)")
    t.add_argument("--triton-layout", default="single",
                   help="single (one model runs the chain) or stages (the four graphs as models, the loop in a BLS model)")
    t.add_argument("--triton-stage-backend", default="python",
                   help="stages layout: python (default; batches across requests), onnxruntime or tensorrt "
                        "(Triton's own backends, in NVIDIA's containers; no batching)")
    t.add_argument("--triton-kind", default="auto", help="instance kind: auto (gpu for engine bundles), cpu or gpu")
    t.add_argument("--triton-instances", type=int, default=1, help="model instances (per GPU with gpu; default 1)")
    t.add_argument("--triton-max-batch", type=int, default=4,
                   help="most prompts the dynamic batcher puts in one execution (default 4; engines: at most their profile's)")
    t.add_argument("--triton-queue-delay-ms", type=float, default=50.0, help="dynamic batcher wait for a fuller batch (default 50)")
    t.add_argument("--triton-bundle", default="link",
                   help="how the bundle goes into the repository: link (hard links, else a copy; default), copy, symlink")
    t.add_argument("--serve-max-steps", type=int, default=100, help="most sampling steps a request may ask for (default 100)")
    t.add_argument("--serve-max-size", type=int, default=1024, help="largest image side a request may ask for (default 1024)")
    t.add_argument("--serve-default-size", type=int, default=512, help="image side when a request gives none (default 512)")
    t.add_argument("--serve-default-steps", type=int, default=50, help="steps when a request gives none (default 50)")
    t.add_argument("--serve-threads", type=int, help="ONNX Runtime threads per instance (default: its own choice)")
    g = p.add_argument_group("real checkpoints (--preset kandinsky22, lambda or karlo): hub ids or local directories")
    g.add_argument("--prior", help="ECLIPSE prior (default: ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior; "
                                   "lambda: ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0; "
                                   "karlo: ECLIPSE-Community/ECLIPSE_Karlo_Prior)")
    g.add_argument("--text-encoder", help="CLIP bigG text encoder + tokenizer (default: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)")
    g.add_argument("--decoder", help="Kandinsky 2.2 decoder with unet/, movq/, scheduler/ (default: kandinsky-community/kandinsky-2-2-decoder; "
                                     "--preset karlo: the UnCLIPPipeline layout of kakaobrain/karlo-v1-alpha, text encoder and tokenizer included)")
    g.add_argument("--image-encoder-repo", help="repo with image_encoder/ (and, for lambda, image_processor/) (default: kandinsky-community/kandinsky-2-2-prior)")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (runs code from the file: trusted sources only)")
    return p


def export_main(argv=None) -> int:
    args = export_parser().parse_args(argv)
    if args.target == "triton":  # serving needs no torch: nothing from export/ is imported
        return _triton_main(args)
    # torch-free so far: --from-bundle (engines, INT8 graphs) runs on a device without torch
    from eclipse_export.export.options import DEFAULT_OPSET, EXPORTERS, MAX_OPSET, MIN_OPSET, ExportOptions
    from eclipse_export.export.exporter import export_bundle
    from eclipse_export.families.karlo import presets as karlo_presets

    if args.exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {args.exporter!r} (choose from {', '.join(EXPORTERS)})")
    if args.seed < 0:
        raise UserError("--seed must be >= 0")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise UserError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET} (default {DEFAULT_OPSET})")
    if args.from_bundle is not None:
        from eclipse_export.export.derive import build_engines_for_bundle

        if args.out is None:
            raise UserError("--from-bundle needs --out (the new bundle with engines)")
        out = build_engines_for_bundle(args.from_bundle, args.out, args.target, _build_options(args),
                                       args.engine_cache, args.overwrite, log=_log,
                                       int8=_int8_options(args) if args.target.endswith("int8") else None)
        print(out)
        return 0
    try:  # the torch side: exporting from PyTorch checkpoints
        from eclipse_export.export.source_factory import make_source
        from eclipse_export.export.sources import REAL_PRESETS
    except ImportError as e:
        raise UserError(f"exporting --preset {args.preset} needs PyTorch and the model libraries ({e.name} is "
                        "missing): pip install 'eclipse-export[export]' on a workstation; a device builds "
                        "engines from a shipped bundle with --from-bundle, without torch") from None
    locations = {
        "prior": args.prior,
        "text_encoder": args.text_encoder,
        "tokenizer": args.text_encoder,
        "unet": args.decoder,
        "movq": args.decoder,
        "scheduler": args.decoder,
        "image_encoder": args.image_encoder_repo,
    }
    if args.preset in karlo_presets.REAL_PRESETS:
        if args.image_encoder_repo:
            raise UserError("--image-encoder-repo applies to --preset kandinsky22 or lambda only (Karlo has no "
                            "zero-image embedding)")
        # one repository in diffusers' UnCLIPPipeline layout holds everything but the prior
        karlo_repo = {c: args.decoder for c in karlo_presets.HUB_SOURCES if c != "prior"}
        locations = {**karlo_repo, "prior": args.prior, "text_encoder": args.text_encoder or args.decoder,
                     "tokenizer": args.text_encoder or args.decoder}
    else:
        if args.preset == "lambda":
            locations["image_processor"] = args.image_encoder_repo
        if any(locations.values()) and args.preset not in REAL_PRESETS:
            raise UserError("--prior/--text-encoder/--decoder/--image-encoder-repo apply to --preset "
                            f"{' or '.join((*REAL_PRESETS, *karlo_presets.REAL_PRESETS))} only")
    out = args.out or Path("engines") / f"{args.preset}-{args.target}"
    options = ExportOptions(target=args.target, exporter=args.exporter, opset=args.opset,
                            overwrite=args.overwrite, check_parity=not args.no_parity_check,
                            build=_build_options(args), engine_cache=args.engine_cache,
                            int8=_int8_options(args) if args.target.endswith("int8") else None)
    _log(f"exporting preset {args.preset} -> {out} ({args.target})")
    source = make_source(args.preset, seed=args.seed, locations=locations, allow_pickle=args.allow_pickle)
    export_bundle(source, out, options, log=_log)
    print(out)
    return 0


def _triton_main(args) -> int:
    from eclipse_export.serve.limits import ServeLimits
    from eclipse_export.serve.triton_repo import RepositoryError, TritonRepoOptions, write_repository

    if args.from_bundle is None or args.out is None:
        raise UserError("--target triton takes --from-bundle (the bundle to serve) and --out (the repository to write)")
    for flag, value in (("--triton-instances", args.triton_instances), ("--triton-max-batch", args.triton_max_batch),
                        ("--serve-max-steps", args.serve_max_steps), ("--serve-default-steps", args.serve_default_steps)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1")
    if args.serve_threads is not None and args.serve_threads < 1:
        raise UserError("--serve-threads must be >= 1")
    try:
        limits = ServeLimits(max_batch=args.triton_max_batch, max_steps=args.serve_max_steps,
                             max_size=args.serve_max_size, default_size=args.serve_default_size,
                             default_steps=args.serve_default_steps).checked()
        options = TritonRepoOptions(layout=args.triton_layout, kind=args.triton_kind, instances=args.triton_instances,
                                    limits=limits, queue_delay_ms=args.triton_queue_delay_ms,
                                    bundle_mode=args.triton_bundle, stage_backend=args.triton_stage_backend,
                                    threads=args.serve_threads,
                                    overwrite=args.overwrite)
        out = write_repository(args.from_bundle, args.out, options, log=_log)
    except (RepositoryError, ValueError) as e:
        raise UserError(str(e)) from None
    print(out)
    return 0


def _image_size(flag: str, value: str) -> tuple[int, int]:
    """An HxW option in pixels: multiples of 64 (the latent scale 8 times the UNet's 8)."""
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise UserError(f"{flag} takes HxW, e.g. 512x512, got {value!r}") from None
    if h % 64 or w % 64 or not (64 <= h <= 2048 and 64 <= w <= 2048):
        raise UserError(f"{flag} {value}: sizes must be multiples of 64 between 64 and 2048")
    return h, w


def _int8_options(args):
    from eclipse_export.export.calibrate import CaptureOptions
    from eclipse_export.export.options import Int8Options
    from eclipse_export.export.quantize import METHODS, RULES
    from eclipse_export.families import FAMILIES

    # any family's component here; the export checks them against the bundle's own family
    COMPONENTS = list(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))
    components = tuple(c.strip() for c in (args.int8_components or "").split(",") if c.strip())
    unknown = [c for c in components if c not in COMPONENTS]
    if (args.int8_components is not None and not components) or unknown:
        raise UserError(f"--int8-components: unknown {', '.join(unknown) or '(none given)'} "
                        f"(choose from {', '.join(COMPONENTS)})")
    if args.calibration_prompts is not None and not args.calibration_prompts.is_file():
        raise UserError(f"--calibration-prompts {args.calibration_prompts}: no such file")
    if args.calibration_count < 1:
        raise UserError("--calibration-count must be >= 1")
    if args.validation_count < 1:
        raise UserError("--validation-count must be >= 1")
    if args.calibration_steps < 1:
        raise UserError("--calibration-steps must be >= 1")
    if args.calibration_method not in METHODS:
        raise UserError(f"--calibration-method must be one of {', '.join(METHODS)}")
    if args.int8_rules is not None and args.int8_rules not in RULES:
        raise UserError(f"--int8-rules must be one of {', '.join(RULES)}")
    h, w = _image_size("--calibration-size", args.calibration_size) if args.calibration_size else (None, None)
    return Int8Options(rules=args.int8_rules, components=components, prompts=args.calibration_prompts,
                       calibration_prompts=args.calibration_count, validation_prompts=args.validation_count,
                       capture=CaptureOptions(height=h, width=w, steps=args.calibration_steps),
                       method=args.calibration_method, cache_dir=args.calibration_cache)


def _build_options(args):
    from eclipse_export.export.engines import RTX_COMPUTE_CAPABILITIES, BuildOptions

    static = None
    if args.static:
        h, w = _image_size("--static", args.static)
        static = {"B": args.max_batch, "h": h // 8, "w": w // 8}
    if args.max_batch is not None and args.max_batch < 1:
        raise UserError("--max-batch must be >= 1")
    if not 0 <= args.opt_level <= 5:
        raise UserError("--opt-level must be between 0 and 5")
    if args.workspace_mib < 64:
        raise UserError("--workspace-mib must be >= 64")
    ccs = tuple(c.upper() for c in (args.compute_capability or ["SM89"]))
    unknown = [c for c in ccs if c not in RTX_COMPUTE_CAPABILITIES]
    if unknown:
        raise UserError(f"unknown compute capability {', '.join(unknown)} (choose from {', '.join(RTX_COMPUTE_CAPABILITIES)})")
    return BuildOptions(static=static, max_batch=args.max_batch, workspace_mib=args.workspace_mib,
                        opt_level=args.opt_level, strip_weights=args.strip_weights, compute_capabilities=ccs,
                        timing_cache=args.engine_cache / "timing.cache" if args.engine_cache else None)



def export_entry() -> None:
    sys.exit(_run(export_main, None))


if __name__ == "__main__":  # python -m eclipse_export.cli.export
    export_entry()
