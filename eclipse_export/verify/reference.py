"""The PyTorch reference: the same sources and semantics, run by the upstream libraries.

Text: transformers' CLIPTokenizer + CLIPTextModelWithProjection. Prior: the ECLIPSE module.
Decoder: diffusers' own KandinskyV22Pipeline (UNet loop, CFG, scheduler) with the same initial
latents and the same DDPM variance noises as the runtime, then diffusers' MoVQ decode.
Components are loaded one at a time and freed after use, so a full-size comparison fits in
memory next to the runtime's sessions.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch

from eclipse_export.export.sources import StackSource, state_dict_sha256
from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.pipeline import Request
from eclipse_export.verify.torch_noise import inject_ddpm_variance_noise


class ReferenceError(RuntimeError):
    """The reference cannot reproduce the bundle's weights (so a comparison would be meaningless)."""


class SourceModules:
    """A reference's torch modules, rebuilt from the bundle's source: each checked against the
    weight hashes recorded at export, timed (load_seconds), and kept only with keep_loaded
    (benchmarks run many times and must not time or repeat the loading; a one-off comparison
    frees each component after use to keep peak memory low)."""

    def _init_modules(self, source: StackSource, expected_weights: dict[str, str] | None, keep_loaded: bool,
                      dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.source = source
        self.expected_weights = expected_weights or {}
        self.dtype, self.device = dtype, device
        self.keep_loaded = keep_loaded
        self._cache: dict[str, torch.nn.Module] = {}
        self.load_seconds: dict[str, float] = {}

    def _load(self, component: str):
        if component in self._cache:
            return self._cache[component]
        t0 = time.perf_counter()
        module = self.source.load(component)
        want = self.expected_weights.get(component)
        if want and state_dict_sha256(module) != want:
            raise ReferenceError(
                f"{component}: the weights rebuilt from the bundle's source differ from the exported ones "
                "(different torch/diffusers version or changed checkpoint)"
            )
        if self.dtype != torch.float32:
            module = module.to(self.dtype)
        module = module.to(self.device)
        self.load_seconds[component] = time.perf_counter() - t0
        if self.keep_loaded:
            self._cache[component] = module
        return module


class ReferencePipeline(SourceModules):
    def __init__(self, source: StackSource, tokenizer_dir: Path, scheduler_config: dict,
                 expected_weights: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", keep_loaded: bool = False):
        self._init_modules(source, expected_weights, keep_loaded, dtype, device)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.scheduler_config = scheduler_config

    def _negative_image_embeds(self) -> np.ndarray:
        # recomputed from the source's image encoder: checks the bundle's stored constant too
        if "negative" not in self._cache:
            value = self.source.negative_image_embeds()
            if not self.keep_loaded:
                return value
            self._cache["negative"] = value
        return self._cache["negative"]

    def _scheduler(self, kind: str | None):
        from diffusers import DDIMScheduler, DDPMScheduler

        name = kind or {"DDIMScheduler": "ddim"}.get(self.scheduler_config.get("_class_name"), "ddpm")
        cls = DDIMScheduler if name == "ddim" else DDPMScheduler
        return cls.from_config(self.scheduler_config)

    def _t(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def _encode_text(self, texts: list[str], timings: dict):
        """transformers' CLIPTokenizer + the text encoder (timed, then freed): (the tokenizer,
        tokens, pooled text_embeds, last hidden state)."""
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_dir)
        tok = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        text_encoder = self._load("text_encoder")
        self._sync()
        t0 = time.perf_counter()
        enc = text_encoder(tok.input_ids.to(self.device))
        self._sync()
        timings["text_encoder"] = time.perf_counter() - t0
        text_embeds, hidden = enc.text_embeds, enc.last_hidden_state
        del text_encoder, enc
        gc.collect()
        return tokenizer, tok, text_embeds, hidden

    @torch.no_grad()
    def run(self, req: Request, noises: Noises) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Returns (stage outputs named like the runtime's intermediates, seconds per stage)."""

        out: dict[str, np.ndarray] = {}
        timings: dict[str, float] = {}
        batch = req.batch
        texts = list(req.prompts) + ([req.negative_prompt] * batch if req.negative_prompt is not None else [])

        _, tok, text_embeds, hidden = self._encode_text(texts, timings)

        prior = self._load("prior")
        self._sync()
        t0 = time.perf_counter()
        embeds = prior(self._t(noises.prior), text_embeds, hidden, tok.attention_mask.bool().to(self.device))
        self._sync()
        timings["prior"] = time.perf_counter() - t0
        del prior
        gc.collect()
        if req.negative_prompt is not None:
            image_embeds, negative = embeds[:batch], embeds[batch:]
        else:
            image_embeds = embeds
            negative = self._t(self._negative_image_embeds()).repeat(batch, 1)

        self.decode(req, noises, image_embeds, negative, out, timings)

        def np32(t):
            return t.detach().float().cpu().numpy()

        out.update({
            "text_encoder.text_embeds": np32(text_embeds),
            "text_encoder.text_hidden_states": np32(hidden),
            "prior.image_embeds": np32(image_embeds),
            "prior.negative_image_embeds": np32(negative),
        })
        timings["total"] = sum(v for k, v in timings.items() if k != "unet_per_step")
        return out, timings

    def decode(self, req: Request, noises: Noises, image_embeds: torch.Tensor, negative: torch.Tensor,
               out: dict, timings: dict) -> None:
        """diffusers' KandinskyV22Pipeline loop on the runtime's noises, then the MoVQ decode;
        adds unet.noise_pred_step0, unet.latents, movq.image to `out`."""
        from diffusers import KandinskyV22Pipeline

        unet, movq = self._load("unet"), self._load("movq")
        scheduler = self._scheduler(req.scheduler)
        pipe = KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
        pipe.set_progress_bar_config(disable=True)
        first_eps = []
        def capture(module, args, output):
            if not first_eps:
                sample = output[0] if isinstance(output, tuple) else output.sample
                first_eps.append(sample[:, : unet.config.in_channels].float().cpu().numpy())

        hook = unet.register_forward_hook(capture)
        steps = noises.steps if noises.steps is not None else np.zeros((0,), np.float32)
        self._sync()
        t0 = time.perf_counter()
        with inject_ddpm_variance_noise(iter(list(steps))):
            latents = pipe(
                image_embeds=image_embeds, negative_image_embeds=negative, height=req.height, width=req.width,
                num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                latents=self._t(noises.latents), output_type="latent", return_dict=False,
            )[0]
        self._sync()
        timings["unet"] = time.perf_counter() - t0
        timings["unet_per_step"] = timings["unet"] / req.steps
        hook.remove()
        del pipe, unet
        gc.collect()

        self._sync()
        t0 = time.perf_counter()
        # Same decode as KandinskyV22Pipeline's output_type="np" branch.
        image = movq.decode(latents, force_not_quantize=True)["sample"]
        image = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        self._sync()
        timings["movq"] = time.perf_counter() - t0
        del movq
        gc.collect()

        out.update({
            "unet.noise_pred_step0": first_eps[0],
            "unet.latents": latents.detach().float().cpu().numpy(),
            "movq.image": image.detach().float().cpu().numpy(),
        })
