"""FP32 ONNX -> mixed FP16 ONNX (precision in the graph: what strongly typed TensorRT builds).

The conversion itself is onnxconverter-common's `convert_float_to_float16` (I/O kept FP32, so
the specs and the runtime do not change). Two small pre-passes work around what that converter
(1.16) gets wrong on our graphs, both seen here on the tiny preset:
- a graph output that is also consumed inside the graph (CLIP's last_hidden_state feeds the
  eos pooling) ends up FP32 while its consumers expect FP16: outputs get an Identity of their own;
- `Cast(to=FLOAT)` nodes (attention masks, timestep embedding) keep producing FP32 while their
  value_info says FP16: they are blocked (kept FP32) and the converter casts after them.
Which ops stay FP32 is decided per component in specs.py (fp16_keep_fp32).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Sequence
from pathlib import Path

from .onnx_io import save_external


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
    to_float = onnx.TensorProto.FLOAT
    casts = [n.name for n in model.graph.node
             if n.op_type == "Cast" and any(a.name == "to" and a.i == to_float for a in n.attribute)]
    with warnings.catch_warnings():
        # one warning per weight below FP16's smallest normal (thousands at full size); the
        # export-time parity check is what judges the result
        warnings.simplefilter("ignore", UserWarning)
        model16 = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(keep_fp32_ops),
            node_block_list=casts,
        )
    del model
    gc.collect()
    if external:
        files = save_external(model16, dst)
        del model16
        onnx.checker.check_model(str(dst))
        return files
    onnx.checker.check_model(model16)
    onnx.save_model(model16, str(dst))
    return [dst.name]
