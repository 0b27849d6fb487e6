"""eclipse-bench: latency and parity of every target this machine can run, in one run.

All targets get the same prompts and the same noises. The FP32 PyTorch reference runs in the
same process; every other target is compared with it, and a target that breaks its written
tolerance makes the run fail (exit 1), so the benchmark doubles as a device acceptance test.
results.json is rewritten after every target, so an interrupted run leaves a valid file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .memory import peak_rss_bytes, reset_peak_rss
from .parity import ParityReport
from .runtime.backends import BackendError
from .runtime.bundle import open_bundle
from .runtime.images import to_uint8
from .runtime.noise import Noises
from .runtime.pipeline import Request
from .runtime.schedulers import scheduler_from_config
from .specs import MIN_IMAGE_PSNR_DB
from .ssim import ssim

STAGES = ("text_encoder", "prior", "unet", "movq")
RESULTS_VERSION = 1


@dataclass
class BenchConfig:
    prompt: str = "a red cube on a blue sphere"
    height: int = 256
    width: int = 256
    steps: int = 4
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
        from .runtime.backends import make_backend
        from .runtime.pipeline import Pipeline

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
    def __init__(self, bundle_dir: Path, precision: str, device: str):
        import torch

        from .compare import reference_for

        self.reference = reference_for(open_bundle(bundle_dir, verify_hashes=False), device, keep_loaded=True)
        self.reference.dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]

    def run(self, req: Request, noises: Noises):
        outputs, timings = self.reference.run(req, noises)
        return timings, outputs, to_uint8(outputs["movq.image"])

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
    return targets


def _backend_unavailable(name: str, providers=("cpu",)) -> str | None:
    from .runtime.backends import BackendError, make_backend

    try:
        make_backend(name, providers)
    except BackendError as e:
        return str(e)
    return None


# --- environment --------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cmd(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    from importlib import metadata

    env = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
           "cpu_count": os.cpu_count()}
    if hasattr(os, "getloadavg"):  # other work on the machine while it ran (a shared CI machine)
        env["loadavg_at_start"] = list(os.getloadavg())
    cpuinfo = _read("/proc/cpuinfo") or ""
    env["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), None)
    versions = {}
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-ep-nv-tensorrt-rtx-cu13", "torch", "numpy", "tensorrt",
                 "tensorrt_rtx", "cuda-bindings", "diffusers", "eclipse-export"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    env["versions"] = versions
    smi = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total",
                "--format=csv,noheader"])
    env["gpu"] = smi
    if smi:
        env["note"] = "GPU clocks are not locked by this tool: figures vary with boost and temperature"
    tegra = _read("/etc/nv_tegra_release")
    if tegra:  # Jetson: L4T release and power mode
        env["jetson"] = {"l4t": tegra.splitlines()[0], "power_mode": _cmd(["nvpmodel", "-q"])}
    locked = clocks_locked()
    if locked is False:
        env.setdefault("warnings", []).append(
            "jetson_clocks is off (GPU min clock below max): run `sudo jetson_clocks` for stable figures")
    return env


def clocks_locked() -> bool | None:
    """Jetson: whether jetson_clocks pinned the GPU clock (min == max); None where unknown."""
    shown = _cmd(["jetson_clocks", "--show"])
    if not shown:
        return None
    import re

    m = re.search(r"GPU MinFreq=(\d+) MaxFreq=(\d+)", shown)
    return None if not m else m.group(1) == m.group(2)


class TegraStats:
    """Samples tegrastats (Jetson) into <out>/tegrastats.log while the run lasts; no-op elsewhere."""

    def __init__(self, out_dir: Path, interval_ms: int = 500):
        self.path, self.interval_ms, self.proc, self._file = out_dir / "tegrastats.log", interval_ms, None, None

    def __enter__(self) -> "TegraStats":
        import shutil

        exe = shutil.which("tegrastats")
        if exe:
            self._file = open(self.path, "w")
            self.proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=self._file,
                                         stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._file.close()

    def summary(self) -> dict | None:
        """Peak GPU load, RAM and board power over the samples (None: no tegrastats)."""
        if self.proc is None:
            return None
        import re

        text = self.path.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]

        def peak(pattern: str) -> int | None:
            values = [int(v) for line in lines for v in re.findall(pattern, line)]
            return max(values) if values else None

        return {"samples": len(lines), "gpu_load_peak_percent": peak(r"GR3D_FREQ (\d+)%"),
                "ram_peak_mb": peak(r"RAM (\d+)/\d+MB"), "board_power_peak_mw": peak(r"VDD_IN (\d+)mW"),
                "log": self.path.name}


# --- measuring ----------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def stage_flops(bundle_dir: Path, req: Request, cfg_batch: int) -> dict[str, int]:
    from .flops import graph_flops

    bundle = open_bundle(bundle_dir, verify_hashes=False)
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


def measure(target: Target, req: Request, noises: Noises, config: BenchConfig, log) -> dict:
    per_stage: dict[str, list[float]] = {k: [] for k in (*STAGES, "total", "unet_per_step")}
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
            for k in per_stage:
                per_stage[k].append(timings[k] if k != "total" else sum(timings[s] for s in STAGES))
        log(f"    run {i + 1}/{config.warmup + config.runs}{' (warm-up)' if i < config.warmup else ''}: "
            f"{sum(timings[s] for s in STAGES):.3f} s")
    result = {k: _stats(v) for k, v in per_stage.items()}
    # CPU seconds of the whole process per generation (all threads): on a shared machine wall
    # time includes waiting for the cores, this does not (spinning threads inflate it)
    result["cpu_seconds"] = _stats(cpu)
    result["images_per_second"] = req.batch / result["total"]["p50"]
    return {"latency": result, "first": first}


def _parity(target_first, reference_first, precision: str) -> tuple[ParityReport, bool]:
    """(report, enforced): precisions without written tolerances are reported, not enforced."""
    from .compare import parity_report

    enforced = precision in MIN_IMAGE_PSNR_DB
    outputs, images = target_first
    report = parity_report(outputs, images, reference_first[0], precision if enforced else "fp32")
    return report, enforced


def run_bench(bundles: list[Path], out_dir: Path, config: BenchConfig, with_torch: bool = True, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = plan_targets(bundles, config, with_torch)
    results = {"version": RESULTS_VERSION, "complete": False, "config": config.__dict__ | {"batches": list(config.batches)},
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
    first_bundle = bundles[0]
    results["quality"] = {}
    quality_reference = None
    for batch in config.batches:
        req, _ = Request.make([config.prompt] * batch, None, config.height, config.width, config.steps,
                              config.guidance, config.seed, None)
        dims = open_bundle(first_bundle, verify_hashes=False).dims
        sched_needs_noise = scheduler_from_config(
            open_bundle(first_bundle, verify_hashes=False).json("scheduler_config.json")).needs_noise
        noises = Noises.draw(config.seed, batch, dims["D"], (batch, dims["C"], config.height // dims["S"],
                             config.width // dims["S"]), config.steps, sched_needs_noise)
        cfg_batch = 2 * batch if config.guidance > 1 else batch
        flops = stage_flops(first_bundle, req, cfg_batch)
        results["flops"][str(batch)] = flops
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
                        target.runner = TorchRunner(first_bundle, target.precision, config.torch_device)
                    else:
                        target.runner = RuntimeRunner(Path(target.meta["bundle"]),
                                                      target.meta.get("providers", config.providers), config.threads,
                                                      target.meta.get("backend", "onnxruntime"),
                                                      target.meta.get("options"))
                measured = measure(target, req, noises, config, log)
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
            entry["tflops_achieved"] = {s: flops[s] / entry["latency"][s]["p50"] / 1e12 for s in STAGES}
            if target.name == "torch-fp32":
                reference_first = measured["first"]
            elif reference_first is not None:
                report, enforced = _parity(measured["first"], reference_first, target.precision)
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
                outs = _quality_outputs(target.runner, config, dims, sched_needs_noise)
                if target.name == "torch-fp32":
                    quality_reference = outs
                elif quality_reference is not None:
                    results["quality"][target.name] = quality_summary(outs, quality_reference, target.precision)
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


def _baseline_bundles(chosen: list[str] | None, bundles: list[Path]) -> tuple[str, ...]:
    from .cli import UserError

    if not chosen:
        return ()
    if "*" in chosen:
        return tuple(str(b) for b in bundles)
    unknown = [c for c in chosen if c not in {str(b) for b in bundles}]
    if unknown:
        raise UserError(f"--baseline-session {unknown[0]} is not one of the --bundle arguments")
    return tuple(chosen)


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


def _quality_outputs(runner, config: BenchConfig, dims: dict, needs_noise: bool) -> list:
    out = []
    for i, prompt in enumerate(config.quality_prompts):
        req, _ = Request.make(prompt, None, config.height, config.width, config.steps, config.guidance,
                              config.seed + i, None)
        noises = Noises.draw(config.seed + i, 1, dims["D"], (1, dims["C"], config.height // dims["S"],
                             config.width // dims["S"]), config.steps, needs_noise)
        _, outputs, images = runner.run(req, noises)
        out.append((outputs, images))
    return out


def quality_summary(outs: list, reference: list, precision: str) -> dict:
    """Per stage: worst and mean cosine, worst max abs; image PSNR (min, mean) and SSIM (mean)."""
    from .compare import parity_report

    enforced = precision in MIN_IMAGE_PSNR_DB
    stages: dict[str, dict] = {}
    psnrs, ssims, failures = [], [], []
    for i, ((outputs, images), ref) in enumerate(zip(outs, reference)):
        report = parity_report(outputs, images, ref[0], precision if enforced else "fp32")
        for m in report.stages:
            st = stages.setdefault(m.stage, {"cosine_min": 1.0, "cosine_sum": 0.0, "max_abs": 0.0, "n": 0})
            st["cosine_min"] = min(st["cosine_min"], m.cosine)
            st["cosine_sum"] += m.cosine
            st["max_abs"] = max(st["max_abs"], m.max_abs)
            st["n"] += 1
        psnrs.append(report.image_psnr_db)
        ssims.append(ssim(images, ref[1]))
        if enforced and not report.ok:
            failures.append(f"prompt {i}: " + "; ".join([f"{m.stage} {', '.join(m.failures)}" for m in report.stages
                                                         if m.failures] + ([report.image_failure] if report.image_failure else [])))
    for st in stages.values():
        st["cosine_mean"] = st.pop("cosine_sum") / st["n"]
    finite = [p for p in psnrs if p != "inf" and math.isfinite(p)]
    return {"prompts": len(outs), "enforced": enforced, "stages": stages,
            "image_psnr_db": {"min": min(finite) if finite else "inf", "mean": float(np.mean(finite)) if finite else "inf"},
            "image_ssim_mean": float(np.mean(ssims)), "failures": failures, "ok": not failures}


def quality_markdown(results: dict) -> list[str]:
    if not results.get("quality"):
        return []
    n = next(iter(results["quality"].values()))["prompts"]
    out = ["", f"Quality against torch-fp32 over {n} prompts (worst / mean stage cosine, worst max abs; image PSNR "
           "min / mean, mean SSIM):", ""]
    for target, q in results["quality"].items():
        stages = "; ".join(f"{k} {v['cosine_min']:.5f} / {v['cosine_mean']:.5f}, {v['max_abs']:.3g}" for k, v in q["stages"].items())
        psnr = q["image_psnr_db"]
        out.append(f"- {target}: {stages}; image PSNR {psnr['min']:.1f} / {psnr['mean']:.1f} dB, SSIM {q['image_ssim_mean']:.4f}"
                   f"{'' if q['ok'] else ' (FAILS its tolerance)'}")
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


# --- reports ------------------------------------------------------------------------------


def table(results: dict) -> str:
    w = max([28] + [len(k) + 2 for k in results["targets"]])
    head = f"{'target/batch':<{w}}" + "".join(f"{s + ' p50 ms':>18}" for s in STAGES) + \
        f"{'step p50 ms':>13}{'total p50 s':>13}{'img/s':>8}{'load s':>8}{'peak GiB':>10}{'cos min':>10}{'PSNR dB':>9}"
    rows = [head, "-" * len(head)]
    for key, e in results["targets"].items():
        if "skipped" in e:
            rows.append(f"{key:<{w}}skipped: {e['skipped']}")
            continue
        lat = e["latency"]
        parity = e.get("parity")
        cos = f"{min(s['cosine'] for s in parity['stages']):.6f}" if parity else "ref"
        psnr = parity["image_psnr_db"] if parity else None
        psnr_s = "ref" if parity is None else ("inf" if psnr == "inf" else f"{psnr:.1f}")
        rows.append(f"{key:<{w}}" + "".join(f"{lat[s]['p50'] * 1e3:>18.1f}" for s in STAGES) +
                    f"{lat['unet_per_step']['p50'] * 1e3:>13.1f}{lat['total']['p50']:>13.3f}"
                    f"{lat['images_per_second']:>8.2f}{e['load_seconds']:>8.2f}"
                    f"{(e['peak_host_bytes'] or 0) / 2**30:>10.2f}{cos:>10}{psnr_s:>9}")
    return "\n".join(rows)


def ratios(results: dict, base: str = "torch-fp32") -> list[str]:
    lines = []
    for key, e in results["targets"].items():
        target, batch = key.split("/")
        ref = results["targets"].get(f"{base}/{batch}")
        if target == base or "latency" not in e or not ref or "latency" not in ref:
            continue
        parts = [f"{s} {ref['latency'][s]['p50'] / e['latency'][s]['p50']:.2f}x" for s in (*STAGES, "total")]
        lines.append(f"{key}: speed-up vs {base}: " + ", ".join(parts))
    return lines


def markdown(results: dict) -> str:
    env = results["environment"]
    out = ["# eclipse-bench results", "",
           f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} logical cores), {env.get('platform')}",
           f"- GPU: {env.get('gpu') or 'none'}",
           f"- versions: {', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())}",
           f"- request: {json.dumps({k: results['config'][k] for k in ('height', 'width', 'steps', 'guidance', 'runs', 'warmup')})}",
           f"- complete: {results['complete']}",
           f"- load average (1/5/15 min) at start {env.get('loadavg_at_start')}, at end {env.get('loadavg_at_end')}"
           " (above the core count: other work shared the cores, so compare ratios within the run)", "",
           "```", table(results), "```", ""]
    out += ["Speed-up of each target over torch-fp32 (p50, same inputs, same run):", ""]
    out += [f"- {line}" for line in ratios(results)] or ["- (no torch-fp32 baseline in this run)"]
    out += ["", "FLOPs per generation (MatMul/Gemm/Conv only) and achieved TFLOP/s at p50:", ""]
    for key, e in results["targets"].items():
        if "tflops_achieved" in e:
            out.append(f"- {key}: " + ", ".join(f"{s} {v:.3f}" for s, v in e["tflops_achieved"].items()))
    out += quality_markdown(results)
    if results["failures"]:
        out += ["", "## Parity failures", ""] + [f"- {f}" for f in results["failures"]]
    return "\n".join(out) + "\n"


def chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [k for k, e in results["targets"].items() if "latency" in e]
    fig, ax = plt.subplots(figsize=(9, 1 + 0.5 * len(keys)))
    left = np.zeros(len(keys))
    for stage in STAGES:
        values = np.array([results["targets"][k]["latency"][stage]["p50"] for k in keys])
        ax.barh(keys, values, left=left, label=stage)
        left += values
    ax.set_xlabel("p50 latency per generation (s)")
    ax.set_title("eclipse-bench: latency per stage")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare_results(a: dict, b: dict) -> str:
    rows = [f"{'target/batch':<28}{'stage':<14}{'A p50 ms':>12}{'B p50 ms':>12}{'B/A':>8}"]
    for key in sorted(set(a["targets"]) & set(b["targets"])):
        ea, eb = a["targets"][key], b["targets"][key]
        if "latency" not in ea or "latency" not in eb:
            continue
        for stage in (*STAGES, "total"):
            pa, pb = ea["latency"][stage]["p50"], eb["latency"][stage]["p50"]
            rows.append(f"{key:<28}{stage:<14}{pa * 1e3:>12.1f}{pb * 1e3:>12.1f}{pb / pa:>8.2f}")
    return "\n".join(rows)


# --- CLI ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    from .cli import ArgumentParser, UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        from .ort_profile import main as profile_main

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
    p = ArgumentParser(prog="eclipse-bench", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True, help="results directory")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 2)")
    p.add_argument("--provider", action="append", help="ONNX Runtime providers (default: cpu)")
    p.add_argument("--provider-set", action="append", metavar="P1,P2",
                   help="one ONNX Runtime target per set, repeatable (e.g. --provider-set cuda "
                        "--provider-set tensorrt,cuda); replaces --provider")
    p.add_argument("--gpu-variants", action="store_true",
                   help="also time GPU targets without CUDA graphs, ONNX Runtime GPU targets with the host loop, "
                        "and TensorRT targets in --low-memory mode")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch targets (no parity then)")
    p.add_argument("--baseline-session", nargs="?", action="append", const="*", metavar="BUNDLE",
                   help="also run the ONNX Runtime target of BUNDLE (default: of every bundle) with ORT's default CPU "
                        "session settings: before and after in one run (repeatable)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak, to report the distance to it")
    p.add_argument("--quality-prompts", type=Path,
                   help="also report parity over these prompts (.jsonl or .txt; e.g. calibration/prompts.jsonl)")
    p.add_argument("--quality-split", default="validation", help="split of a .jsonl prompt file (default validation)")
    p.add_argument("--quality-count", type=int, default=8, help="prompts used from that file (default 8)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be >= 1 and --warmup >= 0")
    opened = [open_bundle(b) for b in args.bundle]  # verify every bundle before spending time
    for b in opened[1:]:
        # one reference, one set of noises: the bundles must be the same model and sampler
        if b.manifest["source"] != opened[0].manifest["source"] or \
                b.json("scheduler_config.json") != opened[0].json("scheduler_config.json"):
            raise UserError(f"{b.root} was exported from another source or scheduler config than {opened[0].root}")
    quality = ()
    if args.quality_prompts is not None:
        from .calibration_prompts import PromptFileError, load_prompts, take_balanced

        if args.quality_count < 1:
            raise UserError("--quality-count must be >= 1")
        try:
            split = args.quality_split if args.quality_prompts.suffix == ".jsonl" else None
            quality = tuple(p.prompt for p in take_balanced(load_prompts(args.quality_prompts, split=split),
                                                             args.quality_count))
        except PromptFileError as e:
            raise UserError(str(e)) from None
    config = BenchConfig(height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
                         warmup=args.warmup, runs=args.runs, batches=tuple(args.batch or (1, 2)),
                         threads=args.threads, providers=tuple(args.provider or ("cpu",)),
                         provider_sets=tuple(tuple(x for x in s.split(",") if x) for s in args.provider_set or ()),
                         gpu_variants=args.gpu_variants,
                         torch_device="cuda" if _cuda_available() else "cpu", peak_tflops=args.peak_tflops,
                         quality_prompts=quality,
                         baseline_session=_baseline_bundles(args.baseline_session, args.bundle))
    Request.make(config.prompt, None, config.height, config.width, config.steps, config.guidance, 0)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        results = run_bench(args.bundle, args.out, config, with_torch=not args.no_torch, log=log)
    except KeyboardInterrupt:
        log(f"interrupted: partial results in {args.out / 'results.json'}")
        return 130
    print(table(results))
    for line in ratios(results) + quality_markdown(results):
        print(line)
    (args.out / "results.md").write_text(markdown(results))
    if chart(results, args.out / "chart.png"):
        log(f"wrote {args.out / 'chart.png'}")
    log(f"wrote {args.out / 'results.json'} and results.md")
    if results["failures"]:
        log("parity failures: " + " | ".join(results["failures"]))
        return 1
    return 0


def memory_main(argv) -> int:
    """eclipse-bench memory: peak host memory per target, each loaded and run in its own process."""
    from .cli import ArgumentParser, UserError
    from .memprobe import markdown as memory_markdown
    from .memprobe import measure as measure_memory

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
    from .cli import _run

    sys.exit(_run(main, None))
