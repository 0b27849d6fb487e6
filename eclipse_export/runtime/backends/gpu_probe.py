"""What the TensorRT backends need on this machine, checked before any engine is loaded.

`cuda_probe()` looks at the CUDA side (driver, GPUs, cuda-bindings, NVRTC), `readiness(flavour)`
adds the TensorRT flavour and whether it can target the GPU; each result is a `Check` with what
was found and the command that fixes it. The TensorRT backend raises one BackendError from the
failed checks; eclipse-doctor prints them all. Nothing here allocates device memory, and nothing
raises: a missing piece is a failed check.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.trt_flavours import (
    FLAVOURS,
    RTX_COMPUTE_CAPABILITIES,
    install_hint,
)

# The Python side of the GPU loop per CUDA major: cuda-bindings of that major (13.x needs a CUDA 13
# driver, R580+) and the NVRTC it loads (cuda.bindings 12 loads libnvrtc.so.12, 13 loads .so.13).
# The same lists are the extras trt-cu12 / trt-cu13 in pyproject.toml (a test holds them equal).
# JetPack 6 is CUDA 12.6: trt-cu12 (PyPI's cuda-bindings 12.x starts at 12.8, fine on 12.x drivers).
CUDA_PACKAGES = {
    12: ("cuda-bindings>=12.8,<13", "nvidia-cuda-nvrtc-cu12>=12.6,<13"),
    13: ("cuda-bindings>=13,<14", "nvidia-cuda-nvrtc>=13,<14"),
}


def install_command(cuda_major: int | None) -> str:
    """pip command for the GPU loop's Python packages of this driver's CUDA major."""
    if cuda_major not in CUDA_PACKAGES:
        return ("pip install 'eclipse-export[trt-cu12]' (CUDA 12 driver, JetPack 6) or "
                "'eclipse-export[trt-cu13]' (CUDA 13 driver)")
    pkgs = " ".join(f"'{p}'" for p in CUDA_PACKAGES[cuda_major])
    return f"pip install {pkgs}  (the trt-cu{cuda_major} extra)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    found: str  # what this machine has, or what is wrong
    fix: str = ""  # the command (or step) that fixes it; "" when ok

    def line(self) -> str:
        return f"{self.found}: {self.fix}" if self.fix else self.found


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "SM87"
    total_bytes: int


@dataclass(frozen=True)
class CudaProbe:
    driver_cuda: tuple[int, int] | None  # CUDA version the driver supports; None: no driver
    bindings_version: str | None
    nvrtc_version: tuple[int, int] | None
    nvrtc_archs: tuple[int, ...]
    gpus: tuple[Gpu, ...]
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def driver_major(self) -> int | None:
        return self.driver_cuda[0] if self.driver_cuda else None


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _err_name(err) -> str:
    return getattr(err, "name", str(err))


def cuda_probe(modules=None) -> CudaProbe:
    """modules: (runtime, nvrtc, version) of cuda.bindings, or None to import them."""
    checks = []
    if modules is None:
        try:
            import cuda.bindings
            from cuda.bindings import nvrtc, runtime
        except ImportError:
            return CudaProbe(None, None, None, (), (), (
                Check("cuda-bindings", False, "cuda-python (cuda.bindings) is not installed", install_command(None)),))
        version = getattr(cuda.bindings, "__version__", None)
    else:
        runtime, nvrtc, version = modules

    # the driver's CUDA version needs no GPU and no driver call that could fail loudly
    err, v = runtime.cudaDriverGetVersion()
    driver = (int(v) // 1000, int(v) % 1000 // 10) if int(err) == 0 and v else None
    bmajor = _major(version)
    if driver and bmajor and bmajor > driver[0]:
        checks.append(Check("cuda-bindings", False,
                            f"cuda-bindings {version} needs a CUDA {bmajor} driver, this driver is CUDA "
                            f"{driver[0]}.{driver[1]}", install_command(driver[0])))
    else:
        checks.append(Check("cuda-bindings", True, f"cuda-bindings {version}"))

    nvrtc_version, archs = None, ()
    try:  # cuda.bindings loads libnvrtc on the first call: a missing library raises here
        err, major, minor = nvrtc.nvrtcVersion()
        if int(err) == 0:
            nvrtc_version = (int(major), int(minor))
            err, found = nvrtc.nvrtcGetSupportedArchs()
            archs = tuple(int(a) for a in found) if int(err) == 0 else ()
    except Exception as e:  # DynamicLibNotFoundError, RuntimeError: whatever the bindings raise
        checks.append(Check("nvrtc", False, f"NVRTC (libnvrtc.so.{bmajor}) cannot be loaded ({type(e).__name__})",
                            install_command(bmajor or (driver[0] if driver else None))))
    else:
        if nvrtc_version is None:
            checks.append(Check("nvrtc", False, f"NVRTC does not answer ({_err_name(err)})",
                                install_command(bmajor)))
        else:
            checks.append(Check("nvrtc", True, f"NVRTC {nvrtc_version[0]}.{nvrtc_version[1]} "
                                               f"(sm_{min(archs, default=0)}..sm_{max(archs, default=0)})"))

    gpus = []
    err, count = runtime.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        why = "no NVIDIA driver" if driver is None else (_err_name(err) if int(err) != 0 else "no device")
        checks.append(Check("gpu", False, f"no usable CUDA GPU ({why})",
                            "an NVIDIA GPU and driver are needed (use --backend onnxruntime on CPU)"))
    else:
        for i in range(count):
            err, props = runtime.cudaGetDeviceProperties(i)
            if int(err) != 0:
                continue
            name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
            gpus.append(Gpu(i, name, f"SM{props.major}{props.minor}", int(props.totalGlobalMem)))
        checks.append(Check("gpu", bool(gpus), ", ".join(f"{g.name} ({g.compute_capability})" for g in gpus)
                            or "GPU properties unreadable", "" if gpus else "check the driver (nvidia-smi)"))
        sm = int(gpus[0].compute_capability[2:]) if gpus else None
        if sm and archs and not [a for a in archs if a <= sm]:
            checks.append(Check("nvrtc-target", False, f"NVRTC {nvrtc_version} cannot compile for SM{sm}",
                                install_command(bmajor)))
    return CudaProbe(driver, version, nvrtc_version, archs, tuple(gpus), tuple(checks))


def flavour_checks(flavour: str, probe: CudaProbe, device: int = 0) -> list[Check]:
    """The flavour imports, and it can target this machine's GPU."""
    try:
        trt = importlib.import_module(FLAVOURS[flavour])
    except ImportError:
        return [Check(flavour, False, f"{FLAVOURS[flavour]} is not installed", install_hint(flavour, probe.driver_major))]
    checks = [Check(flavour, True, f"{flavour} {trt.__version__}")]
    gpu = next((g for g in probe.gpus if g.index == device), None)
    if gpu is not None and flavour == "tensorrt-rtx" and gpu.compute_capability not in RTX_COMPUTE_CAPABILITIES:
        checks.append(Check("target", False,
                            f"tensorrt-rtx {trt.__version__} cannot target {gpu.name} ({gpu.compute_capability}; "
                            f"it targets {', '.join(RTX_COMPUTE_CAPABILITIES)})",
                            "use the tensorrt flavour (trt-fp16 engines) on this GPU"))
    return checks


def readiness(flavour: str, device: int = 0, probe: CudaProbe | None = None) -> list[Check]:
    """Every check the GPU loop of `flavour` depends on, in the order a user fixes them."""
    probe = probe or cuda_probe()
    return list(probe.checks) + flavour_checks(flavour, probe, device)


def require(flavour: str, device: int = 0) -> CudaProbe:
    """Raise one BackendError naming every missing piece (and its install command) of `flavour`'s
    GPU loop; returns the probe when everything is there."""
    if flavour not in FLAVOURS:
        raise BackendError(f"unknown TensorRT flavour {flavour!r} (choose from {', '.join(FLAVOURS)})")
    probe = cuda_probe()
    failed = [c for c in readiness(flavour, device, probe) if not c.ok]
    if failed:
        raise BackendError(f"the {flavour} backend cannot run here: " + "; ".join(c.line() for c in failed))
    return probe
