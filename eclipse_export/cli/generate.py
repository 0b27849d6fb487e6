"""`eclipse-generate`: run a bundle on a backend, write the PNG, optionally compare with the
PyTorch reference. A thin adapter over runtime/ (and verify/ for --compare-reference)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from eclipse_export.cli.common import ArgumentParser, _log, _run
from eclipse_export.util.errors import UserError


def generate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eclipse-generate", description="Generate an image with an exported bundle.")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory made by eclipse-export")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    # defaults per family (Kandinsky 2.2: 512x512, 50 steps, 4.0; Karlo: its 256x256, 25 steps, 8.0)
    p.add_argument("--height", type=int, default=None, help="default: the bundle family's")
    p.add_argument("--width", type=int, default=None, help="default: the bundle family's")
    p.add_argument("--steps", type=int, default=None, help="default: the bundle family's (Karlo: decoder steps)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (<= 1: off; default: the bundle family's)")
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
    keys = ("text_encoder", "prior", "unet", "unet_per_step", "movq", "text_proj", "decoder", "decoder_per_step",
            "upsample", "super_res", "total")
    return "  ".join(f"{k} {timings[k] * 1000:.1f} ms" for k in keys if k in timings)


# Kandinsky 2.2's; a family's driver may say otherwise (request_defaults)
_DEFAULTS = {"height": 512, "width": 512, "steps": 50, "guidance_scale": 4.0}


def _fill_defaults(args) -> None:
    """Options left out take the bundle family's defaults (read from the manifest only)."""
    if None not in (args.height, args.width, args.steps, args.guidance):
        return
    from eclipse_export.runtime.bundle import BundleError, open_bundle
    from eclipse_export.runtime.chains import driver_for

    defaults = dict(_DEFAULTS)
    try:
        bundle = open_bundle(args.bundle, verify_hashes=False)
        family_defaults = getattr(driver_for(bundle.family.name), "request_defaults", None)
        if family_defaults:
            defaults.update(family_defaults(bundle))
    except (BundleError, KeyError):
        pass  # Pipeline.from_bundle reports what is wrong with the bundle
    for attr, key in (("height", "height"), ("width", "width"), ("steps", "steps"), ("guidance", "guidance_scale")):
        if getattr(args, attr) is None:
            setattr(args, attr, defaults[key])


def generate_main(argv=None) -> int:
    args = generate_parser().parse_args(argv)
    from eclipse_export.runtime.backends.factory import make_backend
    from eclipse_export.runtime.images import save_png
    from eclipse_export.runtime.pipeline import Pipeline, Request

    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {args.out}")
    _check_writable(args.out, "output")
    if args.report:
        _check_writable(args.report, "report")
    _fill_defaults(args)
    # Validate the request before loading anything.
    req, warnings = Request.make(args.prompt, args.negative_prompt, args.height, args.width, args.steps,
                                 args.guidance, args.seed, args.scheduler)
    backend_name = args.backend
    if backend_name == "auto":
        from eclipse_export.runtime.backends.factory import backend_for_bundle
        from eclipse_export.runtime.bundle import BundleError, open_bundle

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
            from eclipse_export.verify.compare import compare_with_reference
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



def generate_entry() -> None:
    sys.exit(_run(generate_main, None))


if __name__ == "__main__":  # python -m eclipse_export.cli.generate
    generate_entry()
