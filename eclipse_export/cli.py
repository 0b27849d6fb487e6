"""Console scripts: thin adapters over plain functions. Validate early, one-line errors.

`eclipse-export`   build a bundle from a preset or the real checkpoints.
`eclipse-generate` run a bundle (optionally against the PyTorch reference).

User mistakes end with `error: ...` on stderr and exit status 2; a failed parity check ends with
exit status 1; a traceback means a bug in this program.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_USAGE, EXIT_PARITY, EXIT_INTERRUPTED = 2, 1, 130


class UserError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (bad int, unknown choice, missing flag) become UserError, so every
    user mistake ends the same way: one `error:` line and exit status 2 (argparse would print
    the usage block first)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe a user's mistake or environment, not a bug."""
    from .runtime.backends import BackendError
    from .runtime.bundle import BundleError
    from .runtime.pipeline import GenerationError
    from .runtime.schedulers import SchedulerConfigError

    types: list[type[BaseException]] = [UserError, BackendError, BundleError, GenerationError, SchedulerConfigError]
    try:  # export-time modules need torch; the edge runtime may not have it
        from .export import ExportError
        from .sources import SourceError
        from .tokenizer_files import TokenizerFilesError

        types += [ExportError, SourceError, TokenizerFilesError]
    except ImportError:
        pass
    return tuple(types)


def _run(main, argv) -> int:
    import signal

    def terminate(signum, frame):
        # a service manager's SIGTERM unwinds like Ctrl-C, so the cleanup handlers run and no
        # half-written bundle or partial results are left behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        return main(argv)
    except KeyboardInterrupt:
        _log("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        from .parity import ParityError

        if isinstance(e, ParityError):
            _log(f"parity check failed: {e}")
            return EXIT_PARITY
        if isinstance(e, _user_errors()):
            _log(f"error: {e}")
            return EXIT_USAGE
        raise


# --- eclipse-export -----------------------------------------------------------------------------


def export_parser() -> argparse.ArgumentParser:
    from .presets import ALL_PRESETS

    p = ArgumentParser(prog="eclipse-export", description=(
        "Export ECLIPSE prior + CLIP bigG text encoder + Kandinsky 2.2 decoder to an ONNX bundle."))
    p.add_argument("--preset", default="tiny", help=f"model source: {', '.join(ALL_PRESETS)} (default: tiny)")
    p.add_argument("--target", default="onnx",
                   help="onnx (fp32), onnx-fp16, onnx-int8, trt-rtx-fp16 (TensorRT-RTX engines), "
                        "trt-fp16 or trt-int8 (TensorRT 10.3+/11 engines)")
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
    q.add_argument("--int8-components", default="unet",
                   help="comma-separated components to quantize: unet (default), text_encoder, movq, prior")
    q.add_argument("--calibration-prompts", type=Path,
                   help="prompt file (.jsonl or one prompt per line; default: the project's calibration/prompts.jsonl)")
    q.add_argument("--calibration-count", type=int, default=64, help="calibration prompts used (default 64)")
    q.add_argument("--validation-count", type=int, default=8,
                   help="held-out validation prompts for the export-time INT8 check (default 8)")
    q.add_argument("--calibration-size", default="256x256", metavar="HxW", help="image size during calibration (default 256x256)")
    q.add_argument("--calibration-steps", type=int, default=25, help="sampling steps during calibration (default 25)")
    q.add_argument("--calibration-method", default="minmax", help="minmax (default), percentile or entropy")
    q.add_argument("--int8-rules", help="whose kernels the Q/DQ graphs are shaped for: ort-cpu (onnx-int8's default) "
                                        "or tensorrt (trt-int8's; with onnx-int8: the TensorRT-shaped graph on ONNX Runtime)")
    q.add_argument("--calibration-cache", type=Path, default=Path("engines/.calibration"),
                   help="captured calibration inputs, reused and resumed across exports (default engines/.calibration)")
    g = p.add_argument_group("real checkpoints (--preset kandinsky22): hub ids or local directories")
    g.add_argument("--prior", help="ECLIPSE prior (default: ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior)")
    g.add_argument("--text-encoder", help="CLIP bigG text encoder + tokenizer (default: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)")
    g.add_argument("--decoder", help="Kandinsky 2.2 decoder with unet/, movq/, scheduler/ (default: kandinsky-community/kandinsky-2-2-decoder)")
    g.add_argument("--image-encoder-repo", help="repo with image_encoder/ for the negative embedding (default: kandinsky-community/kandinsky-2-2-prior)")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (runs code from the file: trusted sources only)")
    return p


def export_main(argv=None) -> int:
    args = export_parser().parse_args(argv)
    from .export import DEFAULT_OPSET, EXPORTERS, MAX_OPSET, MIN_OPSET, TARGETS, ExportOptions, export_bundle
    from .presets import ALL_PRESETS, REAL_PRESETS
    from .sources import make_source

    if args.preset not in ALL_PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from {', '.join(ALL_PRESETS)})")
    if args.target not in TARGETS:
        raise UserError(f"unknown target {args.target!r} (available now: {', '.join(TARGETS)})")
    if args.exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {args.exporter!r} (choose from {', '.join(EXPORTERS)})")
    if args.seed < 0:
        raise UserError("--seed must be >= 0")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise UserError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET} (default {DEFAULT_OPSET})")
    if args.from_bundle is not None:
        from .export import build_engines_for_bundle

        if args.out is None:
            raise UserError("--from-bundle needs --out (the new bundle with engines)")
        out = build_engines_for_bundle(args.from_bundle, args.out, args.target, _build_options(args),
                                       args.engine_cache, args.overwrite, log=_log,
                                       int8=_int8_options(args) if args.target.endswith("int8") else None)
        print(out)
        return 0
    locations = {
        "prior": args.prior,
        "text_encoder": args.text_encoder,
        "tokenizer": args.text_encoder,
        "unet": args.decoder,
        "movq": args.decoder,
        "scheduler": args.decoder,
        "image_encoder": args.image_encoder_repo,
    }
    if any(locations.values()) and args.preset not in REAL_PRESETS:
        raise UserError("--prior/--text-encoder/--decoder/--image-encoder-repo apply to --preset kandinsky22 only")
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
    from .calibrate import CaptureOptions
    from .export import Int8Options
    from .quantize import METHODS, RULES
    from .specs import COMPONENTS

    components = tuple(c.strip() for c in args.int8_components.split(",") if c.strip())
    unknown = [c for c in components if c not in COMPONENTS]
    if not components or unknown:
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
    h, w = _image_size("--calibration-size", args.calibration_size)
    return Int8Options(rules=args.int8_rules, components=components, prompts=args.calibration_prompts,
                       calibration_prompts=args.calibration_count, validation_prompts=args.validation_count,
                       capture=CaptureOptions(height=h, width=w, steps=args.calibration_steps),
                       method=args.calibration_method, cache_dir=args.calibration_cache)


def _build_options(args):
    from .engines import RTX_COMPUTE_CAPABILITIES, BuildOptions

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


# --- eclipse-generate ---------------------------------------------------------------------------


def generate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eclipse-generate", description="Generate an image with an exported bundle.")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory made by eclipse-export")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=("ddpm", "ddim"), default=None, help="default: the bundle's")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="PNG file to write (default: out.png)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt", "tensorrt-rtx"), default="auto",
                   help="auto (default): the bundle's engines if it has any, else ONNX Runtime")
    p.add_argument("--provider", action="append", default=None,
                   help="ONNX Runtime provider, repeatable, in order of preference: cpu, cuda, tensorrt, "
                        "tensorrt-rtx (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--low-memory", action="store_true",
                   help="TensorRT backends: hold one engine at a time (8 GB Jetson boards)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="TensorRT backends and ONNX Runtime GPU providers: do not capture the UNet step")
    p.add_argument("--host-loop", action="store_true",
                   help="ONNX Runtime GPU providers: copy the latents to the host every step (the reference loop)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also run the PyTorch reference on the same noises and print per-stage parity")
    p.add_argument("--report", type=Path, default=None, help="write timings (and parity) as JSON here")
    p.add_argument("--skip-hash-check", action="store_true", help="check bundle file sizes only (large bundles load faster)")
    return p


def _check_writable(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory")
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {what} {path}: permission denied")


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eclipse-export"


def _stage_line(timings: dict) -> str:
    keys = ("text_encoder", "prior", "unet", "unet_per_step", "movq", "total")
    return "  ".join(f"{k} {timings[k] * 1000:.1f} ms" for k in keys if k in timings)


def generate_main(argv=None) -> int:
    args = generate_parser().parse_args(argv)
    from .runtime.backends import make_backend
    from .runtime.images import save_png
    from .runtime.pipeline import Pipeline, Request

    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {args.out}")
    _check_writable(args.out, "output")
    if args.report:
        _check_writable(args.report, "report")
    # Validate the request before loading anything.
    req, warnings = Request.make(args.prompt, args.negative_prompt, args.height, args.width, args.steps,
                                 args.guidance, args.seed, args.scheduler)
    backend_name = args.backend
    if backend_name == "auto":
        from .runtime.backends import backend_for_bundle
        from .runtime.bundle import BundleError, open_bundle

        try:
            backend_name = backend_for_bundle(open_bundle(args.bundle, verify_hashes=False).manifest)
        except BundleError:
            backend_name = "onnxruntime"  # Pipeline.from_bundle below reports what is wrong with it
    backend = make_backend(backend_name, providers=args.provider or ["cpu"], threads=args.threads,
                           low_memory=args.low_memory, cuda_graphs=not args.no_cuda_graphs,
                           runtime_cache_dir=_user_cache() / "rtx-runtime-cache",
                           device_loop=False if args.host_loop else None)
    t0 = time.perf_counter()
    pipeline = Pipeline.from_bundle(args.bundle, backend, verify_hashes=not args.skip_hash_check)
    _log(f"loaded {args.bundle} ({pipeline.bundle.precision}, {backend.name}) in {time.perf_counter() - t0:.2f} s")

    def progress(i, n):
        if i == n or i % max(1, n // 10) == 0:
            _log(f"  step {i}/{n}")

    try:
        gen = pipeline.run(req, record=args.compare_reference, progress=progress, warnings=warnings)
    finally:
        pipeline.close()  # TensorRT-RTX keeps the kernels it compiled (runtime cache)
    for w in gen.warnings:
        _log(f"warning: {w}")
    save_png(gen.images[0], args.out)
    _log(f"wrote {args.out}")
    _log("latency: " + _stage_line(gen.timings))
    report_json = {"bundle": str(args.bundle), "backend": backend.describe(), "timings": gen.timings,
                   "load_seconds": pipeline.load_seconds, "warnings": gen.warnings}

    parity = None
    if args.compare_reference:
        try:
            from .compare import compare_with_reference
        except ImportError as e:
            raise UserError(f"--compare-reference needs the export extras (torch, diffusers): {e}") from None
        del pipeline.sessions  # free the backend's graphs before loading the torch stack
        _log("running the PyTorch reference on the same noises ...")
        parity, ref_timings = compare_with_reference(pipeline, gen)
        print(parity.table())
        print("reference latency: " + _stage_line(ref_timings))
        report_json.update({"parity": parity.to_json(), "reference_timings": ref_timings})
    if args.report:
        args.report.write_text(json.dumps(report_json, indent=2, default=float))
    if parity is not None:
        parity.raise_if_failed()
    return 0


def export_entry() -> None:
    sys.exit(_run(export_main, None))


def generate_entry() -> None:
    sys.exit(_run(generate_main, None))
