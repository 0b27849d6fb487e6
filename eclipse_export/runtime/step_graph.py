"""Classifier-free guidance + one scheduler step as a tiny ONNX graph.

ONNX Runtime's device loop (runtime/backends/ort_device_loop.py) runs it on the UNet's execution provider
so the latents never leave the device between steps. It is the ONNX statement of what
runtime/backends/cuda.py's fused kernel computes for the TensorRT backend, driven by the same
`StepCoefficients`: guidance eps = u + s * (c - u), then

    x0   = clamp((x - b * eps) / a, -clip, clip)   (Less/Greater + Where: no Clip, see below)
    prev = c_x0 * x0 + c_x * x + c_eps * eps + std * noise

in float32, in `schedulers.apply_step`'s operation order (tests hold the two to bit equality on
ONNX Runtime's CPU provider). Every per-step number is an input, so one graph serves every step
of every scheduler:

    params (9,) float32 = [guidance scale, a, b, clip, c_x0, c_x, c_eps, std, noise index]

The noise index selects this step's variance noise from all steps' noises, uploaded once before
the loop; it rides in the float vector (exact up to 2**24) so a step costs one tiny upload.
Outputs: the next latents and the next UNet input (the latents twice under CFG).
"""

from __future__ import annotations

import numpy as np

from eclipse_export.runtime.onnx_writer import Node, Value, model_bytes
from eclipse_export.runtime.schedulers import StepCoefficients

PARAMS = ("scale", "a", "b", "clip", "c_x0", "c_x", "c_eps", "std", "noise_index")
INPUTS = ("noise_pred", "latents", "step_noise", "params")
OUTPUTS = ("latents_next", "sample_next")


def step_params(k: StepCoefficients, guidance_scale: float | None, noise_index: int) -> np.ndarray:
    """The `params` input of one step (guidance_scale None: no CFG, the graph ignores it)."""
    return np.array([guidance_scale or 1.0, *k.astuple(), noise_index], dtype=np.float32)


def guided_step_model(cfg: bool) -> bytes:
    """Serialized ONNX model; shapes stay symbolic (B, C, H, W, N steps of noise)."""
    f32 = np.dtype(np.float32)
    lat = ["B", "C", "H", "W"]
    pred_batch = "2*B" if cfg else "B"  # symbolic name only; the Split below divides it
    nodes: list[Node] = []
    inits = {f"i_{i}": np.array(i, np.int64) for i in range(len(PARAMS))}
    for i, name in enumerate(PARAMS):
        nodes.append(Node("Gather", ["params", f"i_{i}"], [name], name=f"get_{name}", attributes=(("axis", 0),)))
    nodes.append(Node("Cast", ["noise_index"], ["noise_index_i64"], attributes=(("to", 7),)))
    nodes.append(Node("Gather", ["step_noise", "noise_index_i64"], ["noise"], attributes=(("axis", 0),)))
    if cfg:  # noise_pred = [uncond; cond] along the batch
        nodes += [Node("Split", ["noise_pred"], ["uncond", "cond"], attributes=(("axis", 0),)),
                  Node("Sub", ["cond", "uncond"], ["diff"]),
                  Node("Mul", ["scale", "diff"], ["scaled"]),
                  Node("Add", ["uncond", "scaled"], ["eps"])]
    else:
        nodes.append(Node("Identity", ["noise_pred"], ["eps"]))
    nodes += [
        Node("Mul", ["b", "eps"], ["b_eps"]),
        Node("Sub", ["latents", "b_eps"], ["x_minus"]),
        Node("Div", ["x_minus", "a"], ["x0_raw"]),
        # the clamp by comparisons, not Clip: ONNX Runtime's CUDA Clip wants min/max in host
        # memory, so bounds computed on the device cost a device->host copy every step. Less /
        # Greater + Where are the kernel's `x0 < -clip ? -clip : (x0 > clip ? clip : x0)`: NaN
        # fails both tests and stays NaN (as np.clip), clip = +inf clamps nothing
        Node("Neg", ["clip"], ["neg_clip"]),
        Node("Less", ["x0_raw", "neg_clip"], ["below"]),
        Node("Where", ["below", "neg_clip", "x0_raw"], ["x0_low"]),
        Node("Greater", ["x0_low", "clip"], ["above"]),
        Node("Where", ["above", "clip", "x0_low"], ["x0"]),
        Node("Mul", ["c_x0", "x0"], ["t_x0"]),
        Node("Mul", ["c_x", "latents"], ["t_x"]),
        Node("Mul", ["c_eps", "eps"], ["t_eps"]),
        Node("Add", ["t_x0", "t_x"], ["s1"]),
        Node("Add", ["s1", "t_eps"], ["s2"]),
        Node("Mul", ["std", "noise"], ["t_noise"]),
        Node("Add", ["s2", "t_noise"], ["latents_next"]),
        Node("Concat", ["latents_next", "latents_next"], ["sample_next"], attributes=(("axis", 0),)) if cfg
        else Node("Identity", ["latents_next"], ["sample_next"]),
    ]
    inputs = [Value("noise_pred", f32, [pred_batch, *lat[1:]]), Value("latents", f32, lat),
              Value("step_noise", f32, ["N", *lat]), Value("params", f32, [len(PARAMS)])]
    outputs = [Value("latents_next", f32, lat), Value("sample_next", f32, [pred_batch, *lat[1:]])]
    return model_bytes("guided_step_cfg" if cfg else "guided_step", nodes, inputs, outputs, inits)
