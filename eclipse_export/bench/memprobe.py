"""Peak host memory of one target, loading and generating, each measured in its own process.

In one process the high-water mark of one target mixes with what the previous one left in the
allocator, so `eclipse-bench memory` starts a fresh Python per target (this module's `child`)
and only collects the figures: resident memory after the imports, the peak while loading the
graphs, the peak over a whole generation, and the size of the graph files loaded. The goal of
issue 13 is stated against that size: peak <= 1.3x the graphs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from eclipse_export.util.memory import peak_rss_bytes, reset_peak_rss, rss_bytes


def graph_bytes(bundle_dir: Path) -> int:
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(bundle_dir, verify_hashes=False)
    return sum(bundle.component_bytes(name) for name in bundle.manifest["components"])


def child(bundle_dir: Path, target: str, height: int, width: int, steps: int, guidance: float,
          threads: int | None, session: str | None) -> dict:  # noqa: PLR0913
    """Runs in the fresh process: load `target` and generate once; report the memory figures."""
    import numpy as np

    from eclipse_export.runtime.bundle import open_bundle
    from eclipse_export.runtime.noise import Noises
    from eclipse_export.runtime.pipeline import Request
    from eclipse_export.runtime.schedulers import scheduler_from_config

    bundle = open_bundle(bundle_dir, verify_hashes=False)
    req, _ = Request.make("a red cube on a blue sphere", None, height, width, steps, guidance, 0)
    d = bundle.dims
    noises = Noises.draw(0, 1, d["D"], (1, d["C"], height // d["S"], width // d["S"]), steps,
                         scheduler_from_config(bundle.json("scheduler_config.json")).needs_noise)
    if target == "torch-fp32":
        import torch  # noqa: F401 - imported before the baseline is taken, like onnxruntime below

        from eclipse_export.bench.runner import TorchRunner
    else:
        import onnxruntime  # noqa: F401

        from eclipse_export.bench.runner import RuntimeRunner
    out = {"target": target, "bundle": str(bundle_dir), "rss_after_imports": rss_bytes()}
    reset_peak_rss()
    t0 = time.perf_counter()
    if target == "torch-fp32":
        runner = TorchRunner(bundle_dir, "fp32", "cpu")
    else:
        runner = RuntimeRunner(bundle_dir, ("cpu",), threads, options={"cpu_profile": session} if session else None)
    out["load_seconds"] = time.perf_counter() - t0
    out["peak_load"] = peak_rss_bytes()
    out["rss_after_load"] = rss_bytes()
    t0 = time.perf_counter()
    _, _, images = runner.run(req, noises)
    out["generate_seconds"] = time.perf_counter() - t0
    out["peak_total"] = peak_rss_bytes()
    out["rss_after_generate"] = rss_bytes()
    out["image_mean"] = float(np.asarray(images).mean())  # the run really produced an image
    return out


def measure(bundle_dir: Path, target: str, height: int = 256, width: int = 256, steps: int = 4,
            guidance: float = 4.0, threads: int | None = None, session: str | None = None) -> dict:
    """One target in a fresh process; adds the graph size and the peak/graph ratio."""
    cmd = [sys.executable, "-m", "eclipse_export.bench.memprobe", str(bundle_dir), target, str(height), str(width),
           str(steps), str(guidance), str(threads or 0), session or ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {target} failed: {proc.stderr.strip()[-500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["graph_bytes"] = graph_bytes(bundle_dir)
    result["session"] = session
    if target != "torch-fp32":
        result["peak_over_graphs"] = result["peak_total"] / result["graph_bytes"]
    return result


def markdown(results: Sequence[dict]) -> str:
    gib = 2 ** 30
    lines = ["| target | graphs loaded | after imports | peak loading | peak loading + generating | peak / graphs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ratio = f"{r['peak_over_graphs']:.2f}x" if "peak_over_graphs" in r else "n/a"
        graphs = f"{r['graph_bytes'] / gib:.2f} GiB" if r["target"] != "torch-fp32" else "(torch modules)"
        lines.append(f"| {r['label']} | {graphs} | {r['rss_after_imports'] / gib:.2f} GiB | "
                     f"{r['peak_load'] / gib:.2f} GiB | {r['peak_total'] / gib:.2f} GiB | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    bundle, target, h, w, steps, guidance, threads, session = sys.argv[1:9]
    print(json.dumps(child(Path(bundle), target, int(h), int(w), int(steps), float(guidance), int(threads) or None,
                           session or None)))
