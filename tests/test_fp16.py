"""onnx-fp16: precision lives in the graph, chosen ops stay FP32, parity vs the FP32 reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from eclipse_export.runtime.bundle import open_bundle
from eclipse_export.specs import COMPONENTS

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _types(model) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(model)
    out = {v.name: v.type.tensor_type.elem_type
           for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    out.update({i.name: i.data_type for i in model.graph.initializer})
    return out


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_graph_is_fp16_with_fp32_io_and_kept_ops(tiny_fp16_bundle, component):
    bundle = open_bundle(tiny_fp16_bundle)
    assert bundle.precision == "fp16" and bundle.manifest["target"] == "onnx-fp16"
    model = onnx.load(str(bundle.graph_path(component)))
    spec = COMPONENTS[component]
    for t in list(model.graph.input) + list(model.graph.output):  # the runtime's I/O is unchanged
        declared = next(s for s in spec.inputs + spec.outputs if s.name == t.name)
        assert t.type.tensor_type.elem_type == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(declared.dtype))
    types = _types(model)
    matmul_weights = [n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")]
    assert matmul_weights and all(types.get(w) == FLOAT16 for w in matmul_weights if w in types)
    kept = [n for n in model.graph.node if n.op_type in spec.fp16_keep_fp32]
    for node in kept:
        assert all(types.get(i, FLOAT) == FLOAT for i in node.input if i), (component, node.name)
    entry = bundle.component(component)
    assert entry["precision"] == "fp16" and entry["export_parity"]["precision"] == "fp16"


KNOWN_GAP = pytest.mark.xfail(strict=True, reason=(
    "open (issue 3): with CFG 4 over 4 DDPM steps the tiny random chain amplifies FP16 rounding "
    "(UNet step-0 cosine 0.99991 -> latents 0.99888 -> image 29.0 dB < 30 dB). onnxconverter-common "
    "rounds every op's output to FP16 and ORT CPU runs unfused ops, so CI sees more rounding than a "
    "fused TensorRT engine; see docs/decisions.md"))


@pytest.mark.parametrize("case", [
    pytest.param(dict(guidance_scale=4.0, steps=4), marks=KNOWN_GAP),
    dict(guidance_scale=1.0, steps=2, scheduler="ddim"),
])
def test_fp16_parity_with_fp32_reference(tiny_fp16_bundle, case):
    from eclipse_export.compare import compare_with_reference
    from eclipse_export.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_bundle(tiny_fp16_bundle)
    gen = pipeline.generate("a red cube on a blue sphere", height=64, width=64, seed=0, record=True, **case)
    report, _ = compare_with_reference(pipeline, gen)
    assert report.precision == "fp16" and report.min_image_psnr_db == 30.0
    assert report.ok, report.table()
    assert all(m.finite for m in report.stages)
    assert min(m.cosine for m in report.stages) >= 0.999 and report.image_psnr_db >= 30


def test_fp16_graphs_are_smaller(tiny_bundle, tiny_fp16_bundle):
    fp32 = open_bundle(tiny_bundle).manifest["files"]
    fp16 = open_bundle(tiny_fp16_bundle).manifest["files"]
    assert fp16["unet.onnx"]["bytes"] < 0.6 * fp32["unet.onnx"]["bytes"]
