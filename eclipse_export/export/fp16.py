"""FP32 ONNX -> mixed FP16 ONNX (precision in the graph: what strongly typed TensorRT builds).

The conversion itself is onnxconverter-common's `convert_float_to_float16` (I/O kept FP32, so
the specs and the runtime do not change). Small passes around it fix what that converter (1.16)
gets wrong on our graphs, all seen here on the tiny preset:
- a graph output that is also consumed inside the graph (CLIP's last_hidden_state feeds the
  eos pooling) ends up FP32 while its consumers expect FP16: outputs get an Identity of their own;
- `Cast(to=FLOAT)` nodes (attention masks, timestep embedding) keep producing FP32 while their
  value_info says FP16: they are blocked (kept FP32) and the converter casts after them;
- the converter keeps a blocked node FP32 by casting its inputs up and its output back down to
  FP16, also between two blocked nodes: a chain "kept FP32" is still rounded to FP16 at every
  link. `collapse_round_trips` lets FP32 consumers read the FP32 value itself.
Which ops stay FP32 is decided per component in the family's component specs (families/, fp16_keep_fp32).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from eclipse_export.export.onnx_io import save_external

# Periodic ops: sin(x) is off by the *absolute* error of x. The UNet's sinusoidal timestep
# embedding computes x = t * freq with t up to 999, where FP16's spacing is 0.5 rad: in FP16 its
# Sin/Cos outputs were 1-5 % off on the tiny preset, which dominated the whole UNet's FP16 error
# (diffusers computes this embedding in FP32 even in FP16 pipelines for the same reason). When a
# spec keeps these ops FP32, everything that computes their argument stays FP32 too.
ARGUMENT_SENSITIVE_OPS = frozenset({"Sin", "Cos"})


def _isolate_outputs(model) -> None:
    from onnx import helper

    outputs = {o.name for o in model.graph.output}
    consumers = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in outputs:
                consumers.setdefault(name, []).append((node, i))
    for node in list(model.graph.node):
        for i, name in enumerate(node.output):
            if name in outputs and name in consumers:
                internal = name + "_internal"
                node.output[i] = internal
                for consumer, j in consumers[name]:
                    consumer.input[j] = internal
                model.graph.node.append(helper.make_node("Identity", [internal], [name], name=name + "_identity"))


def argument_nodes(graph, roots: Iterable) -> set[str]:
    """Names of `roots` and of every node they depend on (back to graph inputs and weights)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return seen


def _cast_to(node) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def collapse_round_trips(model) -> int:
    """Cast(FP32->FP16) followed by Cast(FP16->FP32): the consumers of the second cast read the
    FP32 source instead (one rounding fewer, same types everywhere). Returns how many."""
    from onnx import TensorProto

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    outputs = {o.name for o in graph.output}
    source = {}
    for node in graph.node:
        if _cast_to(node) == TensorProto.FLOAT and node.output[0] not in outputs:
            up = producer.get(node.input[0])
            if up is not None and _cast_to(up) == TensorProto.FLOAT16 and types.get(up.input[0]) == TensorProto.FLOAT:
                source[node.output[0]] = up.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = source[name]
    # casts left without consumers go (repeat: removing one can orphan the cast before it)
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            return len(source)
        for node in dead:
            graph.node.remove(node)


def convert_to_fp16(src: Path, dst: Path, keep_fp32_ops: Sequence[str], external: bool) -> list[str]:
    """Write the FP16 version of graph `src` to `dst`; returns the file names written."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxconverter_common import float16

    # Structure first (no weights): shape inference in memory works whatever the weight size.
    model = onnx.load(str(src), load_external_data=False)
    _isolate_outputs(model)
    del model.graph.value_info[:]  # stale FP32 types would contradict the converted graph
    model = onnx.shape_inference.infer_shapes(model)
    load_external_data_for_model(model, str(src.parent))
    for i, node in enumerate(model.graph.node):  # blocking works by node name
        node.name = node.name or f"{node.op_type}_{i}"
    to_float = onnx.TensorProto.FLOAT
    blocked = {n.name for n in model.graph.node if _cast_to(n) == to_float}
    periodic = [n for n in model.graph.node if n.op_type in ARGUMENT_SENSITIVE_OPS and n.op_type in keep_fp32_ops]
    blocked |= argument_nodes(model.graph, periodic)
    with warnings.catch_warnings():
        # one warning per weight below FP16's smallest normal (thousands at full size); the
        # export-time parity check is what judges the result
        warnings.simplefilter("ignore", UserWarning)
        model16 = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(keep_fp32_ops),
            node_block_list=sorted(blocked),
        )
    del model
    gc.collect()
    collapse_round_trips(model16)
    if external:
        files = save_external(model16, dst)
        del model16
        onnx.checker.check_model(str(dst))
        return files
    onnx.checker.check_model(model16)
    onnx.save_model(model16, str(dst))
    return [dst.name]
