"""The machine a benchmark ran on: CPU, GPU, versions, clocks, Jetson power state (tegrastats)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


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
