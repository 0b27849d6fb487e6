"""Where a reduced-precision graph departs from its FP32 graph, tensor by tensor.

Both graphs run on the same inputs with every intermediate tensor exposed (ONNX Runtime CPU);
each tensor present in both gets its relative error, and each node its *amplification*: its
output's error over the largest error of its inputs. Rounding to FP16 costs ~2^-11 per op, so
an amplification far above 1 marks an op that turns small input errors into large ones (an
overflow, a cancellation, a periodic function of a large argument). This is the measurement
that found the FP16 UNet's timestep-embedding problem (Cos and Sin of t * freq amplified 101x and 20x);
use it to decide which ops a new checkpoint must keep in FP32.

    python -m eclipse_export.verify.precision_trace --reference engines/x-onnx --bundle engines/x-onnx-fp16 --component unet

Diagnostic only: it holds every intermediate tensor of both graphs in memory, so run it on
small shapes (the spec's sample inputs at their smallest size, which is the default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eclipse_export.export.onnx_io import link_or_copy

# FP16's unit roundoff: an input error floor, so that exact inputs (weights, shapes) do not make
# every consumer look like an amplifier
FP16_ROUNDOFF = 2.0 ** -11


@dataclass(frozen=True)
class TensorError:
    index: int  # the producing node's position in the FP32 graph
    op_type: str
    node: str
    tensor: str
    rel_error: float  # ||a - b|| / ||b||
    amplification: float  # rel_error / max(error of the node's inputs, FP16_ROUNDOFF)
    finite: bool
    abs_max: float  # of the FP32 tensor
    constant: bool = False  # a node without inputs: its error is the conversion's own rounding


def _run_all(graph: Path, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], object]:
    """Every float tensor of `graph` that shape inference can type, as outputs."""
    import onnx
    import onnxruntime as ort

    # structure only: weights stay in their external data file (a 5 GB UNet cannot be serialised
    # for shape inference); the traced copy reads them through links next to it
    model = onnx.load(str(graph), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    outputs = {o.name for o in model.graph.output}
    produced = {o for node in model.graph.node for o in node.output}  # converters leave stale value_info
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for info in model.graph.value_info:
        if info.name in produced and info.name not in outputs and info.type.tensor_type.elem_type in floats:
            model.graph.output.append(info)
            outputs.add(info.name)
    data_files = {kv.value for t in model.graph.initializer for kv in t.external_data if kv.key == "location"}
    with _beside(graph, data_files) as tmp:
        path = Path(tmp) / graph.name
        onnx.save_model(model, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(names, dict(feed))))
    return values, model.graph


def _beside(graph: Path, data_files: set[str]) -> tempfile.TemporaryDirectory:
    """A temporary directory holding `graph`'s external data files. ONNX Runtime refuses data
    outside the model's directory, symlinks included: hard links from a directory next to the
    bundle (same file system), copies where that cannot be."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix=".precision-trace-", dir=graph.parent.parent)
    except OSError:  # a read-only place
        tmp = tempfile.TemporaryDirectory(prefix=".precision-trace-")
    for name in data_files:
        link_or_copy(graph.parent / name, Path(tmp.name) / name)
    return tmp


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norm = np.linalg.norm(b64)
    diff = np.linalg.norm(a64 - b64)
    return float(diff / norm) if norm > 0 else (0.0 if diff == 0 else float("inf"))


def trace(reference: Path, candidate: Path, feed: Mapping[str, np.ndarray]) -> list[TensorError]:
    """Relative error of every tensor the two graphs share (same name and shape), in the
    reference graph's node order."""
    ref, graph = _run_all(reference, feed)
    cand, _ = _run_all(candidate, feed)
    errors: dict[str, float] = {}
    rows = []
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name not in ref or name not in cand or ref[name].shape != cand[name].shape:
                continue
            err = _rel_error(cand[name], ref[name])
            errors[name] = err
            into = max([errors.get(i, 0.0) for i in node.input] + [FP16_ROUNDOFF])
            finite = bool(np.isfinite(cand[name]).all())
            rows.append(TensorError(index, node.op_type, node.name, name, err, err / into, finite,
                                    float(np.abs(ref[name]).max()) if ref[name].size else 0.0,
                                    constant=not any(node.input)))
    return rows


def amplifiers(rows: list[TensorError], top: int = 10) -> list[TensorError]:
    """The nodes that grow the error most (non-finite outputs first). Constants have no input
    error to amplify: see `changed_constants`."""
    return sorted((r for r in rows if not r.constant), key=lambda r: (r.finite, -r.amplification))[:top]


def changed_constants(rows: list[TensorError], above: float = 4 * FP16_ROUNDOFF) -> list[TensorError]:
    """Constants the conversion changed by more than rounding: typically a mask's float32
    minimum clamped to FP16's -65504, harmless after a Softmax; anything else deserves a look."""
    return [r for r in rows if r.constant and r.rel_error > above]


def format_rows(rows: list[TensorError]) -> str:
    lines = [f"{'node':>5}  {'op':22} {'tensor':60} {'rel error':>10} {'amplif.':>8} {'|fp32| max':>10}"]
    for r in rows:
        flag = "" if r.finite else "  NaN/Inf"
        lines.append(f"{r.index:5d}  {r.op_type:22} {r.tensor[-60:]:60} {r.rel_error:10.2e} "
                     f"{r.amplification:8.1f} {r.abs_max:10.3g}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from eclipse_export.families.kandinsky22.components import COMPONENTS
    from eclipse_export.runtime.bundle import BundleError, open_bundle

    p = argparse.ArgumentParser(prog="python -m eclipse_export.verify.precision_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, required=True, help="the fp32 bundle")
    p.add_argument("--bundle", type=Path, required=True, help="the fp16 (or int8) bundle of the same source")
    p.add_argument("--component", choices=sorted(COMPONENTS), required=True)
    p.add_argument("--top", type=int, default=15, help="how many amplifying nodes to list")
    p.add_argument("--seed", type=int, default=0, help="seed of the spec's sample inputs")
    p.add_argument("--timestep", type=float, default=None, help="UNet: timestep of the sample input")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be >= 1")
    try:
        ref, cand = open_bundle(args.reference), open_bundle(args.bundle)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ref.precision != "fp32":
        print(f"error: --reference must be an fp32 bundle, {args.reference} is {ref.precision}", file=sys.stderr)
        return 2
    spec = COMPONENTS[args.component]
    dims = dict(ref.dims, **{s: lo for s, (lo, _, _) in spec.shape_ranges.items()})
    feed = spec.sample_inputs(dims, np.random.default_rng(args.seed))
    if args.timestep is not None and "timestep" in feed:
        feed["timestep"] = np.array([args.timestep], dtype=np.float32)
    rows = trace(ref.graph_path(args.component), cand.graph_path(args.component), feed)
    if not rows:
        print("error: the graphs share no tensor names (not exported from the same source?)", file=sys.stderr)
        return 2
    out = rows[-1]
    print(f"{args.component}: {len(rows)} tensors compared; last ({out.tensor}) rel error {out.rel_error:.2e}")
    print(format_rows(amplifiers(rows, args.top)))
    changed = changed_constants(rows)
    if changed:
        print(f"constants changed beyond FP16 rounding ({len(changed)}; e.g. mask values clamped to +-65504):")
        print(format_rows(changed[: args.top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
