"""eclipse-doctor: what this machine can build and run, and whether a bundle's engines fit it.

Every line is a check with what was found and, when something is missing, the command that
installs it. Torch-free and import-light (export packages are looked up, not imported), so it
runs on an edge device with only the runtime installed. The GPU checks are the TensorRT
backend's own start-up checks (runtime.gpu_probe).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from eclipse_export.runtime.backends.gpu_probe import (
    Check,
    CudaProbe,
    cuda_probe,
    flavour_checks,
)
from eclipse_export.runtime.backends.onnxruntime import ORT_PROVIDERS
from eclipse_export.runtime.backends.trt_flavours import (
    FLAVOURS,
    RTX_COMPUTE_CAPABILITIES,
    check_engine_compatible,
    install_hint,
)

EXPORT_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxconverter-common")
EXPORT_FIX = 'pip install -e ".[export]" && pip install --no-deps open_clip_torch  (from a checkout of eclipse-export)'


@dataclass
class Section:
    title: str
    checks: list[Check] = field(default_factory=list)


@dataclass
class Report:
    sections: list[Section]
    bundle_runs: bool | None = None  # None: no bundle asked about

    def to_json(self) -> dict:
        return asdict(self)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _flavour_version(flavour: str) -> str | None:
    try:
        return importlib.import_module(FLAVOURS[flavour]).__version__
    except ImportError:
        return None


def machine_section(probe: CudaProbe) -> Section:
    s = Section("machine")
    jetson = Path("/etc/nv_tegra_release").is_file()
    s.checks.append(Check("host", True, f"{platform.system()} {platform.machine()}{' (Jetson)' if jetson else ''}, "
                                        f"Python {platform.python_version()}"))
    if probe.driver_cuda:
        s.checks.append(Check("driver", True, f"NVIDIA driver for CUDA {probe.driver_cuda[0]}.{probe.driver_cuda[1]}"))
    else:
        s.checks.append(Check("driver", False, "no NVIDIA driver", "install the NVIDIA driver (JetPack on Jetson)"))
    s.checks += probe.checks
    for g in probe.gpus:
        s.checks.append(Check(f"gpu{g.index}", True, f"GPU {g.index}: {g.name}, compute capability "
                                                     f"{g.compute_capability}, {g.total_bytes / 2**30:.1f} GiB"))
    return s


def packages_section(probe: CudaProbe) -> Section:
    s = Section("packages")
    for flavour in FLAVOURS:
        s.checks += flavour_checks(flavour, probe)[:1]
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        s.checks.append(Check("onnxruntime", True, f"onnxruntime {ort.__version__}: {', '.join(providers)}"))
    except ImportError:
        providers = []
        s.checks.append(Check("onnxruntime", False, "onnxruntime is not installed", "pip install onnxruntime"))
    missing = [d for d in EXPORT_PACKAGES if _version(d) is None]
    found = ", ".join(f"{d} {_version(d)}" for d in EXPORT_PACKAGES if d not in missing)
    s.checks.append(Check("export", not missing, f"export packages: {found or 'none'}"
                                                  + (f"; missing {', '.join(missing)}" if missing else ""),
                          EXPORT_FIX if missing else ""))
    return s


def targets_section(probe: CudaProbe) -> tuple[Section, Section]:
    """(what this machine can build, what it can run)."""
    export_ok = all(_version(d) for d in EXPORT_PACKAGES)
    has_gpu = bool(probe.gpus)
    rtx, trt = _flavour_version("tensorrt-rtx"), _flavour_version("tensorrt")
    build = Section("build targets (eclipse-export --target)")
    build.checks.append(Check("onnx", export_ok, "onnx, onnx-fp16, onnx-int8" + ("" if export_ok else
                              ": need the export packages"), "" if export_ok else EXPORT_FIX))
    if rtx:
        build.checks.append(Check("trt-rtx-fp16", True, f"trt-rtx-fp16 (tensorrt-rtx {rtx}; builds ahead of time, "
                                  f"also without a GPU, for {' '.join(RTX_COMPUTE_CAPABILITIES)})"
                                  + ("" if export_ok else "; from an onnx-fp16 bundle only (--from-bundle)")))
    else:
        build.checks.append(Check("trt-rtx-fp16", False, "trt-rtx-fp16: tensorrt-rtx is not installed",
                                  install_hint("tensorrt-rtx", probe.driver_major)))
    if not trt:
        build.checks.append(Check("trt-fp16", False, "trt-fp16, trt-int8: TensorRT is not installed",
                                  install_hint("tensorrt")))
    elif not has_gpu:
        build.checks.append(Check("trt-fp16", False, f"trt-fp16, trt-int8: tensorrt {trt}, but no GPU (TensorRT "
                                  "builds on the GPU that runs the engines)", "build on the target device"))
    else:
        build.checks.append(Check("trt-fp16", True, f"trt-fp16, trt-int8 (tensorrt {trt})"))

    run = Section("backends (eclipse-generate --backend)")
    try:
        import onnxruntime as ort

        providers = set(ort.get_available_providers())
        run.checks.append(Check("onnxruntime-cpu", True, "onnxruntime, provider cpu"))
        rtx_ep = _module_present("onnxruntime_ep_nv_tensorrt_rtx")
        # (--provider name, present here, what is missing, the install command)
        gpu_providers = (
            ("cuda", ORT_PROVIDERS["cuda"] in providers, "onnxruntime-gpu is not installed",
             "pip install onnxruntime-gpu (replaces onnxruntime)"),
            ("tensorrt", ORT_PROVIDERS["tensorrt"] in providers, "onnxruntime-gpu is not installed",
             "pip install onnxruntime-gpu (replaces onnxruntime), and TensorRT 10's libraries"),
            ("tensorrt-rtx", rtx_ep, "its plugin provider is not installed",
             "pip install onnxruntime-ep-nv-tensorrt-rtx (next to onnxruntime >= 1.24)"),
        )
        for name, present, absent, install in gpu_providers:
            missing = [what for what, bad in ((absent, not present), ("no usable CUDA GPU", not has_gpu)) if bad]
            fix = "; ".join(f for f, bad in ((install, not present), ("an NVIDIA GPU and driver are needed", not has_gpu))
                            if bad)
            run.checks.append(Check(f"onnxruntime-{name}", not missing, f"onnxruntime, provider {name}"
                                    + (f": {'; '.join(missing)}" if missing else ""), fix))
    except ImportError:
        run.checks.append(Check("onnxruntime", False, "onnxruntime is not installed", "pip install onnxruntime"))
    for flavour in FLAVOURS:
        failed = [c for c in list(probe.checks) + flavour_checks(flavour, probe) if not c.ok]
        run.checks.append(Check(flavour, not failed, flavour + ("" if not failed else ": " + "; ".join(
            c.found for c in failed)), "; ".join(dict.fromkeys(c.fix for c in failed if c.fix))))
    return build, run


def bundle_section(path: Path, probe: CudaProbe) -> tuple[Section, bool]:
    from eclipse_export.runtime.backends.factory import backend_for_bundle
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(path, verify_hashes=False)  # BundleError: the CLI prints it as an error line
    manifest = bundle.manifest
    s = Section(f"bundle {path} (target {manifest.get('target')}, {manifest.get('precision')})")
    backend = backend_for_bundle(manifest)
    engines = manifest.get("engines") or {}
    if not engines:
        ok = _module_present("onnxruntime")
        s.checks.append(Check("graphs", ok, "ONNX graphs: run on onnxruntime" + ("" if ok else " (not installed)"),
                              "" if ok else "pip install onnxruntime"))
        return s, ok
    gpu_cc = probe.gpus[0].compute_capability if probe.gpus else None
    all_ok = True
    for name in sorted(engines):
        entry = engines[name]
        problems = check_engine_compatible(entry, _flavour_version(entry["flavour"]), gpu_cc)
        if gpu_cc is None:
            problems.append("no GPU here to run it")
        built = ", ".join(entry.get("compute_capabilities", []))
        ok = not problems
        all_ok &= ok
        fix = ""
        if not ok:
            target = "trt-rtx-fp16" if entry["flavour"] == "tensorrt-rtx" else "trt-fp16"
            cc = f" --compute-capability {gpu_cc}" if gpu_cc and entry["flavour"] == "tensorrt-rtx" else ""
            fix = (f"rebuild on this machine: eclipse-export --from-bundle {path} --target {target}{cc} --out DIR"
                   if gpu_cc else "run it on a machine with the GPU it was built for")
        s.checks.append(Check(name, ok, f"{name}: {entry['flavour']} {entry.get('version')} engine for {built}"
                              + ("" if ok else f": {'; '.join(problems)}"), fix))
    failed = [c for c in list(probe.checks) + flavour_checks(backend, probe) if not c.ok] if backend in FLAVOURS else []
    if failed:
        all_ok = False
        s.checks.append(Check("backend", False, f"the {backend} backend: " + "; ".join(c.found for c in failed),
                              "; ".join(dict.fromkeys(c.fix for c in failed if c.fix))))
    if not all_ok and _module_present("onnxruntime"):  # engine bundles carry their ONNX graphs too
        s.checks.append(Check("graphs", True, "its ONNX graphs run here: eclipse-generate --backend onnxruntime"))
    return s, all_ok


def diagnose(bundle: Path | None = None, probe: CudaProbe | None = None) -> Report:
    probe = probe or cuda_probe()
    sections = [machine_section(probe), packages_section(probe), *targets_section(probe)]
    runs = None
    if bundle is not None:
        section, runs = bundle_section(bundle, probe)
        sections.append(section)
    return Report(sections, runs)


def render(report: Report) -> str:
    lines = []
    for section in report.sections:
        lines.append(section.title)
        for c in section.checks:
            lines.append(f"  [{'ok' if c.ok else '--'}] {c.found}")
            if c.fix:
                lines.append(f"         fix: {c.fix}")
    if report.bundle_runs is not None:
        lines.append("the bundle " + ("can run here" if report.bundle_runs else "cannot run here (see fix lines)"))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    from eclipse_export.cli.common import ArgumentParser

    p = ArgumentParser(prog="eclipse-doctor", description=(
        "What this machine can build and run (GPU, driver, CUDA, TensorRT, TensorRT-RTX, ONNX Runtime, NVRTC), "
        "and whether a bundle's engines fit it; each missing piece with the command that installs it."))
    p.add_argument("--bundle", type=Path, help="also check this bundle against this machine")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    report = diagnose(args.bundle)
    print(json.dumps(report.to_json(), indent=2) if args.json else render(report))
    return 1 if report.bundle_runs is False else 0


def entry() -> None:
    from eclipse_export.cli.common import _run

    sys.exit(_run(main, None))



if __name__ == "__main__":  # python -m eclipse_export.cli.doctor
    entry()
