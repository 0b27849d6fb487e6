"""Karlo's decoder and super-resolution loops on the TensorRT backends' device (issue 20 item 4).

The unCLIP twin of TensorRTBackend.denoise: inputs uploaded once (initial latents, every
step's timestep and variance noise, the stage's constant inputs), then per step a 4-byte
device-to-device timestep copy, the UNet enqueue (captured once and replayed as a CUDA graph
on TensorRT, TensorRT-RTX captures itself) and one unclip_step kernel (kernels/guided_step.cu:
guidance on the noise channels, the learned variance from the conditional half, or the fixed
one) whose scalars are its launch arguments; the final latents and the NaN flag come back once.

The super-resolution loop switches UNets for its last step: the switch binds super_res_last,
uploads its constant input (the upsampled image) once and copies the latents into its sample
on the device; low-memory mode frees super_res_first first (one engine resident at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.cuda import DeviceBuffer

if TYPE_CHECKING:
    from eclipse_export.runtime.backends.tensorrt import TensorRTBackend, TrtSession

LOOP_INPUTS = ("sample", "timestep")


# Shared by TensorRTBackend.denoise (Kandinsky) and denoise_unclip (Karlo) --------------------

def step_enqueued(cuda, events: list, i: int, steps: int, progress) -> None:
    """After step i's kernel: progress reports work done, not work queued, without draining the
    stream each step: an event after each step, and the host waits for the previous step's
    event only, so one step is always queued ahead and the GPU never idles on the host."""
    if events:
        cuda.record(events[i % 2])
        if i > 0:
            cuda.wait_event(events[(i - 1) % 2])
            progress(i, steps)


def read_back(cuda, bufs: Mapping[str, DeviceBuffer], shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """The final latents and the kernel's NaN/Inf flag (the first bad step, 0: none), with the
    loop's one host synchronisation."""
    out = np.empty(shape, np.float32)
    bad = np.zeros(1, np.uint32)
    cuda.d2h(out, bufs["latents"].ptr)
    cuda.d2h(bad, bufs["bad_step"].ptr)
    cuda.synchronize()
    return out, int(bad[0])


def loop_finished(bad_step: int, steps: int, failed: str, progress) -> None:
    """failed: the words for a NaN/Inf step (the C++ loops' words)."""
    if bad_step:
        raise BackendError(f"{failed} at step {bad_step} of {steps} "
                           "(FP16 overflow? compare with the FP32 bundle or eclipse-generate --compare-reference)")
    if progress:
        progress(steps, steps)


def _bind(unet: TrtSession, constants: Mapping[str, np.ndarray], sample_shape: tuple[int, ...]) -> None:
    """Bind one UNet for the loop and upload its constant inputs (once per loop)."""
    unet.load()
    loop_io = [n for n in unet.names if n in LOOP_INPUTS or not unet.is_input[n]]
    wrong = {n: str(unet.dtypes[n]) for n in loop_io if unet.dtypes[n] != np.float32}
    if wrong:
        raise BackendError(f"the device loop expects float32 sample, timestep and noise_pred, {unet.spec.name}'s engine "
                           f"has {wrong} (the FP16 graphs keep float32 I/O: re-export the bundle)")
    unet.bind({"sample": sample_shape, "timestep": (1,), **{k: v.shape for k, v in constants.items()}})
    for name, value in constants.items():
        unet.cuda.h2d(unet.ptr(name), np.ascontiguousarray(value).astype(unet.dtypes[name], copy=False))


def denoise_unclip(backend: TensorRTBackend, unets: Sequence[TrtSession], latents: np.ndarray,
                   constants: Mapping[str, np.ndarray], scheduler, guidance_scale: float | None,
                   step_noise: np.ndarray, progress: Callable[[int, int], None] | None = None,
                   record_step0: dict | None = None) -> np.ndarray:
    """unets[0] for every step but the last, unets[-1] for the last; returns the final latents
    (host). guidance_scale None: no CFG. step_noise: (steps, *latents.shape)."""
    cfg = guidance_scale is not None
    b, c = latents.shape[:2]
    sample_shape = ((2 * b,) if cfg else (b,)) + latents.shape[1:]
    learned = scheduler.variance_type == "learned_range"
    cuda, n = backend.cuda, int(latents.size)
    steps = len(scheduler.timesteps)
    bufs = backend._loop_buffers  # grow-only, shared with the Kandinsky loop (one loop at a time)
    for key, nbytes in (("latents", n * 4), ("timesteps", steps * 4), ("noise", step_noise.nbytes), ("bad_step", 4)):
        bufs.setdefault(key, DeviceBuffer(cuda)).ensure(nbytes)
    cuda.h2d(bufs["latents"].ptr, latents.astype(np.float32))
    cuda.h2d(bufs["timesteps"].ptr, scheduler.timesteps.astype(np.float32))
    cuda.h2d(bufs["bad_step"].ptr, np.zeros(1, np.uint32))
    cuda.h2d(bufs["noise"].ptr, step_noise.astype(np.float32))

    def start(unet: TrtSession) -> int:
        """Bind `unet`, check its output, fill its sample from the latents; its pred channels."""
        _bind(unet, constants, sample_shape)
        pred_shape = unet.shapes["noise_pred"]
        channels = (2 * c) if learned else c
        if tuple(pred_shape) != (sample_shape[0], channels, *latents.shape[2:]):
            raise BackendError(f"{unet.spec.name} gives noise_pred of shape {tuple(pred_shape)}; the "
                               f"{scheduler.variance_type} loop needs {(sample_shape[0], channels, *latents.shape[2:])}")
        sample = unet.ptr("sample")
        cuda.d2d(sample, bufs["latents"].ptr, n * 4)
        if cfg:
            cuda.d2d(sample + n * 4, bufs["latents"].ptr, n * 4)
        return channels

    unet = unets[0]
    pred_channels = start(unet)
    # progress: see step_enqueued
    events = [cuda.event(), cuda.event()] if progress else []
    try:
        for i, t in enumerate(scheduler.timesteps):
            if i == steps - 1 and unets[-1] is not unet:
                backend.stage_done(unet)  # low-memory: free the first UNet before the last loads
                unet = unets[-1]
                start(unet)
            cuda.d2d(unet.ptr("timestep"), bufs["timesteps"].ptr + 4 * i, 4)
            unet.enqueue(use_graph=len(unets) == 1 or unet is not unets[-1])  # a UNet run once: no capture
            if record_step0 is not None and i == 0:
                host = np.empty(unet.shapes["noise_pred"], np.float32)
                cuda.d2h(host, unet.ptr("noise_pred"))
                cuda.synchronize()
                record_step0["noise_pred_step0"] = host
            k = scheduler.step_terms(int(t), scheduler.prev_timestep(i))
            noise = bufs["noise"].ptr + i * n * 4 if k.noise else 0
            # the next UNet input, unless the next step is the last of a loop that switches UNets
            # (start() fills that one's sample) or this is the last step
            feeds_next = i + 2 < steps or (i + 2 == steps and unets[-1] is unet)
            cuda.unclip_step(unet.ptr("noise_pred"), bufs["latents"].ptr, noise,
                             unet.ptr("sample") if feeds_next else 0, latents.shape, pred_channels, cfg,
                             float(guidance_scale or 1.0), k, bufs["bad_step"].ptr, i)
            step_enqueued(cuda, events, i, steps, progress)
        out, bad = read_back(cuda, bufs, latents.shape)
    finally:
        for event in events:
            cuda.destroy_event(event)
    loop_finished(bad, steps, f"the {unets[0].spec.name} loop produced NaN/Inf", progress)
    return out
