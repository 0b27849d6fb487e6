"""The TensorRT backend's start-up checks (runtime/backends/gpu_probe.py, issue 11 #2/#6): everything the
GPU loop needs is checked before any engine, and one BackendError names what is missing with the
command that installs it. Here (no driver, no GPU) against the real cuda.bindings; the driver and
library situations this machine cannot have are given to the probe as modules."""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.gpu_probe import (
    CUDA_PACKAGES,
    cuda_probe,
    readiness,
    require,
)

ROOT = Path(__file__).resolve().parents[1]


def _runtime(driver_version=0, gpus=()):
    """A cuda.bindings.runtime look-alike for a machine with this driver and these GPUs."""
    def props(i):
        major, minor = gpus[i][1]
        return 0, types.SimpleNamespace(name=gpus[i][0].encode(), major=major, minor=minor, totalGlobalMem=8 << 30)

    return types.SimpleNamespace(
        cudaDriverGetVersion=lambda: (0, driver_version),
        cudaGetDeviceCount=lambda: (0, len(gpus)) if gpus else (100, 0),
        cudaGetDeviceProperties=props)


class MissingNvrtc:
    """What cuda.bindings.nvrtc does when libnvrtc cannot be found: every call raises."""

    def __getattr__(self, name):
        def call(*args):
            from cuda.pathfinder import DynamicLibNotFoundError

            raise DynamicLibNotFoundError('Failure finding "libnvrtc.so.13"')
        return call


def test_on_this_machine_the_backend_refuses_with_one_error_naming_the_gpu():
    pytest.importorskip("cuda.bindings")
    pytest.importorskip("tensorrt_rtx")
    probe = cuda_probe()
    if probe.gpus:
        pytest.skip("this machine has a GPU")
    checks = {c.name: c for c in readiness("tensorrt-rtx", probe=probe)}
    assert checks["cuda-bindings"].ok and checks["nvrtc"].ok and checks["tensorrt-rtx"].ok
    assert not checks["gpu"].ok and "no usable CUDA GPU" in checks["gpu"].found
    with pytest.raises(BackendError, match=r"^the tensorrt-rtx backend cannot run here: no usable CUDA GPU"):
        require("tensorrt-rtx")


def test_missing_nvrtc_is_named_at_start_up_with_its_install_command():
    """Before: engines loaded, then UNet step 0 died with a RuntimeError from the bindings."""
    probe = cuda_probe((_runtime(13000, [("RTX 4090", (8, 9))]), MissingNvrtc(), "13.5.0"))
    failed = [c for c in probe.checks if not c.ok]
    assert [c.name for c in failed] == ["nvrtc"]
    assert "NVRTC (libnvrtc.so.13) cannot be loaded" in failed[0].found
    assert "nvidia-cuda-nvrtc>=13,<14" in failed[0].fix and "trt-cu13" in failed[0].fix


def test_cuda_13_bindings_on_a_cuda_12_driver_point_to_the_cu12_extra():
    """JetPack 6 is CUDA 12.6: cuda-bindings 13.x cannot talk to its driver."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    probe = cuda_probe((_runtime(12060, [("Orin", (8, 7))]), nvrtc, "13.5.0"))
    failed = {c.name: c for c in probe.checks if not c.ok}
    assert probe.driver_cuda == (12, 6) and probe.gpus[0].compute_capability == "SM87"
    assert "needs a CUDA 13 driver, this driver is CUDA 12.6" in failed["cuda-bindings"].found
    assert "cuda-bindings>=12.8,<13" in failed["cuda-bindings"].fix and "trt-cu12" in failed["cuda-bindings"].fix


def test_tensorrt_rtx_on_a_gpu_it_cannot_target_is_refused():
    pytest.importorskip("tensorrt_rtx")
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    probe = cuda_probe((_runtime(13000, [("H100", (9, 0))]), nvrtc, "13.5.0"))
    failed = [c for c in readiness("tensorrt-rtx", probe=probe) if not c.ok]
    assert [c.name for c in failed] == ["target"] and "cannot target H100 (SM90" in failed[0].found


def test_the_extras_install_what_the_probe_asks_for():
    """pyproject's trt-cu12 / trt-cu13 extras are the probe's install commands, word for word."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major, packages in CUDA_PACKAGES.items():
        assert tuple(extras[f"trt-cu{major}"]) == packages
    assert "trt" not in extras  # one CUDA major per install: the plain extra resolved to 13.x on CUDA 12


def test_the_kernel_source_is_package_data(tmp_path):
    """The wheel carries runtime/backends/kernels/guided_step.cu (the runtime reads it at run time)."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("eclipse_export-*.whl"))
    assert "eclipse_export/runtime/backends/kernels/guided_step.cu" in zipfile.ZipFile(wheel).namelist()
