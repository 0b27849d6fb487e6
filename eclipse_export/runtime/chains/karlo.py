"""ECLIPSE + Karlo (families/karlo): tokenizer -> text encoder -> ECLIPSE prior (one pass on
noise) -> text_proj on the guidance batch ["", prompt] -> 64 px decoder loop (UnCLIP scheduler,
learned variance; guidance on the 3 noise channels, the variance taken from the conditional
half) -> clamp -> antialiased bicubic upsample to the super-resolution size -> super-resolution
loop (super_res_first for every step but the last, super_res_last for the last) -> image
x * 0.5 + 0.5 clamped. As diffusers' UnCLIPPipeline with the ECLIPSE prior in place of its
diffusion prior.

The text encoder runs once, on the guidance batch: its conditional half is what the prior gets
(rows are independent, so this equals the ECLIPSE pipeline's separate prior call on the
prompts) and the whole batch feeds text_proj. Both loops run on the backend's device where it
has one for them (`unclip_device_loop`: ONNX Runtime with the bundle's unCLIP step graphs, the
TensorRT backends with the unclip_step kernel), else on the host. Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from eclipse_export.families.karlo.presets import PIPELINE_DEFAULTS
from eclipse_export.runtime import guidance
from eclipse_export.runtime.bundle import Bundle, BundleError
from eclipse_export.runtime.chains.kandinsky22 import _load_tokenizer
from eclipse_export.runtime.images import to_uint8
from eclipse_export.runtime.noise import (
    STREAM_LATENTS,
    STREAM_PRIOR,
    STREAM_SR_LATENTS,
    STREAM_SR_STEPS,
    STREAM_STEPS,
    standard_normal,
)
from eclipse_export.runtime.request import Generation, GenerationError, Request
from eclipse_export.runtime.resample import resize_bicubic_aa
from eclipse_export.runtime.schedulers import SchedulerConfigError
from eclipse_export.runtime.unclip_scheduler import UnCLIPScheduler, unclip_scheduler_from_config

if TYPE_CHECKING:
    from eclipse_export.runtime.pipeline import Pipeline

CHANNELS = 3  # RGB: the decoder and the super-resolution UNets work in image space


@dataclass(frozen=True)
class KarloNoises:
    """All randomness of one Karlo generation (runtime/noise.py streams 0-4)."""

    prior: np.ndarray  # (B, D)
    latents: np.ndarray  # (B, 3, P, P): the decoder's initial noise
    steps: np.ndarray  # (decoder steps, B, 3, P, P): its variance noises (the last step adds none)
    sr_latents: np.ndarray  # (B, 3, Q, Q)
    sr_steps: np.ndarray  # (super-resolution steps, B, 3, Q, Q)

    @staticmethod
    def shapes(batch: int, dims: dict, steps: int, sr_steps: int) -> dict[str, tuple[int, ...]]:
        p, q = dims["P"], dims["Q"]
        return {"prior": (batch, dims["D"]), "latents": (batch, CHANNELS, p, p),
                "steps": (steps, batch, CHANNELS, p, p), "sr_latents": (batch, CHANNELS, q, q),
                "sr_steps": (sr_steps, batch, CHANNELS, q, q)}

    @classmethod
    def draw(cls, seed: int, batch: int, dims: dict, steps: int, sr_steps: int) -> KarloNoises:
        streams = {"prior": STREAM_PRIOR, "latents": STREAM_LATENTS, "steps": STREAM_STEPS,
                   "sr_latents": STREAM_SR_LATENTS, "sr_steps": STREAM_SR_STEPS}
        shapes = cls.shapes(batch, dims, steps, sr_steps)
        return cls(**{k: standard_normal(seed, streams[k], shapes[k]) for k in streams})

    def check(self, batch: int, dims: dict, steps: int, sr_steps: int) -> None:
        problems = [f"{k} {getattr(self, k).shape} != {v}" for k, v in self.shapes(batch, dims, steps, sr_steps).items()
                    if getattr(self, k) is None or getattr(self, k).shape != v]
        if problems:
            raise ValueError("injected noises do not fit: " + "; ".join(problems))


class KarloChain:
    """Resources of a Karlo bundle besides its graphs (tokenizer, the two scheduler configs),
    loaded and checked once; `run` is one request through the chain."""

    # the UnCLIPPipeline's defaults (its call signature; the checkpoint's pipeline uses them)
    default_steps = PIPELINE_DEFAULTS["decoder_steps"]
    default_guidance = PIPELINE_DEFAULTS["guidance_scale"]
    super_res_steps = PIPELINE_DEFAULTS["super_res_steps"]

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.family = bundle.family
        self.dims = bundle.dims
        self.stages = {s.component: s for s in self.family.chain}
        self.tokenizer = _load_tokenizer(bundle)
        self.scheduler_configs = {}
        for name in ("decoder_scheduler_config.json", "super_res_scheduler_config.json"):
            config = bundle.json(name)
            try:
                unclip_scheduler_from_config(config)
            except (SchedulerConfigError, ValueError, TypeError, KeyError) as e:
                raise BundleError(f"{bundle.root}: {name} cannot be used ({e})") from None
            self.scheduler_configs[name.split("_scheduler")[0]] = config
        self.scheduler_config = self.scheduler_configs["decoder"]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.dims["Q"], self.dims["Q"])

    @classmethod
    def request_defaults(cls, bundle: Bundle) -> dict:
        """What a request leaves out (eclipse-generate's defaults): the bundle's image size (its
        super-resolution UNets'), the pipeline's decoder steps and guidance."""
        q = bundle.dims["Q"]
        return {"height": q, "width": q, "steps": cls.default_steps, "guidance_scale": cls.default_guidance}

    def make_scheduler(self, kind: str | None = None, which: str = "decoder") -> UnCLIPScheduler:
        if kind not in (None, "unclip"):
            raise GenerationError(f"Karlo bundles sample with the unCLIP scheduler only, not {kind!r}")
        return unclip_scheduler_from_config(self.scheduler_configs[which])

    def _check_request(self, req: Request) -> None:
        if req.subjects or req.control is not None:  # the words of Kandinsky22Chain.run (and the C library's)
            raise GenerationError(f"this bundle is plain ECLIPSE ({self.family.title}): it takes no subject or control "
                                  "images; export a λ-ECLIPSE bundle (eclipse-export --preset lambda) for those")
        if req.negative_prompt is not None:
            raise GenerationError("Karlo bundles take no negative prompt (the unconditional half is the empty "
                                  "prompt with text_proj's learned embedding)")
        if (req.height, req.width) != self.image_size:
            h, w = self.image_size
            raise GenerationError(f"this Karlo bundle generates {h}x{w} images (its super-resolution UNets' size), "
                                  f"not {req.height}x{req.width}")
        self.make_scheduler(req.scheduler)

    def noises_for(self, req: Request) -> KarloNoises:
        return KarloNoises.draw(req.seed, req.batch, self.dims, req.steps, self.super_res_steps)

    def _call(self, pipe: Pipeline, name: str, values: dict, timings: dict) -> None:
        stage = self.stages[name]
        t0 = time.perf_counter()
        out = pipe.sessions[name].run({k: values[src] for k, src in stage.inputs.items()})
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        values.update({f"{name}.{k}": v for k, v in out.items()})

    # device loops (ONNX Runtime with the bundle's unCLIP step graphs, TensorRT's unclip_step kernel)
    def _on_device(self, pipe: Pipeline, sched: UnCLIPScheduler, cfg: bool) -> bool:
        check = getattr(pipe.backend, "unclip_device_loop", None)
        if check is None:
            return False
        try:
            sched.step_terms(int(sched.timesteps[0]))
        except ValueError:
            return False  # a "sample" model: the step has no device statement
        return check(self.bundle, cfg, sched.variance_type == "learned_range")

    def _device_loop(self, pipe: Pipeline, names: tuple[str, ...], x: np.ndarray, values: dict, sched, scale,
                     noise: np.ndarray, progress, done: int, total: int, inter: dict | None) -> np.ndarray:
        """The loop of `names` (the first UNet for every step but the last) on the backend's
        device; the stage's inputs other than sample and timestep are uploaded once."""
        stage = self.stages[names[0]]
        constants = {k: values[src] for k, src in stage.inputs.items() if k not in ("sample", "timestep")}
        record = {} if inter is not None else None
        out = pipe.backend.denoise_unclip([pipe.sessions[n] for n in names], x, constants, sched, scale, noise,
                                          (lambda d, n: progress(done + d, total)) if progress else None, record)
        if inter is not None:
            inter[f"{names[0]}.noise_pred_step0"] = record["noise_pred_step0"]
        return out

    def run(self, pipe: Pipeline, req: Request, noises: KarloNoises | None = None, record: bool = False,
            progress: Callable[[int, int], None] | None = None, warnings: list[str] | None = None) -> Generation:
        warnings = list(warnings or [])
        self._check_request(req)
        dec_sched, sr_sched = self.make_scheduler(req.scheduler), self.make_scheduler(req.scheduler, "super_res")
        try:
            dec_sched.set_timesteps(req.steps)
            sr_sched.set_timesteps(self.super_res_steps)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if noises is None:
            noises = self.noises_for(req)
        else:
            noises.check(req.batch, self.dims, req.steps, self.super_res_steps)
        b = req.batch
        use_cfg = guidance.cfg_enabled(req.guidance_scale)
        timings: dict[str, float] = {}
        inter: dict[str, np.ndarray] = {}
        t_start = time.perf_counter()
        total_steps = len(dec_sched.timesteps) + len(sr_sched.timesteps)

        # 1. one text-encoder call on the guidance batch ["", prompt] (just the prompts without guidance)
        texts = ([""] * b if use_cfg else []) + list(req.prompts)
        tokens = self.tokenizer(texts)
        for text, cut in zip(texts, tokens.truncated):
            if cut:
                warnings.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {text[:60]!r}...")
        values = {"tokens.input_ids": tokens.input_ids}
        self._call(pipe, "text_encoder", values, timings)
        pipe.stage_done("text_encoder")
        text_embeds, hidden = values["text_encoder.text_embeds"], values["text_encoder.text_hidden_states"]
        cond = slice(b, 2 * b) if use_cfg else slice(0, b)

        # 2. the prior: one forward pass on the prompts' rows and the noise
        values.update({"noise.prior": noises.prior, "text_encoder.text_embeds": text_embeds[cond],
                       "text_encoder.text_hidden_states": hidden[cond],
                       "tokens.attention_mask": tokens.attention_mask[cond]})
        self._call(pipe, "prior", values, timings)
        pipe.stage_done("prior")
        image_embeds = values["prior.image_embeds"]

        # 3. text_proj on the guidance batch: unconditional rows get its learned embedding
        rows = 2 * b if use_cfg else b
        values.update({"cfg.image_embeds": np.concatenate([image_embeds] * (rows // b)),
                       "cfg.unconditional": (np.arange(rows) < rows - b).astype(np.int32),
                       "cfg.text_embeds": text_embeds, "cfg.text_hidden_states": hidden,
                       "cfg.attention_mask": tokens.attention_mask})
        self._call(pipe, "text_proj", values, timings)
        pipe.stage_done("text_proj")

        # 4. the decoder loop: guidance on the noise channels, variance from the conditional half
        decoder = pipe.sessions["decoder"]
        dec_stage = self.stages["decoder"]
        latents = (noises.latents * np.float32(dec_sched.init_noise_sigma)).astype(np.float32)
        t0 = time.perf_counter()
        on_device = self._on_device(pipe, dec_sched, use_cfg)
        if on_device:
            latents = self._device_loop(pipe, ("decoder",), latents, values, dec_sched,
                                        req.guidance_scale if use_cfg else None, noises.steps, progress, 0, total_steps,
                                        inter if record else None)
        for i, t in enumerate([] if on_device else dec_sched.timesteps):  # else: the host loop
            values["loop.sample"] = guidance.cfg_batch(latents) if use_cfg else latents
            values["loop.timestep"] = np.array([t], dtype=np.float32)
            out = decoder.run({k: values[src] for k, src in dec_stage.inputs.items()})["noise_pred"]
            if record and i == 0:
                inter["decoder.noise_pred_step0"] = out
            if use_cfg:
                uncond, cond_out = np.split(out, 2, axis=0)
                eps = guidance.combine(np.concatenate([uncond[:, :CHANNELS], cond_out[:, :CHANNELS]]),
                                       req.guidance_scale)
                out = np.concatenate([eps, cond_out[:, CHANNELS:]], axis=1)
            latents = dec_sched.step(out, int(t), latents, dec_sched.prev_timestep(i), noises.steps[i])
            if progress:
                progress(i + 1, total_steps)
        pipe.stage_done("decoder")
        timings["decoder"] = time.perf_counter() - t0
        timings["decoder_per_step"] = timings["decoder"] / len(dec_sched.timesteps)
        image_small = np.clip(latents, -1.0, 1.0)

        # 5. upsample (torch's antialiased bicubic, as diffusers calls it), 6. super-resolution
        t0 = time.perf_counter()
        q = self.dims["Q"]
        values["sr.image_upscaled"] = resize_bicubic_aa(image_small, q, q)
        timings["upsample"] = time.perf_counter() - t0
        x = (noises.sr_latents * np.float32(sr_sched.init_noise_sigma)).astype(np.float32)
        n = len(sr_sched.timesteps)
        t0 = time.perf_counter()
        on_device = self._on_device(pipe, sr_sched, False)
        if on_device:
            x = self._device_loop(pipe, ("super_res_first", "super_res_last"), x, values, sr_sched, None,
                                  noises.sr_steps, progress, len(dec_sched.timesteps), total_steps,
                                  inter if record else None)
        for i, t in enumerate([] if on_device else sr_sched.timesteps):  # else: the host loop
            name = "super_res_last" if i == n - 1 else "super_res_first"
            values["sr.sample"], values["sr.timestep"] = x, np.array([t], dtype=np.float32)
            stage = self.stages[name]
            eps = pipe.sessions[name].run({k: values[src] for k, src in stage.inputs.items()})["noise_pred"]
            if record and i == 0:
                inter["super_res_first.noise_pred_step0"] = eps
            x = sr_sched.step(eps, int(t), x, sr_sched.prev_timestep(i), noises.sr_steps[i])
            if progress:
                progress(len(dec_sched.timesteps) + i + 1, total_steps)
        pipe.stage_done("super_res_first")
        pipe.stage_done("super_res_last")
        timings["super_res"] = time.perf_counter() - t0
        image = np.clip(x * np.float32(0.5) + np.float32(0.5), 0.0, 1.0).transpose(0, 2, 3, 1)
        warnings += pipe.backend_warnings()
        timings["total"] = time.perf_counter() - t_start

        if record:
            inter.update({
                # the prompts' rows: what the prior got (the reference's separate prior-side call)
                "text_encoder.text_embeds": text_embeds[cond],
                "text_encoder.text_hidden_states": hidden[cond],
                "prior.image_embeds": image_embeds,
                "text_proj.encoder_hidden_states": values["text_proj.encoder_hidden_states"],
                "text_proj.class_labels": values["text_proj.class_labels"],
                "decoder.image_small": image_small,
                "upsample.image_upscaled": values["sr.image_upscaled"],
                "super_res.image": image,
            })
        return Generation(to_uint8(image), req, noises, timings, warnings, inter)
