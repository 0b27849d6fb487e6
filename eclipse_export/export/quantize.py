"""FP32 ONNX -> explicitly quantized (Q/DQ) INT8 ONNX, shaped for the backend that runs it.

Two rule sets (`RULES`), recorded per graph in the bundle's manifest:

`tensorrt` (trt-int8): NVIDIA Model Optimizer's ONNX PTQ is the first choice upstream, but it
pins onnx 1.21, onnxruntime-gpu and cupy and does not install on a CPU machine (see
docs/decisions.md), so this uses onnxruntime's quantize_static, configured for TensorRT:
- symmetric int8 for weights and activations (zero point 0), QDQ format;
- per-channel weights (Conv: axis 0, the output channel; MatMul/Gemm weights [K, N]: axis 1),
  per-tensor activations;
- Q/DQ only on the inputs of Conv, MatMul and Gemm; no int32 bias quantization
  (QuantizeBias=False): TensorRT fuses the float bias itself;
- everything else stays in the precision of the input graph.

`ort-cpu` (onnx-int8): what ONNX Runtime's x86 kernels run as integer arithmetic. ORT turns a
QDQ node unit into QLinearConv / QLinearMatMul only when *every* input comes through a
DequantizeLinear (the bias as int32) and the output goes into a QuantizeLinear, with uint8
activations on x86 (its VNNI kernels are u8 x s8). A TensorRT-shaped graph has neither (float
bias, no output Q, int8 activations), so ORT ran each of its convolutions as DequantizeLinear of
the weights + a float Conv: slower than FP32 (issue 13: UNet 4.23 s vs 2.33 s per step). So:
- asymmetric uint8 activations (per tensor), symmetric int8 weights (per channel, zero point 0:
  MLAS' symmetric convolution kernels), int32 bias;
- the outputs of quantized ops are quantized too (the Q that completes the node unit); their
  float consumers read the dequantized value, as the QLinear kernels' u8 output implies.

Both: calibration ranges MinMax over the captured inputs (calibrate.py); layers named in
`exclude` stay in floating point, with the reason recorded in the manifest.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eclipse_export.export.calibrate import iter_feeds

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
METHODS = ("minmax", "percentile", "entropy")
# which backend's kernels a quantized graph is shaped for (see the module docstring)
RULES = ("tensorrt", "ort-cpu")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "minmax"
    max_samples: int | None = None  # calibration feeds per component (None: all captured)
    exclude: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float
    # MatMuls of two activations (attention scores Q.K^T and probabilities.V) stay float: measured
    # on the tiny UNet (64 calibration prompts, 32 validation steps), quantizing them took the
    # noise prediction's worst cosine from 0.998 to 0.988; excluding conv_in/conv_out or every
    # Gemm instead changed nothing (0.989). Per-tensor int8 cannot hold softmax probabilities
    # next to their 1.0 peaks, and TensorRT runs these in its fused FP16 attention anyway.
    quantize_attention: bool = False
    rules: str = "tensorrt"


ATTENTION_REASON = ("MatMul of two activations (attention): per-tensor int8 broke the UNet's "
                    "noise prediction (worst cosine 0.988 vs 0.998 kept in float, tiny preset)")


def attention_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose both inputs are computed (neither a weight nor a constant)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(i in constants for i in n.input[:2])]


def quantize_graph(fp32_path: Path, out_path: Path, component: str, shard_dir: Path,
                   options: QuantizeOptions = QuantizeOptions(), external: bool = False) -> dict:
    """Quantize one component's graph with calibration feeds from `shard_dir`; returns a report."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if options.method not in METHODS:
        raise ValueError(f"unknown calibration method {options.method!r} (choose from {', '.join(METHODS)})")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter_feeds(shard_dir, component, options.max_samples)
            self.count = 0

        def get_next(self):
            feed = next(self.feeds, None)
            if feed is not None:
                self.count += 1
            return feed

    exclude = dict(options.exclude)
    if not options.quantize_attention:
        exclude.update({n: ATTENTION_REASON for n in attention_matmuls(fp32_path) if n not in exclude})
    reader = Reader()
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[options.method]
    if options.rules not in RULES:
        raise ValueError(f"unknown quantization rules {options.rules!r} (choose from {', '.join(RULES)})")
    tensorrt = options.rules == "tensorrt"
    t0 = time.perf_counter()
    quantize_static(
        str(fp32_path), str(out_path), reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=True,
        activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
        use_external_data_format=external,
        calibrate_method=method,
        extra_options={
            "ActivationSymmetric": tensorrt,
            "WeightSymmetric": True,
            # TensorRT fuses the float bias itself; ORT's QLinearConv wants it as int32 DQ input
            "QuantizeBias": not tensorrt,
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Gemm": 1},
            # TensorRT: each quantized node gets its own Q/DQ pair, so the float consumers of the
            # same tensor (residual Adds, norms) keep reading the float tensor (confine_qdq below)
            "DedicatedQDQPair": tensorrt,
        },
    )
    rewired = confine_qdq(out_path) if tensorrt else 0
    seconds = time.perf_counter() - t0
    gc.collect()
    if reader.count == 0:
        raise ValueError(f"no calibration data for {component} in {shard_dir}")
    return {"rules": options.rules, "method": options.method, "samples": reader.count, "seconds": round(seconds, 1),
            "quantized_ops": list(QUANTIZED_OPS), "excluded": exclude, "rewired_float_consumers": rewired,
            **qdq_summary(out_path)}


def confine_qdq(path: Path) -> int:
    """Give every non-Conv/MatMul/Gemm consumer of a dequantized activation the float tensor
    back, and drop Q/DQ pairs nobody reads. onnxruntime's QDQ quantizer feeds a quantized
    tensor's DQ output to all its consumers (residual Adds, Shape, Resize, Softmax...), which
    puts int8 rounding where TensorRT's rules say there is none. Returns the inputs rewired.
    Only the graph structure is rewritten; external weight data stays where it is."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rewired = 0
    for n in nodes:
        if n.op_type in QUANTIZED_OPS:
            continue
        for i, name in enumerate(n.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a weight's DQ (int8 initializer): it only feeds its own node anyway
            n.input[i] = q.input[0]
            rewired += 1
    # drop Q/DQ whose outputs are read by nobody (repeat: removing a DQ can orphan its Q)
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    for init in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(init)
    onnx.save_model(model, str(path))
    return rewired


def _array(tensor, base_dir: Path):
    """An initializer's values, read from the external data file when it lives there (the
    quantizer writes per-channel zero points of large layers externally)."""
    import onnx
    from onnx.external_data_helper import (
        load_external_data_for_tensor,
        uses_external_data,
    )

    if uses_external_data(tensor):
        tensor = onnx.TensorProto.FromString(tensor.SerializeToString())
        load_external_data_for_tensor(tensor, str(base_dir))
    return onnx.numpy_helper.to_array(tensor)


def qdq_summary(path: Path) -> dict:
    """What the quantizer did, counted from the graph (checks the TensorRT rules hold)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = model.graph.node
    producers = {o: n for n in nodes for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    quantized = {op: 0 for op in QUANTIZED_OPS}
    total = {op: 0 for op in QUANTIZED_OPS}
    for n in nodes:
        if n.op_type in QUANTIZED_OPS:
            total[n.op_type] += 1
            if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input[:2]):
                quantized[n.op_type] += 1
    zero_points_nonzero = 0
    for n in nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = _array(inits[n.input[2]], path.parent)
            zero_points_nonzero += int((zp != 0).any())
    return {"quantized": quantized, "total": total,
            "q_nodes": sum(n.op_type == "QuantizeLinear" for n in nodes),
            "dq_nodes": sum(n.op_type == "DequantizeLinear" for n in nodes),
            "nonzero_zero_points": zero_points_nonzero}


def check_qdq_rules(model_path: Path) -> list[str]:
    """Violations of TensorRT's explicit-quantization rules (empty: fine)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            for c in consumers.get(n.output[0], []):
                if c.op_type not in QUANTIZED_OPS:
                    problems.append(f"{n.name} feeds {c.op_type} {c.name} (Q/DQ only on {'/'.join(QUANTIZED_OPS)} inputs)")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = _array(inits[n.input[2]], model_path.parent)
            if (zp != 0).any():
                problems.append(f"{n.name}: zero point is not 0 (TensorRT needs symmetric quantization)")
            if zp.dtype.name != "int8":
                problems.append(f"{n.name}: {zp.dtype} quantization (TensorRT needs int8)")
    return problems


def check_ort_cpu_rules(model_path: Path) -> list[str]:
    """Quantized Conv/MatMul/Gemm nodes that ONNX Runtime's CPU provider could not fuse into an
    integer kernel (empty: fine). A node unit fuses when every input comes through a
    DequantizeLinear (bias: int32), its only consumer is a QuantizeLinear, activations are uint8
    (x86 kernels are u8 x s8) and weights int8 with zero point 0."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}

    def dtype(name: str) -> str | None:
        t = inits.get(name)
        return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name if t is not None else None

    problems = []
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        dqs = [producer.get(i) for i in n.input if i]
        if not any(d is not None and d.op_type == "DequantizeLinear" for d in dqs):
            continue  # kept in float (excluded)
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in dqs):
            problems.append(f"{n.name}: an input does not come through DequantizeLinear (float bias?)")
            continue
        after = consumers.get(n.output[0], [])
        if n.output[0] in outputs or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            problems.append(f"{n.name}: its output does not go into one QuantizeLinear alone")
        activation = dqs[0]
        zp = activation.input[2] if len(activation.input) > 2 else None
        if zp is None or dtype(zp) != "uint8":
            problems.append(f"{n.name}: activations are not uint8 (ONNX Runtime's x86 kernels are u8 x s8)")
        weight = dqs[1]
        if dtype(weight.input[0]) != "int8":
            problems.append(f"{n.name}: weights are not int8")
        elif len(weight.input) > 2 and (_array(inits[weight.input[2]], model_path.parent) != 0).any():
            problems.append(f"{n.name}: weight zero point is not 0")
        if len(dqs) > 2 and dtype(dqs[2].input[0]) != "int32":
            problems.append(f"{n.name}: bias is not int32")
    return problems


def check_rules(model_path: Path, rules: str) -> list[str]:
    if rules == "tensorrt":
        return check_qdq_rules(model_path)
    if rules == "ort-cpu":
        return check_ort_cpu_rules(model_path)
    raise ValueError(f"unknown quantization rules {rules!r} (choose from {', '.join(RULES)})")


def quantize_components(components: Sequence[str], family: str = "kandinsky22") -> tuple[str, ...]:
    from eclipse_export.families import get_family

    COMPONENTS = get_family(family).components
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)} (choose from {', '.join(COMPONENTS)})")
    return tuple(components)
