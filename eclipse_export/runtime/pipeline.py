"""A loaded bundle ready to generate: the request type, the graphs loaded on a backend, and the
family's driver (runtime/chains/) that runs the chain. Torch-free; graphs run through whichever
backend the pipeline was given."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from eclipse_export.runtime.backends.base import Backend
from eclipse_export.runtime.bundle import Bundle, BundleError, open_bundle
from eclipse_export.runtime.chains import driver_for
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.request import Generation, GenerationError, Request  # noqa: F401 (public API)


def load_order(bundle: Bundle) -> list[str]:
    """Components, largest graph files first. Loading can take more memory than the loaded graph
    keeps (ONNX Runtime CPU holds an FP16 graph's weights in FP32 and converts them while loading:
    the full-size FP16 UNet peaks at 8.5 GiB and keeps 5.4), and that transient stacks on what is
    already resident; first, it stacks on nothing (full-size onnx-fp16 bundle: 11.6 -> 8.8 GiB)."""
    def size(name: str) -> int:
        try:
            return bundle.component_bytes(name)
        except (BundleError, KeyError, OSError):
            return 0  # the backend's load reports it

    return sorted(bundle.family.components, key=lambda name: -size(name))


class Pipeline:
    """Loaded graphs of one bundle + its family's driver (runtime/chains/). Immutable after
    loading: per-generation state lives in the driver's `run` locals, so one Pipeline can serve
    many calls."""

    def __init__(self, bundle: Bundle, backend: Backend, largest_first: bool = True):
        self.bundle = bundle
        self.backend = backend
        self.dims = bundle.dims
        self.family = bundle.family
        # the family's resources besides its graphs (tokenizer, scheduler config, ...), checked
        # before any graph is loaded
        self.chain = driver_for(self.family.name)(bundle)
        self.load_seconds = {}
        preflight = getattr(backend, "preflight", None)  # e.g. engines vs this GPU, before loading any
        if preflight:
            preflight(bundle)
        components = self.family.components
        loaded = {}
        # largest_first=False: the chain's order, as before issue 13 (benchmarks compare both)
        for name in (load_order(bundle) if largest_first else components):
            t0 = time.perf_counter()
            loaded[name] = backend.load(components[name], bundle)
            self.load_seconds[name] = time.perf_counter() - t0
        self.sessions = {name: loaded[name] for name in components}

    @classmethod
    def from_bundle(cls, path: str | Path, backend: Backend | None = None, verify_hashes: bool = True,
                    largest_first: bool = True) -> "Pipeline":
        """backend None: the one the bundle calls for (backend_for_bundle, as `eclipse-generate
        --backend auto`): TensorRT / TensorRT-RTX for an engine bundle, never its ONNX graphs on
        ONNX Runtime's CPU provider behind the caller's back; ONNX Runtime (CPU) otherwise."""
        bundle = open_bundle(path, verify_hashes=verify_hashes)
        if backend is None:
            from eclipse_export.runtime.backends.factory import backend_for_bundle, make_backend

            backend = make_backend(backend_for_bundle(bundle.manifest))
        return cls(bundle, backend, largest_first)

    # what the family's driver loaded, for callers that inspect a pipeline (bench, compare, C++ parity)
    @property
    def tokenizer(self):
        return self.chain.tokenizer

    @property
    def scheduler_config(self) -> dict:
        return self.chain.scheduler_config

    @property
    def negative_image_embeds(self) -> np.ndarray:
        return self.chain.negative_image_embeds

    def close(self) -> None:
        """Free the backend's graphs and device memory (TensorRT-RTX saves its runtime cache)."""
        close = getattr(self.backend, "close", None)
        if close:
            close()

    def make_scheduler(self, kind: str | None):
        return self.chain.make_scheduler(kind)

    def noises_for(self, req: Request) -> Noises:
        return self.chain.noises_for(req)

    # hooks the drivers call ----------------------------------------------------------------
    def stage_done(self, name: str) -> None:
        hook = getattr(self.backend, "stage_done", None)  # low-memory backends free the engine here
        if hook:
            hook(self.sessions[name])

    def device_loop(self, sched) -> bool:
        """Whether the backend runs the denoiser's loop on its device for this scheduler."""
        # backends with a device loop may still leave it off (ONNX Runtime on CPU: device_loop=False)
        if not hasattr(self.backend, "denoise") or not getattr(self.backend, "device_loop", True):
            return False
        try:
            sched.step_coefficients(int(sched.timesteps[0]))
        except (ValueError, AttributeError):
            return False  # a prediction type without a device step: host loop
        return True

    def backend_warnings(self) -> list[str]:
        drain = getattr(self.backend, "drain_warnings", None)
        return drain() if drain else []

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | None = None, height: int = 512,
                 width: int = 512, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
                 scheduler: str | None = None, noises: Noises | None = None, record: bool = False,
                 progress: Callable[[int, int], None] | None = None, subjects: Sequence | None = None,
                 control_image=None, canny_image=None) -> Generation:
        """subjects / control_image / canny_image: λ-ECLIPSE bundles only (see Request.make)."""
        req, warnings = Request.make(prompt, negative_prompt, height, width, steps, guidance_scale, seed, scheduler,
                                     subjects=subjects, control_image=control_image, canny_image=canny_image)
        return self.run(req, noises=noises, record=record, progress=progress, warnings=warnings)

    def run(self, req: Request, noises: Noises | None = None, record: bool = False,
            progress: Callable[[int, int], None] | None = None, warnings: list[str] | None = None) -> Generation:
        return self.chain.run(self, req, noises, record, progress, warnings)
