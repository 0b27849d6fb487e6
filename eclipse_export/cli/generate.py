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

DEFAULTS = {"height": 512, "width": 512, "steps": 50, "guidance": 4.0}


def generate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eclipse-generate", description="Generate an image with an exported bundle.")
    # request fields default to None here: --from-png fills what the command line leaves out
    p.add_argument("--bundle", type=Path, help="bundle directory made by eclipse-export (with --from-png: default "
                                               "the PNG's bundle path)")
    p.add_argument("--prompt", help="what to draw (required unless --from-png; may be empty: unconditional)")
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from; leave the flag out to use the bundle's zero-image embedding, "
                        "as the official ECLIPSE code does (\"\" runs the prior on the empty string)")
    # defaults per family (Kandinsky 2.2 and λ: 512x512, 50 steps, 4.0; Karlo: its 256x256, 25 steps, 8.0)
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 64 (default: the bundle family's; "
                                              f"Kandinsky 2.2 {DEFAULTS['height']})")
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 64 (default: the bundle family's; "
                                             f"Kandinsky 2.2 {DEFAULTS['width']})")
    p.add_argument("--steps", type=int, help=f"sampling steps (default: the bundle family's; Kandinsky 2.2 "
                                             f"{DEFAULTS['steps']}; Karlo: decoder steps)")
    p.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance (CFG) scale; <= 1 turns it off (default: the bundle family's; "
                        f"Kandinsky 2.2 {DEFAULTS['guidance']})")
    p.add_argument("--seed", type=int, help="0..2^64-1; the same seed gives the same image (default: random, "
                                            "printed, and stored in the PNG)")
    p.add_argument("--scheduler", choices=("ddpm", "ddim"), default=None, help="(default: the bundle's)")
    p.add_argument("--from-png", type=Path, metavar="FILE",
                   help="repeat the request stored in a PNG written by eclipse-generate (flags given override it)")
    g = p.add_argument_group("λ-ECLIPSE bundles: subject-driven generation")
    g.add_argument("--subject", action="append", default=[], metavar="IMAGE=KEYWORD",
                   help="a subject image and the prompt word it stands for (repeatable; a later subject wins a "
                        "shared token), e.g. --subject dog.png=dog")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--canny", type=Path, metavar="IMAGE",
                   help="edge control: Canny edges (100/200) of this reference image (needs OpenCV: the [canny] extra)")
    c.add_argument("--control-image", type=Path, metavar="IMAGE", help="edge control: this edge map, used as it is")
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


def _subjects(values: list[str]) -> list[tuple[Path, str]]:
    out = []
    for value in values:
        image, sep, keyword = value.rpartition("=")
        if not sep or not image or not keyword.strip():
            raise UserError(f"--subject {value!r}: expected IMAGE=KEYWORD, e.g. --subject dog.png=dog")
        out.append((Path(image), keyword))
    return out


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eclipse-export"


def _stage_line(timings: dict) -> str:
    keys = ("text_encoder", "image_encoder", "prior", "unet", "unet_per_step", "movq", "text_proj", "decoder",
            "decoder_per_step", "upsample", "super_res", "total")
    return "  ".join(f"{k} {timings[k] * 1000:.1f} ms" for k in keys if k in timings)


def _request_fields(args) -> dict:
    """The request from the flags, completed from --from-png's stored request, then defaults."""
    stored = {}
    if args.from_png is not None:
        from eclipse_export.runtime.images import read_png_request

        try:
            stored = read_png_request(args.from_png)
        except (OSError, ValueError) as e:
            raise UserError(f"--from-png {args.from_png}: {e}") from None
        if stored is None:
            raise UserError(f"--from-png {args.from_png}: the file holds no eclipse-generate request "
                            "(written by another program, or its metadata was stripped)")
    bundle = args.bundle
    if bundle is None and isinstance(stored.get("bundle"), dict) and stored["bundle"].get("path"):
        bundle = Path(stored["bundle"]["path"])
    if bundle is None:
        raise UserError("--bundle is required (or --from-png FILE, whose request names its bundle)")
    defaults = {**DEFAULTS, **_family_defaults(bundle)}
    fields = {}
    for key in ("prompt", "negative_prompt", "height", "width", "steps", "guidance", "seed", "scheduler"):
        given = getattr(args, key)
        fields[key] = given if given is not None else stored.get(key, defaults.get(key))
    if fields["prompt"] is None:
        raise UserError("--prompt is required (or --from-png FILE)")
    fields["bundle"] = bundle
    fields["stored_bundle"] = stored.get("bundle")
    return fields


def _family_defaults(bundle: Path) -> dict:
    """The bundle family's request defaults, read from its manifest only (a family's driver may
    set them: Karlo 256x256, 25 steps, guidance 8)."""
    from eclipse_export.runtime.bundle import BundleError, open_bundle
    from eclipse_export.runtime.chains import driver_for

    try:
        b = open_bundle(bundle, verify_hashes=False)
        family_defaults = getattr(driver_for(b.family.name), "request_defaults", None)
        got = family_defaults(b) if family_defaults else {}
    except (BundleError, KeyError):
        return {}  # Pipeline.from_bundle reports what is wrong with the bundle
    return {("guidance" if k == "guidance_scale" else k): v for k, v in got.items()}


def generate_main(argv=None) -> int:
    args = generate_parser().parse_args(argv)
    from eclipse_export import __version__
    from eclipse_export.runtime.backends.factory import make_backend
    from eclipse_export.runtime.bundle import MANIFEST, sha256_file
    from eclipse_export.runtime.images import save_png
    from eclipse_export.runtime.pipeline import Pipeline, Request
    from eclipse_export.util.progress import StepProgress

    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be >= 1")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {args.out}")
    _check_writable(args.out, "output")
    if args.report:
        _check_writable(args.report, "report")
    fields = _request_fields(args)
    seed_given = fields["seed"] is not None
    if not seed_given:
        import secrets

        fields["seed"] = secrets.randbelow(2**32)  # short enough to type back in
    # Validate the request before loading anything.
    # (and decode every subject / edge image) before loading anything
    req, warnings = Request.make(fields["prompt"], fields["negative_prompt"], fields["height"], fields["width"],
                                 fields["steps"], fields["guidance"], fields["seed"], fields["scheduler"],
                                 subjects=_subjects(args.subject), control_image=args.control_image,
                                 canny_image=args.canny)
    bundle_dir = fields["bundle"]
    backend_name = args.backend
    if backend_name == "auto":
        from eclipse_export.runtime.backends.factory import backend_for_bundle
        from eclipse_export.runtime.bundle import BundleError, open_bundle

        try:
            backend_name = backend_for_bundle(open_bundle(bundle_dir, verify_hashes=False).manifest)
        except BundleError:
            backend_name = "onnxruntime"  # Pipeline.from_bundle below reports what is wrong with it
    backend = make_backend(backend_name, providers=args.provider or ["cpu"], threads=args.threads,
                           low_memory=args.low_memory, cuda_graphs=not args.no_cuda_graphs,
                           runtime_cache_dir=_user_cache() / "rtx-runtime-cache",
                           device_loop=False if args.host_loop else None)
    t0 = time.perf_counter()
    pipeline = Pipeline.from_bundle(bundle_dir, backend, verify_hashes=not args.skip_hash_check)
    _log(f"loaded {bundle_dir} ({pipeline.bundle.precision}, {backend.name}) in {time.perf_counter() - t0:.2f} s")
    manifest_sha = sha256_file(pipeline.bundle.root / MANIFEST)
    stored_bundle = fields["stored_bundle"]
    if isinstance(stored_bundle, dict) and stored_bundle.get("manifest_sha256") not in (None, manifest_sha):
        warnings.append(f"{args.from_png} was made with another bundle ({stored_bundle.get('target')}, manifest "
                        f"{str(stored_bundle.get('manifest_sha256'))[:12]}): the image may differ")
    _log(f"seed {req.seed}" + ("" if seed_given else f" (random; --seed {req.seed} repeats this image)"))
    scheduler = type(pipeline.make_scheduler(req.scheduler)).__name__.removesuffix("Scheduler").lower()
    request = {"prompt": req.prompts[0], "negative_prompt": req.negative_prompt, "seed": req.seed,
               "height": req.height, "width": req.width, "steps": req.steps, "guidance": req.guidance_scale,
               "scheduler": scheduler, "backend": backend.name, "version": __version__,
               "bundle": {"path": str(bundle_dir), "target": pipeline.bundle.manifest.get("target"),
                          "manifest_sha256": manifest_sha}}

    try:
        gen = pipeline.run(req, record=args.compare_reference, progress=StepProgress(sys.stderr),
                           warnings=warnings)
    finally:
        pipeline.close()  # TensorRT-RTX keeps the kernels it compiled (runtime cache)
    for w in gen.warnings:
        _log(f"warning: {w}")
    save_png(gen.images[0], args.out, request=request)
    _log(f"wrote {args.out}")
    _log("latency: " + _stage_line(gen.timings))
    report_json = {"bundle": str(bundle_dir), "request": request, "backend": backend.describe(), "timings": gen.timings,
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
