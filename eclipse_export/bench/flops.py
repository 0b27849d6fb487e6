"""FLOPs of one graph call, counted from the ONNX graph at concrete input shapes.

Counts the matrix work (MatMul, Gemm, Conv, ConvTranspose: 2 FLOPs per multiply-add), which is
where diffusion models spend their time; element-wise ops are left out (and said so in the
reports). Needs only the graph structure: external weight data is not loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from pathlib import Path


def _shapes(model, batch: int) -> dict[str, list[int]]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue
        # ONNX inference loses the batch at a Reshape(-1, ...) (CLIP's input_ids.view(-1, T)): a
        # symbolic leading dim left after inference is the batch
        if all(d.HasField("dim_value") for d in dims[1:]) and (dims[0].HasField("dim_value") or dims[0].dim_param):
            out[vi.name] = [dims[0].dim_value if dims[0].HasField("dim_value") else batch] + [d.dim_value for d in dims[1:]]
    for init in model.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def graph_flops(path: str | Path, input_shapes: Mapping[str, tuple[int, ...]]) -> int:
    total, skipped = _count(path, input_shapes)
    batch = int(next(iter(input_shapes.values()))[0])
    if skipped and batch == 1:
        # At batch 1 ONNX shape inference leaves CLIP's attention reshapes unresolved (seen: 96
        # MatMuls of the bigG text encoder); at batch 2 it resolves them all. These graphs have no
        # cross-batch work, so their matrix FLOPs are linear in the batch.
        doubled = {k: (2 * v[0], *v[1:]) if v and v[0] == 1 else v for k, v in input_shapes.items()}
        total2, skipped2 = _count(path, doubled)
        if not skipped2:
            return total2 // 2
    return total


def _count(path: str | Path, input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for inp in model.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    # shapes stored at export carry symbolic batch/size dims that inference would keep: re-infer all
    del model.graph.value_info[:]
    model = _infer_shapes(model)
    shapes = _shapes(model, batch=int(next(iter(input_shapes.values()))[0]))
    total = skipped = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not a or not b or not shapes.get(node.output[0]):
                skipped += 1
                continue
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if trans_a else a[-1]
            total += 2 * prod(shapes[node.output[0]]) * k
        elif node.op_type in ("Conv", "ConvTranspose"):
            w, out, x = shapes.get(node.input[1]), shapes.get(node.output[0]), shapes.get(node.input[0])
            if not w or not out or not x:
                skipped += 1
                continue
            if node.op_type == "Conv":  # weight (Cout, Cin/g, kh, kw)
                total += 2 * prod(out) * prod(w[1:])
            else:  # weight (Cin, Cout/g, kh, kw): every input pixel scatters a kernel
                total += 2 * prod(x) * prod(w[1:])
    return total, skipped


def _infer_shapes(model):
    """Concrete shapes for every tensor. ONNX's own inference leaves the attention tensors
    unresolved behind data-dependent Reshapes (seen: every attention MatMul of the prior, UNet
    and MoVQ, so their FLOPs were missing from the count); ONNX Runtime's symbolic inference
    propagates the shape computations and resolves them all. It needs sympy (installed with
    torch); without it, ONNX's inference is used."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - ImportError (no sympy), or a graph the symbolic pass cannot follow
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
