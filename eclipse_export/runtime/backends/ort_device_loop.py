"""The UNet loop on ONNX Runtime's device: the latents stay where the UNet runs.

Per step, on the device:  UNet(sample, timestep, image_embeds) -> noise_pred, then the guided
step graph (export/step_graph.py, a file of the bundle) (noise_pred, latents, all steps' noises, params) ->
next latents + next UNet sample. Every tensor is an OrtValue bound with IO binding; nothing the
loop computes comes back to the host until the final latents.

What crosses host -> device per step: the timestep (4 bytes) and the step's 9 parameters
(36 bytes), written with `OrtValue.update_inplace` into fixed buffers (the scalars a CUDA kernel
would receive as launch arguments). Once per generation: the image embeddings, the initial
latents and every step's variance noise. Device -> host: the final latents (and the step-0 noise
prediction when recording for parity). The host only synchronises where ONNX Runtime's Run does.

CUDA graphs (GPU providers, cuda_graphs=True): the UNet session is specialised to the request's
shapes (free dimensions fixed, so shape computations fold away and every node can sit on the
GPU) and created with the provider's graph option; its inputs and outputs keep fixed addresses
for the whole loop and across generations of the same shape, which graph replay requires. The
step graph alternates between two latents buffers (it cannot read and write one), so it runs
without a graph: ~15 element-wise kernels next to a UNet. A specialisation that ONNX Runtime
refuses falls back to the dynamic session, with a note in the backend's describe().

On ONNX Runtime's CPU provider the same code runs (IO binding on CPU memory); CI holds it to the
host loop there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export.runtime.backends.base import BackendError
from eclipse_export.runtime.backends.ort_errors import ort_error_line
from eclipse_export.runtime.schedulers import StepCoefficients

if TYPE_CHECKING:  # the ORT backend creates this loop; only its types are needed here
    from eclipse_export.runtime.backends.onnxruntime import (
        OnnxRuntimeBackend,
        OrtSession,
    )

F32 = np.float32

# The step graph's `params` input, in order (export/step_graph.py builds the graph that reads it).
PARAMS = ("scale", "a", "b", "clip", "c_x0", "c_x", "c_eps", "std", "noise_index")


def step_params(k: StepCoefficients, guidance_scale: float | None, noise_index: int) -> np.ndarray:
    """The `params` input of one step (guidance_scale None: no CFG, the graph ignores it)."""
    return np.array([guidance_scale or 1.0, *k.astuple(), noise_index], dtype=np.float32)


@dataclass
class _Buffers:
    """Fixed-address device tensors of one request shape (kept across generations)."""

    key: tuple
    session: object  # the UNet session the binding belongs to
    sample: object
    timestep: object
    image_embeds: object
    noise_pred: object
    latents: tuple  # two, alternating: the step graph reads one and writes the other
    params: object
    unet_io: object
    infos: dict


class OrtDeviceLoop:
    def __init__(self, backend: OnnxRuntimeBackend):
        self.backend = backend
        self.ort = backend._ort
        self._step_sessions: dict[str, object] = {}  # by step graph file
        self._buffers: _Buffers | None = None
        self.graph_fallback: str | None = None

    # sessions ----------------------------------------------------------------------------
    def _step_session(self, graph):
        key = str(graph)
        if key not in self._step_sessions:
            ort, b = self.ort, self.backend
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            providers = b.providers
            if b.on_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
                # the CUDA EP runs element-wise graphs as they are; a TensorRT EP would build an engine
                providers = ["CUDAExecutionProvider"]
            elif "tensorrt-rtx" in b.short_providers:
                opts.add_provider_for_devices(b._rtx_devices, {})
                providers = None
            options = [{"device_id": str(b.device_id)}] if providers == ["CUDAExecutionProvider"] else None
            try:
                self._step_sessions[key] = ort.InferenceSession(key, opts, providers=providers,
                                                                provider_options=options, enable_fallback=0)
            except Exception as e:
                raise BackendError(f"ONNX Runtime could not create the guided-step graph: {ort_error_line(e)}") from None
        return self._step_sessions[key]

    def _unet_session(self, unet: OrtSession, shapes: dict):
        b = self.backend
        if not b.cuda_graphs or self.graph_fallback:
            return unet.session()
        try:
            return unet.session(shapes)
        except BackendError as e:
            # e.g. a provider that cannot place every node on the GPU refuses graph capture
            self.graph_fallback = f"UNet CUDA graph not used ({e}); running the dynamic session"
            b.notes.append(self.graph_fallback)
            return unet.session()

    # buffers -----------------------------------------------------------------------------
    def _alloc(self, infos: dict, name: str, shape, dtype=F32):
        """An OrtValue where the UNet session wants this input/output: host memory for one it
        reads on the host, else the backend's device. Plugin providers (TensorRT-RTX) allocate
        through their own memory info (ONNX Runtime keeps a shared allocator only for those)."""
        ort, b = self.ort, self.backend
        info = infos.get(name)
        device = "cuda" if b.on_gpu else "cpu"
        if info is not None and "cpu" in str(getattr(info, "name", "")).lower():
            device = "cpu"
        elif info is not None and "tensorrt-rtx" in b.short_providers:
            try:
                return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, memory_info=info)
            except (TypeError, RuntimeError):
                pass
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, b.device_id)

    def _buffers_for(self, session, key: tuple, shapes: dict, latent_shape: tuple) -> _Buffers:
        if self._buffers is not None and self._buffers.key == key and self._buffers.session is session:
            return self._buffers
        self._buffers = None  # free the old shape's buffers first
        io_types = {t.name: t.type for t in [*session.get_inputs(), *session.get_outputs()]}
        wrong = {n: t for n, t in io_types.items() if t != "tensor(float)"}
        if wrong:
            raise BackendError(f"the device loop expects float32 UNet I/O (the FP16 graphs keep it), got {wrong}")
        infos = {}
        if hasattr(session, "get_input_memory_infos"):  # onnxruntime >= 1.23
            infos.update(zip([i.name for i in session.get_inputs()], session.get_input_memory_infos()))
            infos.update(zip([o.name for o in session.get_outputs()], session.get_output_memory_infos()))
        pred_shape = (shapes["sample"][0],) + latent_shape[1:]
        buf = _Buffers(
            key=key,
            session=session,
            sample=self._alloc(infos, "sample", shapes["sample"]),
            timestep=self._alloc(infos, "timestep", shapes["timestep"]),
            image_embeds=self._alloc(infos, "image_embeds", shapes["image_embeds"]),
            noise_pred=self._alloc(infos, "noise_pred", pred_shape),
            latents=(self._alloc(infos, "sample", latent_shape), self._alloc(infos, "sample", latent_shape)),
            params=self._alloc(infos, "sample", (9,)),
            unet_io=session.io_binding(),
            infos=infos,
        )
        for name in ("sample", "timestep", "image_embeds"):
            buf.unet_io.bind_ortvalue_input(name, getattr(buf, name))
        buf.unet_io.bind_ortvalue_output("noise_pred", buf.noise_pred)
        self._buffers = buf
        return buf

    # the loop ----------------------------------------------------------------------------
    def denoise(self, unet: OrtSession, latents: np.ndarray, image_embeds: np.ndarray, scheduler,
                guidance_scale: float | None, step_noise: np.ndarray | None, progress=None,
                record_step0: dict | None = None) -> np.ndarray:
        args = (unet, latents, image_embeds, scheduler, guidance_scale, step_noise, progress, record_step0)
        try:
            return self._denoise(*args)
        except BackendError:
            raise
        except Exception as e:  # onnxruntime's own error types, raised by a Run
            if unet.static_shapes is not None and self.backend.cuda_graphs and not self.graph_fallback:
                # graph capture happens inside a Run: where it fails, the loop starts again on the
                # dynamic session (every input is still on the host), with a note
                self.graph_fallback = f"UNet CUDA graph failed ({ort_error_line(e)}); running the dynamic session"
                self.backend.notes.append(self.graph_fallback)
                self._buffers = None
                return self._denoise(*args)
            raise BackendError(f"ONNX Runtime failed in the UNet loop: {ort_error_line(e)}") from None

    def _denoise(self, unet: OrtSession, latents: np.ndarray, image_embeds: np.ndarray, scheduler,
                 guidance_scale: float | None, step_noise: np.ndarray | None, progress=None,
                 record_step0: dict | None = None) -> np.ndarray:
        cfg = guidance_scale is not None
        latents = np.ascontiguousarray(latents, F32)
        sample0 = np.concatenate([latents, latents]) if cfg else latents
        shapes = {"sample": sample0.shape, "timestep": (1,), "image_embeds": tuple(image_embeds.shape)}
        key = (tuple(sorted(shapes.items())), latents.shape, cfg)
        if self._buffers is not None and self._buffers.key != key:
            # another shape: let go of the old binding (it holds the old UNet session) before the
            # new session is made, so two UNets are never on the device together
            self._buffers = None
        session = self._unet_session(unet, shapes)
        buf = self._buffers_for(session, key, shapes, latents.shape)
        # the bundle's own hash-verified step graph (the backend runs the loop on the host for a
        # bundle that has none, see OnnxRuntimeBackend.load)
        step = self._step_session(unet.bundle.step_graph_path("cfg" if cfg else "plain"))

        buf.image_embeds.update_inplace(np.ascontiguousarray(image_embeds, F32))
        buf.sample.update_inplace(sample0)
        buf.latents[0].update_inplace(latents)
        # every step's variance noise, uploaded once (DDIM: one zero slice, multiplied by std 0)
        noises = np.ascontiguousarray(step_noise if step_noise is not None else np.zeros((1, *latents.shape)), F32)
        noise_dev = self._alloc(buf.infos, "sample", noises.shape)
        noise_dev.update_inplace(noises)
        step_io = step.io_binding()
        step_io.bind_ortvalue_input("noise_pred", buf.noise_pred)
        step_io.bind_ortvalue_input("step_noise", noise_dev)
        step_io.bind_ortvalue_input("params", buf.params)
        step_io.bind_ortvalue_output("sample_next", buf.sample)

        steps = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            buf.timestep.update_inplace(np.array([t], F32))
            session.run_with_iobinding(buf.unet_io)
            if record_step0 is not None and i == 0:
                record_step0["unet.noise_pred_step0"] = _host_copy(buf.noise_pred)
            k = scheduler.step_coefficients(int(t))
            buf.params.update_inplace(step_params(k, guidance_scale, i if step_noise is not None else 0))
            step_io.bind_ortvalue_input("latents", buf.latents[i % 2])
            step_io.bind_ortvalue_output("latents_next", buf.latents[(i + 1) % 2])
            step.run_with_iobinding(step_io)
            if progress:
                progress(i + 1, steps)
        return _host_copy(buf.latents[steps % 2])


def _host_copy(value) -> np.ndarray:
    # OrtValue.numpy() of host memory is a view of the buffer, which the next step overwrites
    return np.array(value.numpy(), copy=True)
