"""Cost of reading a graph's external-data references (issue 23), Python and C++ readers.

    PYTHONPATH=$PWD .venv/bin/python tools/onnx_refs_cost.py --bundle engines/tiny-onnx [--large DIR]

Times runtime/onnx_refs.py and `build/cpp/eclipse_tests --onnx-refs` (each in a fresh process,
peak RSS from getrusage) on the bundle's graphs and, with --large, on two synthetic graphs
written into DIR: one with 20,000 external-data initializers (more than the full-size UNet's
~700 weights) and one of 1 GiB of inline weights, which the readers must skip without reading.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# peak RSS reset after the imports (util.memory: /proc/self/clear_refs), so the figure is the read's
PY_PROBE = """
import json, sys, time
from eclipse_export.runtime.onnx_refs import external_data_refs
from eclipse_export.util.memory import rss_bytes, peak_rss_bytes, reset_peak_rss
reset_peak_rss(); base = rss_bytes()
t = time.perf_counter(); refs = external_data_refs(sys.argv[1]); dt = time.perf_counter() - t
print(json.dumps({"refs": len(refs), "seconds": dt, "rss_growth_kib": (peak_rss_bytes() - base) // 1024}))
"""
# the C++ reader's process, measured by a fresh parent (RUSAGE_CHILDREN is a maximum over all children)
CC_PROBE = """
import json, resource, subprocess, sys, time
t = time.perf_counter(); out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "out": out}))
"""


def python_cost(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PY_PROBE, str(path)], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout)


def cpp_cost(path: Path, exe: Path) -> dict:
    """Wall time and peak RSS of the C++ reader's process, beside those of a run that reads nothing."""
    def run(args):
        done = subprocess.run([sys.executable, "-c", CC_PROBE, str(exe), "--onnx-refs", *args], capture_output=True,
                              text=True, check=True)
        return json.loads(done.stdout)

    empty, full = run([]), run([str(path)])
    row = json.loads(full["out"].splitlines()[0])
    return {"refs": len(row.get("refs", [])), "seconds": max(0.0, full["seconds"] - empty["seconds"]),
            "peak_rss_kib": full["peak_rss_kib"], "empty_rss_kib": empty["peak_rss_kib"]}


def synthetic(out: Path) -> list[Path]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from eclipse_export.export.onnx_io import save_external

    out.mkdir(parents=True, exist_ok=True)
    many = out / "many_refs.onnx"
    if not many.exists():
        n = 20_000
        inits = [numpy_helper.from_array(np.full(256, i, np.float32), f"w{i}") for i in range(n)]  # 1 KiB: external
        nodes = [helper.make_node("Add", [f"x{i}", f"w{i}"], [f"x{i + 1}"]) for i in range(n)]
        graph = helper.make_graph(nodes, "many", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [256])],
                                  [helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT, [256])], inits)
        save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), many)
    inline = out / "inline_1gib.onnx"
    if not inline.exists():
        inits = [numpy_helper.from_array(np.zeros(16 << 20, np.float32), f"w{i}") for i in range(16)]  # 16 x 64 MiB
        graph = helper.make_graph([helper.make_node("Identity", ["w0"], ["y"])], "inline", [],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16 << 20])], inits)
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(inline))
        del inits, graph
    return [many, inline]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--large", type=Path, help="write the synthetic large graphs here and measure them too")
    ap.add_argument("--exe", type=Path, default=ROOT / "build" / "cpp" / "eclipse_tests")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from eclipse_export.runtime.bundle import open_bundle

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    paths = [args.bundle / c["graph"] for c in manifest["components"].values()]
    if args.large:
        paths += synthetic(args.large)
    print(f"{'graph':<22} {'MiB':>7} {'refs':>6} {'python ms':>10} {'py peak RSS+ MiB':>17} {'c++ ms':>7} "
          f"{'c++ peak RSS MiB (empty run)':>29}")
    for p in paths:
        py, cc = python_cost(p), cpp_cost(p, args.exe)
        assert py["refs"] == cc["refs"], p
        print(f"{p.name:<22} {p.stat().st_size / 2**20:>7.1f} {py['refs']:>6} {py['seconds'] * 1e3:>10.1f} "
              f"{py['rss_growth_kib'] / 1024:>17.1f} {cc['seconds'] * 1e3:>7.1f} "
              f"{cc['peak_rss_kib'] / 1024:>20.1f} ({cc['empty_rss_kib'] / 1024:.1f})")
    # the whole open, with and without the hashes, as users pay it (the graph check included)
    for verify in (True, False):
        t = time.perf_counter()
        bundle = open_bundle(args.bundle, verify_hashes=verify)
        total = time.perf_counter() - t
        t = time.perf_counter()
        for name in manifest["components"]:
            bundle._checked_graphs.discard(name)
            bundle.check_graph(name)
        print(f"open_bundle(verify_hashes={verify}): {total * 1e3:.1f} ms, of which the graph check "
              f"{(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
