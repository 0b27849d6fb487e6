"""Window 2's PyTorch side (run ON the GPU machine): the full-size UNet step in diffusers FP16,
eager and torch.compile, on the same GPU, next to eclipse-bench's ONNX Runtime CUDA figures.

    python bench/gpu/torch_unet.py --preset full-random --height 512 --width 512 --out DIR
        [--ort-results DIR/results.json] [--bundle FP16_BUNDLE] [--variant-timeout 240]

Per variant: the UNet step at the CFG batch (2 x batch), median of --runs timed with CUDA events
after --warmup calls, peak device memory (torch.cuda.max_memory_allocated, reset per variant).
The GPU's FP16 peak is MEASURED here (a large FP16 matmul, the best of a few runs), not taken
from a data sheet; % of peak = UNet FLOPs (counted on the exported graph by bench/flops.py when
--bundle is given) / step time / that peak. torch.compile runs in a child process with its own
time limit: a compile that does not finish is reported as such, never waited for.
Writes DIR/torch_unet.json and DIR/torch_unet.md (with our UNet step from --ort-results and the
ratio to diffusers FP16 eager: the issue's goal is >= 1.2x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _inputs(preset: str, height: int, width: int, batch: int):
    import torch

    from eclipse_export.export.sources import make_source

    source = make_source(preset)
    dims = source.dims()
    rows = 2 * batch  # classifier-free guidance: [negative, positive]
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, dims["C"], height // dims["S"], width // dims["S"], generator=g)
    embeds = torch.randn(rows, dims["D"], generator=g)
    return source, sample, embeds


def _time(fn, warmup: int, runs: int, device: str = "cuda") -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    if device != "cuda":  # the CPU rehearsal of this script: wall time
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def measure(preset: str, height: int, width: int, batch: int, compiled: bool, warmup: int, runs: int,
            device: str = "cuda") -> dict:
    import torch

    from eclipse_export.export.graphs import UNetGraph

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32  # the CPU rehearsal runs FP32
    source, sample, embeds = _inputs(preset, height, width, batch)
    unet = UNetGraph(source.load("unet")).eval().to(device, dtype)
    sample, embeds = sample.to(device, dtype), embeds.to(device, dtype)
    t = torch.tensor([999.0], device=device)
    model = unet
    t0 = time.perf_counter()
    if compiled:
        model = torch.compile(unet)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(sample, t, embeds)  # the compile happens here
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        times = _time(lambda: model(sample, t, embeds), warmup, runs, device)
    times.sort()
    name = "torch.compile" if compiled else "diffusers eager"
    return {"variant": f"{name} {'fp16' if cuda else 'fp32 (cpu)'}", "step_p50_s": times[len(times) // 2],
            "step_min_s": times[0], "first_call_s": round(first, 2), "runs": runs,
            "peak_device_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None, "torch": torch.__version__}


def fp16_peak_tflops() -> float:
    """The GPU's FP16 tensor-core rate as measured: a large matmul, best of several."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    best = min(_time(lambda: a @ b, 3, 10))
    return 2 * n**3 / best / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="full-random")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ort-results", type=Path, help="eclipse-bench's results.json of the same size (our UNet step)")
    p.add_argument("--bundle", type=Path, help="the exported bundle, for its UNet graph's FLOPs")
    p.add_argument("--variant-timeout", type=float, default=240.0,
                   help="time limit of each variant's child process (model build, compile, runs)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only rehearses this script (FP32, wall time)")
    p.add_argument("--child", choices=["eager", "compile"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one variant in this process, JSON on stdout
        print(json.dumps(measure(args.preset, args.height, args.width, args.batch, args.child == "compile",
                                 args.warmup, args.runs, args.device)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"preset": args.preset, "size": f"{args.height}x{args.width}", "batch": args.batch, "cfg": True, "variants": []}
    for child, limit in (("eager", args.variant_timeout), ("compile", args.variant_timeout)):
        cmd = [sys.executable, __file__, "--child", child, "--preset", args.preset, "--height", str(args.height),
               "--width", str(args.width), "--batch", str(args.batch), "--warmup", str(args.warmup),
               "--runs", str(args.runs), "--out", str(args.out), "--device", args.device]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            if done.returncode == 0:
                out["variants"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                out["variants"].append({"variant": child, "error": done.stderr.strip()[-1500:]})
        except subprocess.TimeoutExpired:
            out["variants"].append({"variant": child, "error": f"did not finish within {limit:.0f} s (compile included)"})
    import torch

    on_gpu = args.device == "cuda"
    out["gpu"] = torch.cuda.get_device_name(0) if on_gpu else "cpu (rehearsal)"
    out["fp16_peak_tflops_measured"] = round(fp16_peak_tflops(), 1) if on_gpu else None
    if args.bundle and (args.bundle / "manifest.json").is_file():
        from eclipse_export.bench.flops import graph_flops
        from eclipse_export.runtime.bundle import open_bundle

        _, sample, embeds = _inputs(args.preset, args.height, args.width, args.batch)
        out["unet_flops"] = graph_flops(open_bundle(args.bundle).graph_path("unet"), {"sample": tuple(sample.shape), "timestep": (1,),
                                                    "image_embeds": tuple(embeds.shape)})
    ours = None
    if args.ort_results and args.ort_results.is_file():
        targets = json.loads(args.ort_results.read_text())["targets"]
        for name, entry in targets.items():
            if "skipped" not in entry and "cuda" in name and entry.get("latency", {}).get("unet_per_step"):
                cand = {"variant": f"eclipse {name}", "step_p50_s": entry["latency"]["unet_per_step"]["p50"],
                        "peak_device_bytes": entry.get("peak_device_bytes")}
                if ours is None or cand["step_p50_s"] < ours["step_p50_s"]:
                    ours = cand
        if ours:
            out["variants"].insert(0, ours)
    eager = next((v for v in out["variants"] if v.get("variant", "").startswith("diffusers eager") and "step_p50_s" in v),
                 None)
    lines = [f"# UNet step on {out['gpu']}: {out['size']}, batch {args.batch} with CFG", "",
             f"FP16 peak measured (8192^3 matmul): {out['fp16_peak_tflops_measured']} TFLOPS", "",
             "| variant | step p50 (ms) | vs diffusers eager | % of measured FP16 peak | peak device memory (GiB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for v in out["variants"]:
        if "step_p50_s" not in v:
            lines.append(f"| {v['variant']} | {v.get('error', '?')[:200]} | | | |")
            continue
        ratio = f"{eager['step_p50_s'] / v['step_p50_s']:.2f}x" if eager else "n/a"
        peak = (f"{100 * out['unet_flops'] / v['step_p50_s'] / (out['fp16_peak_tflops_measured'] * 1e12):.1f}"
                if out.get("unet_flops") and out["fp16_peak_tflops_measured"] else "n/a")
        mem = f"{v['peak_device_bytes'] / 2**30:.2f}" if v.get("peak_device_bytes") else "n/a"
        lines.append(f"| {v['variant']} | {v['step_p50_s'] * 1e3:.2f} | {ratio} | {peak} | {mem} |")
    (args.out / "torch_unet.json").write_text(json.dumps(out, indent=1))
    (args.out / "torch_unet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
