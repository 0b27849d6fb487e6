"""Where ONNX Runtime spends its time on each graph of a bundle, against this CPU's peak.

Runs one graph at a time on the spec's sample inputs at the request's shapes (the UNet at its
CFG batch), with ONNX Runtime's own profiler on, and folds the per-node events of the timed
runs into a table per op type: nodes, milliseconds per call, share of the graph, GFLOP per call
and achieved GFLOP/s. Wall time per call is measured after profiling stops, so the profiler's
own cost is not in it.

FLOPs are counted per executed node from the shapes the profiler records, i.e. on the graph ORT
really ran after its own fusions (NCHWc convolutions, FusedMatMul, QLinearConv...): 2 per
multiply-add of MatMul/Gemm/Conv and their fused and integer forms. A prepacked weight is not
listed among a node's inputs, so K comes from the activation and the output (a convolution whose
kernel is not listed, e.g. QLinearConv, takes it from the graph's node of the same name). The
graph's own count (flops.py, on the exported graph) is reported next to it as a cross-check.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from eclipse_export.families.kandinsky22.components import COMPONENTS

GEMM_OPS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits", "QGemm"}
CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv"}
# ops whose kernels run integer arithmetic (their rate is compared with the INT8 peak)
INTEGER_OPS = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv",
               "ConvInteger", "QGemm", "MatMulNBits"}
# inputs of integer ops that hold the weight (index), when listed
_WEIGHT_INPUT = {"QLinearConv": 3, "ConvInteger": 1}


def _shape(entry) -> list[int]:
    return list(next(iter(entry.values()))) if entry else []


def node_flops(op: str, inputs: Sequence[Mapping], outputs: Sequence[Mapping],
               kernel: Sequence[int] | None = None) -> int | None:
    """FLOPs of one executed node from its profiled shapes (`kernel`: a convolution's weight
    shape when the profile does not list it); None: matrix op of unknown size; 0: not a matrix op."""
    if op in GEMM_OPS:
        if not inputs or not outputs:
            return None
        a, out = _shape(inputs[0]), _shape(outputs[0])
        if len(a) < 2 or len(out) < 2:
            return None
        # a is (..., M, K), or (..., K, M) when the kernel transposes it (FusedMatMul transA)
        k = a[-1] if a[-2] == out[-2] else a[-2]
        return 2 * prod(out) * k
    if op in CONV_OPS:
        i = _WEIGHT_INPUT.get(op, 1)
        listed = _shape(inputs[i]) if len(inputs) > i else []
        w = listed if len(listed) == 4 else list(kernel or [])
        out = _shape(outputs[0]) if outputs else []
        if len(w) != 4 or len(out) != 4:
            return None
        # NCHW: (N, Cout, H, W); NHWC (channels-last integer convs): (N, H, W, Cout): same count
        return 2 * prod(out) * prod(w[1:])
    return 0


@dataclass
class OpRow:
    op: str
    nodes: int = 0  # per call
    seconds: float = 0.0  # per call
    flops: int = 0  # per call
    unknown: int = 0  # matrix nodes whose size the profile did not give

    def to_json(self) -> dict:
        return {"op": self.op, "nodes": self.nodes, "ms": self.seconds * 1e3, "gflop": self.flops / 1e9,
                "unknown_size_nodes": self.unknown}


@dataclass
class GraphProfile:
    component: str
    batch: int
    input_shapes: dict
    wall_seconds: float  # p50 per call, without the profiler
    kernel_seconds: float  # sum of node times per call (profiled runs)
    graph_flops: int  # flops.py on the exported graph
    ops: list[OpRow] = field(default_factory=list)
    graph_file_bytes: int = 0

    @property
    def node_flops(self) -> int:
        return sum(r.flops for r in self.ops)

    def to_json(self) -> dict:
        return {"component": self.component, "batch": self.batch, "input_shapes": self.input_shapes,
                "wall_ms": self.wall_seconds * 1e3, "kernel_ms": self.kernel_seconds * 1e3,
                "graph_gflop": self.graph_flops / 1e9, "node_gflop": self.node_flops / 1e9,
                "gflops_achieved": self.graph_flops / self.wall_seconds / 1e9 if self.wall_seconds else None,
                "graph_file_bytes": self.graph_file_bytes, "ops": [r.to_json() for r in self.ops]}


def conv_kernels(path: Path) -> dict[str, list[int]]:
    """Weight shape of every Conv in a graph file by node name (through a DequantizeLinear too)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvInteger") and len(n.input) > 1:
            w = n.input[1]
            if w not in dims and w in producer and producer[w].op_type == "DequantizeLinear":
                w = producer[w].input[0]
            if w in dims:
                out[n.name] = dims[w]
    return out


def _kernel_for(event_name: str, kernels: Mapping[str, list[int]]) -> list[int] | None:
    """ORT names a node it rewrote after the original (+ "_token_12", "_nchwc", ...): the
    longest original name the event's name starts with."""
    best = None
    for name in kernels:
        if event_name.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return kernels[best] if best else None


def parse_profile(events: list[dict], runs: int, kernels: Mapping[str, list[int]] | None = None
                  ) -> tuple[list[OpRow], float]:
    """Per-op-type rows (per call) and the summed kernel time per call, from the node events of
    the last `runs` model runs in an ORT profile. Each node's time is its median over the runs:
    on a shared machine one time-sliced run must not move the table."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    spans = spans[-runs:]
    per_node: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in spans):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        if e["name"] not in per_node:
            kernel = _kernel_for(e["name"], kernels) if kernels and op in CONV_OPS else None
            per_node[e["name"]] = {"op": op, "durations": [], "flops": node_flops(
                op, args.get("input_type_shape", []), args.get("output_type_shape", []), kernel)}
        node = per_node[e["name"]]
        node["durations"].append(e["dur"] * 1e-6)
    rows: dict[str, OpRow] = {}
    for node in per_node.values():
        row = rows.setdefault(node["op"], OpRow(node["op"]))
        row.nodes += 1
        row.seconds += float(np.median(node["durations"]))
        if node["flops"] is None:
            row.unknown += 1
        else:
            row.flops += node["flops"]
    return sorted(rows.values(), key=lambda r: -r.seconds), sum(r.seconds for r in rows.values())


def component_inputs(component: str, dims: Mapping[str, int], batch: int, height: int, width: int,
                     cfg: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """The spec's sample inputs at a request's shapes (the UNet gets the CFG batch)."""
    spec = COMPONENTS[component]
    b = 2 * batch if (component == "unet" and cfg) else batch
    d = dict(dims, B=b, h=height // dims["S"], w=width // dims["S"])
    inputs = spec.sample_inputs(d, np.random.default_rng(seed))
    if "timestep" in inputs:
        inputs["timestep"] = np.array([500.0], dtype=np.float32)  # no effect on cost; fixed for repeatability
    return inputs


def profile_graph(path: Path, session_options, inputs: dict, runs: int = 3, warmup: int = 1,
                  providers: Sequence[str] = ("CPUExecutionProvider",)) -> tuple[list[OpRow], float, float]:
    """(op rows, kernel seconds per call, wall p50 seconds per call) of one graph."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        session_options.enable_profiling = True
        session_options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), session_options, providers=list(providers))
        for _ in range(warmup + runs):
            session.run(None, inputs)
        profile = Path(session.end_profiling())
        events = json.loads(profile.read_text())
    rows, kernel = parse_profile(events, runs, conv_kernels(path))
    walls = []
    for _ in range(runs):  # profiling has stopped: these are the real per-call times
        t0 = time.perf_counter()
        session.run(None, inputs)
        walls.append(time.perf_counter() - t0)
    del session
    return rows, kernel, float(np.median(walls))


def profile_bundle(bundle_dir: Path, components: Sequence[str], batches: Sequence[int], height: int, width: int,
                   runs: int = 3, warmup: int = 1, threads: int | None = None, log=print,
                   seen: set | None = None) -> list[GraphProfile]:
    """Profiles of `components` of one bundle. Graphs whose files are in `seen` (sha256 of every
    file, filled as it goes) were profiled already in this run and are skipped: an INT8 bundle
    derived from an fp32 one holds byte-identical copies of the graphs it did not quantize."""
    from eclipse_export.bench.flops import graph_flops
    from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from eclipse_export.runtime.bundle import open_bundle

    bundle = open_bundle(bundle_dir, verify_hashes=False)
    backend = OnnxRuntimeBackend(("cpu",), threads)
    out = []
    seen = set() if seen is None else seen
    for name in components:
        files = bundle.component(name)["files"]
        key = tuple(bundle.manifest["files"][f]["sha256"] for f in files)
        if key in seen:
            log(f"  {name}: the same graph was profiled above")
            continue
        seen.add(key)
        for batch in batches:
            inputs = component_inputs(name, bundle.dims, batch, height, width)
            shapes = {k: list(v.shape) for k, v in inputs.items()}
            log(f"  profiling {name} at {shapes}")
            path = bundle.graph_path(name)
            rows, kernel, wall = profile_graph(path, backend.session_options(), inputs, runs, warmup)
            out.append(GraphProfile(name, batch, shapes, wall, kernel, graph_flops(path, shapes), rows,
                                    sum(bundle.path(f).stat().st_size for f in files)))
    return out


# --- report -------------------------------------------------------------------------------


def _pct(value: float | None, peak: float | None) -> str:
    return f"{100 * value / peak:.0f} %" if value is not None and peak else "n/a"


def markdown(bundle_profiles: Mapping[str, list[GraphProfile]], peaks: Mapping | None, top: int = 8) -> str:
    """The stage table (one row per graph and batch) and the top ops of each graph."""
    fp32_peak = (peaks or {}).get("fp32_gflops")
    int8_peak = (peaks or {}).get("int8_gops")
    lines = ["| bundle | graph | batch | ms per call | GFLOP per call | GFLOP/s | of peak | top ops by time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, profiles in bundle_profiles.items():
        for p in profiles:
            rate = p.graph_flops / p.wall_seconds / 1e9
            ops = ", ".join(f"{r.op} {100 * r.seconds / p.kernel_seconds:.0f} %" for r in p.ops[:4])
            # a graph whose matrix work is mostly integer is measured against the INT8 peak
            integer = sum(r.flops for r in p.ops if r.op in INTEGER_OPS) > p.node_flops / 2
            peak = f"{_pct(rate, int8_peak)} (INT8)" if integer else f"{_pct(rate, fp32_peak)} (FP32)"
            lines.append(f"| {label} | {p.component} | {p.batch} | {p.wall_seconds * 1e3:.1f} | {p.graph_flops / 1e9:.1f} "
                         f"| {rate:.1f} | {peak} | {ops} |")
    for label, profiles in bundle_profiles.items():
        for p in profiles:
            lines += ["", f"{label} / {p.component}, batch {p.batch} (inputs {p.input_shapes}): wall "
                      f"{p.wall_seconds * 1e3:.1f} ms, kernels {p.kernel_seconds * 1e3:.1f} ms per call; "
                      f"{p.graph_flops / 1e9:.2f} GFLOP in the graph, {p.node_flops / 1e9:.2f} counted on the nodes run", "",
                      "| op | nodes | ms per call | share | GFLOP | GFLOP/s | of peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in p.ops[:top]:
                rate = r.flops / r.seconds / 1e9 if r.seconds and r.flops else None
                peak = int8_peak if r.op in INTEGER_OPS else fp32_peak
                flops = f"{r.flops / 1e9:.2f}" + (f" (+{r.unknown} unknown)" if r.unknown else "")
                lines.append(f"| {r.op} | {r.nodes} | {r.seconds * 1e3:.2f} | {100 * r.seconds / p.kernel_seconds:.1f} % "
                             f"| {flops} | {f'{rate:.1f}' if rate else '-'} | "
                             f"{_pct(rate, peak) if rate else '-'}{' (int8)' if rate and r.op in INTEGER_OPS else ''} |")
    return "\n".join(lines) + "\n"


def peaks_markdown(measured: Mapping) -> str:
    micro = measured.get("microbench")
    lines = []
    if micro:
        lines.append(f"- {measured['threads']} threads; measured clock {micro['clock_ghz']:.2f} GHz; "
                     f"{micro['fp32_flop_per_cycle_per_core']:.0f} FP32 FLOP/cycle/core "
                     f"({'full-width' if micro['avx512_full_width'] else 'double-pumped'} AVX-512), "
                     f"{micro['int8_op_per_cycle_per_core']:.0f} INT8 op/cycle/core (VNNI)")
        lines.append(f"- peak: FP32 {measured['peak']['fp32_gflops']:.0f} GFLOP/s, INT8 {measured['peak']['int8_gops']:.0f} GOP/s "
                     f"(cores x clock x FLOP/cycle)")
    for g in measured.get("ort_gemm", []):
        lines.append(f"- ONNX Runtime {g['op']} {g['m']}x{g['k']}x{g['n']}: {g['gops']:.0f} G(FL)OP/s")
    for c in measured.get("ort_conv", []):
        lines.append(f"- ONNX Runtime {c['op']} {c['shape']}: {c['gops']:.0f} G(FL)OP/s")
    if "memory" in measured:
        lines.append(f"- memory copy: {measured['memory']['copy_gib_per_s']:.1f} GiB/s (read + write)")
    return "\n".join(lines) + "\n"
