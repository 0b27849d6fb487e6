"""ECLIPSE + Kandinsky 2.2 (families/kandinsky22): tokenizer -> text encoder -> ECLIPSE prior
(one pass, noise in its hidden_states slot) -> UNet loop with classifier-free guidance -> MoVQ ->
image. The graphs are fed as the family's chain says (Stage.inputs); what is here is the glue the
chain cannot say: the negative prompt sharing the prior's batch, the zero-image negative
embedding, the CFG batch and the sampler loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export.families.chain import Stage
from eclipse_export.runtime import guidance
from eclipse_export.runtime.bundle import Bundle, BundleError
from eclipse_export.runtime.images import to_uint8
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.request import Generation, GenerationError, Request
from eclipse_export.runtime.schedulers import SchedulerConfigError, scheduler_from_config
from eclipse_export.runtime.tokenizer import ClipTokenizer

if TYPE_CHECKING:  # the pipeline creates its driver and passes itself in
    from eclipse_export.runtime.pipeline import Pipeline


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



class Kandinsky22Chain:
    """Resources of a Kandinsky 2.2 bundle besides its graphs (tokenizer, scheduler config,
    zero-image embedding), loaded and checked once; `run` is one request through the chain."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.family = bundle.family
        self.dims = bundle.dims
        self.stages = {s.component: s for s in self.family.chain}
        self.tokenizer = _load_tokenizer(bundle)
        self.scheduler_config = bundle.json("scheduler_config.json")
        try:  # refuse a config this runtime cannot follow now, not at the first generation
            scheduler_from_config(self.scheduler_config)
        except (SchedulerConfigError, ValueError, TypeError, KeyError) as e:
            raise BundleError(f"{bundle.root}: scheduler_config.json cannot be used ({e})") from None
        self.negative_image_embeds = _load_negative(bundle)

    def make_scheduler(self, kind: str | None):
        return scheduler_from_config(self.scheduler_config, kind)

    def prior_batch(self, req: Request) -> int:
        return 2 * req.batch if req.negative_prompt is not None else req.batch

    def latent_shape(self, req: Request) -> tuple[int, int, int, int]:
        s = self.dims["S"]
        return (req.batch, self.dims["C"], req.height // s, req.width // s)

    def noises_for(self, req: Request) -> Noises:
        scheduler = self.make_scheduler(req.scheduler)
        return Noises.draw(req.seed, self.prior_batch(req), self.dims["D"], self.latent_shape(req),
                           req.steps, scheduler.needs_noise)

    def _call(self, pipe: Pipeline, stage: Stage, values: dict, timings: dict) -> None:
        """Run one stage on the values the chain names; its outputs join `values` as
        "component.output"."""
        t0 = time.perf_counter()
        out = pipe.sessions[stage.component].run({name: values[src] for name, src in stage.inputs.items()})
        timings[stage.component] = time.perf_counter() - t0
        values.update({f"{stage.component}.{k}": v for k, v in out.items()})
        pipe.stage_done(stage.component)

    def denoise_and_decode(self, pipe: Pipeline, req: Request, sched, noises: Noises, values: dict, timings: dict,
                           inter: dict, record: bool, progress, warnings: list[str]) -> np.ndarray:
        """The UNet loop on values["loop.image_embeds"] ([negative; positive] under CFG), then
        MoVQ: the (B,H,W,3) float image. Sets values["loop.latents"]."""
        unet_stage, movq = self.stages["unet"], self.stages["movq"]
        use_cfg = guidance.cfg_enabled(req.guidance_scale)
        latents = (noises.latents * np.float32(sched.init_noise_sigma)).astype(np.float32)
        unet = pipe.sessions[unet_stage.component]
        (eps_name,) = self.family.components[unet_stage.component].output_names
        t0 = time.perf_counter()
        if pipe.device_loop(sched):
            # the backend keeps latents on the device for the whole loop (fused CFG + step kernel)
            latents = pipe.backend.denoise(unet, latents, values["loop.image_embeds"], sched,
                                           req.guidance_scale if use_cfg else None,
                                           noises.steps if sched.needs_noise else None, progress,
                                           inter if record else None)
        else:
            for i, t in enumerate(sched.timesteps):
                values["loop.sample"] = guidance.cfg_batch(latents) if use_cfg else latents
                values["loop.timestep"] = np.array([t], dtype=np.float32)
                eps = unet.run({name: values[src] for name, src in unet_stage.inputs.items()})[eps_name]
                if record and i == 0:
                    inter[f"{unet_stage.component}.{eps_name}_step0"] = eps
                if use_cfg:
                    eps = guidance.combine(eps, req.guidance_scale)
                latents = sched.step(eps, int(t), latents, noise=noises.steps[i] if sched.needs_noise else None)
                if progress:
                    progress(i + 1, len(sched.timesteps))
        pipe.stage_done(unet_stage.component)
        warnings += pipe.backend_warnings()  # e.g. a CUDA graph that could not be captured
        timings[unet_stage.component] = time.perf_counter() - t0
        timings["unet_per_step"] = timings[unet_stage.component] / len(sched.timesteps)
        values["loop.latents"] = latents

        # 5. MoVQ decode (post-processing is inside the graph)
        self._call(pipe, movq, values, timings)
        image = values["movq.image"]
        if image.shape != (req.batch, req.height, req.width, 3):  # dims.S disagrees with the MoVQ graph
            raise BundleError(f"{self.bundle.root}: the movq graph returned images of shape {image.shape} for "
                              f"{req.height}x{req.width}; the manifest's dims do not match its graphs")
        return image

    def run(self, pipe: Pipeline, req: Request, noises: Noises | None = None, record: bool = False,
            progress: Callable[[int, int], None] | None = None, warnings: list[str] | None = None) -> Generation:
        if req.subjects or req.control is not None:
            raise GenerationError(f"this bundle is plain ECLIPSE ({self.family.title}): it takes no subject or control "
                                  "images; export a λ-ECLIPSE bundle (eclipse-export --preset lambda) for those")
        warnings = list(warnings or [])
        sched = self.make_scheduler(req.scheduler)
        try:
            sched.set_timesteps(req.steps)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        latent_shape = self.latent_shape(req)
        if noises is None:
            noises = self.noises_for(req)
        else:
            noises.check(self.prior_batch(req), self.dims["D"], latent_shape, req.steps, sched.needs_noise)
        timings: dict[str, float] = {}
        inter: dict[str, np.ndarray] = {}
        t_start = time.perf_counter()
        text_encoder, prior = self.stages["text_encoder"], self.stages["prior"]

        # 1. tokens: prompts, then the negative prompt once per image (it shares the batch)
        texts = list(req.prompts) + ([req.negative_prompt] * req.batch if req.negative_prompt is not None else [])
        tokens = self.tokenizer(texts)
        for text, cut in zip(texts, tokens.truncated):
            if cut:
                warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {text[:60]!r}...")
        values = {"tokens.input_ids": tokens.input_ids, "tokens.attention_mask": tokens.attention_mask,
                  "noise.prior": noises.prior}

        # 2. text encoder, 3. prior: one forward pass, noise in the hidden_states slot
        self._call(pipe, text_encoder, values, timings)
        self._call(pipe, prior, values, timings)
        embeds = values["prior.image_embeds"]
        if req.negative_prompt is not None:
            image_embeds, negative_embeds = embeds[: req.batch], embeds[req.batch:]
        else:
            image_embeds = embeds
            negative_embeds = np.repeat(self.negative_image_embeds, req.batch, axis=0)

        # 4. the UNet loop, 5. MoVQ
        values["loop.image_embeds"] = (np.concatenate([negative_embeds, image_embeds])
                                       if guidance.cfg_enabled(req.guidance_scale) else image_embeds)
        image = self.denoise_and_decode(pipe, req, sched, noises, values, timings, inter, record, progress, warnings)
        timings["total"] = time.perf_counter() - t_start

        if record:
            inter.update({
                "text_encoder.text_embeds": values["text_encoder.text_embeds"],
                "text_encoder.text_hidden_states": values["text_encoder.text_hidden_states"],
                "prior.image_embeds": image_embeds,
                "prior.negative_image_embeds": negative_embeds,
                "unet.latents": values["loop.latents"],
                "movq.image": image,
            })
        return Generation(to_uint8(image), req, noises, timings, warnings, inter)
