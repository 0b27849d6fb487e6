"""External data written with aligned offsets (ONNX Runtime maps those instead of copying them)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eclipse_export.export.onnx_io import ALIGNMENT, save_external


def test_large_tensors_are_aligned_and_the_graph_still_runs(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    small = rng.standard_normal((3, 100), dtype=np.float32)  # 1.2 KB: external, not aligned
    large = rng.standard_normal((100, 300), dtype=np.float32)  # 120 KB: aligned
    two = np.array([2.0], np.float32)  # 4 bytes: stays in the graph file
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "small"], ["h"]), helper.make_node("MatMul", ["h", "large"], ["y0"]),
         helper.make_node("Mul", ["y0", "two"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 300))],
        [numpy_helper.from_array(small, "small"), numpy_helper.from_array(large, "large"),
         numpy_helper.from_array(two, "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    assert save_external(model, path) == ["m.onnx", "m.onnx.data"]
    stored = onnx.load(str(path), load_external_data=False)
    where = {t.name: {kv.key: kv.value for kv in t.external_data} for t in stored.graph.initializer}
    assert int(where["large"]["offset"]) % ALIGNMENT == 0 and where["large"]["location"] == "m.onnx.data"
    assert int(where["small"]["offset"]) == 0
    assert where["two"] == {}  # inline
    x = rng.standard_normal((2, 3), dtype=np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, 2 * (x @ small @ large), rtol=1e-5, atol=1e-5)
