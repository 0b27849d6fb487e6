"""The PyTorch reference of a Karlo bundle: diffusers' own UnCLIPPipeline (its text_proj,
decoder loop with guidance and learned variance, antialiased bicubic upsample, super-resolution
loop and UnCLIPScheduler) with the ECLIPSE prior's image embedding injected in place of its
diffusion prior, on the runtime's noises.

The ECLIPSE Karlo pipeline runs the text encoder once on the prompts for the prior (one forward
pass on the prior noise), then hands the embedding to the unCLIP decoder. Here the prior slot of
UnCLIPPipeline holds a stand-in that returns that embedding (identical guidance halves, so the
prior's guidance leaves it unchanged) with a one-step scheduler that passes it through; the
decoder and super-resolution draw their variance noise from the runtime's arrays (the scheduler's
randn_tensor is patched for the call). Forward hooks record the per-stage outputs.
"""

from __future__ import annotations

import functools
import gc
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from eclipse_export.export.sources import StackSource
from eclipse_export.families.karlo.components import COMPONENTS, MIN_IMAGE_PSNR_DB
from eclipse_export.metrics.parity import ParityReport, compare, psnr
from eclipse_export.runtime.images import to_uint8
from eclipse_export.runtime.request import Request
from eclipse_export.verify.reference import ReferenceError, SourceModules
from eclipse_export.verify.torch_noise import inject_unclip_variance_noise

# per-stage outputs compared (names as in the Karlo driver's intermediates), in chain order;
# those after a sampling loop are bounded by cosine + the image PSNR (Tolerance.chained)
STAGES = ("text_encoder.text_embeds", "text_encoder.text_hidden_states", "prior.image_embeds",
          "text_proj.encoder_hidden_states", "text_proj.class_labels", "decoder.noise_pred_step0",
          "upsample.image_upscaled", "super_res_first.noise_pred_step0", "super_res.image")
CHAINED = ("upsample.image_upscaled", "super_res_first.noise_pred_step0", "super_res.image")


class _InjectedPrior(torch.nn.Module):
    """Stands in UnCLIPPipeline's prior slot: returns the ECLIPSE embedding for every row."""

    def __init__(self, embeds: torch.Tensor):
        super().__init__()
        self.register_buffer("embeds", embeds)
        self.config = SimpleNamespace(embedding_dim=embeds.shape[1])

    @property
    def device(self):  # DiffusionPipeline asks its modules (diffusers' ModelMixin has these)
        return self.embeds.device

    @property
    def dtype(self):
        return self.embeds.dtype

    def forward(self, latents, timestep=None, proj_embedding=None, encoder_hidden_states=None, attention_mask=None):
        reps = latents.shape[0] // self.embeds.shape[0]
        return SimpleNamespace(predicted_image_embedding=self.embeds.repeat(reps, 1))

    def post_process_latents(self, latents):
        return latents


class _PassThroughScheduler:
    """One prior 'step' whose result is the model output itself."""

    init_noise_sigma = 1.0

    def set_timesteps(self, n, device=None):
        self.timesteps = torch.tensor([0])

    def step(self, model_output, timestep, sample, generator=None, prev_timestep=None):
        return SimpleNamespace(prev_sample=model_output)


class KarloReference(SourceModules):
    def __init__(self, source: StackSource, tokenizer_dir: Path, scheduler_configs: dict[str, dict],
                 expected_weights: dict[str, str] | None = None, keep_loaded: bool = False):
        # keep_loaded: eclipse-bench runs the reference several times (minutes of loading for
        # random full-size weights)
        self._init_modules(source, expected_weights, keep_loaded)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.scheduler_configs = scheduler_configs

    @torch.no_grad()
    def run(self, req: Request, noises, super_res_steps: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Stage outputs and seconds per stage, timed as the runtime's Karlo driver times them
        (text_proj, decoder loop, upsample, super-resolution loop). super_res_steps: the
        noises' (one variance noise per step)."""
        from diffusers import UnCLIPPipeline, UnCLIPScheduler
        from transformers import CLIPTokenizer

        timings: dict[str, float] = {}
        out: dict[str, np.ndarray] = {}
        tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_dir)
        text_encoder = self._load("text_encoder")
        t0 = time.perf_counter()
        tok = tokenizer(list(req.prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        enc = text_encoder(tok.input_ids)
        timings["text_encoder"] = time.perf_counter() - t0
        prior = self._load("prior")
        t0 = time.perf_counter()
        embeds = prior(torch.from_numpy(noises.prior), enc.text_embeds, enc.last_hidden_state,
                       tok.attention_mask.bool())
        timings["prior"] = time.perf_counter() - t0
        out.update({"text_encoder.text_embeds": enc.text_embeds.numpy(),
                    "text_encoder.text_hidden_states": enc.last_hidden_state.numpy(),
                    "prior.image_embeds": embeds.numpy()})
        if not self.keep_loaded:
            del prior
            gc.collect()
        if super_res_steps is None:
            super_res_steps = len(noises.sr_steps)

        modules = {name: self._load(name) for name in ("text_proj", "decoder", "super_res_first", "super_res_last")}
        pipe = UnCLIPPipeline(prior=_InjectedPrior(embeds), text_encoder=text_encoder, tokenizer=tokenizer,
                              prior_scheduler=_PassThroughScheduler(),
                              decoder_scheduler=UnCLIPScheduler.from_config(self.scheduler_configs["decoder"]),
                              super_res_scheduler=UnCLIPScheduler.from_config(self.scheduler_configs["super_res"]),
                              **modules)
        pipe.set_progress_bar_config(disable=True)
        seen: dict[str, np.ndarray] = {}

        def keep(name, value):
            if name not in seen:
                seen[name] = value.detach().float().numpy().copy()

        # (a forward hook that returns something replaces the module's output: these return None)
        def on_text_proj(module, args, output):
            keep("text_proj.encoder_hidden_states", output[0])
            keep("text_proj.class_labels", output[1])

        def on_decoder(module, args, output):
            keep("decoder.noise_pred_step0", output.sample)

        def on_super_res(module, args, kwargs, output):
            keep("upsample.image_upscaled", kwargs["sample"][:, 3:])
            keep("super_res_first.noise_pred_step0", output.sample)

        # stage boundaries inside diffusers' call: text_proj's forward; the decoder loop from its
        # first UNet call to the first super-resolution call, less the upsample (torch's
        # interpolate, timed where diffusers calls it); the super-resolution loop to the end
        marks: dict[str, float] = {}

        inside = []  # UNet forwards running: their own (nearest) interpolate calls are not the upsample

        def mark(name, unet=True):
            def hook(*_):
                marks.setdefault(name, time.perf_counter())
                if unet:
                    inside.append(name)
            return hook

        def leave(*_):
            inside.pop()

        def on_text_proj_done(module, args, output):
            marks["text_proj_end"] = time.perf_counter()

        hooks = [modules["text_proj"].register_forward_hook(on_text_proj),
                 modules["text_proj"].register_forward_pre_hook(mark("text_proj", unet=False)),
                 modules["text_proj"].register_forward_hook(on_text_proj_done),
                 modules["decoder"].register_forward_pre_hook(mark("decoder")),
                 modules["decoder"].register_forward_hook(on_decoder),
                 modules["decoder"].register_forward_hook(leave),
                 modules["super_res_first"].register_forward_pre_hook(mark("super_res")),
                 modules["super_res_first"].register_forward_hook(on_super_res, with_kwargs=True),
                 modules["super_res_first"].register_forward_hook(leave),
                 modules["super_res_last"].register_forward_pre_hook(mark("super_res_last")),
                 modules["super_res_last"].register_forward_hook(leave)]
        upsample = []
        interpolate = torch.nn.functional.interpolate

        # wraps: diffusers reads interpolate's signature to decide on antialias=True
        @functools.wraps(interpolate)
        def timed_interpolate(*args, **kwargs):
            if inside:
                return interpolate(*args, **kwargs)
            t = time.perf_counter()
            result = interpolate(*args, **kwargs)
            upsample.append(time.perf_counter() - t)
            return result
        # the last step of each loop is t = 0, which draws no noise
        injected = iter(list(noises.steps[:-1]) + list(noises.sr_steps[:-1]))
        t0 = time.perf_counter()
        torch.nn.functional.interpolate = timed_interpolate
        try:
            with inject_unclip_variance_noise(injected):
                image = pipe(list(req.prompts), prior_num_inference_steps=1, decoder_num_inference_steps=req.steps,
                             super_res_num_inference_steps=super_res_steps,
                             prior_latents=torch.zeros(req.batch, embeds.shape[1]),
                             decoder_latents=torch.from_numpy(noises.latents),
                             super_res_latents=torch.from_numpy(noises.sr_latents),
                             prior_guidance_scale=req.guidance_scale, decoder_guidance_scale=req.guidance_scale,
                             output_type="np", return_dict=False)[0]
        finally:
            torch.nn.functional.interpolate = interpolate
            for h in hooks:
                h.remove()
        end = time.perf_counter()
        timings["text_proj"] = marks["text_proj_end"] - marks["text_proj"]
        if len(upsample) != 1:  # the pipeline's one 64 -> 256 upsample (diffusers changed?)
            raise ReferenceError(f"expected one upsample between the decoder and the super-resolution, saw {len(upsample)}")
        timings["upsample"] = upsample[0]
        timings["decoder"] = marks["super_res"] - marks["decoder"] - timings["upsample"]
        timings["decoder_per_step"] = timings["decoder"] / req.steps
        timings["super_res"] = end - marks["super_res"]
        if not self.keep_loaded:
            del pipe, modules
            gc.collect()
        out.update(seen)
        out["super_res.image"] = np.asarray(image, dtype=np.float32)
        timings["total"] = sum(v for k, v in timings.items() if not k.endswith("_per_step"))
        return out, timings


def reference_for(bundle, keep_loaded: bool = False):
    from eclipse_export.export.source_factory import source_from_manifest

    weights = {name: entry.get("weights_sha256") for name, entry in bundle.manifest["components"].items()}
    configs = {"decoder": bundle.json("decoder_scheduler_config.json"),
               "super_res": bundle.json("super_res_scheduler_config.json")}
    return KarloReference(source_from_manifest(bundle.manifest["source"]), bundle.path("tokenizer/tokenizer.json").parent,
                          configs, weights, keep_loaded=keep_loaded)


def parity_report(outputs: dict, images, reference: dict, precision: str) -> ParityReport:
    report = ParityReport(precision=precision, min_image_psnr_db=MIN_IMAGE_PSNR_DB[precision])
    for stage in STAGES:
        component = stage.split(".")[0]
        spec = COMPONENTS.get(component) or COMPONENTS["super_res_first" if component == "super_res" else "decoder"]
        tol = spec.tolerance(precision)
        report.stages.append(compare(stage, outputs[stage], reference[stage], tol.chained() if stage in CHAINED else tol))
    report.image_psnr_db = psnr(images, to_uint8(reference["super_res.image"]))
    return report


def compare_karlo(pipeline, generation) -> tuple[ParityReport, dict]:
    reference = reference_for(pipeline.bundle)
    outputs, timings = reference.run(generation.request, generation.noises, pipeline.chain.super_res_steps)
    report = parity_report(generation.intermediates, generation.images, outputs, pipeline.bundle.precision)
    del reference, outputs
    gc.collect()
    return report, timings
