"""`eclipse-bench`: time and check every target on the same prompt and noises; subcommands
`profile` (ONNX Runtime profile per op type vs this CPU's peak), `memory` (peak host memory per
target) and `compare` (two results.json). A thin adapter over bench/."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from eclipse_export.bench import ort_profile
from eclipse_export.bench.environment import environment
from eclipse_export.bench.report import (
    COLUMNS,
    COMPACT_COLUMNS,
    chart,
    columns_of,
    compare_results,
    markdown,
    parts_markdown,
    quality_markdown,
    ratios,
    table,
    write_json,
)
from eclipse_export.bench.runner import (
    BenchConfig,
    TargetSelectionError,
    _cuda_available,
    default_batches,
    requested_provider_sets,
    run_bench,
)
from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.runtime.pipeline import Request


SUBCOMMANDS = """subcommands (each with its own --help):
  eclipse-bench --bundle B --out DIR    time and check every target (this command)
  eclipse-bench profile --bundle B ...  ONNX Runtime's profile per op type against this CPU's peak
  eclipse-bench memory --bundle B ...   peak host memory of each target, each in its own process
  eclipse-bench compare A.json B.json   two results.json side by side"""


def _baseline_bundles(chosen: list[str] | None, bundles: list[Path]) -> tuple[str, ...]:
    from eclipse_export.util.errors import UserError

    if not chosen:
        return ()
    if "*" in chosen:
        return tuple(str(b) for b in bundles)
    unknown = [c for c in chosen if c not in {str(b) for b in bundles}]
    if unknown:
        raise UserError(f"--baseline-session {unknown[0]} is not one of the --bundle arguments")
    return tuple(chosen)


def main(argv=None) -> int:
    from eclipse_export.cli.common import ArgumentParser
    from eclipse_export.util.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])
    if argv[:1] == ["memory"]:
        return memory_main(argv[1:])
    if argv[:1] == ["compare"]:
        p = ArgumentParser(prog="eclipse-bench compare")
        p.add_argument("a", type=Path)
        p.add_argument("b", type=Path)
        args = p.parse_args(argv[1:])
        try:
            a, b = json.loads(args.a.read_text()), json.loads(args.b.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read results: {e}") from None
        print(compare_results(a, b))
        return 0
    p = ArgumentParser(prog="eclipse-bench", description="Time and check every target on the same prompt and noises.",
                       usage="eclipse-bench [profile | memory | compare] [options]", epilog=SUBCOMMANDS)
    p.add_argument("--bundle", type=Path, action="append", required=True,
                   help="bundle directory, repeatable (bundles of the same model: one reference, one set of noises)")
    p.add_argument("--out", type=Path, required=True, help="results directory")
    p.add_argument("--targets", metavar="T1,T2",
                   help="only these targets, as named in the table: e.g. trt-fp16 (an engine bundle's engines, "
                        "without its ONNX graphs), onnx-fp16@cuda (ONNX Runtime with those providers, "
                        "tensorrt+cuda for a list), torch-fp16; torch-fp32 runs whenever torch is there "
                        "(the parity reference). A named target that cannot run here fails the run "
                        "(default: every target this machine can run)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any target is skipped, not only the ones named by --targets")
    p.add_argument("--height", type=int, help="image height in pixels; a Karlo bundle: its own size, that of its "
                   f"super-resolution UNets (default: {BenchConfig.height})")
    p.add_argument("--width", type=int, help=f"image width in pixels; a Karlo bundle: its own (default: {BenchConfig.width})")
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help="sampling steps per generation")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (CFG) scale")
    p.add_argument("--runs", type=int, default=5, help="timed runs per target (the table shows their p50)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (CUDA graph capture, JIT, caches)")
    p.add_argument("--batch", type=int, action="append",
                   help="batch size, repeatable (default: 1 and 2, no more than the engines' profile takes)")
    p.add_argument("--columns", metavar="C1,C2",
                   help=f"table columns, from {', '.join(COLUMNS)} (default: all, or {','.join(COMPACT_COLUMNS)} "
                        "when the terminal is narrower than the full table; results.md has them all)")
    p.add_argument("--provider", action="append", help="ONNX Runtime providers (default: cpu)")
    p.add_argument("--provider-set", action="append", metavar="P1,P2",
                   help="one ONNX Runtime target per set, repeatable (e.g. --provider-set cuda "
                        "--provider-set tensorrt,cuda); replaces --provider")
    p.add_argument("--gpu-variants", action="store_true",
                   help="also time GPU targets without CUDA graphs, ONNX Runtime GPU targets with the host loop, "
                        "and TensorRT targets in --low-memory mode")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch targets (no parity then)")
    p.add_argument("--reference-low-memory", action="store_true",
                   help="load each PyTorch reference component per run and free it after use (timings still "
                        "exclude loading; runs take longer): a full-size λ-ECLIPSE reference otherwise holds ~16 GB")
    p.add_argument("--baseline-session", nargs="?", action="append", const="*", metavar="BUNDLE",
                   help="also run the ONNX Runtime target of BUNDLE (default: of every bundle) with ORT's default CPU "
                        "session settings: before and after in one run (repeatable)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak, to report the distance to it")
    p.add_argument("--quality-prompts", type=Path,
                   help="also report parity over these prompts (.jsonl or .txt; e.g. calibration/prompts.jsonl)")
    p.add_argument("--quality-split", default="validation", help="split of a .jsonl prompt file (default validation)")
    p.add_argument("--quality-count", type=int, default=8, help="prompts used from that file (default 8)")
    g = p.add_argument_group("λ-ECLIPSE bundles")
    g.add_argument("--subject", action="append", default=[], metavar="IMAGE=KEYWORD",
                   help="a subject image and the word of the bench prompt it stands for (repeatable; default: two "
                        "images drawn by the project for 'cube' and 'sphere' of the prompt "
                        f"{BenchConfig.prompt!r}, written to OUT/subjects/)")
    g.add_argument("--control-image", type=Path, metavar="IMAGE", help="an edge map for the control token")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be >= 1 and --warmup >= 0")
    opened = [open_bundle(b) for b in args.bundle]  # verify every bundle before spending time
    family = opened[0].family
    schedulers = [f for f in family.required_files if f.endswith("scheduler_config.json")]
    for b in opened[1:]:
        # one reference, one set of noises: the bundles must be the same model and sampler
        if b.family.name != family.name or b.manifest["source"] != opened[0].manifest["source"] or \
                any(b.json(f) != opened[0].json(f) for f in schedulers):
            raise UserError(f"{b.root} was exported from another source or scheduler config than {opened[0].root}")
    from eclipse_export.cli.generate import _subjects
    from eclipse_export.runtime.chains import driver_for

    if (args.subject or args.control_image) and not family.takes_subjects:
        raise UserError(f"--subject/--control-image: {opened[0].root} is a {family.title} bundle, which takes no "
                        "subject images")
    # the image size: the family's own (a Karlo bundle generates one size), else BenchConfig's
    own_size = getattr(driver_for(family.name), "request_defaults", None)
    if own_size is not None:
        defaults = own_size(opened[0])
        args.height, args.width = args.height or defaults["height"], args.width or defaults["width"]
    args.height, args.width = args.height or BenchConfig.height, args.width or BenchConfig.width
    quality = ()
    if args.quality_prompts is not None:
        from eclipse_export.export.calibration_prompts import (
            PromptFileError,
            load_prompts,
            take_balanced,
        )

        if args.quality_count < 1:
            raise UserError("--quality-count must be >= 1")
        try:
            split = args.quality_split if args.quality_prompts.suffix == ".jsonl" else None
            quality = tuple(p.prompt for p in take_balanced(load_prompts(args.quality_prompts, split=split),
                                                             args.quality_count))
        except PromptFileError as e:
            raise UserError(str(e)) from None
    requested = tuple(t.strip() for t in (args.targets or "").split(",") if t.strip())
    columns = None
    if args.columns:
        columns = tuple(c.strip() for c in args.columns.split(",") if c.strip())
        available = columns_of(family.timed_stages, family.per_step_timing)
        unknown = [c for c in columns if c not in available]
        if unknown or not columns:
            raise UserError(f"--columns: unknown {', '.join(unknown) or '(none given)'} (choose from {', '.join(available)})")
    provider_sets = tuple(tuple(x for x in s.split(",") if x) for s in args.provider_set or ())
    if requested and requested_provider_sets(requested):
        # the ONNX Runtime targets named by --targets, next to what --provider(-set) asked for
        base = provider_sets or (tuple(args.provider or ("cpu",)),)
        provider_sets = base + tuple(s for s in requested_provider_sets(requested) if s not in base)
    config = BenchConfig(height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
                         warmup=args.warmup, runs=args.runs, batches=tuple(args.batch or default_batches(args.bundle)),
                         threads=args.threads, providers=tuple(args.provider or ("cpu",)),
                         provider_sets=provider_sets, targets=requested,
                         gpu_variants=args.gpu_variants,
                         torch_device="cuda" if _cuda_available() else "cpu", peak_tflops=args.peak_tflops,
                         quality_prompts=quality,
                         baseline_session=_baseline_bundles(args.baseline_session, args.bundle),
                         subjects=tuple((str(path), keyword) for path, keyword in _subjects(args.subject)),
                         control_image=str(args.control_image) if args.control_image else None,
                         reference_low_memory=args.reference_low_memory)
    # the request checked (sizes, steps; subject images decoded) before anything runs
    from eclipse_export.runtime.request import GenerationError

    try:
        Request.make(config.prompt, None, config.height, config.width, config.steps, config.guidance, 0,
                     subjects=list(config.subjects) or None, control_image=config.control_image)
    except GenerationError as e:
        raise UserError(str(e)) from None
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    import importlib.util

    with_torch = not args.no_torch
    try:
        has_torch = importlib.util.find_spec("torch") is not None  # without importing it (seconds)
    except ImportError:  # a broken or blocked install counts as none
        has_torch = False
    if with_torch and not has_torch:
        # a device: the edge runtime without the export extras. Timings only; parity reads n/a
        log("torch is not installed: no PyTorch reference in this run (parity columns: n/a)")
        with_torch = False
    try:
        results = run_bench(args.bundle, args.out, config, with_torch=with_torch, log=log)
    except TargetSelectionError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        log(f"interrupted: partial results in {args.out / 'results.json'}")
        return 130
    import shutil

    print(table(results, columns, shutil.get_terminal_size().columns if sys.stdout.isatty() else None))
    for line in ratios(results) + parts_markdown(results) + quality_markdown(results):
        print(line)
    (args.out / "results.md").write_text(markdown(results))
    if chart(results, args.out / "chart.png"):
        log(f"wrote {args.out / 'chart.png'}")
    log(f"wrote {args.out / 'results.json'} and results.md")
    skipped = [k for k, e in results["targets"].items() if "skipped" in e
               and (args.strict or e["target"].split("[")[0] in requested or e["target"] in requested)]
    if skipped:
        log(f"{'--strict: ' if args.strict else ''}requested target(s) skipped: {', '.join(skipped)} "
            "(the reasons are in the table)")
    if results["failures"]:
        log("parity failures: " + " | ".join(results["failures"]))
    return 1 if results["failures"] or skipped else 0


def memory_main(argv) -> int:
    """eclipse-bench memory: peak host memory per target, each loaded and run in its own process."""
    from eclipse_export.bench.memprobe import markdown as memory_markdown
    from eclipse_export.bench.memprobe import measure as measure_memory
    from eclipse_export.cli.common import ArgumentParser
    from eclipse_export.util.errors import UserError

    p = ArgumentParser(prog="eclipse-bench memory", description=memory_main.__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True, help="writes memory.json and memory.md here")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int)
    p.add_argument("--torch", action="store_true", help="also torch-fp32 (the first bundle's source)")
    p.add_argument("--baseline-session", action="store_true", help="also each bundle with ORT's default session settings")
    args = p.parse_args(list(argv))
    Request.make("x", None, args.height, args.width, args.steps, 4.0, 0)  # sizes checked before anything runs
    for b in args.bundle:
        open_bundle(b, verify_hashes=False)
    runs = [("torch-fp32", args.bundle[0], "torch-fp32", None)] if args.torch else []
    for b in args.bundle:
        precision = open_bundle(b, verify_hashes=False).precision
        label = f"{'onnx' if precision == 'fp32' else 'onnx-' + precision} ({b.name})"
        if args.baseline_session:
            runs.append((f"{label} [ort-defaults]", b, "runtime", "ort-defaults"))
        runs.append((label, b, "runtime", None))
    results = []
    for label, bundle, target, session in runs:
        print(f"[{label}] measuring in a fresh process", file=sys.stderr, flush=True)
        try:
            r = measure_memory(bundle, target, args.height, args.width, args.steps, threads=args.threads, session=session)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        results.append(r | {"label": label})
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "memory.json", {"results": results, "environment": environment()})
    text = memory_markdown(results)
    (args.out / "memory.md").write_text(text)
    print(text)
    return 0


def entry() -> None:
    from eclipse_export.cli.common import _run

    sys.exit(_run(main, None))


def profile_main(argv: Sequence[str]) -> int:
    """eclipse-bench profile: see the module docstring."""
    import os

    from eclipse_export.cli.common import ArgumentParser
    from eclipse_export.runtime.bundle import open_bundle
    from eclipse_export.util.errors import UserError

    p = ArgumentParser(prog="eclipse-bench profile", description=ort_profile.__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True, help="writes profile.json and profile.md here")
    p.add_argument("--component", action="append", help=f"graphs to profile (default: all of {', '.join(ort_profile.COMPONENTS)})")
    p.add_argument("--batch", type=int, action="append", help="request batch (the UNet runs the CFG batch, 2x); default 1")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--top", type=int, default=8, help="op types listed per graph (default 8)")
    p.add_argument("--peak-gflops", type=float, help="FP32 peak (default: measured with cpu_peak)")
    p.add_argument("--peak-int8-gops", type=float, help="INT8 peak (default: measured with cpu_peak)")
    p.add_argument("--quick-peak", action="store_true", help="small peak measurement (tests)")
    args = p.parse_args(list(argv))
    components = args.component or list(ort_profile.COMPONENTS)
    unknown = [c for c in components if c not in ort_profile.COMPONENTS]
    if unknown:
        raise UserError(f"unknown component(s) {', '.join(unknown)} (choose from {', '.join(ort_profile.COMPONENTS)})")
    if args.runs < 1 or args.warmup < 0 or any(b < 1 for b in args.batch or ()):
        raise UserError("--runs and --batch must be >= 1, --warmup >= 0")
    for b in args.bundle:
        open_bundle(b, verify_hashes=False)  # refuse a broken bundle before measuring anything
    log = lambda m: print(m, file=__import__("sys").stderr, flush=True)  # noqa: E731
    from eclipse_export.bench import cpu_peak

    log("measuring this CPU's peak")
    measured = cpu_peak.measure(args.threads, quick=args.quick_peak)
    peaks = dict(measured.get("peak") or {})
    if args.peak_gflops:
        peaks["fp32_gflops"] = args.peak_gflops
    if args.peak_int8_gops:
        peaks["int8_gops"] = args.peak_int8_gops
    results, seen = {}, set()
    for b in args.bundle:
        log(f"[{b}]")
        results[b.name] = ort_profile.profile_bundle(b, components, args.batch or [1], args.height, args.width, args.runs,
                                         args.warmup, args.threads, log, seen)
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    (args.out / "profile.json").write_text(json.dumps(
        {"cpu": measured, "peaks_used": peaks, "loadavg": load, "height": args.height, "width": args.width,
         "bundles": {k: [p.to_json() for p in v] for k, v in results.items()}}, indent=2))
    text = ("# ONNX Runtime profile\n\n" + ort_profile.peaks_markdown(measured) +
            (f"- load average during the run: {', '.join(f'{x:.2f}' for x in load)}\n" if load else "") +
            f"- {args.height}x{args.width}, p50 of {args.runs} runs after {args.warmup} warm-up\n\n" +
            ort_profile.markdown(results, peaks, args.top))
    (args.out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":  # python -m eclipse_export.cli.bench
    entry()
