"""Classifier-free guidance + one scheduler step as a tiny ONNX graph, written into every bundle
(Karlo bundles: the unCLIP step, `unclip_step_model`, for the decoder and super-resolution loops).

ONNX Runtime's device loop (runtime/backends/ort_device_loop.py) runs it on the UNet's execution
provider so the latents never leave the device between steps. It is the ONNX statement of what
runtime/backends/kernels/guided_step.cu computes for the TensorRT backend, driven by the same
`StepCoefficients`: guidance eps = u + s * (c - u), then

    x0   = clamp((x - b * eps) / a, -clip, clip)   (Less/Greater + Where: no Clip, see below)
    prev = c_x0 * x0 + c_x * x + c_eps * eps + std * noise

in float32, in `schedulers.apply_step`'s operation order (tests hold the two to bit equality on
ONNX Runtime's CPU provider). Every per-step number is an input, so one graph serves every step
of every scheduler:

    params (9,) float32 = [guidance scale, a, b, clip, c_x0, c_x, c_eps, std, noise index]

(runtime/backends/ort_device_loop.py: PARAMS, step_params). The noise index selects this step's
variance noise from all steps' noises, uploaded once before the loop; it rides in the float vector
(exact up to 2**24) so a step costs one tiny upload. Outputs: the next latents and the next UNet
input (the latents twice under CFG).

Written at export time with the `onnx` package (the export side has it; the edge runtime does
not need it) and listed in the manifest like every other file, so the runtime loads a
hash-verified graph instead of building one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eclipse_export.runtime.backends.ort_device_loop import PARAMS
from eclipse_export.runtime.backends.ort_unclip_loop import LOG_PARAMS, UNCLIP_FILES, UNCLIP_KINDS, UNCLIP_PARAMS

INPUTS = ("noise_pred", "latents", "step_noise", "params")
OUTPUTS = ("latents_next", "sample_next")
# file names in the bundle, per kind (runtime/bundle.py STEP_GRAPH_KINDS)
FILES = {"cfg": "guided_step_cfg.onnx", "plain": "guided_step.onnx"}
# opset 17: Split takes its sizes as an input (absent: equal halves); every op here is in ONNX
# Runtime's CUDA and CPU providers at this opset
OPSET = 17


def _guided_eps(cfg: bool, uncond: str, cond: str, single: str) -> list:
    """eps: uncond + scale * (cond - uncond) under CFG, else the prediction itself."""
    if cfg:
        return [helper.make_node("Sub", [cond, uncond], ["diff"]),
                helper.make_node("Mul", ["scale", "diff"], ["scaled"]),
                helper.make_node("Add", [uncond, "scaled"], ["eps"])]
    return [helper.make_node("Identity", [single], ["eps"])]


def _x0_and_mean_terms() -> list:
    """x0 = clamp((latents - b*eps) / a, -clip, clip), then t_x0 = c_x0*x0 and t_x = c_x*latents.

    The clamp by comparisons, not Clip: ONNX Runtime's CUDA Clip wants min/max in host memory,
    so bounds computed on the device cost a device->host copy every step. Less / Greater + Where
    are the kernel's `x0 < -clip ? -clip : (x0 > clip ? clip : x0)`: NaN fails both tests and
    stays NaN (as np.clip), clip = +inf clamps nothing."""
    return [
        helper.make_node("Mul", ["b", "eps"], ["b_eps"]),
        helper.make_node("Sub", ["latents", "b_eps"], ["x_minus"]),
        helper.make_node("Div", ["x_minus", "a"], ["x0_raw"]),
        helper.make_node("Neg", ["clip"], ["neg_clip"]),
        helper.make_node("Less", ["x0_raw", "neg_clip"], ["below"]),
        helper.make_node("Where", ["below", "neg_clip", "x0_raw"], ["x0_low"]),
        helper.make_node("Greater", ["x0_low", "clip"], ["above"]),
        helper.make_node("Where", ["above", "clip", "x0_low"], ["x0"]),
        helper.make_node("Mul", ["c_x0", "x0"], ["t_x0"]),
        helper.make_node("Mul", ["c_x", "latents"], ["t_x"]),
    ]


def guided_step_model(cfg: bool) -> onnx.ModelProto:
    """The step graph; shapes stay symbolic (B, C, H, W, N steps of noise)."""
    lat = ["B", "C", "H", "W"]
    pred_batch = "2*B" if cfg else "B"  # symbolic name only; the Split below halves it
    nodes = []
    inits = [numpy_helper.from_array(np.array(i, np.int64), f"i_{i}") for i in range(len(PARAMS))]
    for i, name in enumerate(PARAMS):
        nodes.append(helper.make_node("Gather", ["params", f"i_{i}"], [name], name=f"get_{name}", axis=0))
    nodes.append(helper.make_node("Cast", ["noise_index"], ["noise_index_i64"], to=TensorProto.INT64))
    nodes.append(helper.make_node("Gather", ["step_noise", "noise_index_i64"], ["noise"], axis=0))
    if cfg:  # noise_pred = [uncond; cond] along the batch
        nodes.append(helper.make_node("Split", ["noise_pred"], ["uncond", "cond"], axis=0))
    nodes += _guided_eps(cfg, "uncond", "cond", "noise_pred")
    nodes += _x0_and_mean_terms()
    nodes += [
        helper.make_node("Mul", ["c_eps", "eps"], ["t_eps"]),
        helper.make_node("Add", ["t_x0", "t_x"], ["s1"]),
        helper.make_node("Add", ["s1", "t_eps"], ["s2"]),
        helper.make_node("Mul", ["std", "noise"], ["t_noise"]),
        helper.make_node("Add", ["s2", "t_noise"], ["latents_next"]),
        helper.make_node("Concat", ["latents_next", "latents_next"], ["sample_next"], axis=0) if cfg
        else helper.make_node("Identity", ["latents_next"], ["sample_next"]),
    ]
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("noise_pred", f32, [pred_batch, *lat[1:]]),
              helper.make_tensor_value_info("latents", f32, lat),
              helper.make_tensor_value_info("step_noise", f32, ["N", *lat]),
              helper.make_tensor_value_info("params", f32, [len(PARAMS)])]
    outputs = [helper.make_tensor_value_info("latents_next", f32, lat),
               helper.make_tensor_value_info("sample_next", f32, [pred_batch, *lat[1:]])]
    graph = helper.make_graph(nodes, "guided_step_cfg" if cfg else "guided_step", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="eclipse-export")
    model.ir_version = 8  # readable by ONNX Runtime >= 1.14
    onnx.checker.check_model(model, full_check=True)
    return model


def unclip_step_model(cfg: bool, learned: bool) -> onnx.ModelProto:
    """Karlo's step (UnCLIPScheduler.step after the chain's guidance) as a graph, the ONNX
    statement of kernels/guided_step.cu `unclip_step` in runtime.unclip_scheduler.apply_unclip_step's
    operation order. noise_pred is (rows, C or 2C, H, W): learned=True splits off the variance
    channels (of the conditional half under CFG) and computes the standard deviation per element
    in float64 from `log_params` = [min_log, max_log] (float64: they are float64 in numpy, a
    float32 round would move the result); fixed: the `std` parameter. `noise_on` 0 (the last
    step) multiplies the noise term away."""
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE
    lat = ["B", "C", "H", "W"]
    pred_batch, pred_channels = ("2*B" if cfg else "B"), ("2*C" if learned else "C")
    nodes = []
    inits = [numpy_helper.from_array(np.array(i, np.int64), f"i_{i}") for i in range(len(UNCLIP_PARAMS))]
    inits += [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(2.0, np.float32), "two"),
              numpy_helper.from_array(np.array(1.0, np.float64), "one_d"),
              numpy_helper.from_array(np.array(0.5, np.float64), "half_d")]
    for i, name in enumerate(UNCLIP_PARAMS):
        nodes.append(helper.make_node("Gather", ["params", f"i_{i}"], [name], name=f"get_{name}", axis=0))
    nodes.append(helper.make_node("Cast", ["noise_index"], ["noise_index_i64"], to=TensorProto.INT64))
    nodes.append(helper.make_node("Gather", ["step_noise", "noise_index_i64"], ["noise"], axis=0))
    halves = ["uncond", "cond"] if cfg else ["pred"]
    if cfg:
        nodes.append(helper.make_node("Split", ["noise_pred"], halves, axis=0))
    else:
        nodes.append(helper.make_node("Identity", ["noise_pred"], ["pred"]))
    for h in halves:  # opset 17 Split without sizes: equal halves, the noise and variance channels
        nodes.append(helper.make_node("Split", [h], [f"{h}_eps", f"{h}_var"], axis=1) if learned
                     else helper.make_node("Identity", [h], [f"{h}_eps"]))
    nodes += _guided_eps(cfg, "uncond_eps", "cond_eps", "pred_eps")
    nodes += _x0_and_mean_terms()
    nodes += [
        helper.make_node("Add", ["t_x0", "t_x"], ["prev"]),
    ]
    if learned:
        var = "cond_var" if cfg else "pred_var"
        nodes += [
            helper.make_node("Add", [var, "one"], ["v1"]),
            helper.make_node("Div", ["v1", "two"], ["frac32"]),
            helper.make_node("Cast", ["frac32"], ["frac"], to=f64),
            helper.make_node("Gather", ["log_params", "i_0"], ["min_log"], axis=0),
            helper.make_node("Gather", ["log_params", "i_1"], ["max_log"], axis=0),
            helper.make_node("Mul", ["frac", "max_log"], ["l1"]),
            helper.make_node("Sub", ["one_d", "frac"], ["rest"]),
            helper.make_node("Mul", ["rest", "min_log"], ["l2"]),
            helper.make_node("Add", ["l1", "l2"], ["l12"]),
            helper.make_node("Mul", ["half_d", "l12"], ["half_log"]),
            helper.make_node("Exp", ["half_log"], ["std64"]),
            helper.make_node("Cast", ["std64"], ["std_e"], to=f32),
            helper.make_node("Mul", ["std_e", "noise"], ["t_noise"]),
        ]
    else:
        nodes.append(helper.make_node("Mul", ["std", "noise"], ["t_noise"]))
    nodes += [
        helper.make_node("Mul", ["t_noise", "noise_on"], ["t_noise_on"]),
        helper.make_node("Add", ["prev", "t_noise_on"], ["latents_next"]),
        helper.make_node("Concat", ["latents_next", "latents_next"], ["sample_next"], axis=0) if cfg
        else helper.make_node("Identity", ["latents_next"], ["sample_next"]),
    ]
    inputs = [helper.make_tensor_value_info("noise_pred", f32, [pred_batch, pred_channels, *lat[2:]]),
              helper.make_tensor_value_info("latents", f32, lat),
              helper.make_tensor_value_info("step_noise", f32, ["N", *lat]),
              helper.make_tensor_value_info("params", f32, [len(UNCLIP_PARAMS)])]
    if learned:
        inputs.append(helper.make_tensor_value_info("log_params", f64, [len(LOG_PARAMS)]))
    outputs = [helper.make_tensor_value_info("latents_next", f32, lat),
               helper.make_tensor_value_info("sample_next", f32, [pred_batch, *lat[1:]])]
    name = f"unclip_step_{'learned' if learned else 'fixed'}{'_cfg' if cfg else ''}"
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="eclipse-export")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def step_graph_files(family: str) -> dict[str, str]:
    """The step graphs a bundle of `family` carries: Karlo's unCLIP loops, else the guided step
    of the Kandinsky UNet loop (ECLIPSE and λ-ECLIPSE)."""
    return dict(UNCLIP_FILES) if family == "karlo" else dict(FILES)


def step_model(kind: str) -> onnx.ModelProto:
    if kind in UNCLIP_KINDS:
        cfg, learned = UNCLIP_KINDS[kind]
        return unclip_step_model(cfg, learned)
    return guided_step_model(kind == "cfg")


def write_step_graphs(directory: Path, family: str = "kandinsky22", kinds=None) -> dict[str, str]:
    """Write the family's step graphs (or only `kinds` of them) into a bundle directory; returns
    those entries of the manifest's `step_graphs`."""
    files = {k: v for k, v in step_graph_files(family).items() if kinds is None or k in kinds}
    for kind, name in files.items():
        onnx.save(step_model(kind), Path(directory) / name)
    return files
