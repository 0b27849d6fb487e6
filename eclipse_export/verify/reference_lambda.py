"""The PyTorch λ-ECLIPSE reference, written after the official inference code: transformers'
CLIPTokenizer, CLIPTextModelWithProjection, CLIPImageProcessor and CLIPVisionModelWithProjection;
the keyword's sub-tokens (tokenizer(keyword).input_ids[1:-1]) located in the prompt's ids with
np.where and overwritten subject by subject; the project's λ prior module; then diffusers'
KandinskyV22Pipeline on the runtime's noises (ReferencePipeline.decode). Independent of
runtime/subjects.py, which it checks."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch

from eclipse_export.runtime.noise import Noises
from eclipse_export.runtime.pipeline import Request
from eclipse_export.verify.reference import ReferencePipeline


class LambdaReferencePipeline(ReferencePipeline):
    def __init__(self, *args, image_processor_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_processor_dir = Path(image_processor_dir)

    def _processor(self):
        # the PIL implementation (transformers' original CLIPImageProcessor): transformers 5 names
        # it CLIPImageProcessorPil and makes CLIPImageProcessor the torchvision one when it can
        try:
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:  # transformers 4
            from transformers import CLIPImageProcessor as Processor
        return Processor.from_pretrained(self.image_processor_dir)

    @torch.no_grad()
    def run(self, req: Request, noises: Noises) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        from PIL import Image

        out: dict[str, np.ndarray] = {}
        timings: dict[str, float] = {}
        batch = req.batch
        tokenizer, tok, text_embeds, hidden = self._encode_text(list(req.prompts), timings)

        processor = self._processor()
        image_encoder = self._load("image_encoder")
        size = image_encoder.config.image_size
        zero = image_encoder(torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)).image_embeds

        def embed(image, key):
            pixels = processor(Image.fromarray(image.pixels), return_tensors="pt").pixel_values
            self._sync()
            t = time.perf_counter()
            emb = image_encoder(pixels.to(self.device, self.dtype)).image_embeds
            self._sync()
            timings[key] = time.perf_counter() - t
            return emb

        subject_embeds = [embed(image, f"image_encoder.subject{i}") for i, (image, _) in enumerate(req.subjects)]
        control = embed(req.control, "image_encoder.control") if req.control is not None else zero
        timings["image_encoder"] = sum(v for k, v in timings.items() if k.startswith("image_encoder."))
        del image_encoder
        gc.collect()

        # the official interleaving, per prompt of the batch
        new_hidden = hidden.detach().cpu().numpy().copy()
        ids = tok.input_ids.numpy()
        for (_, keyword), emb in zip(req.subjects, subject_embeds):
            for tid in tokenizer(keyword)["input_ids"][1:-1]:
                for b in range(batch):
                    new_hidden[b, np.where(ids[b] == tid)[0]] = emb[0].float().cpu().numpy()
        interleaved = self._t(new_hidden)

        prior = self._load("prior")
        self._sync()
        t0 = time.perf_counter()
        image_embeds = prior(self._t(noises.prior), text_embeds, interleaved, tok.attention_mask.bool().to(self.device),
                             control.repeat(batch, 1))
        self._sync()
        timings["prior"] = time.perf_counter() - t0
        del prior
        gc.collect()
        negative = zero.repeat(batch, 1)

        self.decode(req, noises, image_embeds, negative, out, timings)

        def np32(t):
            return t.detach().float().cpu().numpy()

        out.update({
            "text_encoder.text_embeds": np32(text_embeds),
            "text_encoder.text_hidden_states": np32(hidden),
            **{f"image_encoder.subject{i}": np32(e) for i, e in enumerate(subject_embeds)},
            "image_encoder.control": np32(control),
            "prior.text_hidden_states": new_hidden,
            "prior.image_embeds": np32(image_embeds),
            "prior.negative_image_embeds": np32(negative),
        })
        timings["total"] = sum(v for k, v in timings.items()
                               if k != "unet_per_step" and not k.startswith("image_encoder."))
        return out, timings
