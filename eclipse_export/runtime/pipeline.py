"""The chain: tokenizer -> text encoder -> ECLIPSE prior -> UNet loop (CFG) -> MoVQ -> image.

Torch-free. The pipeline owns the order of operations and the host-side glue; graphs run
through whichever backend it was given, and the sampler only sees a denoiser callable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eclipse_export.families.kandinsky22.components import COMPONENTS
from eclipse_export.runtime import guidance
from eclipse_export.runtime.backends.base import Backend
from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
from eclipse_export.runtime.bundle import Bundle, BundleError, open_bundle
from eclipse_export.runtime.images import to_uint8
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.schedulers import (
    SchedulerConfigError,
    scheduler_from_config,
)
from eclipse_export.runtime.tokenizer import ClipTokenizer

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 64, 2048, 64


class GenerationError(ValueError):
    """Bad generation request (the message is meant for the user, one line)."""


@dataclass(frozen=True)
class Request:
    """A validated generation request. Validation happens here, once, before any work."""

    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 4.0
    seed: int = 0
    scheduler: str | None = None  # None: the bundle's scheduler class

    @staticmethod
    def make(prompt: str | Sequence[str], negative_prompt: str | None = None, height: int = 512,
             width: int = 512, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
             scheduler: str | None = None) -> tuple["Request", list[str]]:
        """Returns the request and warnings for the user."""
        warnings = []
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        if not prompts:
            raise GenerationError("no prompt given")
        if not all(isinstance(p, str) for p in prompts):
            raise GenerationError("prompts must be strings")
        if any(not p.strip() for p in prompts):
            # as the official ECLIPSE pipeline: an empty prompt is unconditional generation
            warnings.append("the prompt is empty: generating without text conditioning")
        # None and "" differ, as in the official ECLIPSE code (KandinskyPriorPipeline): None uses
        # the CLIP image embedding of a zeros image (the bundle's negative_image_embeds.npy); any
        # string, "" included, is run through the prior like the prompt.
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise GenerationError(f"the negative prompt must be a string or None, got {type(negative_prompt).__name__}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise GenerationError(f"{name} must be an integer, got {value!r}")
            if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
                raise GenerationError(
                    f"{name} {value} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}"
                )
        if not isinstance(steps, int) or steps < 1:
            raise GenerationError(f"steps must be a whole number >= 1, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise GenerationError(f"guidance scale must be a finite number, got {guidance_scale!r}")
        if guidance_scale < 1:
            warnings.append(f"guidance scale {guidance_scale} < 1 means no classifier-free guidance (same as 1)")
        if negative_prompt is not None and guidance_scale <= 1:
            warnings.append("the negative prompt has no effect without classifier-free guidance (guidance <= 1)")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise GenerationError(f"seed must be an integer in 0..2^64-1, got {seed!r}")
        req = Request(prompts, negative_prompt, height, width, steps, float(guidance_scale), seed, scheduler)
        return req, warnings

    @property
    def batch(self) -> int:
        return len(self.prompts)


@dataclass
class Generation:
    images: np.ndarray  # (B,H,W,3) uint8
    request: Request
    noises: Noises
    timings: dict[str, float]  # seconds per stage, and "total"
    warnings: list[str] = field(default_factory=list)
    # Stage outputs by name (see Pipeline.generate); filled when record=True.
    intermediates: dict[str, np.ndarray] = field(default_factory=dict)


def _load_tokenizer(bundle: Bundle) -> ClipTokenizer:
    config = "tokenizer/tokenizer_config.json"
    try:
        return ClipTokenizer.from_files(bundle.path("tokenizer/tokenizer.json"),
                                        bundle.path(config) if bundle.has(config) else None)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed tokenizer.json
        raise BundleError(f"{bundle.root}: the tokenizer files cannot be used ({e})") from None


def _load_negative(bundle: Bundle) -> np.ndarray:
    rel = "negative_image_embeds.npy"
    try:
        value = np.load(bundle.path(rel), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle.root / rel} is unreadable ({e})") from None
    want = (1, bundle.dims["D"])
    if value.shape != want or value.dtype.kind != "f" or not np.isfinite(value).all():
        raise BundleError(f"{bundle.root / rel} holds {value.dtype} {value.shape}, expected finite float {want}")
    return value.astype(np.float32)


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

    return sorted(COMPONENTS, key=lambda name: -size(name))


class Pipeline:
    """Loaded graphs + tokenizer + scheduler config of one bundle. Immutable after loading:
    per-generation state lives in `generate`'s locals, so one Pipeline can serve many calls."""

    def __init__(self, bundle: Bundle, backend: Backend, largest_first: bool = True):
        self.bundle = bundle
        self.backend = backend
        self.dims = bundle.dims
        self.tokenizer = _load_tokenizer(bundle)
        self.scheduler_config = bundle.json("scheduler_config.json")
        try:  # refuse a config this runtime cannot follow now, not at the first generation
            scheduler_from_config(self.scheduler_config)
        except (SchedulerConfigError, ValueError, TypeError, KeyError) as e:
            raise BundleError(f"{bundle.root}: scheduler_config.json cannot be used ({e})") from None
        self.negative_image_embeds = _load_negative(bundle)
        self.load_seconds = {}
        preflight = getattr(backend, "preflight", None)  # e.g. engines vs this GPU, before loading any
        if preflight:
            preflight(bundle)
        loaded = {}
        # largest_first=False: the chain's order, as before issue 13 (benchmarks compare both)
        for name in (load_order(bundle) if largest_first else COMPONENTS):
            t0 = time.perf_counter()
            loaded[name] = backend.load(COMPONENTS[name], bundle)
            self.load_seconds[name] = time.perf_counter() - t0
        self.sessions = {name: loaded[name] for name in COMPONENTS}

    @classmethod
    def from_bundle(cls, path: str | Path, backend: Backend | None = None, verify_hashes: bool = True,
                    largest_first: bool = True) -> "Pipeline":
        return cls(open_bundle(path, verify_hashes=verify_hashes), backend or OnnxRuntimeBackend(), largest_first)

    def close(self) -> None:
        """Free the backend's graphs and device memory (TensorRT-RTX saves its runtime cache)."""
        close = getattr(self.backend, "close", None)
        if close:
            close()

    def make_scheduler(self, kind: str | None):
        return scheduler_from_config(self.scheduler_config, kind)

    def noises_for(self, req: Request) -> Noises:
        scheduler = self.make_scheduler(req.scheduler)
        return Noises.draw(req.seed, self._prior_batch(req), self.dims["D"], self._latent_shape(req),
                           req.steps, scheduler.needs_noise)

    def _prior_batch(self, req: Request) -> int:
        return 2 * req.batch if req.negative_prompt is not None else req.batch

    def _latent_shape(self, req: Request) -> tuple[int, int, int, int]:
        s = self.dims["S"]
        return (req.batch, self.dims["C"], req.height // s, req.width // s)

    def _stage_done(self, name: str) -> None:
        hook = getattr(self.backend, "stage_done", None)  # low-memory backends free the engine here
        if hook:
            hook(self.sessions[name])

    def _device_loop(self, sched) -> bool:
        # backends with a device loop may still leave it off (ONNX Runtime on CPU: device_loop=False)
        if not hasattr(self.backend, "denoise") or not getattr(self.backend, "device_loop", True):
            return False
        try:
            sched.step_coefficients(int(sched.timesteps[0]))
        except (ValueError, AttributeError):
            return False  # a prediction type without a device step: host loop
        return True

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | None = None, height: int = 512,
                 width: int = 512, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
                 scheduler: str | None = None, noises: Noises | None = None, record: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Generation:
        req, warnings = Request.make(prompt, negative_prompt, height, width, steps, guidance_scale, seed, scheduler)
        return self.run(req, noises=noises, record=record, progress=progress, warnings=warnings)

    def run(self, req: Request, noises: Noises | None = None, record: bool = False,
            progress: Callable[[int, int], None] | None = None, warnings: list[str] | None = None) -> Generation:
        warnings = list(warnings or [])
        sched = self.make_scheduler(req.scheduler)
        try:
            sched.set_timesteps(req.steps)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        latent_shape = self._latent_shape(req)
        if noises is None:
            noises = self.noises_for(req)
        else:
            noises.check(self._prior_batch(req), self.dims["D"], latent_shape, req.steps, sched.needs_noise)
        timings: dict[str, float] = {}
        inter: dict[str, np.ndarray] = {}
        t_start = time.perf_counter()

        # 1. tokens: prompts, then the negative prompt once per image (it shares the batch)
        texts = list(req.prompts) + ([req.negative_prompt] * req.batch if req.negative_prompt is not None else [])
        tokens = self.tokenizer(texts)
        for text, cut in zip(texts, tokens.truncated):
            if cut:
                warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {text[:60]!r}...")

        # 2. text encoder
        t0 = time.perf_counter()
        text = self.sessions["text_encoder"].run({"input_ids": tokens.input_ids})
        timings["text_encoder"] = time.perf_counter() - t0
        self._stage_done("text_encoder")

        # 3. prior: one forward pass, noise in the hidden_states slot
        t0 = time.perf_counter()
        prior_out = self.sessions["prior"].run({
            "noise": noises.prior,
            "text_embeds": text["text_embeds"],
            "text_hidden_states": text["text_hidden_states"],
            "attention_mask": tokens.attention_mask,
        })
        timings["prior"] = time.perf_counter() - t0
        self._stage_done("prior")
        embeds = prior_out["image_embeds"]
        if req.negative_prompt is not None:
            image_embeds, negative_embeds = embeds[: req.batch], embeds[req.batch:]
        else:
            image_embeds = embeds
            negative_embeds = np.repeat(self.negative_image_embeds, req.batch, axis=0)

        # 4. UNet loop
        use_cfg = guidance.cfg_enabled(req.guidance_scale)
        unet_embeds = np.concatenate([negative_embeds, image_embeds]) if use_cfg else image_embeds
        latents = (noises.latents * np.float32(sched.init_noise_sigma)).astype(np.float32)
        unet = self.sessions["unet"]
        t0 = time.perf_counter()
        if self._device_loop(sched):
            # the backend keeps latents on the device for the whole loop (fused CFG + step kernel)
            latents = self.backend.denoise(unet, latents, unet_embeds, sched, req.guidance_scale if use_cfg else None,
                                           noises.steps if sched.needs_noise else None, progress,
                                           inter if record else None)
        else:
            for i, t in enumerate(sched.timesteps):
                sample = guidance.cfg_batch(latents) if use_cfg else latents
                eps = unet.run({"sample": sample, "timestep": np.array([t], dtype=np.float32),
                                "image_embeds": unet_embeds})["noise_pred"]
                if record and i == 0:
                    inter["unet.noise_pred_step0"] = eps
                if use_cfg:
                    eps = guidance.combine(eps, req.guidance_scale)
                latents = sched.step(eps, int(t), latents, noise=noises.steps[i] if sched.needs_noise else None)
                if progress:
                    progress(i + 1, len(sched.timesteps))
        self._stage_done("unet")
        drain = getattr(self.backend, "drain_warnings", None)  # e.g. a CUDA graph that could not be captured
        if drain:
            warnings += drain()
        timings["unet"] = time.perf_counter() - t0
        timings["unet_per_step"] = timings["unet"] / len(sched.timesteps)

        # 5. MoVQ decode (post-processing is inside the graph)
        t0 = time.perf_counter()
        image = self.sessions["movq"].run({"latents": latents})["image"]
        if image.shape != (req.batch, req.height, req.width, 3):  # dims.S disagrees with the MoVQ graph
            raise BundleError(f"{self.bundle.root}: the movq graph returned images of shape {image.shape} for "
                              f"{req.height}x{req.width}; the manifest's dims do not match its graphs")
        timings["movq"] = time.perf_counter() - t0
        self._stage_done("movq")
        timings["total"] = time.perf_counter() - t_start

        if record:
            inter.update({
                "text_encoder.text_embeds": text["text_embeds"],
                "text_encoder.text_hidden_states": text["text_hidden_states"],
                "prior.image_embeds": image_embeds,
                "prior.negative_image_embeds": negative_embeds,
                "unet.latents": latents,
                "movq.image": image,
            })
        return Generation(to_uint8(image), req, noises, timings, warnings, inter)
