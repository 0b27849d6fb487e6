"""This CPU's limits, measured: clock, FP32 FMA and INT8 dot-product peaks, what ONNX Runtime's
own kernels reach on large GEMMs and convolutions, and memory bandwidth.

The peak is cores x clock x SIMD lanes x 2 (FMA) x FMA pipes. Spec sheets and /proc/cpuinfo
give neither the clock a VM really runs at nor the number of full-width 512-bit pipes (Zen 4
double-pumps 256-bit units, Zen 5 desktop/server parts have two full 512-bit FMA pipes, Zen 5
mobile parts do not), so both are measured: `cpu_peak.c` times dependent integer adds (1 cycle
each: the clock) and independent FMA / VNNI chains (the pipes) on thread CPU time, which other
processes on a shared machine cannot inflate. The ONNX Runtime figures say what the kernels this
project runs on actually reach, which is the practical ceiling of a graph's achieved FLOP/s.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("cpu_peak.c")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def physical_cores() -> int:
    """Cores ONNX Runtime uses by default (it sizes its pool by physical cores)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        pairs = {(blk.get("physical id"), blk.get("core id")) for blk in _cpuinfo_blocks(text)}
        if pairs and None not in {p[1] for p in pairs}:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def _cpuinfo_blocks(text: str) -> list[dict]:
    blocks = []
    for chunk in text.strip().split("\n\n"):
        blocks.append({k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in chunk.splitlines())})
    return blocks


def microbench(threads: int, repeats: int = 3) -> dict | None:
    """Clock and FMA/VNNI peaks from cpu_peak.c; None where it cannot run (no C compiler,
    not x86-64 with AVX-512 VNNI)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64") or not {"avx512f", "avx512_vnni"} <= cpu_flags():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "cpu_peak"
        subprocess.run([cc, "-O2", "-pthread", str(SOURCE), "-o", str(exe)], check=True, capture_output=True)
        out = subprocess.run([str(exe), str(threads), str(repeats)], check=True, capture_output=True, text=True).stdout
    values = {k: float(v) for k, v in (line.split() for line in out.splitlines())}
    ghz = values["clock_ghz"]
    per_cycle = values["fp32_fma512_gflops"] / threads / ghz
    return {
        "threads": threads, **values,
        # FLOP per cycle per core: 64 = two full-width 512-bit FMA pipes (16 lanes x 2 x 2)
        "fp32_flop_per_cycle_per_core": round(per_cycle, 1),
        "int8_op_per_cycle_per_core": round(values["int8_vnni512_gops"] / threads / ghz, 1),
        "avx512_full_width": values["fp32_fma512_gflops"] > 1.5 * values["fp32_fma256_gflops"],
    }


def theoretical_peaks(cores: int, ghz: float, fp32_flop_per_cycle: float, int8_op_per_cycle: float) -> dict:
    return {"fp32_gflops": cores * ghz * fp32_flop_per_cycle, "int8_gops": cores * ghz * int8_op_per_cycle}


def _session(model, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _best_seconds(session, feed: dict, runs: int) -> float:
    session.run(None, feed)  # warm-up: prepacking, arena growth
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return best


def ort_gemm(m: int, k: int, n: int, dtype: str = "fp32", threads: int | None = None, runs: int = 5) -> dict:
    """Achieved rate of ONNX Runtime's GEMM with a constant (prepacked) B: fp32 MatMul, or int8
    MatMulInteger (uint8 activations x int8 weights: the x86 VNNI path). 2*m*k*n ops."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if dtype == "fp32":
        b = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type, y_type, a = TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((m, k), dtype=np.float32)
    elif dtype == "int8":
        b = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "b")
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type, a = TensorProto.UINT8, TensorProto.INT32, rng.integers(0, 256, (m, k), dtype=np.uint8)
    else:
        raise ValueError(dtype)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, (m, k))],
                              [helper.make_tensor_value_info("y", y_type, (m, n))], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    seconds = _best_seconds(_session(model, threads), {"a": a}, runs)
    return {"op": "MatMul" if dtype == "fp32" else "MatMulInteger", "m": m, "k": k, "n": n,
            "seconds": seconds, "gops": 2 * m * k * n / seconds / 1e9}


def ort_conv(batch: int, cin: int, cout: int, size: int, kernel: int = 3, dtype: str = "fp32",
             threads: int | None = None, runs: int = 5) -> dict:
    """Achieved rate of ONNX Runtime's Conv (fp32, NCHWc after its layout transform) or QLinearConv
    (uint8 activations, symmetric int8 weights: MLAS' symmetric VNNI path) at one shape."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    pads = [kernel // 2] * 4
    x_shape, y_shape = (batch, cin, size, size), (batch, cout, size, size)
    if dtype == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((cout, cin, kernel, kernel), dtype=np.float32) * 0.05, "w")
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=pads)]
        inits, x_type, x = [w], TensorProto.FLOAT, rng.standard_normal(x_shape, dtype=np.float32)
        y_type = TensorProto.FLOAT
    elif dtype == "int8":
        inits = [numpy_helper.from_array(rng.integers(-127, 128, (cout, cin, kernel, kernel), dtype=np.int8), "w"),
                 numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
                 numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                 numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "ys"),
                 numpy_helper.from_array(np.array(128, np.uint8), "yz")]
        nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=pads)]
        x_type, y_type, x = TensorProto.UINT8, TensorProto.UINT8, rng.integers(0, 256, x_shape, dtype=np.uint8)
    else:
        raise ValueError(dtype)
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", x_type, x_shape)],
                              [helper.make_tensor_value_info("y", y_type, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    seconds = _best_seconds(_session(model, threads), {"x": x}, runs)
    ops = 2 * batch * cout * size * size * cin * kernel * kernel
    return {"op": "Conv" if dtype == "fp32" else "QLinearConv", "shape": f"{batch}x{cin}x{size}x{size} -> {cout}, "
            f"{kernel}x{kernel}", "seconds": seconds, "gops": ops / seconds / 1e9}


def memory_bandwidth(mib: int = 512, runs: int = 3) -> dict:
    """Host memory bandwidth: a numpy copy of `mib` MiB (read + write), best of `runs`."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return {"copy_gib_per_s": 2 * a.nbytes / best / 2**30}


# Shapes that occur in the full-size UNet at 256x256 (latents 32x32, CFG batch 2) and the MoVQ
UNET_LIKE_GEMM = (2048, 1536, 1536)
UNET_LIKE_CONVS = ((2, 384, 384, 32), (2, 768, 768, 16), (2, 1536, 1536, 8))


def measure(threads: int | None = None, quick: bool = False) -> dict:
    """Everything above, for the report: theoretical peaks from the measured clock and pipes,
    and what ONNX Runtime's kernels reach."""
    threads = threads or physical_cores()
    out: dict = {"threads": threads, "cpu_flags_avx512": sorted(f for f in cpu_flags() if f.startswith("avx512"))}
    micro = microbench(threads, repeats=1 if quick else 3)
    out["microbench"] = micro
    if micro:
        out["peak"] = theoretical_peaks(threads, micro["clock_ghz"], micro["fp32_flop_per_cycle_per_core"],
                                        micro["int8_op_per_cycle_per_core"])
    runs = 2 if quick else 5
    gemm = (256, 256, 256) if quick else UNET_LIKE_GEMM
    convs = ((1, 32, 32, 16),) if quick else UNET_LIKE_CONVS
    out["ort_gemm"] = [ort_gemm(*gemm, dtype=d, threads=threads, runs=runs) for d in ("fp32", "int8")]
    out["ort_conv"] = [ort_conv(*c, dtype=d, threads=threads, runs=runs) for c in convs for d in ("fp32", "int8")]
    out["memory"] = memory_bandwidth(64 if quick else 512)
    return out
