"""eclipse-bench: latency and parity of every target this machine can run, in one run.

All targets get the same prompts and the same noises (and, for λ-ECLIPSE bundles, the same
subject images). What is timed is the bundle's family's data (Family.timed_stages: one column
per stage, per-part timings such as the image encoder's per subject, the loop's per-step mean);
the noises come from the family's runtime driver. The FP32 PyTorch reference runs in the
same process; every other target is compared with it, and a target that breaks its written
tolerance makes the run fail (exit 1), so the benchmark doubles as a device acceptance test.
results.json is rewritten after every target, so an interrupted run leaves a valid file.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eclipse_export.bench.environment import TegraStats, environment
from eclipse_export.bench.quality import quality_outputs, quality_summary
from eclipse_export.bench.report import write_json
from eclipse_export.families.spec import MIN_IMAGE_PSNR_DB
from eclipse_export.metrics.parity import ParityReport
from eclipse_export.metrics.ssim import ssim
from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.runtime.images import to_uint8
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.pipeline import Request
from eclipse_export.util.memory import peak_rss_bytes, reset_peak_rss

RESULTS_VERSION = 1


@dataclass
class BenchConfig:
    prompt: str = "a red cube on a blue sphere"
    # a realistic device request (what eclipse-generate users run, smaller than its 50 steps);
    # tests pass small sizes explicitly
    height: int = 512
    width: int = 512
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0
    warmup: int = 1
    runs: int = 5
    batches: tuple[int, ...] = (1, 2)
    threads: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    # more ONNX Runtime provider lists, one target each (e.g. ("tensorrt", "cuda")); () : providers only
    provider_sets: tuple[tuple[str, ...], ...] = ()
    # also time each GPU target's variants: ONNX Runtime GPU providers with the host loop and
    # without CUDA graphs, TensorRT backends without CUDA graphs and in low-memory mode
    gpu_variants: bool = False
    torch_device: str = "cpu"
    peak_tflops: float | None = None
    # quality report: parity of every target against torch-fp32 on these prompts (batch 1, the
    # timed request's size and steps, seed per prompt); empty: the timed prompt only
    quality_prompts: tuple[str, ...] = ()
    # bundles whose ONNX Runtime target also runs with ONNX Runtime's default CPU session settings
    # (the "before" of the tuned ones, backends.CPU_SESSION_PROFILES), in the same run
    baseline_session: tuple[str, ...] = ()
    # only these targets (names as in the table, e.g. "trt-fp16", "onnx-fp16@cuda"); () : all.
    # torch-fp32 still runs when torch is there: it is the parity reference
    targets: tuple[str, ...] = ()
    # λ-ECLIPSE bundles: (image path, keyword) pairs, keywords of `prompt`; () : two subjects
    # drawn by the project (DEFAULT_SUBJECT_KEYWORDS), written to the results directory
    subjects: tuple[tuple[str, str], ...] = ()
    control_image: str | None = None
    # the PyTorch reference loads each component per run and frees it after use (its timings still
    # exclude loading): a full-size λ stack held at once is ~16 GB of FP32 weights
    reference_low_memory: bool = False


# words of BenchConfig.prompt that the drawn default subjects stand for
DEFAULT_SUBJECT_KEYWORDS = ("cube", "sphere")


def default_subjects(out_dir: Path) -> tuple[tuple[str, str], ...]:
    """Two subject images drawn by the project (export/calibrate.py's drawn_subject: coloured
    shapes on white, never downloaded), saved under out_dir/subjects/ so a run can be repeated."""
    from PIL import Image

    from eclipse_export.export.calibrate import drawn_subject

    folder = out_dir / "subjects"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, keyword in enumerate(DEFAULT_SUBJECT_KEYWORDS):
        path = folder / f"{keyword}.png"
        Image.fromarray(drawn_subject(i)[0]).save(path)
        out.append((str(path), keyword))
    return tuple(out)


def make_request(config: BenchConfig, prompts, seed: int) -> Request:
    req, _ = Request.make(prompts, None, config.height, config.width, config.steps, config.guidance, seed, None,
                          subjects=list(config.subjects) or None, control_image=config.control_image)
    return req


class TargetSelectionError(ValueError):
    """--targets names a target this run does not plan (the message lists the ones it does)."""


def requested_provider_sets(names) -> tuple[tuple[str, ...], ...]:
    """ONNX Runtime provider lists named by --targets (`onnx-fp16@tensorrt+cuda` -> ("tensorrt", "cuda"))."""
    sets = []
    for name in names:
        if "@" in name:
            providers = tuple(name.split("@", 1)[1].split(":")[0].split("[")[0].split("+"))
            if providers not in sets:
                sets.append(providers)
    return tuple(sets)


def engine_max_batch(manifest: dict) -> int | None:
    """Most prompts per request the bundle's engines take (their optimisation profile); None: no engines."""
    from eclipse_export.families import DEFAULT_FAMILY, get_family
    from eclipse_export.runtime.bundle import family_name

    components = get_family(family_name(manifest) or DEFAULT_FAMILY).components if manifest.get("engines") else {}
    most = None
    for name, engine in (manifest.get("engines") or {}).items():
        rows = components[name].rows_per_prompt if name in components else 1
        for _lo, _opt, hi in (engine.get("profile") or {}).values():
            prompts = hi[0] // rows
            most = prompts if most is None else min(most, prompts)
    return most


def default_batches(bundles) -> tuple[int, ...]:
    """Batch 1 and 2, but no batch the engines' profile cannot take (an engine bundle built for
    one prompt, the default, gets a b1 row only rather than a b2 row that can only be skipped)."""
    limits = [m for m in (engine_max_batch(open_bundle(b, verify_hashes=False).manifest) for b in bundles)
              if m is not None]
    return tuple(b for b in (1, 2) if not limits or b <= min(limits)) or (1,)


# --- targets -----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    precision: str
    kind: str  # "reference" or "runtime"
    runner: object = None
    load_seconds: float = 0.0
    skipped: str | None = None
    meta: dict = field(default_factory=dict)


class RuntimeRunner:
    def __init__(self, bundle_dir: Path, providers, threads, backend: str = "onnxruntime", options: dict | None = None):
        from eclipse_export.runtime.backends.factory import make_backend
        from eclipse_export.runtime.pipeline import Pipeline

        options = options or {}
        self.backend = make_backend(backend, providers, threads, **options)
        # the ort-defaults baseline is the runtime as it was before issue 13: ONNX Runtime's default
        # session settings and the graphs loaded in the chain's order
        self.pipeline = Pipeline.from_bundle(bundle_dir, self.backend,
                                             largest_first=options.get("cpu_profile") != "ort-defaults")

    @property
    def load_seconds(self) -> float:
        # sessions made lazily (a UNet specialised to the request's shapes for CUDA graphs, engines
        # of --low-memory) count when they are made; read after the runs
        return sum(getattr(s, "load_seconds", 0.0) or self.pipeline.load_seconds[n]
                   for n, s in self.pipeline.sessions.items())

    def run(self, req: Request, noises: Noises):
        gen = self.pipeline.run(req, noises=noises, record=True)
        return gen.timings, gen.intermediates, gen.images


class TorchRunner:
    def __init__(self, bundle_dir: Path, precision: str, device: str, low_memory: bool = False):
        import torch

        from eclipse_export.verify.compare import final_image_stage, reference_for

        bundle = open_bundle(bundle_dir, verify_hashes=False)
        try:
            self.reference = reference_for(bundle, device, keep_loaded=not low_memory)
        except ValueError as e:  # a reference that cannot run on this device: skipped, not fatal
            raise BackendError(str(e)) from None
        if precision != "fp32" and not hasattr(self.reference, "dtype"):
            raise BackendError(f"the {bundle.family.title} reference runs in fp32 only")
        if hasattr(self.reference, "dtype"):
            self.reference.dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
        self.image_stage = final_image_stage(bundle.family.name)

    def run(self, req: Request, noises: Noises):
        outputs, timings = self.reference.run(req, noises)
        return timings, outputs, to_uint8(outputs[self.image_stage])

    @property
    def load_seconds(self) -> float:
        return sum(self.reference.load_seconds.values())


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def plan_targets(bundles: list[Path], config: BenchConfig, with_torch: bool) -> list[Target]:
    targets = []
    if with_torch:
        targets.append(Target("torch-fp32", "fp32", "reference"))
        fp16 = Target("torch-fp16", "fp16", "runtime")
        if config.torch_device == "cpu":
            fp16.skipped = "needs a CUDA GPU (fp16 on CPU is not a deployment target)"
        targets.append(fp16)
    provider_sets = config.provider_sets or (tuple(config.providers),)
    for b in bundles:
        manifest = open_bundle(b, verify_hashes=False).manifest
        # every bundle's ONNX graphs run on ONNX Runtime; its engines (if any) on their TensorRT flavour
        graphs = "onnx" if manifest["precision"] == "fp32" else f"onnx-{manifest['precision']}"
        rules = {c.get("quantization_rules") for c in manifest.get("components", {}).values()} - {None}
        if rules == {"tensorrt"}:  # INT8 graphs shaped for TensorRT, run on ONNX Runtime (issue 13's before)
            graphs += "-trt-rules"
        for providers in provider_sets:
            on_gpu = providers[0] != "cpu"
            name = f"{graphs}@{'+'.join(providers)}"
            if any(t.name == name for t in targets):  # two bundles of the same kind: tell them apart
                name = f"{name}:{b.name}"
            variants = [("", {})]
            if on_gpu and config.gpu_variants:
                variants += [("[no-graphs]", {"cuda_graphs": False}), ("[host-loop]", {"device_loop": False})]
            if not on_gpu and str(b) in config.baseline_session:
                # ONNX Runtime's default CPU session settings, graphs in chain order: issue 13's before
                variants.insert(0, ("[ort-defaults]", {"cpu_profile": "ort-defaults"}))
            skipped = _backend_unavailable("onnxruntime", providers) if on_gpu else None
            for suffix, options in variants:
                t = Target(name + suffix, manifest["precision"], "runtime",
                           meta={"bundle": str(b), "backend": "onnxruntime", "providers": list(providers),
                                 "options": options})
                t.skipped = skipped
                targets.append(t)
        flavours = {e["flavour"] for e in (manifest.get("engines") or {}).values()}
        for flavour in sorted(flavours):
            variants = [("", {})]
            if config.gpu_variants:
                variants += [("[no-graphs]", {"cuda_graphs": False}), ("[low-memory]", {"low_memory": True})]
            skipped = _backend_unavailable(flavour)
            for suffix, options in variants:
                t = Target(manifest["target"] + suffix, manifest["precision"], "runtime",
                           meta={"bundle": str(b), "backend": flavour, "options": options})
                t.skipped = skipped
                targets.append(t)
    return _select(targets, config.targets)


def _select(targets: list[Target], names: tuple[str, ...]) -> list[Target]:
    if not names:
        return targets
    planned = {t.name for t in targets}
    unknown = [n for n in names if n not in planned]
    if unknown:
        raise TargetSelectionError(f"--targets {', '.join(unknown)}: not a target of these bundles "
                                   f"(this run has: {', '.join(sorted(planned))})")
    # a target's variants (--gpu-variants: "trt-fp16[no-graphs]", ...) follow their base name
    return [t for t in targets if t.name.split("[")[0] in names or t.name in names or t.name == "torch-fp32"]


def _backend_unavailable(name: str, providers=("cpu",)) -> str | None:
    from eclipse_export.runtime.backends.base import BackendError
    from eclipse_export.runtime.backends.factory import make_backend

    try:
        make_backend(name, providers)
    except BackendError as e:
        return str(e)
    return None


# --- measuring ----------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def stage_flops(bundle_dir: Path, req: Request, cfg_batch: int) -> dict[str, int]:
    from eclipse_export.bench.flops import graph_flops

    bundle = open_bundle(bundle_dir, verify_hashes=False)
    if bundle.family.name != "kandinsky22":
        # the call shapes below are Kandinsky 2.2's chain
        raise NotImplementedError(f"FLOPs are counted for Kandinsky 2.2 bundles only, not {bundle.family.title}")
    d = bundle.dims
    b = req.batch
    text_b = 2 * b if req.negative_prompt is not None else b
    h, w = req.height // d["S"], req.width // d["S"]
    shapes = {
        "text_encoder": {"input_ids": (text_b, d["T"])},
        "prior": {"noise": (text_b, d["D"]), "text_embeds": (text_b, d["D"]),
                  "text_hidden_states": (text_b, d["T"], d["E"]), "attention_mask": (text_b, d["T"])},
        "unet": {"sample": (cfg_batch, d["C"], h, w), "timestep": (1,), "image_embeds": (cfg_batch, d["D"])},
        "movq": {"latents": (b, d["C"], h, w)},
    }
    flops = {name: graph_flops(bundle.graph_path(name), s) for name, s in shapes.items()}
    flops["unet"] *= req.steps  # per generation
    return flops


def timing_keys(timings: dict, stages: tuple[str, ...], per_step: str) -> list[str]:
    """What a run's timings report: the family's stages, the loop's per-step mean, and each
    stage's parts ("image_encoder.subject0", ...), in that order."""
    parts = sorted((k for k in timings if k.split(".")[0] in stages and "." in k),
                   key=lambda k: (stages.index(k.split(".")[0]), len(k), k))
    return [*stages, "total", per_step, *parts]


def measure(target: Target, req: Request, noises, config: BenchConfig, log,
            stages: tuple[str, ...] = ("text_encoder", "prior", "unet", "movq"), per_step: str = "unet_per_step") -> dict:
    per_stage: dict[str, list[float]] | None = None
    cpu: list[float] = []
    first = None
    for i in range(config.warmup + config.runs):
        cpu0 = time.process_time()
        timings, outputs, images = target.runner.run(req, noises)
        if i >= config.warmup:
            cpu.append(time.process_time() - cpu0)
        if i == 0:
            first = (outputs, images)  # parity uses the first (cold) run: same numbers every run
        if i >= config.warmup:
            if per_stage is None:
                per_stage = {k: [] for k in timing_keys(timings, stages, per_step)}
            for k in per_stage:
                per_stage[k].append(timings[k] if k != "total" else sum(timings[s] for s in stages))
        log(f"    run {i + 1}/{config.warmup + config.runs}{' (warm-up)' if i < config.warmup else ''}: "
            f"{sum(timings[s] for s in stages):.3f} s")
    result = {k: _stats(v) for k, v in per_stage.items()}
    # CPU seconds of the whole process per generation (all threads): on a shared machine wall
    # time includes waiting for the cores, this does not (spinning threads inflate it)
    result["cpu_seconds"] = _stats(cpu)
    result["images_per_second"] = req.batch / result["total"]["p50"]
    return {"latency": result, "first": first}


def _parity(target_first, reference_first, precision: str, family: str) -> tuple[ParityReport, bool]:
    """(report, enforced): precisions without written tolerances are reported, not enforced."""
    from eclipse_export.verify.compare import parity_report

    enforced = precision in MIN_IMAGE_PSNR_DB
    outputs, images = target_first
    report = parity_report(outputs, images, reference_first[0], precision if enforced else "fp32", family=family)
    return report, enforced


def run_bench(bundles: list[Path], out_dir: Path, config: BenchConfig, with_torch: bool = True, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    family = open_bundle(bundles[0], verify_hashes=False).family
    if family.takes_subjects and not config.subjects:
        from dataclasses import replace

        config = replace(config, subjects=default_subjects(out_dir))
    targets = plan_targets(bundles, config, with_torch)
    results = {"version": RESULTS_VERSION, "complete": False, "config": config.__dict__ | {"batches": list(config.batches)},
               "family": family.name, "stages": list(family.timed_stages), "per_step": family.per_step_timing,
               "environment": environment(), "targets": {}, "flops": {}, "failures": []}
    for warning in results["environment"].get("warnings", []):
        log(f"warning: {warning}")
    with TegraStats(out_dir) as tegrastats:
        _run_targets(bundles, out_dir, config, targets, results, log)
    results["tegrastats"] = tegrastats.summary()
    results["complete"] = True
    if hasattr(os, "getloadavg"):
        results["environment"]["loadavg_at_end"] = list(os.getloadavg())
    write_json(out_dir / "results.json", results)
    return results


def _run_targets(bundles, out_dir: Path, config: BenchConfig, targets, results: dict, log) -> None:
    from eclipse_export.runtime.chains import driver_for

    first_bundle = bundles[0]
    bundle = open_bundle(first_bundle, verify_hashes=False)
    family = bundle.family
    # the family's driver draws the noises (shapes and streams are the family's)
    driver = driver_for(family.name)(bundle)
    stages = {"stages": family.timed_stages, "per_step": family.per_step_timing}
    results["quality"] = {}
    quality_reference = None
    for batch in config.batches:
        req = make_request(config, [config.prompt] * batch, config.seed)
        noises = driver.noises_for(req)
        cfg_batch = 2 * batch if config.guidance > 1 else batch
        try:
            flops = stage_flops(first_bundle, req, cfg_batch)
            results["flops"][str(batch)] = flops
        except ImportError:
            # counting FLOPs reads the graphs with the onnx package, which a device's edge
            # runtime may lack: the timings do not need it
            if batch == config.batches[0]:
                log("FLOPs not counted: the onnx package is not installed (pip install 'eclipse-export[edge-build]')")
            flops = None
        except NotImplementedError as e:
            if batch == config.batches[0]:
                log(f"FLOPs not counted: {e}")
            flops = None
        reference_first = None
        for target in targets:
            key = f"{target.name}/b{batch}"
            entry = {"target": target.name, "batch": batch, "precision": target.precision}
            if target.skipped:
                entry["skipped"] = target.skipped
                results["targets"][key] = entry
                continue
            log(f"[{key}] loading")
            reset_peak_rss()
            t0 = time.perf_counter()
            try:
                if target.runner is None:
                    if target.name.startswith("torch-"):
                        target.runner = TorchRunner(first_bundle, target.precision, config.torch_device,
                                                    config.reference_low_memory)
                    else:
                        target.runner = RuntimeRunner(Path(target.meta["bundle"]),
                                                      target.meta.get("providers", config.providers), config.threads,
                                                      target.meta.get("backend", "onnxruntime"),
                                                      target.meta.get("options"))
                measured = measure(target, req, noises, config, log, **stages)
            except BackendError as e:
                # a provider or engine this machine cannot run (found only when loading, e.g. ONNX
                # Runtime's TensorRT provider without TensorRT's libraries): recorded, not fatal
                log(f"[{key}] skipped: {e}")
                entry["skipped"] = str(e)
                results["targets"][key] = entry
                write_json(out_dir / "results.json", results)
                target.runner = None
                gc.collect()
                continue
            if hasattr(target.runner, "backend"):
                entry["backend"] = target.runner.backend.describe()
            entry["load_seconds"] = target.runner.load_seconds
            entry["wall_seconds"] = time.perf_counter() - t0
            entry["latency"] = measured["latency"]
            entry["peak_host_bytes"] = peak_rss_bytes()
            if flops:
                entry["tflops_achieved"] = {s: flops[s] / entry["latency"][s]["p50"] / 1e12 for s in flops}
            if target.name == "torch-fp32":
                reference_first = measured["first"]
            elif reference_first is not None:
                report, enforced = _parity(measured["first"], reference_first, target.precision, family.name)
                entry["parity"] = report.to_json()
                entry["parity"]["image_ssim"] = ssim(measured["first"][1], reference_first[1])
                if not enforced:
                    entry["parity"]["note"] = f"no tolerance written for {target.precision} yet: reported, not enforced"
                elif not report.ok:
                    results["failures"].append(f"{key}: " + "; ".join(
                        f"{m.stage} {', '.join(m.failures)}" for m in report.stages if m.failures) +
                        (f"; {report.image_failure}" if report.image_failure else ""))
            if config.quality_prompts and batch == config.batches[0]:
                log(f"[{key}] quality over {len(config.quality_prompts)} prompts")
                outs = quality_outputs(target.runner, config, driver, make_request)
                if target.name == "torch-fp32":
                    quality_reference = outs
                elif quality_reference is not None:
                    results["quality"][target.name] = quality_summary(outs, quality_reference, target.precision,
                                                                      family.name)
                    if not results["quality"][target.name]["ok"]:
                        results["failures"].append(f"{target.name}: quality over the prompt set: "
                                                   + "; ".join(results["quality"][target.name]["failures"]))
            results["targets"][key] = entry
            write_json(out_dir / "results.json", results)
            # one target's models in memory at a time: full-size stacks are ~8 GB each (a run
            # holding torch-fp32, onnx and onnx-fp16 together was killed on a 24 GB machine)
            target.runner = None
            gc.collect()
            _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the freed heap back to the OS (glibc keeps it otherwise), so that the next target's
    peak host memory does not start from the previous target's leftovers."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass
