"""FLOPs of one graph call, counted from the ONNX graph at concrete input shapes.

Counts the matrix work (MatMul, Gemm, Conv, ConvTranspose: 2 FLOPs per multiply-add), which is
where diffusion models spend their time; element-wise ops are left out (and said so in the
reports). Needs only the graph structure: external weight data is not loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from pathlib import Path


def _shapes(model) -> dict[str, list[int]]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def graph_flops(path: str | Path, input_shapes: Mapping[str, tuple[int, ...]]) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for inp in model.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not a or not b:
                continue
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if trans_a else a[-1]
            out = shapes.get(node.output[0])
            if out:
                total += 2 * prod(out) * k
        elif node.op_type in ("Conv", "ConvTranspose"):
            w, out, x = shapes.get(node.input[1]), shapes.get(node.output[0]), shapes.get(node.input[0])
            if not w or not out or not x:
                continue
            if node.op_type == "Conv":  # weight (Cout, Cin/g, kh, kw)
                total += 2 * prod(out) * prod(w[1:])
            else:  # weight (Cin, Cout/g, kh, kw): every input pixel scatters a kernel
                total += 2 * prod(x) * prod(w[1:])
    return total
