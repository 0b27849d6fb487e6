"""What the runtime and the engine builder share about the TensorRT family, torch-free: which
module each flavour is, how to install it, which GPUs TensorRT-RTX targets, and whether an engine
in a bundle can run with the TensorRT and GPU of this machine. The builder (eclipse_export/export/engines.py)
imports this; the runtime never imports the builder."""

from __future__ import annotations

import importlib

from eclipse_export.runtime.backends.base import BackendError

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
# Compute capabilities TensorRT-RTX 1.7 can target ahead of time (its ComputeCapability enum;
# no SM90: H100/H200 are not RTX targets).
RTX_COMPUTE_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")


def install_hint(flavour: str, cuda_major: int | None = None) -> str:
    if flavour == "tensorrt-rtx":
        # tensorrt-rtx is the CUDA 13 build; CUDA 12 drivers need its cu12 twin
        return "pip install tensorrt-rtx-cu12" if cuda_major == 12 else "pip install tensorrt-rtx"
    return "install TensorRT 10.3+ (JetPack 6 ships it; x86-64: pip install tensorrt from NVIDIA's index)"


def import_flavour(flavour: str):
    """The flavour's Python module; BackendError naming the install command when it is missing."""
    if flavour not in FLAVOURS:
        raise BackendError(f"unknown TensorRT flavour {flavour!r} (choose from {', '.join(FLAVOURS)})")
    try:
        return importlib.import_module(FLAVOURS[flavour])
    except ImportError:
        raise BackendError(f"{FLAVOURS[flavour]} is not installed: {install_hint(flavour)}") from None


def check_engine_compatible(entry: dict, installed_version: str | None, gpu_cc: str | None) -> list[str]:
    """Refusal reasons for running `entry` with the installed TensorRT on this GPU."""
    problems = []
    flavour = entry["flavour"]
    if installed_version is None:
        problems.append(f"{FLAVOURS[flavour]} is not installed")
    elif installed_version != entry["version"]:
        problems.append(f"built with {flavour} {entry['version']}, this machine has {installed_version}")
    built_for = [c for c in entry["compute_capabilities"] if c != "unknown"]
    if gpu_cc and built_for and gpu_cc not in built_for:
        problems.append(f"built for {', '.join(built_for)}, this GPU is {gpu_cc}")
    return problems
