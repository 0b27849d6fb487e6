"""Karlo's decoder and super-resolution loops on ONNX Runtime's device (issue 20 item 4).

The unCLIP twin of ort_device_loop.py: per step, on the device, UNet(sample, timestep, the
stage's constant inputs) -> noise_pred, then the bundle's unCLIP step graph
(export/step_graph.py unclip_step_model) (noise_pred, latents, all steps' noises, params
[, log_params]) -> next latents + next UNet sample. Every tensor is an OrtValue bound with IO
binding; nothing comes back to the host until the final latents.

Host -> device per step: the timestep (4 bytes), 9 float32 parameters (36 bytes) and, for the
decoder's learned variance, 2 float64 logs (16 bytes). Once per loop: the constant inputs (the
decoder's context, class embedding and mask; the super-resolution's upsampled image), the
initial latents and every step's variance noise. Device -> host: the final latents (and the
step-0 noise prediction when recording for parity).

The super-resolution loop runs two UNets (super_res_first for every step but the last,
super_res_last for the last): both bindings share the sample, timestep, constant and
noise_pred buffers, so switching costs nothing. CUDA graphs are not used here (the Kandinsky
loop's static-shape sessions are specialised to one UNet's inputs); each UNet runs as exported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.ort_device_loop import OrtDeviceLoop, _host_copy
from eclipse_export.runtime.backends.ort_errors import ort_error_line

if TYPE_CHECKING:
    from eclipse_export.runtime.backends.onnxruntime import OrtSession
    from eclipse_export.runtime.unclip_scheduler import UnCLIPStepTerms

F32 = np.float32

# the unCLIP step graphs' `params` (float32) and `log_params` (float64) inputs, in order
UNCLIP_PARAMS = ("scale", "a", "b", "clip", "c_x0", "c_x", "std", "noise_on", "noise_index")
LOG_PARAMS = ("min_log", "max_log")
# bundle step-graph kinds (runtime/bundle.py STEP_GRAPH_KINDS) -> (cfg, learned variance), files
UNCLIP_KINDS = {"unclip_learned_cfg": (True, True), "unclip_learned": (False, True), "unclip_fixed": (False, False)}
UNCLIP_FILES = {kind: f"{kind.replace('unclip', 'unclip_step')}.onnx" for kind in UNCLIP_KINDS}


def unclip_kind(cfg: bool, learned: bool) -> str | None:
    """The step graph kind for a loop, None where no graph is written (the host loop serves it)."""
    return next((k for k, v in UNCLIP_KINDS.items() if v == (cfg, learned)), None)


def unclip_params(k: UnCLIPStepTerms, guidance_scale: float | None, noise_index: int) -> np.ndarray:
    return np.array([guidance_scale or 1.0, k.a, k.b, k.clip, k.c_x0, k.c_x, k.std, 1.0 if k.noise else 0.0,
                     noise_index], dtype=F32)


class OrtUnclipLoop(OrtDeviceLoop):
    """Shares the step-graph sessions and device allocation of the Kandinsky loop."""

    def denoise(self, unets: Sequence[OrtSession], latents: np.ndarray, constants: Mapping[str, np.ndarray],
                scheduler, guidance_scale: float | None, step_noise: np.ndarray, progress=None,
                record_step0: dict | None = None) -> np.ndarray:
        """unets[0] for every step but the last, unets[-1] for the last; returns the final
        latents (host). record_step0 gets "noise_pred_step0"."""
        try:
            return self._loop(unets, latents, constants, scheduler, guidance_scale, step_noise, progress,
                              record_step0)
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001 (onnxruntime's own error types, raised by a Run)
            raise BackendError(f"ONNX Runtime failed in the unCLIP loop: {ort_error_line(e)}") from None

    def _loop(self, unets, latents, constants, scheduler, guidance_scale, step_noise, progress, record_step0):
        cfg = guidance_scale is not None
        latents = np.ascontiguousarray(latents, F32)
        pred_channels = unets[0].spec.outputs[0].shape[1]
        learned = scheduler.variance_type == "learned_range"
        if learned and pred_channels != 2 * latents.shape[1]:
            raise BackendError(f"learned_range variance needs {2 * latents.shape[1]} UNet output channels, "
                               f"{unets[0].spec.name} gives {pred_channels}")
        kind = unclip_kind(cfg, learned)
        graph = unets[0].bundle.step_graph_path(kind) if kind else None
        if graph is None:
            raise BackendError(f"the bundle has no unCLIP step graph for this loop ({kind}); see unclip_device_loop")
        sessions = [u.session() for u in unets]
        infos = {}
        if hasattr(sessions[0], "get_input_memory_infos"):  # onnxruntime >= 1.23
            infos.update(zip([i.name for i in sessions[0].get_inputs()], sessions[0].get_input_memory_infos()))
            infos.update(zip([o.name for o in sessions[0].get_outputs()], sessions[0].get_output_memory_infos()))
        rows = 2 * latents.shape[0] if cfg else latents.shape[0]
        sample = self._alloc(infos, "sample", (rows, *latents.shape[1:]))
        timestep = self._alloc(infos, "timestep", (1,))
        pred = self._alloc(infos, "noise_pred", (rows, pred_channels, *latents.shape[2:]))
        bound = {}
        for name, value in constants.items():
            value = np.ascontiguousarray(value)
            bound[name] = self._alloc(infos, name, value.shape, value.dtype.type)
            bound[name].update_inplace(value)
        ios = []
        for session in sessions:
            io = session.io_binding()
            io.bind_ortvalue_input("sample", sample)
            io.bind_ortvalue_input("timestep", timestep)
            for name, value in bound.items():
                io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output("noise_pred", pred)
            ios.append(io)
        buffers = (self._alloc(infos, "sample", latents.shape), self._alloc(infos, "sample", latents.shape))
        buffers[0].update_inplace(latents)
        sample.update_inplace(np.concatenate([latents, latents]) if cfg else latents)
        noises = self._alloc(infos, "sample", step_noise.shape)
        noises.update_inplace(np.ascontiguousarray(step_noise, F32))
        params = self._alloc(infos, "sample", (len(UNCLIP_PARAMS),))
        log_params = self._alloc(infos, "sample", (len(LOG_PARAMS),), np.float64) if learned else None

        step = self._step_session(graph)
        step_io = step.io_binding()
        step_io.bind_ortvalue_input("noise_pred", pred)
        step_io.bind_ortvalue_input("step_noise", noises)
        step_io.bind_ortvalue_input("params", params)
        if learned:
            step_io.bind_ortvalue_input("log_params", log_params)
        step_io.bind_ortvalue_output("sample_next", sample)

        steps = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            last = i == steps - 1
            timestep.update_inplace(np.array([t], F32))
            sessions[-1 if last else 0].run_with_iobinding(ios[-1 if last else 0])
            if record_step0 is not None and i == 0:
                record_step0["noise_pred_step0"] = _host_copy(pred)
            k = scheduler.step_terms(int(t), scheduler.prev_timestep(i))
            params.update_inplace(unclip_params(k, guidance_scale, i))
            if learned:
                log_params.update_inplace(np.array([k.min_log, k.max_log], np.float64))
            step_io.bind_ortvalue_input("latents", buffers[i % 2])
            step_io.bind_ortvalue_output("latents_next", buffers[(i + 1) % 2])
            step.run_with_iobinding(step_io)
            if progress:
                progress(i + 1, steps)
        return _host_copy(buffers[steps % 2])
